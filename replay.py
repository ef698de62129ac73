"""Replay: one preallocated uint8 ring per environment, sampled as fixed-length windows.

With replay context (the official v2 scheme) every stored step also keeps the posterior latent
the agent had there: deter in bfloat16 and stoch as one class index per latent. It is written
when acting and refreshed by every update that replays the step. A window of T steps is then
sampled with the step before it, and training starts from that step's latent and action, so
`is_first` marks only real episode starts.
"""
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
