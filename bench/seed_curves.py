"""The return curves of several runs of one game (e.g. seeds) in one PNG: each run's mean of its
last 10 episodes against agent steps, its episodes as faint points, and the random policy's
level as a dashed line.

    python bench/seed_curves.py runs/cpu-RoadRunner-s0 runs/cpu-RoadRunner-s1 --png roadrunner.png

The random level is --random, or for Atari games the random score of
scores/atari57_random_human.csv. Prints one JSON line: per run its seed, episodes and final mean.
"""
import argparse
import os
import sys

from matplotlib.figure import Figure

import common
from return_curve import curve, random_level


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--png", required=True, help="where the PNG goes")
    p.add_argument("--random", type=float, default=None, help="random policy's return (default: Atari table)")
    p.add_argument("--title", default="", help="the plot's title (default: the first run's env)")
    args = p.parse_args(argv)
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    runs = []
    for i, run_dir in enumerate(args.run_dirs):
        config, points = common.run_config(run_dir), curve(run_dir)
        color = f"C{i}"
        episodes = common.episode_returns(run_dir)
        if episodes:
            ax.scatter(*zip(*episodes), s=4, alpha=0.25, color=color)
        if points:
            ax.plot([q["step"] for q in points], [q["mean_return"] for q in points], color=color,
                    label=f"seed {config.get('seed')}: mean of the last 10")
        runs.append(dict(run_dir=run_dir, seed=config.get("seed"), episodes=len(points),
                         final_mean=points[-1]["mean_return"] if points else None))
    level = args.random if args.random is not None else random_level(args.run_dirs[0])
    if level is not None:
        ax.axhline(level, color="gray", linestyle="--", label=f"random policy ({level:g})")
    ax.set_xlabel("agent steps")
    ax.set_ylabel("return")
    ax.set_title(args.title or common.run_config(args.run_dirs[0]).get("env", ""))
    ax.legend(fontsize="small")
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    fig.savefig(args.png, dpi=100)
    common.emit(dict(png=args.png, random=level, runs=runs))


if __name__ == "__main__":
    sys.exit(main())
