"""The softmax over a short last axis on the CPU: torch's kernel against `model.softmax` (the
same softmax across a transposed view), alone and inside the whole update.

    python bench/softmax_speed.py                 # the CPU preset's shape, one torch thread
    python bench/softmax_speed.py --pairs 60

Prints one JSON line:
- `ops`: for each tensor shape of a tiny update's softmaxes (the (N, 32 latents, 8 classes)
  priors and posteriors, the (N, actions) policy), the microseconds of `torch.softmax(x, -1)` and
  of `model.softmax(x)`, forward alone and forward + backward (median of --repeats);
- `update_plain_s`, `update_ours_s`: the median seconds of one update with each, taken in turn in
  one process (plain, ours, ours, plain, ...), so that the machine's drift falls on both alike;
  `update_ratio`: the median of the pairs' ours / plain, with its quartiles.
"""
import argparse
import contextlib
import statistics
import time

import torch

import common  # also puts the repo root on sys.path
import model
import train
from profile_update import cpu_update, timed


def plain_softmax(x):
    return torch.softmax(x, -1)


def op_times(shape, repeats):
    x = torch.randn(shape).requires_grad_()
    grad = torch.randn(shape)
    row = dict(shape=list(shape))
    for name, fn in (("torch", plain_softmax), ("ours", model.softmax)):
        with torch.no_grad():
            row[f"{name}_us"] = 1e6 * timed(lambda: fn(x), repeats)
        row[f"{name}_fwd_bwd_us"] = 1e6 * timed(lambda: fn(x).backward(grad), repeats)
    return row


def main(argv=None):
    preset = train.PRESETS["cpu"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=preset["batch_size"])
    p.add_argument("--sequence_length", type=int, default=preset["sequence_length"])
    p.add_argument("--horizon", type=int, default=15, help="imagination horizon")
    p.add_argument("--num_actions", type=int, default=6)
    p.add_argument("--pairs", type=int, default=30, help="updates with each softmax, taken in turn")
    p.add_argument("--repeats", type=int, default=200, help="timed calls of each softmax alone")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.pairs, args.repeats) < 1:
        p.error("--pairs and --repeats must be >= 1")

    with common.quiet_stdout():
        threads, agent, opt, batch = cpu_update(args, "tiny")
        n = args.batch_size * args.sequence_length
        classes = train.SIZES["tiny"]["classes"]
        ops = [op_times(shape, args.repeats)
               for shape in ((n, 32, classes), (args.batch_size, 32, classes), (n, args.num_actions))]

        fns, times = dict(plain=plain_softmax, ours=model.softmax), dict(plain=[], ours=[])
        try:
            for i in range(args.pairs + 1):  # the first pair warms up
                for name in ("plain", "ours") if i % 2 else ("ours", "plain"):
                    model.softmax = fns[name]  # unimix looks it up at each call
                    start = time.perf_counter()
                    train.train_step(agent, opt, batch, autocast=contextlib.nullcontext())
                    if i:
                        times[name].append(time.perf_counter() - start)
        finally:
            model.softmax = fns["ours"]
    ratios = [ours / plain for ours, plain in zip(times["ours"], times["plain"])]
    common.emit(dict(
        batch_size=args.batch_size, sequence_length=args.sequence_length, horizon=args.horizon,
        threads=threads, torch=torch.__version__, ops=ops, pairs=args.pairs,
        update_plain_s=statistics.median(times["plain"]), update_ours_s=statistics.median(times["ours"]),
        update_ratio=statistics.median(ratios),
        update_ratio_quartiles=statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3,
    ))


if __name__ == "__main__":
    main()
