"""A run's last training episodes against a uniformly random policy on the same game.

    python bench/versus_random.py runs/Boxing-cpu --episodes 20

The random policy plays `--episodes` episodes with the run's env settings (sticky actions);
the run's score is the mean return of its last `--episodes` training episodes. `above_random`
holds when the run's mean exceeds the random mean by more than two standard errors of both
means together (the random policy's spread over the same number of episodes). Prints one JSON
line.
"""
import argparse
import math
import sys

import numpy as np

import common
from env import make_env
from evaluate import evaluate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--episodes", type=int, default=20, help="last training episodes, and random episodes")
    p.add_argument("--seed", type=int, default=12345)
    args = p.parse_args(argv)
    config = common.run_config(args.run_dir)
    if "env" not in config:
        p.error(f"{args.run_dir}: no checkpoint.pt or config.json to read the env from")
    trained = [ret for _, ret in common.episode_returns(args.run_dir)][-args.episodes:]
    if not trained:
        p.error(f"{args.run_dir}: no finished training episode in metrics.jsonl")

    with common.quiet_stdout():
        envs = min(4, args.episodes)
        rng = np.random.default_rng(args.seed)
        probe = make_env(config["env"], config.get("sticky_actions", 0.25))()
        num_actions = int(probe.action_space.n)
        probe.close()
        random = evaluate(None, config["env"], args.episodes, envs, args.seed,
                          config.get("sticky_actions", 0.25),
                          policy=lambda obs, is_first: rng.integers(0, num_actions, len(obs))).returns

    def stats(x):
        x = np.asarray(x, np.float64)
        return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0

    (tm, ts), (rm, rs) = stats(trained), stats(random)
    margin = 2 * math.sqrt(ts**2 / len(trained) + rs**2 / len(random))
    common.emit(dict(env=config["env"], trained_episodes=len(trained), trained_mean=tm, trained_std=ts,
                     random_episodes=len(random), random_mean=rm, random_std=rs,
                     margin_2se=margin, above_random=bool(tm - rm > margin),
                     last_step=common.episode_returns(args.run_dir)[-1][0]))


if __name__ == "__main__":
    sys.exit(main())
