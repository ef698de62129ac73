"""Replay: per-env rings, wrap-around, window sampling and memory per step."""
import numpy as np
import pytest

from replay import Replay, from_bf16_bits, to_bf16_bits


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


def fill_with_latents(replay, steps, deter=4, stoch=3):
    """Like `fill`, and step s stores deter = s + 0.25 (exact in bfloat16) and stoch classes s % 5."""
    n = replay.num_envs
    for s in range(steps):
        replay.add(np.full((n, 64, 64, 3), s % 256, np.uint8), action=np.full(n, s % 7),
                   reward=np.full(n, s, np.float32), is_first=np.full(n, s % 10 == 0),
                   is_last=np.full(n, s % 10 == 9), is_terminal=np.zeros(n, bool),
                   deter=np.full((n, deter), s + 0.25, np.float32), stoch=np.full((n, stoch), s % 5))


def test_bfloat16_bits_round_to_nearest_even():
    x = np.array([1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, 0.1], np.float32)
    back = from_bf16_bits(to_bf16_bits(x))
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0);
    # 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties go to 1 + 2^-6.
    assert list(back[:5]) == [1.0, -2.5, 1.0, 1 + 2**-6, 1.0]
    assert abs(back[5] - 0.1) <= 0.1 * 2**-8


def test_context_window_starts_from_the_step_before_it():
    replay = Replay(capacity=200, num_envs=2, latent=(4, 3), seed=0)
    fill_with_latents(replay, 30)
    batch = replay.sample(64, 8)
    first_step = batch["reward"][:, 0].astype(int)
    assert (first_step >= 1).all()  # the oldest step is only ever context
    assert (batch["start_deter"] == (first_step - 1 + 0.25)[:, None]).all()
    assert (batch["start_stoch"] == ((first_step - 1) % 5)[:, None]).all()
    assert (batch["start_action"] == (first_step - 1) % 7).all()
    # is_first is where an episode really begins, never forced at the window's start.
    assert (batch["is_first"] == (batch["reward"] % 10 == 0)).all()
    assert not batch["is_first"][:, 0].all()
    assert (batch["index"] == first_step[:, None] + np.arange(8)).all()  # no wrap yet


def test_context_needs_one_more_step_and_refresh_writes_back():
    replay = Replay(capacity=200, num_envs=2, latent=(4, 3), seed=0)
    fill_with_latents(replay, 8)
    assert not replay.can_sample(8)
    fill_with_latents(replay, 1)
    assert replay.can_sample(8)
    batch = replay.sample(1, 8)
    env, index = batch["env"], batch["index"]
    replay.refresh(env, index, np.full((1, 8, 4), -3.5, np.float32), np.full((1, 8, 3), 4))
    assert (from_bf16_bits(replay.data["deter"][env[0], index[0]]) == -3.5).all()
    assert (replay.data["stoch"][env[0], index[0]] == 4).all()
    assert (from_bf16_bits(replay.data["deter"][env[0], 0]) == 0.25).all()  # the context step is kept


def test_latent_bytes_per_step():
    assert Replay.step_bytes(latent=(4096, 32)) == 12_288 + 15 + 8192 + 32
    replay = Replay(capacity=1000, num_envs=4, latent=(128, 32))
    assert replay.bytes_per_step == 12_288 + 15 + 256 + 32
