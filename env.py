"""Environments: Atari preprocessing, generic image envs, the vector env and episode bookkeeping.

Atari follows DreamerV3's Atari setting: the ALE runs with frameskip 1 and sticky actions 0.25 (per frame), we
repeat each action 4 times and max-pool the last two frames, resize to 64×64 RGB with
INTER_AREA, start with up to 30 no-ops, cap episodes at 108,000 frames, never clip rewards and
ignore lives (or, with `--lives discount`, make a lost life terminal but not last). gymnasium ≥
1.0 vector envs autoreset on the step AFTER an episode ends; the `Episodes` bookkeeping turns
that into the stored-step convention (reward and flags arrive with the observation, the reset
step is `is_first` with reward 0), and `Collector` is the one place where a step is acted on,
stored and sent to the envs.
"""
import atexit
import difflib
import importlib
import multiprocessing
import signal
import time
import weakref

import cv2
import gymnasium as gym
import numpy as np
from gymnasium.vector.async_vector_env import AsyncState

from utils import warn

IMAGE_SIZE = 64


def _registry_ids():
    try:
        import ale_py
        gym.register_envs(ale_py)
    except ImportError:  # pragma: no cover - ale-py is a hard requirement, but be clear
        pass
    return list(gym.registry.keys())


def check_env_id(env_id):
    """Raise ValueError with close matches when `env_id` is not a registered gymnasium id."""
    ids = _registry_ids()
    if ":" in env_id:
        module, name = env_id.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"--env {env_id}: cannot import module '{module}' ({e})") from None
        ids = list(gym.registry.keys())
    else:
        name = env_id
    if name not in ids:
        close = difflib.get_close_matches(name, ids, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; Atari ids look like ALE/Pong-v5"
        raise ValueError(f"--env {env_id} is not a registered environment{hint}")


def check_env(env_id):
    """check_env_id, then build one env to check that it gives RGB images and discrete actions
    (a clear error here beats a traceback from a vector-env worker)."""
    check_env_id(env_id)
    if is_atari(env_id):
        return
    try:
        make_env(env_id)().close()
    except ValueError as e:
        raise ValueError(f"--env {env_id}: {e}") from None


def is_atari(env_id):
    return env_id.split(":")[-1].startswith("ALE/")


def resize(frame):
    if frame.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        frame = cv2.resize(frame, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
    return frame


class SavesState:
    """The env state protocol, on the outermost wrapper of every env (see `make_env`):
    `get_state()` is a picklable snapshot of everything that decides the env's future (the
    emulator with its RNG, the env's own RNG, time-limit counters), `set_state(state)` puts it
    back. A base env takes part by having `get_state` / `set_state` itself (as the scripted test
    envs do); ALE envs are handled here. `get_state` returns None for envs that cannot be
    restored: a resumed run restarts their episodes.

    The vector env's workers are reached through `Collector.get_state` / `set_state`.
    """

    reset_next = False  # the restored step was an episode's last: the next step is its reset
    restore_to = None  # set per env through the vector env's set_attr, then `restore()`

    def get_state(self):
        base = self.unwrapped
        if hasattr(base, "get_state"):
            core = base.get_state()
        elif hasattr(base, "ale"):
            # include_rng: sticky actions draw from the emulator's RNG; the env's own np_random
            # draws the no-op starts (the wrapper's np_random is the base env's). The emulator
            # state as bytes: a checkpoint holds data only (see run_state.to_safe).
            core = dict(ale=base.ale.cloneState(include_rng=True).serialize(),
                        np_random=base.np_random.bit_generator.state)
        else:
            return None
        return dict(core=core, elapsed=[w._elapsed_steps for w in _time_limits(self)])

    def set_state(self, state):
        base = self.unwrapped
        if hasattr(base, "set_state"):
            base.set_state(state["core"])
        else:
            from ale_py import ALEState  # only for ALE envs: ale-py is imported when one is made

            base.ale.restoreState(ALEState(state["core"]["ale"]))
            base.np_random.bit_generator.state = state["core"]["np_random"]
        for wrapper, elapsed in zip(_time_limits(self), state["elapsed"]):
            wrapper._elapsed_steps = elapsed
        # A fresh vector-env worker does not know that its env ended an episode at the saved
        # step: the reset it would have done (gymnasium's next-step autoreset) is done here.
        self.reset_next = bool(state.get("reset_next", False))

    def restore(self):
        self.set_state(self.restore_to)
        self.restore_to = None

    def step(self, action):
        if self.reset_next:
            return self.restored_reset()
        return super().step(action)

    def restored_reset(self):
        """The step that resets the env, as the vector env's autoreset would have done it."""
        self.reset_next = False
        obs, info = self.reset()
        return obs, 0.0, False, False, info


def _time_limits(env):
    """The TimeLimit wrappers in an env's wrapper chain (their step counters are env state)."""
    found = []
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.TimeLimit):
            found.append(env)
        env = env.env
    return found


class Atari(SavesState, gym.Wrapper):
    """Action repeat with max-pool over the last two frames, no-op starts and 64×64 RGB frames."""

    def __init__(self, env, repeat=4, noops=30):
        super().__init__(env)
        self.repeat, self.noops = repeat, noops
        self.observation_space = gym.spaces.Box(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for _ in range(self.np_random.integers(0, self.noops + 1) if self.noops else 0):
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset()
        return resize(obs), info

    def step(self, action):
        if self.reset_next:  # (this method comes before SavesState.step)
            return self.restored_reset()
        total, frames = 0.0, []
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += reward
            frames.append(obs)
            if terminated or truncated:
                break
        # Max over the last two frames removes the flicker of sprites drawn every other frame.
        frame = np.maximum(frames[-1], frames[-2]) if len(frames) > 1 else frames[-1]
        return resize(frame), total, terminated, truncated, info


class ResizeImage(SavesState, gym.ObservationWrapper):
    """Generic RGB-image env → 64×64×3 uint8 frames (no Atari-specific processing)."""

    def __init__(self, env):
        super().__init__(env)
        shape = env.observation_space.shape
        if not (isinstance(env.observation_space, gym.spaces.Box) and len(shape) == 3
                and shape[-1] == 3):
            raise ValueError(f"observations must be RGB images (H, W, 3), got {env.observation_space}")
        self.observation_space = gym.spaces.Box(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)

    def observation(self, obs):
        return resize(np.asarray(obs, dtype=np.uint8))


def make_env(env_id, sticky=0.25, repeat=4, noops=30):
    """Thunk that builds one preprocessed env (for the vector env's worker processes)."""

    def thunk():
        if multiprocessing.parent_process() is not None:
            # Worker process: Ctrl-C and SIGTERM (also when sent to the whole process group)
            # are handled by the trainer, which saves its checkpoint and closes the workers.
            # Because of that, `VectorEnv` kills (SIGKILL) workers that a forced close finds alive.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            cv2.setNumThreads(1)  # one resize per step; threads would only compete with torch
        _registry_ids()
        if is_atari(env_id):
            env = gym.make(env_id, frameskip=1, repeat_action_probability=sticky,
                           full_action_space=False, max_num_frames_per_episode=108_000)
            return Atari(env, repeat, noops)
        env = ResizeImage(gym.make(env_id))
        if not isinstance(env.action_space, gym.spaces.Discrete):
            raise ValueError(f"{env_id}: actions must be discrete, got {env.action_space}")
        return env

    return thunk


class VectorEnv(gym.vector.AsyncVectorEnv):
    """AsyncVectorEnv whose forced close (an error, garbage collection, interpreter exit) kills
    the workers: they ignore SIGTERM, so the stock terminate-and-join would wait forever."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _OPEN.add(self)

    def close_extras(self, timeout=None, terminate=False):
        if terminate:
            # Dead workers cannot answer a pending step or reset: do not wait for one.
            self._state = AsyncState.DEFAULT
            _kill(self.processes)
        super().close_extras(timeout, terminate)


def _kill(processes):
    for process in processes:
        if process.is_alive():
            process.kill()


_OPEN = weakref.WeakSet()  # vector envs not yet garbage-collected


@atexit.register  # runs before multiprocessing's exit handler, which would SIGTERM and wait
def _kill_open_workers():
    for envs in list(_OPEN):
        _kill(envs.processes)


def make_vector_env(env_id, num_envs, sticky=0.25, asynchronous=True):
    """gymnasium vector env with next-step autoreset (the gymnasium ≥ 1.0 default)."""
    thunks = [make_env(env_id, sticky) for _ in range(num_envs)]
    mode = gym.vector.AutoresetMode.NEXT_STEP
    if asynchronous:
        return VectorEnv(thunks, shared_memory=True, autoreset_mode=mode)
    return gym.vector.SyncVectorEnv(thunks, autoreset_mode=mode)


class Episodes:
    """Per-env flags and episode statistics in the stored-step convention.

    After `step(obs, reward, terminated, truncated)` the attributes describe the step that
    holds `obs`: `reward` and `is_terminal` arrived with it, `is_first` marks a reset
    observation (the env ignored the action sent with it, its reward is 0), and `is_last`
    marks the end of an episode (terminated or truncated). Truncation is last, never terminal.

    With `lives="discount"` a step on which the game took a life (the env's `info["lives"]`
    fell) is terminal but not last: the continue and value targets end there, the episode and
    the model state go on. With "unused" (the default, as in the official code) lives are ignored.
    """

    def __init__(self, num_envs, lives="unused"):
        self.n, self.lives_mode = num_envs, lives
        self.lives = np.zeros(num_envs, np.int64)  # the lives of the last step (discount)
        self.reward = np.zeros(num_envs, np.float32)
        self.is_first = np.ones(num_envs, bool)
        self.is_last = np.zeros(num_envs, bool)
        self.is_terminal = np.zeros(num_envs, bool)
        self.returns = np.zeros(num_envs, np.float64)
        self.lengths = np.zeros(num_envs, np.int64)

    def step(self, reward, terminated, truncated, lives=None):
        """Advance the flags; returns [(env index, return, length)] of episodes that ended.
        `lives`: the envs' lives after the step (`info["lives"]`), or None for envs without."""
        self.is_first = self.is_last.copy()  # the step after a last step is the reset obs
        self.reward = np.where(self.is_first, 0.0, reward).astype(np.float32)
        self.is_terminal = np.asarray(terminated, bool) & ~self.is_first
        self.is_last = (np.asarray(terminated, bool) | np.asarray(truncated, bool)) & ~self.is_first
        if self.lives_mode == "discount" and lives is not None:
            lives = np.asarray(lives, np.int64)
            self.is_terminal |= (lives < self.lives) & ~self.is_first
            self.lives = lives
        self.returns = np.where(self.is_first, 0.0, self.returns + self.reward)
        self.lengths = np.where(self.is_first, 0, self.lengths + 1)
        return [(i, float(self.returns[i]), int(self.lengths[i]))
                for i in np.flatnonzero(self.is_last)]


# What the pipe to a worker raises once the worker process is gone (killed, segfault).
WORKER_DIED = (EOFError, BrokenPipeError, ConnectionResetError)


class Collector:
    """The collection step, written once: act on o_t → store the step → step the envs → flags.

    The trainer, the evaluation, the benchmarks and the tests all collect through it. A stored
    step holds o_t, the reward and flags that arrived with o_t (from `Episodes`) and a_t, the
    action chosen at o_t. `step` is `send` followed by `receive`; a caller may do other work
    (updates) between the two while the env workers step.

    With `rebuild` (a function returning a new vector env), a worker that dies (killed, a
    segfault in an emulator) does not stop the run: the vector env is replaced and every env
    starts a new episode (see `restart`).
    """

    def __init__(self, envs, seed=0, rebuild=None, lives="unused"):
        self.envs, self.seed, self.rebuild, self.lives = envs, seed, rebuild, lives
        self.restarts = 0
        self.failure = None  # a worker death seen by send, handled by receive
        self.episodes = Episodes(envs.num_envs, lives)
        self.obs, _ = envs.reset(seed=seed)

    def get_state(self):
        """What a resumed run needs to go on collecting exactly where this one is: the current
        observations, the episode bookkeeping and every env's state (`SavesState`; None for an
        env that cannot be restored). Draws no random numbers."""
        episodes = {k: v.copy() for k, v in vars(self.episodes).items() if k not in ("n", "lives_mode")}
        return dict(obs=self.obs.copy(), episodes=episodes, envs=list(self.envs.call("get_state")),
                    seed=self.seed, restarts=self.restarts)

    def set_state(self, state):
        """Continue from a `get_state` of a collector with as many envs. Returns False and
        changes nothing when an env cannot be restored (then its episodes start afresh)."""
        if len(state["envs"]) != self.envs.num_envs or any(s is None for s in state["envs"]):
            return False
        last = state["episodes"]["is_last"]
        self.envs.set_attr("restore_to", [dict(s, reset_next=bool(done))
                                          for s, done in zip(state["envs"], last)])
        self.envs.call("restore")
        self.obs = state["obs"].copy()
        for k, v in state["episodes"].items():
            setattr(self.episodes, k, v.copy())
        self.seed, self.restarts = state["seed"], state["restarts"]
        return True

    def send(self, policy, store=None):
        """Choose a_t = policy(o_t, is_first) (an int array), store the step with
        `store(obs, action=..., reward=..., is_first=..., is_last=..., is_terminal=...)`, and
        send the actions to the envs."""
        ep = self.episodes
        action = policy(self.obs, ep.is_first)
        if store is not None:
            store(self.obs, action=action, reward=ep.reward, is_first=ep.is_first,
                  is_last=ep.is_last, is_terminal=ep.is_terminal)
        if hasattr(self.envs, "step_async"):
            try:
                self.envs.step_async(action)
            except WORKER_DIED as e:
                self.failure = e
        else:  # a synchronous vector env steps in receive()
            self.pending = action

    def receive(self):
        """Wait for the envs; returns [(env index, return, length)] of the episodes that ended."""
        try:
            if self.failure is not None:
                raise self.failure
            if hasattr(self.envs, "step_wait"):
                self.obs, reward, terminated, truncated, info = self.envs.step_wait()
            else:
                self.obs, reward, terminated, truncated, info = self.envs.step(self.pending)
        except WORKER_DIED as e:
            self.failure = None
            if self.rebuild is None:
                raise
            self.restart(e)
            return []
        return self.episodes.step(reward, terminated, truncated, info.get("lives"))

    def step(self, policy, store=None):
        self.send(policy, store)
        return self.receive()

    def restart(self, error):
        """Replace a vector env whose worker died and reset every env.

        The episodes in flight end there: they are not terminal (nothing ended them in the
        game), and they are not reported as finished, since their returns are incomplete. The
        reset observations become the next stored steps with is_first (reward 0, not last), as
        after any reset, so the RSSM and the acting state start afresh. The last step stored
        before the failure keeps is_last false: it was stored before the failure was known.
        """
        old = self.envs
        deadline = time.time() + 1.0  # the pipe breaks a moment before the process is reaped
        dead = [i for i, p in enumerate(old.processes) if not p.is_alive()]
        while not dead and time.time() < deadline:
            time.sleep(0.05)
            dead = [i for i, p in enumerate(old.processes) if not p.is_alive()]
        codes = ", ".join(f"{i} (exit code {old.processes[i].exitcode})" for i in dead) or "?"
        old.close(terminate=True)
        self.envs = self.rebuild()
        self.restarts += 1
        self.episodes = Episodes(self.envs.num_envs, self.lives)
        self.obs, _ = self.envs.reset(seed=self.seed + 10_000 * self.restarts)
        warn(f"env worker {codes} died ({type(error).__name__}); the vector env was rebuilt and "
             f"its {self.envs.num_envs} episodes in flight ended (not terminal); training continues")
