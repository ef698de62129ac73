"""Replay: one preallocated uint8 ring per environment, sampled as fixed-length windows.

With replay context (the official v2 scheme) every stored step also keeps the posterior latent
the agent had there: deter in bfloat16 and stoch as one class index per latent. It is written
when acting and refreshed by every update that replays the step. A window of T steps is then
sampled with the step before it, and training starts from that step's latent and action, so
`is_first` marks only real episode starts.

`ReplayStore` keeps the replay on disk with the run (see its docstring).
"""
import os

import numpy as np

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

    def __init__(self, capacity, num_envs, obs_shape=(64, 64, 3), latent=None, seed=0):
        self.num_envs, self.length = num_envs, capacity // num_envs
        self.context = latent is not None
        deter, stoch = latent or (0, 0)
        need = self.length * num_envs * self.step_bytes(obs_shape, latent)
        avail = available_memory()
        if avail is not None and need > avail:
            raise ValueError(f"--capacity {capacity} needs {need / 2**30:.1f} GiB of replay but only "
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

    def add(self, obs, deter=None, stoch=None, **step):
        """Store one step of every env: obs (E, 64, 64, 3), per-env fields of shape (E,) and, with
        replay context, the acting latent: deter (E, D) float32, stoch (E, S) class indices."""
        self.obs[:, self.pos] = obs
        for k, v in step.items():
            self.data[k][:, self.pos] = v
        if self.context:
            self.data["deter"][:, self.pos] = to_bf16_bits(deter)
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
        env = self.rng.integers(0, self.num_envs, batch)
        # Chronological offset of each window within the ring, oldest data first; with context
        # the window is sampled with the step before it.
        span = seq_len + self.context
        offset = self.rng.integers(0, self.filled - span + 1, batch)
        oldest = self.pos if self.filled == self.length else 0
        index = (oldest + offset[:, None] + np.arange(span)) % self.length  # (B, span)
        rows = env[:, None]
        out = {"obs": self.obs[rows, index[:, self.context:]]}
        for k in self.FIELDS:
            out[k] = self.data[k][rows, index[:, self.context:]]
        if not self.context:
            out["is_first"][:, 0] = True
            return out
        start = index[:, 0]
        out["start_deter"] = from_bf16_bits(self.data["deter"][env, start])
        out["start_stoch"] = self.data["stoch"][env, start]
        out["start_action"] = self.data["action"][env, start]
        out["env"], out["index"] = env, index[:, 1:]
        return out

    def refresh(self, env, index, deter, stoch):
        """Write the latents that training computed for sampled windows back to their steps:
        env (B,), index (B, T), deter (B, T, D) float32, stoch (B, T, S) class indices."""
        self.data["deter"][env[:, None], index] = to_bf16_bits(deter)
        self.data["stoch"][env[:, None], index] = stoch


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
        if self.exact:
            latents = f"latents_{end:012d}.npz"
            write_atomic(self.path(latents),
                         lambda f: np.savez(f, deter=r.data["deter"], stoch=r.data["stoch"]))
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
        """Fill the (empty) replay from the files of a checkpoint's record."""
        r = self.replay
        if (record["num_envs"], record["length"]) != (r.num_envs, r.length):
            raise ValueError(f"the saved replay has {record['num_envs']} envs of "
                             f"{record['length']} steps, this run {r.num_envs} of {r.length}")
        end, chunk = record["adds"], record["chunk"]
        oldest = max(0, end - r.length)
        names = [f"chunk_{k:09d}.npz" for k in range(oldest // chunk, end // chunk)]
        for name in [*names, record["tail"]]:
            try:
                with np.load(self.path(name)) as saved:
                    start = int(saved["start"])
                    steps = np.arange(start, start + saved["obs"].shape[1])
                    keep = steps >= oldest
                    index = steps[keep] % r.length
                    r.obs[:, index] = saved["obs"][:, keep]
                    for k in r.data:
                        if k in saved:  # files of an older version hold no latents
                            r.data[k][:, index] = saved[k][:, keep]
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"replay file {self.path(name)} is missing or unreadable "
                                 f"({type(e).__name__})") from None
        if record["latents"] is not None and r.context:  # the ring's latents at the checkpoint
            with np.load(self.path(record["latents"])) as saved:
                r.data["deter"][:], r.data["stoch"][:] = saved["deter"], saved["stoch"]
        r.adds, r.pos, r.filled = end, end % r.length, min(end, r.length)
        # Chunks a crashed run wrote after this checkpoint are written again as the ring refills.
        self.unwritten = []

    def disk_bytes(self):
        """Bytes under the folder, with its subfolders (rank 0's holds the other ranks' replays)."""
        return sum(os.path.getsize(os.path.join(folder, name))
                   for folder, _, names in os.walk(self.dir) for name in names)


def saves_ring_latents(nbytes, limit=None):
    """Whether a checkpoint rewrites ring latents of `nbytes` (then a resume is exact): up to
    `limit`, by default EXACT_LATENTS_BYTES."""
    return nbytes <= (EXACT_LATENTS_BYTES if limit is None else limit)


def ring_latent_bytes(replay):
    """Bytes of the latents of the whole ring (0 without replay context)."""
    return sum(replay.data[k].nbytes for k in ("deter", "stoch") if k in replay.data)
