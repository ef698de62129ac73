"""The agent learns: end-to-end Catch and Rhythm through the real train.py, and the world model
on Pong."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from env import Collector, make_vector_env
from evaluate import evaluate
from model import Dreamer, LaProp
from replay import Replay
from run_state import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATCH, RHYTHM = "tests.catch:Catch-v0", "tests.rhythm:Rhythm-v0"
# The world model must leave the mean-frame plateau within this many updates (checked every
# CHECK_PONG): at lr 2e-3 it left it after 1,500 on an Intel Xeon (3.30, 2026-12-02). At lr 1e-3 it did
# after 2,000 on an AMD EPYC but not on the Xeon (4.04 against a bar of 3.81): the moment it leaves
# depends on float rounding, so the test stops when it has left instead of after a fixed count.
UPDATES_PONG, CHECK_PONG = 3000, 250

# Tiny model, short sequences and high learning rates: ~2100 updates in about 3.5 minutes on 2
# CPU cores. Everything else (losses, imagination, normalisation, optimizer) is the default.
# The actor's rate stays lower: at 1e-3 the policy could collapse early onto a wrong
# deterministic choice, so the outcome depended on small numerical differences.
TINY_ARGS = ["--model_size", "tiny", "--num_envs", "2", "--batch_size", "8",
             "--sequence_length", "8", "--imagination_horizon", "10", "--train_ratio", "64",
             "--learning_starts", "300", "--lr", "1e-3", "--actor_lr", "3e-4",
             "--critic_lr", "1e-3", "--warmup", "50", "--wandb_mode", "disabled",
             "--video_interval", "0", "--image_interval", "0", "--log_interval", "400",
             "--seed", "0"]


def train_tiny(env_id, total_steps, num_actions, run_dir):
    """Train through the user's command line, then load the final checkpoint."""
    result = subprocess.run([sys.executable, "train.py", "--env", env_id, *TINY_ARGS,
                             "--total_steps", str(total_steps), "--run_dir", str(run_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    agent = Dreamer(num_actions, **train.SIZES["tiny"])
    agent.load_state_dict(ckpt["agent"])
    return agent.eval()


def random_return(env_id, num_actions, episodes=200):
    rng = np.random.default_rng(0)
    return evaluate(None, env_id, episodes, seed=1,
                    policy=lambda obs, is_first: rng.integers(0, num_actions, len(obs))).mean


# Under `pytest -n 2 --dist loadscope` every class is a unit of work that one worker runs, and the
# units are handed out in file order (tests/conftest.py): the Pong world model (about 7 minutes
# on one thread) first, then Catch and Rhythm together, so that both workers start with a learning
# test and take the short tests afterwards.

@pytest.mark.slow
class TestPongWorldModel:
    def test_world_model_learns_real_pong_frames(self):
        """Reconstruction of random-play Pong frames must fall far below its start and below the
        loss of predicting the mean frame (which already gets the static background right)."""
        torch.manual_seed(0)
        envs = make_vector_env("ALE/Pong-v5", 2)
        replay, rng = Replay(1000, 2, seed=0), np.random.default_rng(0)
        try:
            collector = Collector(envs, seed=0)
            for _ in range(200):  # 400 frames
                collector.step(lambda obs, is_first: rng.integers(0, 6, 2), replay.add)
        finally:
            envs.close()
        frames = replay.obs[:, :replay.filled].reshape(-1, 64, 64, 3).astype(np.float64) / 255
        mean_frame_loss = ((frames - frames.mean(0)) ** 2).sum((1, 2, 3)).mean()

        agent, _ = train.build_agent(train.Config(env=CATCH, model_size="tiny"), 6, torch.device("cpu"))
        opt = LaProp(list(agent.world_model_parameters()), lr=2e-3, warmup=20)
        scales = agent.loss_scales

        def losses(batch):
            b = {k: torch.as_tensor(v) for k, v in batch.items()}
            return agent.world_model_loss(b["obs"], b["action"], b["reward"], b["is_first"],
                                          b["is_terminal"])[0]

        def rec_loss():  # over the first 192 stored steps of each env, in windows of 16
            window = {k: v[:, :192].reshape(24, 16, *v.shape[2:])
                      for k, v in dict(obs=replay.obs, **replay.data).items()}
            window["is_first"][:, 0] = True
            with torch.no_grad():
                return losses(window)["rec"].mean().item()

        start, end, updates = rec_loss(), None, 0
        while updates < UPDATES_PONG and not (end is not None and end < 0.9 * mean_frame_loss):
            for _ in range(CHECK_PONG):
                loss = sum(scales[k] * v.mean() for k, v in losses(replay.sample(8, 16)).items())
                opt.zero_grad()
                loss.backward()
                opt.step()
            updates += CHECK_PONG
            end = rec_loss()
        print(f"pong reconstruction: start {start:.1f}, end {end:.2f} after {updates} updates, "
              f"mean frame {mean_frame_loss:.2f}")
        assert end < start / 100
        assert end < 0.9 * mean_frame_loss


@pytest.mark.slow
class TestPolicyLearning:
    """Catch (about 6 minutes on one thread) and Rhythm (about 3): one unit of work, so that under
    xdist they run one after the other on one worker while the Pong world model runs on the other."""

    def test_agent_learns_catch_far_better_than_random(self, tmp_path):
        agent = train_tiny(CATCH, 2400, 3, tmp_path)
        random_play, trained = random_return(CATCH, 3), evaluate(agent, CATCH, 100, seed=2).mean
        # Return = 2·catch rate − 1: random catches about 20%, the trained agent at least 80%.
        print(f"catch: trained {trained:.2f}, random {random_play:.2f}")
        assert random_play < -0.3
        assert trained >= 0.6
        assert trained - random_play >= 1.0

    def test_agent_learns_rhythm_which_needs_the_is_first_reset(self, tmp_path):
        """Rhythm can only be won by an agent whose state restarts at every episode's first step:
        the screen never changes. A perfect agent earns 3.5 per episode on average; an agent that
        cannot tell where episodes begin earns about 0.5 at best, random play about 0."""
        agent = train_tiny(RHYTHM, 1200, 2, tmp_path)
        random_play, trained = random_return(RHYTHM, 2), evaluate(agent, RHYTHM, 100, seed=2).mean
        print(f"rhythm: trained {trained:.2f}, random {random_play:.2f}")
        assert abs(random_play) < 0.5
        assert trained >= 2.5
        assert trained - random_play >= 2.0
