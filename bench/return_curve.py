"""Return curve of a run: metrics.jsonl → CSV of (agent steps, wall seconds, mean return of the
last 10 episodes), one row per finished episode. Prints the final row as JSON.

    python bench/return_curve.py runs/Pong-.../ > return_curve.csv
"""
import argparse
import csv
import json
import os
import sys


def curve(run_dir, window=10):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    start = min(r["time"] for r in rows) if rows else 0.0
    returns, out = [], []
    for r in rows:
        if "episode/return" in r:
            returns.append(r["episode/return"])
            recent = returns[-window:]
            out.append(dict(step=r["step"], wall_s=round(r["time"] - start, 1),
                            mean_return=round(sum(recent) / len(recent), 3)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--csv", default="", help="write the CSV here instead of stdout")
    args = p.parse_args(argv)
    points = curve(args.run_dir)
    f = open(args.csv, "w", newline="") if args.csv else sys.stdout
    writer = csv.DictWriter(f, fieldnames=["step", "wall_s", "mean_return"])
    writer.writeheader()
    writer.writerows(points)
    if args.csv:
        f.close()
        print(json.dumps(dict(run_dir=args.run_dir, episodes=len(points),
                              **(points[-1] if points else {}))))


if __name__ == "__main__":
    main()
