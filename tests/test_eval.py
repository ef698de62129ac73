"""Evaluation: the human-normalised score, the game names of the score tables, evaluating a
checkpoint through train.py, and the evaluations during training."""
import json
import os
import shutil
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from env import _registry_ids
from evaluate import ATARI100K_CSV, atari_id, game_name, human_normalized, read_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATCH = "tests.catch:Catch-v0"
TINY_CATCH = ["--env", CATCH, "--model_size", "tiny", "--num_envs", "2", "--batch_size", "4",
              "--sequence_length", "8", "--train_ratio", "8", "--learning_starts", "64",
              "--wandb_mode", "disabled", "--video_interval", "0", "--image_interval", "0",
              "--log_interval", "100", "--total_steps", "200"]


def run_train(*args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_human_normalized_score_from_hand_values():
    # Pong: random −20.7, human 14.6; Breakout: random 1.7, human 30.5.
    assert human_normalized(-20.7, "Pong") == pytest.approx(0.0)
    assert human_normalized(14.6, "Pong") == pytest.approx(1.0)
    assert human_normalized(-3.05, "Pong") == pytest.approx(0.5)
    assert human_normalized(59.3, "Breakout") == pytest.approx(2.0)
    assert human_normalized(1.0, "Pooyan") is None  # an ALE game outside the 57


def test_every_game_of_the_score_tables_is_a_registered_ale_id():
    ids = set(_registry_ids())
    random_human, atari100k = read_scores(), read_scores(ATARI100K_CSV)
    assert len(random_human) == 57 and len(atari100k) == 26
    assert set(atari100k) <= set(random_human)
    for game in random_human:
        assert atari_id(game) in ids, game
        assert game_name(atari_id(game)) == game
    assert game_name("ALE/MontezumaRevenge-v5") == "MontezumaRevenge"
    assert game_name(CATCH) is None and game_name("CartPole-v1") is None
    assert gym.spec(atari_id("Pong")).id == "ALE/Pong-v5"


@pytest.fixture(scope="module")
def catch_run(tmp_path_factory):
    """A tiny Catch run through train.py that evaluates every 100 agent steps."""
    run_dir = tmp_path_factory.mktemp("catch")
    result = run_train(*TINY_CATCH, "--eval_interval", "100", "--eval_episodes", "4",
                       "--run_dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def test_eval_interval_logs_eval_return(catch_run):
    rows = [json.loads(line) for line in (catch_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/return" in r]
    assert [r["step"] for r in evals] == [100, 200]
    assert all(-1 <= r["eval/return"] <= 1 and "eval/hns" not in r for r in evals)
    record = json.loads((catch_run / "eval_100.json").read_text())
    assert record["episodes"] == 4 and record["mean"] == evals[0]["eval/return"]


def test_eval_episodes_evaluates_a_checkpoint_and_exits(catch_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(catch_run, run_dir)
    checkpoint, metrics = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"
    before = checkpoint.read_bytes(), metrics.read_text()
    result = run_train("--resume", str(checkpoint), "--eval_episodes", "7")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (checkpoint.read_bytes(), metrics.read_text()) == before  # no training, no logging
    record = json.loads((run_dir / "eval_200.json").read_text())
    returns = record["returns"]
    assert len(returns) == record["episodes"] == 7 and set(returns) <= {-1.0, 1.0}
    assert record["lengths"] == [5] * 7  # Catch episodes always take 5 steps
    assert record["mean"] == pytest.approx(np.mean(returns))
    assert record["median"] == pytest.approx(np.median(returns))
    assert record["std"] == pytest.approx(np.std(returns))
    assert (record["game"], record["env"], record["step"], record["greedy"]) == (CATCH, CATCH, 200, False)
    assert "hns" not in record  # not an Atari game: returns only
    assert os.path.getsize(run_dir / "eval_200.mp4") > 1000
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "7 episodes" in lines[0] and f"mean return {record['mean']:.2f}" in lines[0]

    result = run_train("--resume", str(checkpoint), "--eval_episodes", "2", "--eval_greedy")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((run_dir / "eval_200.json").read_text())
    assert record["greedy"] is True and record["episodes"] == 2


@pytest.mark.parametrize("args,message", [
    (["--resume", "{tmp}/missing.pt", "--eval_episodes", "5"], "no such checkpoint"),
    (["--resume", "{tmp}/junk.pt", "--eval_episodes", "5"], "not a readable checkpoint"),
    (["--env", CATCH, "--eval_episodes", "5"], "--eval_episodes needs --resume"),
    (["--env", CATCH, "--eval_interval", "-1"], "--eval_interval must be >= 0"),
])
def test_bad_evaluation_input_is_one_line_error(tmp_path, args, message):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = run_train(*[a.format(tmp=tmp_path) for a in args], "--run_dir", str(tmp_path / "run"),
                       timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error")]) == 1
    assert not (tmp_path / "run").exists()
