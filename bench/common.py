"""Shared bits of the benchmark scripts: repo imports and a clean one-JSON-line stdout.

The scripts are run as `python bench/<name>.py`, so this folder is on sys.path and
`import common` works; importing it puts the repo root there too (for train, model, env).
"""
import contextlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The real stdout, kept aside: while a benchmark runs, file descriptor 1 points at stderr so that
# nothing else (library banners, env worker processes, C++ prints) can land on stdout.
_STDOUT = None


@contextlib.contextmanager
def quiet_stdout():
    global _STDOUT
    sys.stdout.flush()
    _STDOUT = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(_STDOUT.fileno(), 1)


def emit(record):
    """Write one JSON line to the real stdout."""
    out = _STDOUT or sys.stdout
    out.write(json.dumps(record) + "\n")
    out.flush()


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def set_threads(n):
    """--threads 0 keeps torch's default; returns the thread count in use."""
    import torch

    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()
