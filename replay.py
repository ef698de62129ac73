"""Replay: one preallocated uint8 ring per environment, sampled as fixed-length windows."""
import numpy as np


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


class Replay:
    """One preallocated uint8 ring per environment; uniform sampling of fixed-length windows.

    A window may span an episode boundary (is_first inside it resets the RSSM); its first step
    is always marked is_first, because the model starts every window from the zero state.
    """

    FIELDS = dict(action=np.int64, reward=np.float32, is_first=bool, is_last=bool, is_terminal=bool)

    def __init__(self, capacity, num_envs, obs_shape=(64, 64, 3), seed=0):
        self.num_envs, self.length = num_envs, capacity // num_envs
        step_bytes = int(np.prod(obs_shape)) + sum(np.dtype(t).itemsize for t in self.FIELDS.values())
        need, avail = self.length * num_envs * step_bytes, available_memory()
        if avail is not None and need > avail:
            raise ValueError(f"--capacity {capacity} needs {need / 2**30:.1f} GiB of replay but only "
                             f"{avail / 2**30:.1f} GiB is available; lower --capacity")
        self.obs = np.zeros((num_envs, self.length, *obs_shape), np.uint8)
        self.data = {k: np.zeros((num_envs, self.length), t) for k, t in self.FIELDS.items()}
        self.pos = 0  # next write index (all env rings advance together)
        self.filled = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return self.filled * self.num_envs

    @property
    def bytes_per_step(self):
        total = self.obs.nbytes + sum(v.nbytes for v in self.data.values())
        return total / (self.num_envs * self.length)

    def add(self, obs, **step):
        """Store one step of every env: obs (E, 64, 64, 3) and per-env fields of shape (E,)."""
        self.obs[:, self.pos] = obs
        for k, v in step.items():
            self.data[k][:, self.pos] = v
        self.pos = (self.pos + 1) % self.length
        self.filled = min(self.filled + 1, self.length)

    def can_sample(self, seq_len):
        return self.filled >= seq_len

    def sample(self, batch, seq_len):
        """Dict of numpy arrays (batch, seq_len, ...)."""
        env = self.rng.integers(0, self.num_envs, batch)
        # Chronological offset of each window within the ring, oldest data first.
        offset = self.rng.integers(0, self.filled - seq_len + 1, batch)
        oldest = self.pos if self.filled == self.length else 0
        index = (oldest + offset[:, None] + np.arange(seq_len)) % self.length  # (B, T)
        out = {"obs": self.obs[env[:, None], index]}
        for k, v in self.data.items():
            out[k] = v[env[:, None], index]
        out["is_first"][:, 0] = True
        return out
