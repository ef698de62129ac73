"""Data conventions through the real collection path, on scripted envs and on real ALE Pong."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from env import Episodes, check_env_id, make_env, resize
from replay import from_bf16_bits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer_for(env_id, tmp_path, num_envs=2, **kw):
    kw = dict(dict(capacity=4096, sequence_length=8, video_interval=0), **kw)
    cfg = train.Config(env=env_id, num_envs=num_envs, model_size="tiny", run_dir=str(tmp_path),
                       wandb_mode="disabled", **kw)
    return train.Trainer(cfg, train.prepare(cfg))


def stored(trainer, steps):
    for _ in range(steps):
        trainer.collect()
    r = trainer.replay
    return r.obs[:, :steps, 0, 0, 0], {k: v[:, :steps] for k, v in r.data.items()}


@pytest.mark.parametrize("env_id,terminal", [("tests.scripted:Terminate-v0", True),
                                             ("tests.scripted:Truncate-v0", False)])
def test_stored_steps_align_reward_and_flags_with_their_observation(tmp_path, env_id, terminal):
    trainer = trainer_for(env_id, tmp_path)
    try:
        frames, d = stored(trainer, 9)
    finally:
        trainer.close()
    k = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0])  # step within the episode, reset obs at k = 0
    for e in range(2):
        assert (frames[e] == 10 * k).all()  # the frame of step k
        assert (d["reward"][e] == k).all()  # the reward that arrived with it; 0 at reset
        assert (d["is_first"][e] == (k == 0)).all()
        assert (d["is_last"][e] == (k == 3)).all()
        # Truncation is last but never terminal.
        assert (d["is_terminal"][e] == ((k == 3) & terminal)).all()


def test_episode_statistics_count_steps_and_rewards(tmp_path):
    trainer = trainer_for("tests.scripted:Terminate-v0", tmp_path, num_envs=1)
    try:
        finished = [trainer.collect() for _ in range(4)]
    finally:
        trainer.close()
    assert finished[:2] == [[], []] and finished[2] == [(0, 6.0, 3)]


def test_real_pong_episode_boundary(tmp_path):
    trainer = trainer_for("ALE/Pong-v5", tmp_path, num_envs=1, capacity=8192)
    try:
        finished, steps = [], 0
        while not finished and steps < 4000:
            finished = trainer.collect()
            steps += 1
        # collect() returns an episode when the env step produced its last observation; that
        # observation is stored by the next collect(), the reset observation by the one after.
        trainer.collect()
        trainer.collect()
        steps += 2
    finally:
        trainer.close()
    assert finished, "a random Pong episode should end within 4000 agent steps"
    d = {k: v[0, :steps] for k, v in trainer.replay.data.items()}
    last = np.flatnonzero(d["is_last"])
    assert list(last) == [steps - 2]
    assert d["is_terminal"][steps - 2]  # game over is a real termination
    assert d["is_first"][0] and d["is_first"][steps - 1] and d["is_first"].sum() == 2
    assert d["reward"][steps - 1] == 0 and d["reward"][0] == 0
    _, ret, length = finished[0]
    assert ret == d["reward"][:steps - 1].sum() and length == steps - 2
    assert ret <= -1  # a random policy loses points
    assert set(np.unique(d["reward"])) <= {-1.0, 0.0, 1.0}  # rewards are not clipped: Pong's are ±1


def test_lives_discount_makes_a_lost_life_terminal_but_not_last():
    """Hand-made steps of one env with 3 lives: a life lost at step 2, game over at step 4, reset
    at step 5 (lives back to 3). Discount: step 2 is terminal, not last; unused: only step 4."""
    lives = [3, 3, 2, 2, 0, 3, 3]
    terminated = [0, 0, 0, 0, 1, 0, 0]
    flags = {}
    for mode in ("unused", "discount"):
        episodes, rows = Episodes(1, lives=mode), []
        for t in range(7):
            episodes.step(np.zeros(1), np.array([terminated[t]], bool), np.zeros(1, bool),
                          np.array([lives[t]]))
            rows.append((episodes.is_first[0], episodes.is_terminal[0], episodes.is_last[0]))
        flags[mode] = np.array(rows)
    first, terminal, last = flags["discount"].T
    assert list(np.flatnonzero(terminal)) == [2, 4] and list(np.flatnonzero(last)) == [4]
    assert list(np.flatnonzero(first)) == [5]  # the reset (lives back to 3) is not a lost life
    assert list(np.flatnonzero(flags["unused"][:, 1])) == [4]
    assert (flags["unused"][:, [0, 2]] == flags["discount"][:, [0, 2]]).all()


def test_real_roadrunner_lost_lives_are_terminal_with_discount(tmp_path):
    """RoadRunner starts with 3 lives: a random episode has 2 lives lost before its game over
    (with lives unused no step but the last is terminal: the hand-made test above)."""
    trainer = trainer_for("ALE/RoadRunner-v5", tmp_path, num_envs=1, capacity=8192, lives="discount")
    try:
        finished, steps = [], 0
        while not finished and steps < 3000:
            finished = trainer.collect()
            steps += 1
        trainer.collect()  # stores the episode's last step
    finally:
        trainer.close()
    assert finished, "a random RoadRunner episode should end within 3000 agent steps"
    d = {k: v[0, :steps + 1] for k, v in trainer.replay.data.items()}
    assert list(np.flatnonzero(d["is_last"])) == [steps] and d["is_first"].sum() == 1
    assert d["is_terminal"][steps]
    assert len(np.flatnonzero(d["is_terminal"][:steps])) == 2


def test_actions_change_the_game_on_real_ale():
    """ale-py 0.10.0/0.10.1 ignored actions (ALE issue 594): UP and DOWN must differ."""
    frames = {}
    for action in (2, 3):  # Pong: RIGHT (up), LEFT (down)
        env = make_env("ALE/Pong-v5", sticky=0.0, noops=0)()
        env.reset(seed=0)
        for _ in range(30):
            obs, *_ = env.step(action)
        frames[action] = obs.astype(int)
        env.close()
    assert np.abs(frames[2] - frames[3]).sum() > 1000


def test_atari_frames_are_64x64_rgb_uint8():
    env = make_env("ALE/Breakout-v5")()
    obs, _ = env.reset(seed=0)
    obs2, reward, *_ = env.step(1)
    env.close()
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and obs2.shape == (64, 64, 3)


def test_atari_step_repeats_the_action_four_frames_sums_rewards_and_pools_the_last_two():
    """The wrapped env against the raw ALE env (frameskip 1, no sticky actions, no no-ops) stepped
    four frames at a time: the frame is the resized max of the last two, the reward the sum."""
    def game():
        return make_env("ALE/Boxing-v5", sticky=0.0, repeat=4, noops=0)()

    raw, wrapped = game().env, game()  # the ALE env inside the wrapper, and a wrapped one
    obs, _ = wrapped.reset(seed=0)
    first, _ = raw.reset(seed=0)
    assert np.array_equal(obs, resize(first))
    actions = np.random.default_rng(0).integers(0, raw.action_space.n, 60)
    pooled_differs, rewards = False, []
    for action in actions:
        obs, reward, *_ = wrapped.step(action)
        frames, total = [], 0.0
        for _ in range(4):
            frame, r, *_ = raw.step(action)
            frames.append(frame)
            total += r
        assert np.array_equal(obs, resize(np.maximum(frames[-1], frames[-2]))) and reward == total
        pooled_differs |= not np.array_equal(obs, resize(frames[-1]))
        rewards.append(reward)
    raw.close()
    wrapped.close()
    # The comparisons tell the max-pool from the last frame, and the sum from the last reward.
    assert pooled_differs and sum(r != 0 for r in rewards) >= 2


@pytest.mark.parametrize("env_id", ["ALE/Pongg-v5", "Pong", "nosuchmodule:Foo-v0"])
def test_unknown_env_is_a_clear_error(env_id):
    with pytest.raises(ValueError, match="--env"):
        check_env_id(env_id)


def test_unknown_game_names_close_matches():
    with pytest.raises(ValueError, match=r"did you mean ALE/Pong-v5\b"):
        check_env_id("ALE/Pongg-v5")
    with pytest.raises(ValueError, match=r"did you mean ALE/Breakout-v5\b"):
        check_env_id("ALE/Breakoutt-v5")


def test_process_exits_with_env_workers_still_open():
    """Workers ignore SIGTERM (the trainer handles it); a process that exits, or fails, without
    closing its vector env must still end rather than wait for them."""
    code = ("from env import make_vector_env\n"
            "envs = make_vector_env('tests.catch:Catch-v0', 2)\n"
            "envs.reset(seed=0)\n"
            "raise SystemExit(3)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_replay_context_is_the_acting_latent_of_the_step_before_the_window(tmp_path):
    """Through the real collection path: the start latent and action of a sampled window, stepped
    once through the RSSM with the window's first frame, give the latent the agent stored when it
    acted on that frame. A start taken from the wrong step, or the wrong previous action, fails."""
    trainer = trainer_for("tests.scripted:Terminate-v0", tmp_path)
    try:
        stored(trainer, 14)
    finally:
        trainer.close()
    agent, replay = trainer.agent, trainer.replay
    batch = replay.sample(32, 5)
    assert not batch["is_first"][:, 0].all() and batch["is_first"][:, 0].any()
    b = {k: torch.as_tensor(v) for k, v in batch.items()}
    (deter, stoch), prev_action = agent.window_start(b["action"], train.window_start(b))
    with torch.no_grad():
        predicted, _, _ = agent.rssm.obs_step(deter, stoch, prev_action[:, 0],
                                              agent.encoder(b["obs"][:, 0]), b["is_first"][:, 0])
    acted = torch.as_tensor(from_bf16_bits(replay.data["deter"][batch["env"], batch["index"][:, 0]]))
    # bfloat16 storage of the start latent and of the acted one: equal to a few bf16 ulps.
    assert torch.allclose(predicted, acted, atol=0.03)
    # Off by one: the window's own first step as the start, or its own action as the previous.
    continuing = torch.as_tensor(~batch["is_first"][:, 0])
    own = torch.as_tensor(from_bf16_bits(replay.data["deter"][batch["env"], batch["index"][:, 0]]))
    own_action = torch.nn.functional.one_hot(b["action"][:, 0], 2).float()
    for d, a, rows in ((own, prev_action[:, 0], continuing),
                       (deter, own_action, continuing & (b["action"][:, 0] != b["start_action"]))):
        assert rows.any()
        with torch.no_grad():
            wrong, _, _ = agent.rssm.obs_step(d, stoch, a, agent.encoder(b["obs"][:, 0]), b["is_first"][:, 0])
        assert (wrong - acted).abs()[rows].amax(-1).min() > 0.03


def test_overlapping_env_steps_with_updates_stores_the_same_replay(tmp_path):
    """The env workers step while the updates run; the stored steps, the updates made and the
    weights are exactly those of the plain order (step the envs, then update)."""
    results = []
    for overlap in (True, False):
        trainer = trainer_for("tests.scripted:Terminate-v0", tmp_path / str(overlap), num_envs=2,
                              batch_size=2, learning_starts=8, train_ratio=16)
        try:
            for _ in range(20):
                trainer.step(overlap)
        finally:
            trainer.close()
        r = trainer.replay
        results.append((r.obs.copy(), {k: v.copy() for k, v in r.data.items()}, dict(trainer.counters),
                        [p.detach().clone() for p in trainer.agent.parameters()]))
    (obs1, data1, c1, w1), (obs2, data2, c2, w2) = results
    assert c1 == c2 and c1["updates"] > 10
    assert np.array_equal(obs1, obs2) and all(np.array_equal(data1[k], data2[k]) for k in data1)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
