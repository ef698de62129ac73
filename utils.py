"""Logging (metrics.jsonl + wandb), videos, reconstruction / open-loop panels, atomic file writes,
the run directory's lock, and the CPU allocator setting (`keep_freed_memory`)."""
import contextlib
import ctypes
import fcntl
import json
import os
import sys
import time
import warnings

import imageio.v2 as imageio
import numpy as np
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
