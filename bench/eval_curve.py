"""Learning curve of a run from its kept snapshots (train.py --keep_checkpoints N): each
checkpoint_<step>.pt is evaluated as `train.py --resume checkpoint_<step>.pt --eval_episodes N`
would (the run's env settings and evaluation seeds), and the returns (and, for Atari games, the
human-normalised score) are written against agent steps.

    python bench/eval_curve.py runs/Pong-... --eval_episodes 10

Writes <run_dir>/eval_curve.csv (agent_steps, mean, std, episodes and hns for Atari games; --csv
to choose) and <run_dir>/eval_curve.png (--png), and prints one JSON line. Nothing else is
written: the run's own eval_<step>.json files are left as they are.
"""
import argparse
import csv
import os

import torch
from matplotlib.figure import Figure

import common
import run_state
import train
from evaluate import game_name
from run_state import load_checkpoint


def snapshot_config(checkpoint, args):
    """The run's Config as the snapshot saved it, with this command's evaluation settings."""
    changes = dict(eval_episodes=args.eval_episodes, eval_envs=args.eval_envs, device=args.device)
    if args.eval_greedy is not None:
        changes["eval_greedy"] = args.eval_greedy
    return common.checkpoint_config(checkpoint, **changes)


def plot(rows, path, title):
    """Mean return (± std over the episodes) against agent steps; a second panel of the HNS for
    Atari games."""
    hns = "hns" in rows[0]
    fig = Figure(figsize=(7.0, 6.5 if hns else 4.0), layout="constrained")
    axes = fig.subplots(2 if hns else 1, 1, sharex=True, squeeze=False)[:, 0]
    steps = [r["agent_steps"] for r in rows]
    axes[0].errorbar(steps, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], marker="o",
                     capsize=3, label=f"mean return of {rows[-1]['episodes']} episodes (± std)")
    axes[0].set_ylabel("return")
    axes[0].set_title(title)
    axes[0].legend(fontsize="small")
    if hns:
        axes[1].plot(steps, [r["hns"] for r in rows], marker="o", color="tab:green")
        axes[1].axhline(1.0, color="gray", linestyle="--", linewidth=1, label="human")
        axes[1].axhline(0.0, color="black", linewidth=0.8, label="random")
        axes[1].set_ylabel("human-normalised score")
        axes[1].legend(fontsize="small")
    axes[-1].set_xlabel("agent steps")
    fig.savefig(path, dpi=100)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--eval_episodes", type=int, default=10, help="episodes per snapshot")
    p.add_argument("--eval_envs", type=int, default=4, help="parallel envs of an evaluation")
    p.add_argument("--eval_greedy", action=argparse.BooleanOptionalAction, default=None,
                   help="the most likely action instead of sampling (default: the run's setting)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--csv", default="", help="where the CSV goes (default: <run_dir>/eval_curve.csv)")
    p.add_argument("--png", default="", help="where the PNG goes (default: <run_dir>/eval_curve.png)")
    args = p.parse_args(argv)
    if args.eval_episodes <= 0 or args.eval_envs <= 0:
        p.error("--eval_episodes and --eval_envs must be positive")
    if not os.path.isdir(args.run_dir):
        raise SystemExit(f"error: {args.run_dir} is not a directory")
    found = run_state.snapshots(args.run_dir)
    if not found:
        raise SystemExit(f"error: {args.run_dir} holds no checkpoint_<step>.pt (train with --keep_checkpoints N)")
    common.set_threads(args.threads)

    rows = []
    with common.quiet_stdout():
        for _, path in found:
            try:
                checkpoint = load_checkpoint(path, evaluation=True)
                cfg = snapshot_config(checkpoint, args)
                record = train.evaluate_checkpoint(cfg, checkpoint, report=False)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
            row = dict(agent_steps=record["step"], mean=record["mean"], std=record["std"],
                       episodes=record["episodes"])
            if "hns" in record:
                row["hns"] = record["hns"]
            rows.append(row)
        csv_path = args.csv or os.path.join(args.run_dir, "eval_curve.csv")
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        title = f"{os.path.basename(os.path.normpath(args.run_dir))} ({game_name(cfg.env) or cfg.env})"
        png = plot(rows, args.png or os.path.join(args.run_dir, "eval_curve.png"), title)
    common.emit(dict(run_dir=args.run_dir, env=cfg.env, snapshots=len(rows), csv=csv_path, png=png,
                     device=str(torch.device(args.device)), last=rows[-1],
                     best=max(rows, key=lambda r: r["mean"])))


if __name__ == "__main__":
    main()
