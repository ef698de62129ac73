"""This machine's matmul peak in a dtype: GFLOP/s of a loop of n×n matmuls (the reference for the
share of peak that bench/update_speed.py reports, measured in the update's own precision: fp32,
or bf16 for a bf16 update, whose tensor-core peak is many times the fp32 one).

    python bench/peak.py --size 2048 --seconds 3 [--dtype bf16]

Prints one JSON line: size, dtype, threads, repeats, gflops (the best of the timed rounds).
"""
import argparse
import sys
import time

import torch

import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_gflops(size=2048, seconds=2.0, device="cpu", dtype="fp32"):
    """Best GFLOP/s over ~`seconds` of size×size matmuls in `dtype` (fp32 or bf16), in rounds of a
    few products."""
    device, dtype = torch.device(device), DTYPES[dtype]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b, out=out)  # warm-up: thread pool, allocator
    sync()
    flops, best, rounds, start = 2 * size ** 3, 0.0, 0, time.perf_counter()
    while rounds < 2 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=out)
        sync()
        best = max(best, 4 * flops / (time.perf_counter() - t0) / 1e9)
        rounds += 1
    return best, 4 * rounds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048, help="matrix size n")
    p.add_argument("--seconds", type=float, default=2.0, help="time to spend (at least two rounds)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    threads = common.set_threads(args.threads)
    gflops, repeats = matmul_gflops(args.size, args.seconds, args.device, args.dtype)
    common.emit(dict(size=args.size, dtype=args.dtype, device=args.device, threads=threads, repeats=repeats,
                     gflops=gflops))


if __name__ == "__main__":
    sys.exit(main())
