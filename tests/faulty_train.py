"""train.py with faults injected, for tests/test_faults.py: `python -m tests.faulty_train ARGS`
runs `train.main(ARGS)` after patching the process (train.py itself has no test hooks), with
denormal floats flushed to zero for speed.

Faults are chosen by environment variables, read only here:
- FAULT_SLOW_SAVE=N: the N-th checkpoint write of this process writes half of the file, says so
  on stderr, then sleeps for a minute before it writes the rest (time for a kill -9 in the
  middle of a save).
- FAULT_ENOSPC=2,4-: checkpoint writes number 2 and 4 onwards write half of the file, then fail
  with OSError(ENOSPC), as on a full disk.
- FAULT_NAN_AFTER=N: every replayed batch after the N-th has NaN rewards.
- FAULT_REPLAY_ENOSPC=R:N: the N-th checkpoint's replay write (ReplayStore.save) of rank R (its
  RANK under torchrun, 0 otherwise) fails with OSError(ENOSPC) before it writes anything.
"""
import errno
import io
import os
import sys
import time

import numpy as np
import torch

import train
from replay import Replay, ReplayStore

real_save, real_gather, real_replay_save = torch.save, Replay.gather, ReplayStore.save
writes, samples, replay_saves = 0, 0, 0


def failing(spec, n):
    """Whether write n is listed in a spec such as "2,4-" (2, and 4 onwards)."""
    for item in filter(None, spec.split(",")):
        if item.endswith("-") and n >= int(item[:-1]) or item == str(n):
            return True
    return False


def faulty_save(payload, f, *args, **kwargs):
    global writes
    writes += 1
    slow = os.environ.get("FAULT_SLOW_SAVE") == str(writes)
    full = failing(os.environ.get("FAULT_ENOSPC", ""), writes)
    if not (slow or full) or isinstance(f, (str, os.PathLike)):
        return real_save(payload, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(payload, buffer)
    data = buffer.getvalue()
    f.write(data[:len(data) // 2])
    f.flush()
    if full:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    print(f"fault: slow save, half of {f.name} written", file=sys.stderr, flush=True)
    time.sleep(60)
    f.write(data[len(data) // 2:])


def faulty_gather(self, *args, **kwargs):  # once per replayed batch (Replay.sample and Loader)
    global samples
    samples += 1
    batch = real_gather(self, *args, **kwargs)
    if samples > int(os.environ.get("FAULT_NAN_AFTER", sys.maxsize)):
        batch["reward"][:] = np.nan
    return batch


def faulty_replay_save(self):
    global replay_saves
    replay_saves += 1
    if os.environ.get("FAULT_REPLAY_ENOSPC") == f"{os.environ.get('RANK', '0')}:{replay_saves}":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_replay_save(self)


if __name__ == "__main__":
    # Speed only: the early updates of a tiny model on Catch's black frames are full of denormal
    # floats, which make the CPU about 3 times slower.
    torch.set_flush_denormal(True)
    torch.save = faulty_save
    Replay.gather = faulty_gather
    ReplayStore.save = faulty_replay_save
    train.main(sys.argv[1:])
