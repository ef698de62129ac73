"""The return curves of several runs of one game (e.g. seeds) in one PNG: each run's mean of its
last 10 episodes against agent steps, its episodes as faint points, and the random policy's
level as a dashed line.

    python bench/seed_curves.py runs/cpu-RoadRunner-s0 runs/cpu-RoadRunner-s1 --png roadrunner.png
    python bench/seed_curves.py runs/a runs/b --label "ratio 64" --label "ratio 32" --x wall --png ab.png

Each curve is labelled with its run's seed, or with --label (one per run, in order, for runs
that differ in something else). --x wall draws against the run's wall-clock minutes instead of
agent steps, for settings compared at equal time. The random level is --random, or for Atari
games the random score of scores/atari57_random_human.csv. Prints one JSON line: per run its
label, seed, episodes, final mean and last x (agent steps or minutes).
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
    p.add_argument("--label", action="append", default=[], help="a run's label (one per run; default: its seed)")
    p.add_argument("--x", choices=("step", "wall"), default="step", help="agent steps or wall-clock minutes")
    args = p.parse_args(argv)
    if args.label and len(args.label) != len(args.run_dirs):
        p.error(f"--label: {len(args.label)} given for {len(args.run_dirs)} runs (one per run, or none)")
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    runs = []
    for i, run_dir in enumerate(args.run_dirs):
        config, points = common.run_config(run_dir), curve(run_dir)
        color = f"C{i}"
        label = args.label[i] if args.label else f"seed {config.get('seed')}"
        # One curve point per episode, in the episodes' order: the x of each episode is its point's.
        xs = [q["step"] if args.x == "step" else round(q["wall_s"] / 60, 2) for q in points]
        episodes = common.episode_returns(run_dir)
        if episodes:
            ax.scatter(xs, [ret for _, ret in episodes], s=4, alpha=0.25, color=color)
        if points:
            ax.plot(xs, [q["mean_return"] for q in points], color=color, label=f"{label}: mean of the last 10")
        runs.append(dict(run_dir=run_dir, label=label, seed=config.get("seed"), episodes=len(points),
                         final_mean=points[-1]["mean_return"] if points else None, x_end=xs[-1] if xs else None))
    level = args.random if args.random is not None else random_level(args.run_dirs[0])
    if level is not None:
        ax.axhline(level, color="gray", linestyle="--", label=f"random policy ({level:g})")
    ax.set_xlabel("agent steps" if args.x == "step" else "wall-clock minutes")
    ax.set_ylabel("return")
    ax.set_title(args.title or common.run_config(args.run_dirs[0]).get("env", ""))
    ax.legend(fontsize="small")
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    fig.savefig(args.png, dpi=100)
    common.emit(dict(png=args.png, random=level, runs=runs))


if __name__ == "__main__":
    sys.exit(main())
