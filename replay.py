"""Replay: one preallocated uint8 ring per environment, sampled as fixed-length windows.

With replay context (the official v2 scheme) every stored step also keeps the posterior latent
the agent had there: deter in bfloat16 and stoch as one class index per latent. It is written
when acting and refreshed by every update that replays the step. A window of T steps is then
sampled with the step before it, and training starts from that step's latent and action, so
`is_first` marks only real episode starts.

`ReplayStore` keeps the replay on disk with the run (see its docstring).
"""
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from model import bf16_bits
from utils import warn, write_atomic


def available_memory():
    """Bytes of memory available to a new allocation (Linux), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def to_bf16_bits(x):
    """float32 array → the uint16 bits of its bfloat16 rounding (to nearest, ties to even)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(bits):
    """uint16 bfloat16 bits → float32 array (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class Replay:
    """One preallocated uint8 ring per environment; uniform sampling of fixed-length windows.

    A window may span an episode boundary (is_first inside it resets the RSSM). Without replay
    context (`latent=None`) the model starts every window from the zero state, so the window's
    first step is marked is_first. With `latent=(deter, stoch)` sizes, the step before the
    window gives the start latent and previous action instead.
    """

    FIELDS = dict(action=np.int64, reward=np.float32, is_first=bool, is_last=bool, is_terminal=bool)

    def __init__(self, capacity, num_envs, obs_shape=(64, 64, 3), latent=None, seed=0, ranks_on_node=1):
        self.num_envs, self.length = num_envs, capacity // num_envs
        self.context = latent is not None
        deter, stoch = latent or (0, 0)
        # Under torchrun every rank on the machine holds a replay of --capacity steps, and all of
        # them pass this check at once, before any has filled its pages: count them all.
        need = self.length * num_envs * self.step_bytes(obs_shape, latent)
        avail = available_memory()
        if avail is not None and need * ranks_on_node > avail:
            ranks = f" per rank, {need * ranks_on_node / 2**30:.1f} GiB for the {ranks_on_node} ranks on " \
                    f"this machine," if ranks_on_node > 1 else ""
            raise ValueError(f"--capacity {capacity} needs {need / 2**30:.1f} GiB of replay{ranks} but only "
                             f"{avail / 2**30:.1f} GiB is available; lower --capacity")
        self.obs = np.zeros((num_envs, self.length, *obs_shape), np.uint8)
        self.data = {k: np.zeros((num_envs, self.length), t) for k, t in self.FIELDS.items()}
        if self.context:
            self.data["deter"] = np.zeros((num_envs, self.length, deter), np.uint16)  # bf16 bits
            self.data["stoch"] = np.zeros((num_envs, self.length, stoch), np.uint8)  # class indices
        self.pos = 0  # next write index (all env rings advance together)
        self.filled = 0
        self.adds = 0  # steps stored per env since the run started (pos = adds % length)
        self.rng = np.random.default_rng(seed)

    @classmethod
    def step_bytes(cls, obs_shape=(64, 64, 3), latent=None):
        """Bytes of one stored step: frame, fields and, with replay context, the latent."""
        deter, stoch = latent or (0, 0)
        fields = sum(np.dtype(t).itemsize for t in cls.FIELDS.values())
        return int(np.prod(obs_shape)) + fields + 2 * deter + stoch

    def __len__(self):
        return self.filled * self.num_envs

    @property
    def bytes_per_step(self):
        total = self.obs.nbytes + sum(v.nbytes for v in self.data.values())
        return total / (self.num_envs * self.length)

    def add(self, obs, deter=None, stoch=None, deter_bits=None, **step):
        """Store one step of every env: obs (E, 64, 64, 3), per-env fields of shape (E,) and, with
        replay context, the acting latent: deter (E, D) float32 (or `deter_bits`, already rounded
        to bfloat16 as uint16 bits, see `to_bf16_bits`), stoch (E, S) class indices."""
        self.obs[:, self.pos] = obs
        for k, v in step.items():
            self.data[k][:, self.pos] = v
        if self.context:
            self.data["deter"][:, self.pos] = to_bf16_bits(deter) if deter_bits is None else deter_bits
            self.data["stoch"][:, self.pos] = stoch
        self.pos = (self.pos + 1) % self.length
        self.filled = min(self.filled + 1, self.length)
        self.adds += 1

    def can_sample(self, seq_len):
        return self.filled >= seq_len + self.context

    def sample(self, batch, seq_len):
        """Dict of numpy arrays (batch, seq_len, ...) of the window's steps. With replay context
        also the start: `start_deter` (batch, D) float32, `start_stoch` (batch, S) class indices
        and `start_action` (batch,), from the step before the window; and where the window lies
        (`env` (batch,), `index` (batch, seq_len)) for `refresh`."""
        env, index = self.draw(batch, seq_len)
        return {**self.gather(env, index), **self.start(env, index)}

    def draw(self, batch, seq_len):
        """Where `batch` windows of `seq_len` steps lie: env (batch,) and ring index (batch,
        seq_len + context), with the step before each window first when the replay keeps context.
        The only random draws of sampling: everything else is a read."""
        env = self.rng.integers(0, self.num_envs, batch)
        # Chronological offset of each window within the ring, oldest data first.
        span = seq_len + self.context
        offset = self.rng.integers(0, self.filled - span + 1, batch)
        oldest = self.pos if self.filled == self.length else 0
        return env, (oldest + offset[:, None] + np.arange(span)) % self.length

    def gather(self, env, index, out=None):
        """The steps of drawn windows that never change once stored: obs and the fields (batch,
        seq_len, ...), into the arrays of `out` when given (e.g. pinned buffers)."""
        out = {} if out is None else out
        rows, index = env[:, None], index[:, self.context:]
        flat = (rows * self.length + index).ravel()  # one take per array, straight into `out`
        for k, array in [("obs", self.obs), *((k, self.data[k]) for k in self.FIELDS)]:
            shape = (*index.shape, *array.shape[2:])
            if k not in out:
                out[k] = np.empty(shape, array.dtype)
            np.take(array.reshape(-1, *array.shape[2:]), flat, axis=0, out=out[k].reshape(-1, *shape[2:]),
                    mode="wrap")  # wrap: no bounds-check copy of `out` (the indices are in range)
        if not self.context:
            out["is_first"][:, 0] = True
        return out

    def start(self, env, index, out=None):
        """The replay context of drawn windows, read when they are used (training refreshes the
        latents): `start_deter` (float32), `start_stoch`, `start_action` of the step before each
        window (into the arrays of `out` when given), and `env`, `index` (batch, seq_len) for
        `refresh`. Empty without context."""
        if not self.context:
            return {}
        start, out = index[:, 0], {} if out is None else out
        values = dict(start_deter=from_bf16_bits(self.data["deter"][env, start]),
                      start_stoch=self.data["stoch"][env, start], start_action=self.data["action"][env, start])
        for k, v in values.items():
            if k in out:
                out[k][...] = v
            else:
                out[k] = v
        return dict(out, env=env, index=index[:, 1:])

    def refresh(self, env, index, deter=None, stoch=None, deter_bits=None):
        """Write the latents that training computed for sampled windows back to their steps:
        env (B,), index (B, T), deter (B, T, D) float32 (or `deter_bits` as in `add`), stoch
        (B, T, S) class indices."""
        self.data["deter"][env[:, None], index] = to_bf16_bits(deter) if deter_bits is None else deter_bits
        self.data["stoch"][env[:, None], index] = stoch


class Loader:
    """Replayed batches as tensors on the training device, the next one read while an update runs.

    `next(prefetch=True)` draws the following batch's windows at once (the replay's RNG stream is
    the same as sampling one batch after the other) and gathers their frames and fields in a
    background thread into a second buffer, while the caller's update runs; those never change
    between two collection steps. The start latents change with every update (`refresh`), so
    they are read when the batch is used. Each batch is thus bit for bit the one `Replay.sample`
    would give at that moment.

    On CUDA the buffers are pinned and copied to the GPU without blocking, and the latents an
    update computes come back packed (bfloat16 bits, uint8 classes) by a non-blocking copy that
    `flush` writes into the replay before anything reads it again (the next batch, a stored
    step, a checkpoint). On the CPU the same code runs, with plain buffers.
    """

    def __init__(self, replay, batch_size, seq_len, device):
        self.replay, self.shape, self.device = replay, (batch_size, seq_len), device
        self.pin = device.type == "cuda"
        self.buffers = [self.empty_batch() for _ in range(2)]  # one in use, one being filled
        self.copied = [None, None]  # CUDA events: the device has its copy of that buffer
        self.turn = 0
        self.ahead = None  # (env, index, future) of the next batch
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="replay")
        self.returning = None  # latents on their way back: (env, index, host tensors, event)
        self.host_latents = None

    def empty_batch(self):
        """{name: host tensor} of one batch (pinned on CUDA)."""
        r, (B, T) = self.replay, self.shape
        shapes = {"obs": ((B, T, *r.obs.shape[2:]), r.obs.dtype),
                  **{k: ((B, T), dtype) for k, dtype in r.FIELDS.items()}}
        if r.context:
            shapes.update(start_deter=((B, r.data["deter"].shape[-1]), np.float32),
                          start_stoch=((B, r.data["stoch"].shape[-1]), np.uint8), start_action=((B,), np.int64))
        return {k: torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=self.pin)
                for k, (shape, dtype) in shapes.items()}

    def fill(self, turn, env, index):
        """Gather the unchanging part of drawn windows into buffer `turn` (in the worker thread)."""
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()  # its previous batch has reached the device
        arrays = {k: t.numpy() for k, t in self.buffers[turn].items()}
        self.replay.gather(env, index, out=arrays)

    def next(self, prefetch=False):
        """The next batch: {name: tensor (B, T, ...) on the device}, with `env` and `index` (numpy)
        where its windows lie when the replay keeps context. With `prefetch`, the batch after it
        is drawn now and gathered in the background; the caller must not store a step before it
        asks for that batch."""
        self.flush()
        turn = self.turn
        if self.ahead is None:
            env, index = self.replay.draw(*self.shape)
            self.fill(turn, env, index)
        else:
            env, index, future = self.ahead
            self.ahead = None
            future.result()
        host = self.buffers[turn]
        where = self.replay.start(env, index, out={k: host[k].numpy() for k in host if k.startswith("start_")})
        batch = {k: t.to(self.device, non_blocking=True) for k, t in host.items()}
        if self.pin:
            self.copied[turn] = torch.cuda.Event()
            self.copied[turn].record()
        batch.update((k, where[k]) for k in ("env", "index") if k in where)
        self.turn ^= 1
        if prefetch:
            env, index = self.replay.draw(*self.shape)
            self.ahead = (env, index, self.worker.submit(self.fill, self.turn, env, index))
        return batch

    def refresh(self, env, index, latents):
        """Send the latents of an update (deter (B, T, D), stoch class indices (B, T, S) on the
        device) back to the replayed steps: packed on the device, copied without blocking, and
        written into the replay by `flush`."""
        self.flush()  # the host buffers hold the previous update's latents until written
        packed = (bf16_bits(latents["deter"].float()), latents["stoch"].to(torch.uint8))
        if self.host_latents is None:
            self.host_latents = [torch.empty(p.shape, dtype=p.dtype, pin_memory=self.pin) for p in packed]
        for host, p in zip(self.host_latents, packed):
            host.copy_(p, non_blocking=True)
        event = torch.cuda.Event() if self.pin else None
        if event is not None:
            event.record()
        self.returning = (env, index, event)

    def flush(self):
        """Write the latents of the last `refresh` into the replay (waiting for their copy)."""
        if self.returning is None:
            return
        env, index, event = self.returning
        if event is not None:
            event.synchronize()
        bits, stoch = (t.numpy() for t in self.host_latents)
        self.replay.refresh(env, index, deter_bits=bits.view(np.uint16), stoch=stoch)
        self.returning = None

    def close(self):
        self.worker.shutdown(wait=True)


# Write positions per chunk file: about 4096 steps (50 MB of frames) whatever the number of envs.
CHUNK_STEPS = 4096
# A checkpoint writes the whole ring's refreshed latents up to this size, less than a 50m
# checkpoint.pt: 1.8M steps of the tiny model, 130k of 12m (deter 2048), 65k of 50m (deter 4096).
EXACT_LATENTS_BYTES = 2**29


class ReplayStore:
    """The replay on disk under <run_dir>/replay/, so that a resumed run has the data it had.

    Frames and fields never change once stored, so they are written once, in chunk files of C
    write positions of all envs (chunk k holds the steps stored by `add` calls k·C to (k+1)·C),
    each as soon as it is full, with (replay context) the latents its steps have then. A
    checkpoint adds the open tail (the steps after the last full chunk). Training refreshes the
    latents of every step it replays, so a checkpoint also writes the whole ring's latents
    (2·deter + 32 bytes per step) when they fit in `exact_latents_bytes`; then a resume is exact.
    Above that a checkpoint writes no more than a chunk whatever the replay size, and a resumed
    replay starts each step from the latent it had when its chunk was written (as the official
    code does), which training refreshes again.

    `save` writes the tail (and latents) and returns the record that goes in the checkpoint; a
    checkpoint written after it names everything it needs, so a crash between the two leaves the
    previous checkpoint with its own files. `commit` (after the checkpoint) deletes what no
    checkpoint needs any more: chunks the ring has overwritten and older tails and latents. Every
    file is written atomically (`write_atomic`).
    """

    def __init__(self, directory, replay, chunk_steps=None, exact_latents_bytes=None):
        self.dir, self.replay = directory, replay
        chunk_steps = chunk_steps or CHUNK_STEPS
        self.exact = replay.context and saves_ring_latents(ring_latent_bytes(replay), exact_latents_bytes)
        self.chunk = max(1, min(chunk_steps // replay.num_envs, replay.length))
        self.unwritten = []  # full chunks whose write failed (disk full): retried by `save`
        os.makedirs(directory, exist_ok=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def after_add(self):
        """Write the chunk that the last `add` filled. A failed write (disk full) warns and is
        retried by the next `save`."""
        if self.replay.adds % self.chunk == 0:
            self.unwritten.append(self.replay.adds // self.chunk - 1)
            try:
                self.write_unwritten()
            except OSError as e:
                warn(f"could not write replay chunk {self.unwritten[0]} ({e.strerror or e}); "
                     f"the next checkpoint tries again")

    def write_unwritten(self):
        """Write the full chunks not yet on disk (the part of each that is still in the ring)."""
        r = self.replay
        oldest = r.adds - r.filled
        while self.unwritten:
            k = self.unwritten[0]
            start, end = max(k * self.chunk, oldest), (k + 1) * self.chunk
            if start < end:
                self.write_steps(f"chunk_{k:09d}.npz", start, end)
            self.unwritten.pop(0)

    def write_steps(self, name, start, end):
        """Frames, fields and latents of the steps stored by add calls start..end-1 (all in the
        ring)."""
        r = self.replay
        index = np.arange(start, end) % r.length
        arrays = {k: v[:, index] for k, v in r.data.items()}
        write_atomic(self.path(name), lambda f: np.savez(f, start=np.int64(start), obs=r.obs[:, index],
                                                         **arrays))

    def save(self):
        """Write the open tail (and the ring's latents when exact); returns the checkpoint's
        record."""
        r = self.replay
        self.write_unwritten()
        end = r.adds
        start = end - end % self.chunk
        tail = f"tail_{end:012d}.npz"
        self.write_steps(tail, start, end)
        latents = None
        if self.exact:  # the filled positions only: before the ring wraps, [0, filled)
            latents = f"latents_{end:012d}.npz"
            write_atomic(self.path(latents), lambda f: np.savez(
                f, deter=r.data["deter"][:, :r.filled], stoch=r.data["stoch"][:, :r.filled]))
        return dict(adds=end, chunk=self.chunk, num_envs=r.num_envs, length=r.length, tail=tail,
                    latents=latents)

    def commit(self, record):
        """After the checkpoint holding `record` is written: delete the files it does not need."""
        first = self.first_chunk(record)
        keep = {record["tail"], record["latents"]}
        for name in os.listdir(self.dir):
            old = name.startswith(("tail_", "latents_")) and name not in keep
            if name.startswith("chunk_") and name.endswith(".npz"):
                old = int(name[6:-4]) < first
            if old or name.endswith(".tmp"):
                os.unlink(self.path(name))

    def first_chunk(self, record):
        """The oldest chunk whose steps are still in the ring of a checkpoint's record."""
        return max(0, record["adds"] - record["length"]) // record["chunk"]

    def load(self, record):
        """Fill the (empty) replay from the files of a checkpoint's record. A missing, truncated
        or damaged file is a one-line ValueError naming it."""
        r = self.replay
        if (record["num_envs"], record["length"]) != (r.num_envs, r.length):
            raise ValueError(f"the saved replay has {record['num_envs']} envs of "
                             f"{record['length']} steps, this run {r.num_envs} of {r.length}")
        end, chunk = record["adds"], record["chunk"]
        oldest = max(0, end - r.length)
        files = [(f"chunk_{k:09d}.npz", max(k * chunk, oldest), (k + 1) * chunk)
                 for k in range(oldest // chunk, end // chunk)]
        for name, first, last in [*files, (record["tail"], end - end % chunk, end)]:
            with self.reading(name) as saved:
                members = set(saved.files)
                latents = members & {"deter", "stoch"}  # none in files of an older version
                if members - latents != {"start", "obs", *Replay.FIELDS} or len(latents) == 1:
                    raise ValueError(f"holds {sorted(members)}")
                start = int(saved["start"])
                obs = checked(saved["obs"], "obs", r.obs, last - start)
                if not start <= first:  # the file must hold every step of the ring it is for
                    raise ValueError(f"holds steps {start} to {last - 1}, the ring needs {first} on")
                steps = np.arange(start, last)
                keep = steps >= oldest
                index = steps[keep] % r.length
                r.obs[:, index] = obs[:, keep]
                for k in r.data:
                    if k in members:
                        r.data[k][:, index] = checked(saved[k], k, r.data[k], last - start)[:, keep]
        if record["latents"] is not None and r.context:  # the ring's latents at the checkpoint
            filled = min(end, r.length)
            with self.reading(record["latents"]) as saved:
                # The filled positions (older versions wrote the whole ring).
                deter = saved["deter"]
                steps = deter.shape[1] if deter.ndim == 3 else -1
                if not filled <= steps <= r.length:
                    raise ValueError(f"holds latents of {steps} positions, the ring has {filled} filled")
                r.data["deter"][:, :steps] = checked(deter, "deter", r.data["deter"], steps)
                r.data["stoch"][:, :steps] = checked(saved["stoch"], "stoch", r.data["stoch"], steps)
        r.adds, r.pos, r.filled = end, end % r.length, min(end, r.length)
        # Chunks a crashed run wrote after this checkpoint are written again as the ring refills.
        self.unwritten = []

    @contextlib.contextmanager
    def reading(self, name):
        """np.load of a replay file; any failure to read it (also while its arrays are read, and
        the checks of `checked`) is a one-line ValueError naming the file."""
        path = self.path(name)
        try:
            with np.load(path) as saved:
                yield saved
        except Exception as e:
            # A damaged .npz raises what its byte happens to break: BadZipFile (truncated, a bad
            # CRC, a garbled zip header), EOFError, zlib.error, ValueError, SyntaxError or
            # tokenize.TokenError (a garbled .npy header), MemoryError (a huge shape),
            # NotImplementedError (a compression method), KeyError, OSError (missing) and more;
            # all mean the same here. The block reads only this file.
            detail = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [""])[0]
            detail = f"{type(e).__name__}: {detail[:120]}" if detail else type(e).__name__
            raise ValueError(f"replay file {path} is missing or unreadable ({detail})") from None

    def disk_bytes(self):
        """Bytes under the folder, with its subfolders (rank 0's holds the other ranks' replays,
        which those ranks write while this one counts: a file renamed or deleted after the listing
        is skipped, not an error)."""
        return sum(size_or_zero(os.path.join(folder, name))
                   for folder, _, names in os.walk(self.dir) for name in names)


def size_or_zero(path):
    """The size of the file at `path`, or 0 if it is gone (another process renamed or deleted it)."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def checked(array, key, ring, steps):
    """A replay file's array, which must hold `steps` positions of every env of `ring`, with its
    dtype: a clear message for a file that does not fit (a member read whole has its CRC checked,
    but one whose damaged .npy header makes it shorter is read only in part)."""
    expected = (ring.shape[0], steps, *ring.shape[2:])
    if array.dtype != ring.dtype or array.shape != expected:
        raise ValueError(f"{key} is {array.dtype} {array.shape}, expected {ring.dtype} {expected}")
    return array


def saves_ring_latents(nbytes, limit=None):
    """Whether a checkpoint rewrites ring latents of `nbytes` (then a resume is exact): up to
    `limit`, by default EXACT_LATENTS_BYTES."""
    return nbytes <= (EXACT_LATENTS_BYTES if limit is None else limit)


def ring_latent_bytes(replay):
    """Bytes of the latents of the whole ring (0 without replay context)."""
    return sum(replay.data[k].nbytes for k in ("deter", "stoch") if k in replay.data)
