"""Logging (metrics.jsonl + wandb), videos, reconstruction / open-loop panels, checkpoint I/O, the
run directory's lock, and the CPU allocator setting (`keep_freed_memory`)."""
import contextlib
import ctypes
import fcntl
import json
import os
import pickle
import sys
import time
import warnings
import zipfile

import imageio.v2 as imageio
import numpy as np
import torch
from tqdm import tqdm


def warn(message):
    # tqdm.write puts the line above the progress bar instead of in the middle of it.
    tqdm.write(f"warning: {message}", file=sys.stderr)
    sys.stderr.flush()


def keep_freed_memory():
    """Make glibc's malloc serve large blocks from its heap and keep what is freed there, for the
    rest of the process. Returns whether it could (Linux with glibc).

    By default glibc gives every block above 32 MB a fresh mmap and unmaps it when it is freed.
    A B16 × T64 update on the CPU allocates dozens of such blocks (the (1024, C, 32, 32)
    activations of the encoder and decoder: 67 MB each for tiny), so every update had the
    kernel zero and map their pages anew: a tiny update took 2.14 s instead of 1.28 s, a 12m one
    7.7 s instead of 5.9 s. The price: freed memory stays with the process (its peak resident
    memory was 12 % (tiny) to 24 % (12m) higher).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False


# ---------------------------------------------------------------------------------------------
# Checkpoints


# A checkpoint is data, never code: it holds only what torch.load(weights_only=True) accepts
# (tensors, numbers, strings, bytes, None, lists, tuples, dicts), so that loading a checkpoint.pt
# someone hands you cannot run anything. numpy arrays and scalars (RNG states, the collector's
# observations and episode flags) are stored as tensors tagged with NUMPY, and come back as numpy
# with the dtype they had: resume stays bit-exact.
NUMPY = "__numpy__"  # {NUMPY: tensor} is a numpy array, {NUMPY: tensor, "scalar": True} a scalar

# What the safe load says about a file that is not made of the types above.
UNSAFE = ("holds objects a safe load refuses (an older version's checkpoint, or not a checkpoint); "
          "if you trust it, convert it once with: python train.py --convert_checkpoint {path}")


def to_safe(obj):
    """`obj` with every numpy array and scalar replaced by its tagged tensor (the rest as it is).
    Raises TypeError for anything a safe load would refuse."""
    if isinstance(obj, np.generic):  # before the Python types: np.float64 is a float
        return {NUMPY: torch.from_numpy(np.array(obj)), "scalar": True}
    if isinstance(obj, np.ndarray):
        return {NUMPY: torch.from_numpy(obj.copy())}  # a copy: the array goes on changing
    if isinstance(obj, (dict, list, tuple)):
        return _walk(obj, to_safe)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype,
                                       torch.device)):
        return obj
    raise TypeError(f"a checkpoint holds data only, not {type(obj).__name__}")


def from_safe(obj):
    """The inverse of `to_safe`: tagged tensors back to numpy arrays and scalars."""
    if isinstance(obj, dict) and NUMPY in obj:
        array = obj[NUMPY].numpy()
        return array[()] if obj.get("scalar") else array  # array[()] of a 0-d array: its scalar
    if isinstance(obj, (dict, list, tuple)):
        return _walk(obj, from_safe)
    return obj


def _walk(obj, fn):
    """`fn` applied to the values of a dict, list or tuple; `obj` itself when nothing changed
    (a state dict keeps its OrderedDict and the `_metadata` that load_state_dict reads)."""
    items = list(obj.items() if isinstance(obj, dict) else enumerate(obj))
    new = [(k, fn(v)) for k, v in items]
    if all(n is v for (_, v), (_, n) in zip(items, new)):
        return obj
    if isinstance(obj, dict):
        return dict(new)
    return type(obj)(v for _, v in new)


def save_checkpoint(path, payload):
    """torch.save `payload` (made safe, see `to_safe`) to `path` with `write_atomic`."""
    safe = to_safe(payload)
    write_atomic(path, lambda f: torch.save(safe, f))


def write_atomic(path, write):
    """`write(f)` to a temporary file, fsync it, rename it over `path`, fsync the directory.

    A crash at any moment (kill -9, power loss) leaves either the previous file or the new one,
    never a half-written file: the rename is atomic, and the fsyncs make sure that the renamed
    file holds its data and that the rename itself reaches the disk. A failed write (e.g.
    OSError ENOSPC, disk full) removes the temporary file, leaves the previous file as it was
    and raises.
    """
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_pickle(path):
    """Whether a file is what torch.save or pickle writes: a zip archive (torch's format) or a
    pickle stream (its PROTO opcode first)."""
    with open(path, "rb") as f:
        return zipfile.is_zipfile(f) or f.seek(0) == 0 and f.read(1) == b"\x80"


def read_checkpoint(path, mmap=False):
    """The payload of a checkpoint file, loaded safely (weights_only: no code runs) and with its
    numpy values back (`from_safe`). Raises ValueError with one line for a file the safe load
    refuses, and the load's own error for an unreadable one."""
    try:
        with warnings.catch_warnings():  # torch's note on a plain pickle file: the error says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        if not is_pickle(path):  # junk, not a refused object: the caller's "not readable"
            raise
        # A global (a class, a function) that is not plain data: refused, never run.
        raise ValueError(f"{path}: {UNSAFE.format(path=path)}") from None
    return from_safe(payload)


def load_checkpoint(path, evaluation=False):
    """Load a checkpoint dict, or raise ValueError with one line saying what is wrong. A snapshot
    of --keep_checkpoints (weights only) is accepted only for `evaluation`."""
    if not os.path.isfile(path):
        raise ValueError(f"--resume {path}: no such checkpoint file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"--resume {path}: not readable (permission denied)")
    try:
        payload = read_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"--resume {e}") from None
    except Exception as e:  # truncated or not a torch file
        raise ValueError(f"--resume {path}: not a readable checkpoint ({type(e).__name__})") from None
    keys = set(payload if isinstance(payload, dict) else ())
    if "snapshot" in keys and not evaluation:
        folder = os.path.dirname(path) or "."
        raise ValueError(f"--resume {path}: a snapshot for evaluation only (weights, no optimizer or replay): "
                         f"evaluate it with --eval_episodes N, or resume training from "
                         f"{os.path.join(folder, 'checkpoint.pt')}")
    missing = {"agent", "counters", "config", *(() if evaluation else ("optimizer",))} - keys
    if missing:
        raise ValueError(f"--resume {path}: not a checkpoint of this program (missing {sorted(missing)})")
    return payload


def lock_run_dir(run_dir):
    """Make `run_dir` and hold an exclusive lock on <run_dir>/.lock for the life of the process
    (until the returned file is closed), so that two runs never write one checkpoint. The kernel
    drops the lock when the process ends, also after kill -9, so a crashed run never blocks its
    resume. Raises ValueError with one line when another live process holds it."""
    os.makedirs(run_dir, exist_ok=True)
    lock = open(os.path.join(run_dir, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        owner = lock.read().strip() or "unknown"
        lock.close()
        raise ValueError(f"--run_dir {run_dir} is in use by another run (pid {owner}); wait for it "
                         f"to end or choose another --run_dir") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


# ---------------------------------------------------------------------------------------------
# Images and videos


def write_video(path, frames, fps=15, upscale=2):
    """frames (T, H, W, 3) uint8 → mp4 (nearest-neighbour upscaled for viewing)."""
    frames = np.asarray(frames)
    if upscale > 1:
        frames = frames.repeat(upscale, 1).repeat(upscale, 2)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
    return path


def write_image(path, image):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    imageio.imwrite(path, image)
    return path


def write_media(write, path, data, log, step, name):
    """`write(path, data)` a video or image, then `log(step, name, path)` it; a failure (disk,
    codec) warns and returns, so that training goes on."""
    try:
        write(path, data)
    except Exception as e:
        warn(f"could not write {path} ({type(e).__name__}: {e}); training continues")
        return
    log(step, name, path)


def image_grid(rows):
    """rows: list of (T, H, W, 3) float arrays in [0, 1] → one uint8 image, rows stacked."""
    rows = [np.concatenate(list(r), 1) for r in rows]  # each (H, T·W, 3)
    return (np.clip(np.concatenate(rows, 0), 0, 1) * 255).astype(np.uint8)


def panels(truth, recon, openloop, context):
    """Two images from arrays (N, T, H, W, 3) in [0, 1]:
    - reconstruction: per sample a row of originals and a row of posterior reconstructions;
    - open-loop: per sample truth, model (reconstruction for the first `context` frames, then
      imagined frames from the replayed actions) and the absolute error.
    """
    rec_rows, ol_rows = [], []
    for x, r, o in zip(truth, recon, openloop):
        rec_rows += [x, r]
        model = np.concatenate([r[:context], o], 0)
        ol_rows += [x, model, np.abs(model - x)]
    return image_grid(rec_rows), image_grid(ol_rows)


# ---------------------------------------------------------------------------------------------
# Logging


# Seconds an online wandb start waits for the server before the run logs offline instead
# (wandb's own WANDB_INIT_TIMEOUT variable overrides it).
WANDB_INIT_TIMEOUT = 15.0


class Logger:
    """Writes every scalar to <run_dir>/metrics.jsonl and, when available, to wandb.

    wandb never stops training: an online start that cannot reach the server within
    WANDB_INIT_TIMEOUT seconds falls back to offline, and a failing init or log falls back to
    local files only.
    """

    def __init__(self, run_dir, config, mode="offline", key_file=None, run_id=None,
                 project="dreamerv3-atari"):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        self.wandb = None
        self.run_id = run_id
        if mode == "disabled":
            return
        try:
            import wandb
            if key_file:
                with open(key_file) as f:
                    os.environ["WANDB_API_KEY"] = f.read().strip()
                mode = "online"
            else:
                mode = "offline" if mode == "online" else mode
            # wandb's own console lines (e.g. "Loaded credentials") would clutter the one-line
            # warnings below.
            os.environ.setdefault("WANDB_SILENT", "true")
            timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT))
            settings = wandb.Settings(init_timeout=timeout, silent=True, console="off")
            kwargs = dict(project=project, config=config, dir=run_dir, mode=mode, id=run_id,
                          resume="allow", settings=settings)
            try:
                self.wandb = wandb.init(**kwargs)
            except Exception as e:
                if mode != "online":
                    raise
                warn(f"wandb could not start online within {timeout:g} s ({type(e).__name__}); "
                     f"logging offline instead (upload later with wandb sync)")
                self.wandb = wandb.init(**{**kwargs, "mode": "offline"})
            self.run_id = self.wandb.id
            # Charts use the agent step as their x-axis, not wandb's own step: after a resume
            # from an older checkpoint (the process was killed) the agent step goes back, and
            # wandb would drop every point logged at a step below its last one.
            self.wandb.define_metric("agent_step")
            self.wandb.define_metric("*", step_metric="agent_step")
        except Exception as e:
            warn(f"wandb unavailable ({type(e).__name__}: {e}); logging to metrics.jsonl only")
            self.wandb = None

    def scalars(self, step, metrics):
        metrics = {k: float(v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **metrics}) + "\n")
        self._wandb_log(metrics, step)

    def video(self, step, name, path):
        self._wandb_log(lambda wandb: {name: wandb.Video(path, format="mp4")}, step)

    def image(self, step, name, path):
        self._wandb_log(lambda wandb: {name: wandb.Image(path)}, step)

    def _wandb_log(self, data, step):
        """data: a dict, or a function of the wandb module giving one (media objects)."""
        if self.wandb is None:
            return
        try:
            if callable(data):
                import wandb
                data = data(wandb)
            self.wandb.log({**data, "agent_step": int(step)})
        except Exception as e:
            warn(f"wandb log failed ({type(e).__name__}); continuing with metrics.jsonl only")
            self.wandb = None

    def close(self):
        self.file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass
