"""--keep_checkpoints: the last N checkpoints kept as small weights-only snapshots, evaluable with
train.py --resume ... --eval_episodes N and by bench/eval_curve.py, and refused for training."""
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import imageio.v2 as imageio
import pytest
import torch

import train
from run_state import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import eval_curve  # noqa: E402  (bench/ is not a package: the scripts import each other by name)

# A few cheap updates, so that the snapshots' weights differ.
FAST = ["--env", "tests.catch:Catch-v0", "--model_size", "tiny", "--num_envs", "2", "--batch_size", "2",
        "--sequence_length", "4", "--imagination_horizon", "2", "--learning_starts", "16",
        "--train_ratio", "2", "--capacity", "1000", "--log_interval", "16", "--wandb_mode", "disabled",
        "--video_interval", "0", "--image_interval", "0"]


def python(*args, timeout=180):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def catch_run(tmp_path_factory):
    """100 agent steps, a checkpoint every 32: checkpoints at 32, 64, 96 and the final one at 100."""
    run_dir = tmp_path_factory.mktemp("snapshots")
    result = python("train.py", *FAST, "--total_steps", "100", "--checkpoint_interval", "32",
                    "--keep_checkpoints", "2", "--run_dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.fixture
def run_dir(catch_run, tmp_path):
    """A copy of the run, for tests that write in it."""
    shutil.copytree(catch_run, tmp_path / "run")
    return tmp_path / "run"


def test_keep_checkpoints_leaves_the_last_n_small_snapshots(catch_run):
    names = sorted(n for n in os.listdir(catch_run) if n.startswith("checkpoint"))
    assert names == ["checkpoint.pt", "checkpoint_000000096.pt", "checkpoint_000000100.pt"]
    full = load_checkpoint(str(catch_run / "checkpoint.pt"))
    for step in (96, 100):
        path = catch_run / f"checkpoint_{step:09d}.pt"
        snapshot = load_checkpoint(str(path), evaluation=True)
        assert set(snapshot) == {"snapshot", "agent", "config", "counters", "num_actions"}
        assert snapshot["counters"]["env_steps"] == step and snapshot["num_actions"] == 3
        # The weights and the normaliser only: a third of checkpoint.pt (no optimizer moments,
        # replay record, RNGs or env states), and the size the disk estimate counts.
        assert os.path.getsize(path) < os.path.getsize(catch_run / "checkpoint.pt") / 2
        cfg = train.Config(**snapshot["config"])
        assert os.path.getsize(path) <= train.snapshot_bytes(cfg, num_actions=3) < os.path.getsize(path) + 2**17
    last = load_checkpoint(str(catch_run / "checkpoint_000000100.pt"), evaluation=True)
    assert last["agent"].keys() == full["agent"].keys()
    for name, value in full["agent"].items():  # the final snapshot is the final checkpoint's agent
        assert torch.equal(value, last["agent"][name]), name
    assert "retnorm.hi" in last["agent"]
    earlier = load_checkpoint(str(catch_run / "checkpoint_000000096.pt"), evaluation=True)
    assert any(not torch.equal(v, earlier["agent"][k]) for k, v in last["agent"].items())


def test_a_snapshot_is_evaluated_but_not_resumed_for_training(run_dir):
    snapshot = run_dir / "checkpoint_000000096.pt"
    result = python("train.py", "--resume", str(snapshot))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: --resume {snapshot}: a snapshot for evaluation only (weights, no optimizer or "
                      f"replay): evaluate it with --eval_episodes N, or resume training from "
                      f"{run_dir / 'checkpoint.pt'}"]
    with pytest.raises(ValueError, match="a snapshot for evaluation only"):
        train.prepare(train.Config(resume=str(snapshot)))  # also without the command line

    result = python("train.py", "--resume", str(snapshot), "--eval_episodes", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((run_dir / "eval_96.json").read_text())
    assert record["step"] == 96 and record["episodes"] == 4

    # eval_curve.py evaluates it the same way: the same episodes, the same mean.
    result = python("bench/eval_curve.py", str(run_dir), "--eval_episodes", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(run_dir / "eval_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["mean"]) == pytest.approx(record["mean"])


def test_eval_curve_writes_a_row_per_snapshot_and_a_png(run_dir):
    before = set(os.listdir(run_dir))
    result = python("bench/eval_curve.py", str(run_dir), "--eval_episodes", "3", "--eval_envs", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    summary = json.loads(lines[0])
    assert summary["snapshots"] == 2 and summary["last"]["agent_steps"] == 100
    with open(run_dir / "eval_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["agent_steps", "mean", "std", "episodes"]  # Catch: no HNS
    assert [int(r["agent_steps"]) for r in rows] == [96, 100]
    assert all(int(r["episodes"]) == 3 and -1 <= float(r["mean"]) <= 1 for r in rows)
    assert imageio.imread(run_dir / "eval_curve.png").shape[:2] == (400, 700)
    assert set(os.listdir(run_dir)) - before == {"eval_curve.csv", "eval_curve.png"}  # nothing else


def test_eval_curve_of_a_run_without_snapshots_is_one_line_error(tmp_path):
    result = python("bench/eval_curve.py", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path} holds no checkpoint_<step>.pt (train with " \
                                    f"--keep_checkpoints N)"


def test_eval_curve_plots_the_hns_of_atari_games_in_a_second_panel(tmp_path):
    rows = [dict(agent_steps=s, mean=m, std=1.0, episodes=10, hns=h)
            for s, m, h in ((1000, -20.0, 0.02), (2000, -10.0, 0.30))]
    eval_curve.plot(rows, tmp_path / "hns.png", "Pong")
    eval_curve.plot([{k: v for k, v in r.items() if k != "hns"} for r in rows], tmp_path / "return.png", "Catch")
    assert imageio.imread(tmp_path / "hns.png").shape[:2] == (650, 700)
    assert imageio.imread(tmp_path / "return.png").shape[:2] == (400, 700)


def test_keep_checkpoints_is_checked_and_counted_in_the_disk_estimate(tmp_path, monkeypatch, capsys):
    cfg = train.Config(env="tests.catch:Catch-v0", model_size="12m", save_replay=False, run_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--keep_checkpoints must be >= 0, got -1"):
        train.check_config(dataclasses.replace(cfg, keep_checkpoints=-1))
    params = sum(p.numel() for p in train.build_agent(cfg, 18, torch.device("meta"))[0].parameters())
    assert 4 * params < train.snapshot_bytes(cfg) < 4 * params * 1.01 + 2**17
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: train.shutil._ntuple_diskusage(10**12, 0, 0))
    need = {}
    for keep in (0, 5):
        train.warn_if_disk_too_small(dataclasses.replace(cfg, keep_checkpoints=keep))
        need[keep] = float(capsys.readouterr().err.split("need about ")[1].split(" GiB")[0])
    # 5 kept, and the new one written before the oldest is deleted
    assert need[5] - need[0] == pytest.approx(6 * train.snapshot_bytes(cfg) / 2**30, abs=0.01)
