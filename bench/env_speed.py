"""Time the collection path: vector env step + episode bookkeeping + replay add (+ agent.act).

    python bench/env_speed.py --num_envs 16 --steps 4000              # random actions
    python bench/env_speed.py --num_envs 16 --policy 50m --device cuda

Times env.Collector.step, the same collection step that train.Trainer.collect runs, without
training. Env creation and the first reset are not timed.
Prints one JSON line.
"""
import argparse
import math
import sys
import time

import numpy as np
import torch

import common  # noqa: F401  (puts the repo root on sys.path)
import train
from env import Collector, make_vector_env
from model import AgentPolicy
from replay import Replay


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="ALE/Pong-v5")
    p.add_argument("--num_envs", type=int, default=16)
    p.add_argument("--steps", type=int, default=4000, help="agent steps in total, summed over the envs")
    p.add_argument("--policy", default="none", choices=["none", *train.SIZES],
                   help="none: random actions; else act with a fresh agent of this model size")
    p.add_argument("--device", default="auto", help="for the policy: auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.num_envs < 1 or args.steps < 1:
        p.error("--num_envs and --steps must be positive")

    with common.quiet_stdout():
        threads = common.set_threads(args.threads)
        train.seed_everything(args.seed)
        iterations = math.ceil(args.steps / args.num_envs)
        # Room for every step, so the replay never wraps (as early in training).
        replay = Replay(args.steps + args.num_envs * 64, args.num_envs, seed=args.seed)
        envs = make_vector_env(args.env, args.num_envs)
        try:
            num_actions = int(envs.single_action_space.n)
            device = None
            if args.policy == "none":
                rng = np.random.default_rng(args.seed)
                policy = lambda obs, is_first: rng.integers(0, num_actions, len(obs))  # noqa: E731
            else:
                device = train.pick_device(args.device)
                cfg = train.Config(env=args.env, model_size=args.policy)
                agent, _ = train.build_agent(cfg, num_actions, device)
                policy = AgentPolicy(agent, args.num_envs, device)  # waits for the GPU each step
            collector = Collector(envs, seed=args.seed)

            start = time.perf_counter()
            for _ in range(iterations):
                collector.step(policy, replay.add)
            seconds = time.perf_counter() - start
        finally:
            envs.close()

    steps = iterations * args.num_envs
    common.emit(dict(env=args.env, num_envs=args.num_envs, policy=args.policy,
                     device=device.type if device is not None else "none", steps=steps,
                     seconds=seconds, env_steps_per_sec=steps / seconds, threads=threads,
                     torch=torch.__version__))


if __name__ == "__main__":
    sys.exit(main())
