"""Time the collection path: vector env step + episode bookkeeping + replay add (+ agent.act).

    python bench/env_speed.py --num_envs 16 --steps 4000              # random actions
    python bench/env_speed.py --num_envs 16 --policy 50m --device cuda

Mirrors train.Trainer.collect without training. Env creation and the first reset are not timed.
Prints one JSON line.
"""
import argparse
import math
import sys
import time

import common  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import torch

import train
from env import Episodes, make_vector_env


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
        replay = train.Replay(args.steps + args.num_envs * 64, args.num_envs, seed=args.seed)
        envs = make_vector_env(args.env, args.num_envs)
        try:
            num_actions = int(envs.single_action_space.n)
            device = agent = state = None
            if args.policy != "none":
                device = train.pick_device(args.device)
                cfg = train.Config(env=args.env, model_size=args.policy)
                agent, _ = train.build_agent(cfg, num_actions, device)
                state = agent.initial_state(args.num_envs, device)
            rng = np.random.default_rng(args.seed)
            episodes = Episodes(args.num_envs)
            obs, _ = envs.reset(seed=args.seed)

            start = time.perf_counter()
            for _ in range(iterations):
                if agent is None:
                    action = rng.integers(0, num_actions, args.num_envs)
                else:
                    obs_t = torch.as_tensor(obs, device=device)
                    first_t = torch.as_tensor(episodes.is_first, device=device)
                    action, state = agent.act(obs_t, first_t, state)
                    action = action.cpu().numpy()  # also waits for the GPU
                replay.add(obs, action=action, reward=episodes.reward, is_first=episodes.is_first,
                           is_last=episodes.is_last, is_terminal=episodes.is_terminal)
                obs, reward, terminated, truncated, _ = envs.step(action)
                episodes.step(reward, terminated, truncated)
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
