"""Agent steps per second of the training loop, with and without the collection overlap.

    python bench/loop_speed.py --env ALE/Pong-v5 --model_size tiny --num_envs 16 --train_ratio 32

Builds one train.Trainer (as train.py does, without wandb, checkpoints or videos), collects
--learning_starts steps, then runs Trainer.step in blocks of --block iterations, alternating
overlap (the env workers step while the updates run) and the plain order (step the envs, then
update), so that both see the same replay, model and machine load. The stored data is the same
either way (tests/test_env.py). Prints one JSON line: agent steps/s and updates of each order.
"""
import argparse
import sys
import tempfile
import time

import torch

import common  # noqa: F401  (puts the repo root on sys.path)
import train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="ALE/Pong-v5")
    p.add_argument("--model_size", default="tiny", choices=list(train.SIZES))
    p.add_argument("--num_envs", type=int, default=16)
    p.add_argument("--train_ratio", type=float, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--sequence_length", type=int, default=64)
    p.add_argument("--learning_starts", type=int, default=2048)
    p.add_argument("--block", type=int, default=16, help="loop iterations per timed block")
    p.add_argument("--blocks", type=int, default=4, help="timed blocks of each order")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (as train.py's --device)")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (as train.py's --precision)")
    args = p.parse_args(argv)
    if min(args.num_envs, args.block, args.blocks, args.learning_starts) < 1:
        p.error("--num_envs, --block, --blocks and --learning_starts must be positive")

    with common.quiet_stdout(), tempfile.TemporaryDirectory() as run_dir:
        threads = common.set_threads(args.threads)
        cfg = train.Config(env=args.env, model_size=args.model_size, num_envs=args.num_envs,
                           train_ratio=args.train_ratio, batch_size=args.batch_size,
                           sequence_length=args.sequence_length, learning_starts=args.learning_starts,
                           capacity=max(args.learning_starts * 4, 10_000), run_dir=run_dir,
                           wandb_mode="disabled", video_interval=0, image_interval=0, device=args.device,
                           precision=args.precision)
        trainer = train.Trainer(cfg, train.prepare(cfg))
        totals = {overlap: dict(agent_steps=0, updates=0, seconds=0.0) for overlap in (True, False)}
        try:
            while trainer.counters["env_steps"] < args.learning_starts:
                trainer.step()
            trainer.step()  # the first update (one-time allocations) is not timed
            for _ in range(args.blocks):
                for overlap in (True, False):
                    c, t = dict(trainer.counters), totals[overlap]
                    start = time.perf_counter()
                    for _ in range(args.block):
                        trainer.step(overlap)
                    t["seconds"] += time.perf_counter() - start
                    t["agent_steps"] += trainer.counters["env_steps"] - c["env_steps"]
                    t["updates"] += trainer.counters["updates"] - c["updates"]
        finally:
            trainer.close()

    row = dict(env=args.env, model_size=args.model_size, num_envs=args.num_envs,
               train_ratio=args.train_ratio, batch=[args.batch_size, args.sequence_length],
               threads=threads, device=str(trainer.device), precision=args.precision, torch=torch.__version__)
    for overlap, name in ((True, "overlap"), (False, "plain")):
        t = totals[overlap]
        row[name] = dict(t, seconds=round(t["seconds"], 3),
                         agent_steps_per_sec=round(t["agent_steps"] / t["seconds"], 2))
    row["speedup"] = round(row["overlap"]["agent_steps_per_sec"] / row["plain"]["agent_steps_per_sec"], 3)
    common.emit(row)


if __name__ == "__main__":
    sys.exit(main())
