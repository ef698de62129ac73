"""The agent learns: end-to-end Catch through the real train.py, and the world model on Pong."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from model import Dreamer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATCH = "tests.catch:Catch-v0"

# Tiny model, short sequences and a high learning rate: ~2000 updates in about 3 minutes on 2
# CPU cores. Everything else (losses, imagination, normalisation, optimizer) is the default.
CATCH_ARGS = ["--env", CATCH, "--model_size", "tiny", "--num_envs", "2", "--total_steps", "2400",
              "--batch_size", "8", "--sequence_length", "8", "--imagination_horizon", "10",
              "--train_ratio", "64", "--learning_starts", "300", "--lr", "1e-3",
              "--actor_lr", "1e-3", "--critic_lr", "1e-3", "--warmup", "50",
              "--wandb_mode", "disabled", "--video_interval", "0", "--image_interval", "0",
              "--log_interval", "400", "--seed", "0"]


@pytest.mark.slow
def test_agent_learns_catch_far_better_than_random(tmp_path):
    result = subprocess.run([sys.executable, "train.py", *CATCH_ARGS, "--run_dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    agent = Dreamer(3, **train.SIZES["tiny"])
    agent.load_state_dict(ckpt["agent"])
    agent.eval()
    rng = np.random.default_rng(0)
    random_return = train.evaluate(None, CATCH, 200, seed=1,
                                   policy=lambda obs: rng.integers(0, 3, len(obs)))
    trained_return = train.evaluate(agent, CATCH, 100, seed=2)
    # Return = 2·catch rate − 1: random catches about 20%, the trained agent at least 80%.
    print(f"catch: trained {trained_return:.2f}, random {random_return:.2f}")
    assert random_return < -0.3
    assert trained_return >= 0.6
    assert trained_return - random_return >= 1.0
