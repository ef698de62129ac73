"""Time one update (train.train_step with the gradient all-reduce of a torchrun job) at world
size 1 and 2 on this machine's CPU, one process per rank over gloo, each with its own batch.

    python bench/ddp_speed.py --model_size tiny --world_sizes 1 2

Prints one JSON line per world size: seconds per update (the slowest rank's median), the seconds
of the gradient average alone (distributed.average_gradients: one flat all-reduce, in place), the
size of the gradients, and the job's replayed steps per second (ranks × B × T per update). On
CPU the ranks share the cores, so the figures check that the distributed path runs, not how it
scales on GPUs.
"""
import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

import common  # also puts the repo root on sys.path
import distributed
import train
from update_speed import synthetic_batch


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gradient_bytes(model_size, num_actions):
    """Bytes of the fp32 gradients that an update averages (counted on the meta device)."""
    agent, _ = train.build_agent(train.Config(model_size=model_size), num_actions, torch.device("meta"))
    return 4 * sum(p.numel() for p in agent.parameters())


def rank_main(rank, world, port, args, queue):
    if world > 1:  # the variables torchrun would set
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                          RANK=str(rank), LOCAL_RANK=str(rank))
        distributed.init("cpu")
    torch.set_num_threads(args.threads)
    train.seed_everything(args.seed)
    cfg = train.Config(model_size=args.model_size, batch_size=args.batch_size,
                       sequence_length=args.sequence_length, imagination_horizon=args.horizon)
    agent, opt = train.build_agent(cfg, args.num_actions, torch.device("cpu"))
    distributed.synchronise(agent)
    batch = synthetic_batch(args.batch_size, args.sequence_length, args.num_actions,
                            torch.device("cpu"), args.seed + rank)
    times, reduce_times = [], []
    for i in range(args.warmup_updates + args.updates):
        start = time.perf_counter()
        train.train_step(agent, opt, batch)
        if i >= args.warmup_updates:
            times.append(time.perf_counter() - start)
    for _ in range(args.updates):  # the gradient average alone, on the last update's gradients
        start = time.perf_counter()
        distributed.average_gradients(agent.parameters(), torch.tensor(True))
        reduce_times.append(time.perf_counter() - start)
    queue.put((statistics.median(times), statistics.median(reduce_times)))
    distributed.close()
    if world > 1:
        # A spawned gloo rank sometimes aborts at interpreter exit, after its work is done and its
        # group destroyed ("terminate called without an active exception", about 1 exit in 10 on
        # this torch): leave without the C++ teardown, as the result is already sent.
        os._exit(0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_size", default="tiny", choices=list(train.SIZES))
    p.add_argument("--batch_size", type=int, default=16, help="B per rank")
    p.add_argument("--sequence_length", type=int, default=64)
    p.add_argument("--horizon", type=int, default=15, help="imagination horizon")
    p.add_argument("--world_sizes", type=int, nargs="+", default=[1, 2])
    common.add_timing_args(p, warmup=1, updates=3, threads=1, threads_help="torch CPU threads per rank")
    args = p.parse_args(argv)
    if args.updates < 1 or min(args.world_sizes) < 1:
        p.error("--updates and --world_sizes must be >= 1")

    for world in args.world_sizes:
        with common.quiet_stdout():
            queue = mp.get_context("spawn").SimpleQueue()
            mp.spawn(rank_main, args=(world, free_port(), args, queue), nprocs=world)
            # An update ends when the slowest rank's does.
            median, reduce = (max(column) for column in zip(*[queue.get() for _ in range(world)]))
        common.emit(dict(
            device="cpu", backend="gloo" if world > 1 else "none", world_size=world,
            model_size=args.model_size, batch_size_per_rank=args.batch_size,
            sequence_length=args.sequence_length, horizon=args.horizon, threads_per_rank=args.threads,
            cpu_count=os.cpu_count(), sec_per_update_median=median, sec_gradient_average_median=reduce,
            gradient_mb=gradient_bytes(args.model_size, args.num_actions) / 2**20,
            replayed_steps_per_sec=world * args.batch_size * args.sequence_length / median,
        ))


if __name__ == "__main__":
    sys.exit(main())
