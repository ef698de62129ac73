"""Shared bits of the benchmark scripts: repo imports, a clean one-JSON-line stdout, and reading
the run directories that train.py writes.

The scripts are run as `python bench/<name>.py`, so this folder is on sys.path and
`import common` works; importing it puts the repo root there too (for train, model, env).
"""
import contextlib
import json
import os
import re
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


# ---------------------------------------------------------------------------------------------
# Run directories (what train.py writes)


def eval_records(run_dir):
    """The run's eval_<step>.json records, oldest first."""
    names = [n for n in os.listdir(run_dir) if re.fullmatch(r"eval_\d+\.json", n)]
    records = []
    for name in sorted(names, key=lambda n: int(n[5:-5])):
        with open(os.path.join(run_dir, name)) as f:
            records.append(json.load(f))
    return records


def episode_returns(run_dir):
    """(agent step, return) of every training episode in the run's metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["step"], r["episode/return"]) for r in rows if "episode/return" in r]


def run_config(run_dir):
    """The run's settings: config.json when there is one (hand-made or copied runs), else the
    config stored in checkpoint.pt, else the env of its evaluations; {} when none is found."""
    path = os.path.join(run_dir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    path = os.path.join(run_dir, "checkpoint.pt")
    if os.path.isfile(path):
        from run_state import read_checkpoint  # only here: reading a folder of JSON files needs no torch

        return dict(read_checkpoint(path, mmap=True)["config"])  # a safe load: data, never code
    records = eval_records(run_dir)
    return {"env": records[-1]["env"]} if records else {}


def checkpoint_config(checkpoint, **changes):
    """The train.Config a checkpoint's run was made with (fields this version lacks are dropped),
    with `changes` applied."""
    import dataclasses

    import train

    saved = checkpoint["config"]
    cfg = train.Config(**{f.name: saved[f.name] for f in dataclasses.fields(train.Config) if f.name in saved})
    return dataclasses.replace(cfg, **changes)


def add_timing_args(p, warmup, updates, threads, threads_help):
    """The flags every update benchmark shares: untimed and timed updates, actions, threads, seed."""
    p.add_argument("--warmup_updates", type=int, default=warmup, help="untimed updates first (compile, allocator)")
    p.add_argument("--updates", type=int, default=updates, help="timed updates")
    p.add_argument("--num_actions", type=int, default=6)
    p.add_argument("--threads", type=int, default=threads, help=threads_help)
    p.add_argument("--seed", type=int, default=0)
