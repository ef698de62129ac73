"""Measure the resident memory of a full replay.Replay against the nominal 12,288 bytes per frame.

    python bench/replay_memory.py --capacity 200000 --num_envs 16

Fills every slot through Replay.add (zeroed arrays cost no RSS until their pages are written,
so only a full replay shows the real footprint). Prints one JSON line.
"""
import argparse
import sys

import numpy as np

import common  # noqa: F401  (puts the repo root on sys.path)
from replay import Replay

FRAME_BYTES = 64 * 64 * 3


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capacity", type=int, default=200_000, help="replay capacity in steps")
    p.add_argument("--num_envs", type=int, default=16)
    args = p.parse_args(argv)

    with common.quiet_stdout():
        E = args.num_envs
        rng = np.random.default_rng(0)
        # A small pool of random frames, cycled: generating fresh noise for every step would take
        # longer than the filling itself, and the pool's memory is allocated before the baseline.
        pool = rng.integers(0, 256, (8, E, 64, 64, 3), dtype=np.uint8)
        zeros, ones = np.zeros(E, np.float32), np.ones(E, bool)
        before = rss_bytes()
        replay = Replay(args.capacity, E)
        for i in range(replay.length):
            replay.add(pool[i % len(pool)], action=np.full(E, i % 6), reward=zeros,
                       is_first=ones if i == 0 else ~ones, is_last=~ones, is_terminal=~ones)
        increase = rss_bytes() - before
        assert len(replay) == replay.length * E

    nominal = args.capacity * FRAME_BYTES
    common.emit(dict(capacity=args.capacity, num_envs=E, stored_steps=len(replay),
                     bytes_per_step=replay.bytes_per_step, nominal_bytes=nominal,
                     rss_increase_bytes=increase, ratio_to_nominal=increase / nominal))


if __name__ == "__main__":
    sys.exit(main())
