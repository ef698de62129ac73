"""Replay: per-env rings, wrap-around, window sampling and memory per step."""
import numpy as np
import pytest

from replay import Replay


def fill(replay, steps, start=0):
    """Step s stores frames filled with s % 256 (env e adds 100·e) and reward s."""
    for s in range(start, start + steps):
        obs = np.stack([np.full((64, 64, 3), (s + 100 * e) % 256, np.uint8)
                        for e in range(replay.num_envs)])
        n = replay.num_envs
        replay.add(obs, action=np.full(n, s % 7), reward=np.full(n, s, np.float32),
                   is_first=np.full(n, s % 10 == 0), is_last=np.full(n, s % 10 == 9),
                   is_terminal=np.zeros(n, bool))


def test_windows_are_consecutive_steps_of_one_env():
    replay = Replay(capacity=200, num_envs=2, seed=0)
    fill(replay, 50)
    batch = replay.sample(64, 8)
    assert batch["obs"].shape == (64, 8, 64, 64, 3) and batch["obs"].dtype == np.uint8
    steps = batch["reward"]
    assert (np.diff(steps, axis=1) == 1).all()  # consecutive, never across the write head
    env = (batch["obs"][:, :, 0, 0, 0].astype(int) - steps.astype(int)) % 256 // 100
    assert set(np.unique(env)) == {0, 1} and (env == env[:, :1]).all()  # one env per window


def test_first_step_of_every_window_is_first():
    replay = Replay(capacity=200, num_envs=2, seed=0)
    fill(replay, 50)
    batch = replay.sample(64, 8)
    assert batch["is_first"][:, 0].all()
    # Inside the window the stored flags are kept: is_first where an episode began.
    inner = batch["is_first"][:, 1:]
    assert (inner == (batch["reward"][:, 1:] % 10 == 0)).all()
    assert inner.any()  # some windows do span an episode boundary
    # The stored data is not modified by sampling.
    assert replay.data["is_first"][:, 1:10].sum() == 0


def test_capacity_wraps_around_and_keeps_the_newest_steps():
    replay = Replay(capacity=40, num_envs=2, seed=0)  # 20 steps per env ring
    fill(replay, 55)
    assert len(replay) == 40
    assert sorted(replay.data["reward"][0]) == list(range(35, 55))
    batch = replay.sample(500, 5)
    assert batch["reward"].min() == 35 and batch["reward"].max() == 54
    assert (np.diff(batch["reward"], axis=1) == 1).all()  # no window crosses the write head
    assert batch["reward"][:, 0].min() == 35 and batch["reward"][:, 0].max() == 50


def test_sampling_needs_a_full_window():
    replay = Replay(capacity=100, num_envs=2, seed=0)
    fill(replay, 7)
    assert not replay.can_sample(8)
    fill(replay, 1, start=7)
    assert replay.can_sample(8)
    assert (replay.sample(4, 8)["reward"] == np.arange(8)).all()


def test_bytes_per_stored_step_close_to_a_frame():
    replay = Replay(capacity=1000, num_envs=4)
    assert 64 * 64 * 3 <= replay.bytes_per_step <= 12_288 * 1.01


def test_capacity_that_does_not_fit_in_memory_is_refused():
    with pytest.raises(ValueError, match="--capacity"):
        Replay(capacity=10**12, num_envs=1)
