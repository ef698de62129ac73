"""Return curve of a run: metrics.jsonl → CSV of (agent steps, wall seconds of the run's jobs, mean
return of the last 10 episodes), one row per finished episode, and a PNG of the curve with the episodes' returns
and the random policy's level as a horizontal line.

    python bench/return_curve.py runs/Pong-.../ > return_curve.csv
    python bench/return_curve.py runs/Pong-.../ --csv curve.csv --random -20.7

The PNG goes to <run_dir>/return_curve.png (--png to choose). The random level is --random, or for
Atari games the random score of scores/atari57_random_human.csv. With --csv the final row is
printed as JSON.
"""
import argparse
import csv
import json
import os
import sys

from matplotlib.figure import Figure

import common
from evaluate import game_name, read_scores


def curve(run_dir, window=10):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    start = min(r["time"] for r in rows) if rows else 0.0
    returns, out = [], []
    for r in rows:
        if "episode/return" in r:
            returns.append(r["episode/return"])
            recent = returns[-window:]
            # The run's own seconds over all its jobs (the gaps between the jobs of a resumed run
            # left out); older logs without them count the clock from the first line.
            wall = r["time/elapsed"] if "time/elapsed" in r else r["time"] - start
            out.append(dict(step=r["step"], wall_s=round(wall, 1),
                            mean_return=round(sum(recent) / len(recent), 3)))
    return out


def random_level(run_dir):
    """The random policy's score of the run's Atari game, or None."""
    game = game_name(common.run_config(run_dir).get("env", ""))
    return read_scores().get(game, {}).get("random")


def plot(run_dir, points, path, random=None):
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    episodes = common.episode_returns(run_dir)
    if episodes:
        ax.scatter(*zip(*episodes), s=4, alpha=0.3, color="tab:blue", label="episode return")
    if points:
        ax.plot([p["step"] for p in points], [p["mean_return"] for p in points], color="tab:blue",
                label="mean of the last 10 episodes")
    if random is not None:
        ax.axhline(random, color="gray", linestyle="--", label=f"random policy ({random:g})")
    ax.set_xlabel("agent steps")
    ax.set_ylabel("return")
    ax.set_title(os.path.basename(os.path.normpath(run_dir)))
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--csv", default="", help="write the CSV here instead of stdout")
    p.add_argument("--png", default="", help="where the PNG goes (default: <run_dir>/return_curve.png)")
    p.add_argument("--random", type=float, default=None,
                   help="random policy's return, drawn as a line (default: from the CSV for Atari games)")
    args = p.parse_args(argv)
    points = curve(args.run_dir)
    level = args.random if args.random is not None else random_level(args.run_dir)
    png = plot(args.run_dir, points, args.png or os.path.join(args.run_dir, "return_curve.png"), level)
    f = open(args.csv, "w", newline="") if args.csv else sys.stdout
    writer = csv.DictWriter(f, fieldnames=["step", "wall_s", "mean_return"])
    writer.writeheader()
    writer.writerows(points)
    if args.csv:
        f.close()
        print(json.dumps(dict(run_dir=args.run_dir, episodes=len(points), **(points[-1] if points else {}),
                              random=level, png=png)))


if __name__ == "__main__":
    main()
