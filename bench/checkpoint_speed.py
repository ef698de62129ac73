"""Measure what --save_replay costs: the chunk writes while the replay fills, and the time and
size of a checkpoint (replay tail, ring latents when they are small enough to be saved whole,
checkpoint.pt) with a full replay.

    python bench/checkpoint_speed.py --capacity 200000 --num_envs 16 --model_size tiny

Fills the replay with synthetic steps through Replay.add (as the trainer does, each full chunk
is written at once), writes a checkpoint as Trainer.save does, stores another
--checkpoint_interval steps (the ring overwrites its oldest chunks), writes a second one and
commits it (the overwritten chunks are deleted). Prints one JSON line; the files go to a
temporary folder (--dir to choose), deleted at the end.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

import common  # noqa: F401  (puts the repo root on sys.path)
import train
from replay import Replay, ReplayStore
from run_state import save_checkpoint


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capacity", type=int, default=200_000, help="replay capacity in steps")
    p.add_argument("--num_envs", type=int, default=16)
    p.add_argument("--model_size", default="tiny", choices=list(train.SIZES))
    p.add_argument("--checkpoint_interval", type=int, default=50_000, help="steps between the two checkpoints")
    p.add_argument("--dir", default=None, help="where the files go (default: a temporary folder)")
    args = p.parse_args(argv)

    with common.quiet_stdout():
        cfg = train.Config(model_size=args.model_size, num_envs=args.num_envs, capacity=args.capacity)
        folder = tempfile.mkdtemp(prefix="checkpoint_speed_", dir=args.dir)
        try:
            record = measure(cfg, args, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    common.emit(record)


def measure(cfg, args, folder):
    E, latent = args.num_envs, train.replay_latent(cfg)
    rng = np.random.default_rng(0)
    # A small pool of random frames, cycled: fresh noise for every step would dominate the time.
    pool = rng.integers(0, 256, (8, E, 64, 64, 3), dtype=np.uint8)
    deter = rng.normal(size=(E, latent[0])).astype(np.float32)
    stoch = rng.integers(0, 8, (E, latent[1])).astype(np.uint8)
    zeros, ones = np.zeros(E, np.float32), np.ones(E, bool)
    replay = Replay(args.capacity, E, latent=latent)
    store = ReplayStore(os.path.join(folder, "replay"), replay)
    agent, opt = train.build_agent(cfg, 18, torch.device("cpu"))

    def fill(steps):
        writing = 0.0
        for i in range(steps // E):
            replay.add(pool[i % len(pool)], action=np.full(E, i % 6), reward=zeros, is_first=~ones,
                       is_last=~ones, is_terminal=~ones, deter=deter, stoch=stoch)
            t = time.perf_counter()
            store.after_add()
            writing += time.perf_counter() - t
        return writing

    def checkpoint():
        t = time.perf_counter()
        record = store.save()
        path = os.path.join(folder, "checkpoint.pt")
        save_checkpoint(path, {"agent": agent.state_dict(), "optimizer": opt.state_dict(), "replay": record})
        seconds = time.perf_counter() - t
        store.commit(record)
        size = lambda name: os.path.getsize(os.path.join(store.dir, name))  # noqa: E731
        latent_bytes = size(record["latents"]) if record["latents"] else 0
        return seconds, record, os.path.getsize(path), size(record["tail"]), latent_bytes

    t = time.perf_counter()
    chunk_seconds = fill(args.capacity)
    fill_seconds = time.perf_counter() - t
    chunks = len([n for n in os.listdir(store.dir) if n.startswith("chunk_")])
    first, _, ckpt_bytes, tail_bytes, latent_bytes = checkpoint()
    disk_full = store.disk_bytes()
    fill(args.checkpoint_interval)
    peak = store.disk_bytes()  # the overwritten chunks stay until the next checkpoint is written
    second, *_ = checkpoint()
    return dict(capacity=args.capacity, num_envs=E, model_size=args.model_size,
                chunk_steps=store.chunk * E, chunks=chunks, exact_latents=store.exact,
                chunk_write_seconds_per_chunk=chunk_seconds / max(chunks, 1),
                fill_seconds=fill_seconds, chunk_write_seconds=chunk_seconds,
                checkpoint_seconds=first, second_checkpoint_seconds=second,
                checkpoint_pt_bytes=ckpt_bytes, tail_bytes=tail_bytes, latents_bytes=latent_bytes,
                replay_disk_bytes=disk_full, replay_disk_bytes_before_commit=peak,
                replay_disk_bytes_after_commit=store.disk_bytes(),
                estimate_bytes=train.replay_disk_bytes(
                    train.Config(model_size=args.model_size, capacity=args.capacity,
                                 checkpoint_interval=args.checkpoint_interval)))


if __name__ == "__main__":
    sys.exit(main())
