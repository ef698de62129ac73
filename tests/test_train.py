"""The real train.py end to end: smoke run on ALE Pong, resume, and one-line errors."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, timeout=600):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


SMOKE = ["--env", "ALE/Pong-v5", "--model_size", "tiny", "--num_envs", "2", "--batch_size", "4",
         "--sequence_length", "16", "--train_ratio", "8", "--learning_starts", "256",
         "--image_interval", "50", "--video_interval", "1", "--log_interval", "256",
         "--checkpoint_interval", "1000", "--capacity", "20000"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("smoke"))
    result = run_train(*SMOKE, "--total_steps", "2000", "--run_dir", run_dir)
    return run_dir, result


def test_smoke_run_leaves_checkpoint_logs_video_and_images(smoke_run):
    run_dir, result = smoke_run
    assert result.returncode == 0, result.stderr[-2000:]
    files = os.listdir(run_dir)
    assert "checkpoint.pt" in files and "metrics.jsonl" in files
    assert not [f for f in files if f.endswith(".tmp")]
    videos = os.listdir(os.path.join(run_dir, "videos"))
    assert videos and all(os.path.getsize(os.path.join(run_dir, "videos", v)) > 1000 for v in videos)
    images = os.listdir(os.path.join(run_dir, "images"))
    assert any(i.startswith("reconstruction") for i in images)
    assert any(i.startswith("openloop") for i in images)
    offline = [d for d in os.listdir(os.path.join(run_dir, "wandb")) if d.startswith("offline-run")]
    assert offline, "offline wandb run files are missing"
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    episodes = [r for r in rows if "episode/return" in r]
    assert episodes and all(-21 <= r["episode/return"] <= 21 for r in episodes)
    trained = [r for r in rows if "loss/rec" in r]
    assert trained and all("fps/env" in r and "replay/size" in r for r in trained)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert ckpt["counters"]["env_steps"] == 2000
    assert ckpt["counters"]["updates"] == pytest.approx((2000 - 256) * 8 / 64, abs=2)


def test_resume_continues_from_saved_counters(smoke_run):
    run_dir, _ = smoke_run
    path = os.path.join(run_dir, "checkpoint.pt")
    before = torch.load(path, weights_only=False)
    # Only the new budget is given: every other setting comes from the checkpoint.
    result = run_train("--resume", path, "--total_steps", "2400")
    assert result.returncode == 0, result.stderr[-2000:]
    after = torch.load(path, weights_only=False)
    assert after["counters"]["env_steps"] == 2400
    assert after["counters"]["updates"] > before["counters"]["updates"]
    assert after["wandb_id"] == before["wandb_id"]
    assert after["config"]["num_envs"] == 2 and after["config"]["model_size"] == "tiny"
    # The slow critic and the return normaliser come back from the checkpoint, then move on.
    assert not torch.equal(after["agent"]["retnorm.hi"], before["agent"]["retnorm.hi"])
    steps = [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert max(steps) > 2000


def test_trainer_restores_optimizer_normaliser_and_counters(tmp_path):
    cfg = train.Config(env="tests.catch:Catch-v0", model_size="tiny", num_envs=1, batch_size=2,
                       sequence_length=4, capacity=1000, run_dir=str(tmp_path),
                       wandb_mode="disabled", video_interval=0, image_interval=0)
    trainer = train.Trainer(cfg, train.prepare(cfg))
    for _ in range(10):
        trainer.collect()
    trainer.update(trainer.replay.sample(2, 4))
    trainer.save()
    trainer.close()
    cfg2 = dataclasses.replace(cfg, resume=os.path.join(str(tmp_path), "checkpoint.pt"))
    resumed = train.Trainer(cfg2, train.prepare(cfg2))
    resumed.close()
    assert resumed.counters == trainer.counters
    for a, b in zip(trainer.agent.state_dict().values(), resumed.agent.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = trainer.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["nu"], s2[k]["nu"]) for k in s1)


@pytest.mark.parametrize("args,message", [
    (["--env", "ALE/Pongg-v5"], "did you mean ALE/Pong-v5"),
    (["--env", "ALE/Pong-v5", "--num_envs", "0"], "--num_envs must be positive"),
    (["--env", "ALE/Pong-v5", "--capacity", "100", "--sequence_length", "64"], "--sequence_length"),
    (["--env", "ALE/Pong-v5", "--model_size", "huge"], "--model_size"),
    (["--env", "ALE/Pong-v5", "--discount", "1.5"], "--discount"),
    (["--env", "ALE/Pong-v5", "--wandb_mode", "online"], "--wandb_key"),
    (["--env", "ALE/Pong-v5", "--resume", "/nonexistent/checkpoint.pt"], "no such checkpoint"),
    (["--env", "ALE/Pong-v5", "--capacity", str(10**12), "--num_envs", "1"], "lower --capacity"),
    (["--env", "CartPole-v1"], "must be RGB images"),
])
def test_bad_input_is_one_line_error(args, message):
    result = run_train(*args, "--run_dir", "/tmp/never-used", timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error")]) == 1


def test_new_run_never_overwrites_a_checkpoint(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"precious")
    result = run_train("--env", "ALE/Pong-v5", "--run_dir", str(tmp_path), timeout=120)
    assert result.returncode == 2 and "already holds a checkpoint" in result.stderr
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"precious"


def test_corrupt_checkpoint_is_one_line_error(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint at all")
    result = run_train("--env", "ALE/Pong-v5", "--resume", str(bad), timeout=120)
    assert result.returncode == 2 and "not a readable checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    assert bad.read_bytes() == b"not a checkpoint at all"  # the user's file is left alone


def test_help_documents_every_flag():
    result = run_train("--help", timeout=60)
    assert result.returncode == 0
    for f in dataclasses.fields(train.Config):
        assert f"--{f.name}" in result.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_checkpoint_and_exits_cleanly(tmp_path, sig):
    args = ["--env", "tests.catch:Catch-v0", "--model_size", "tiny", "--num_envs", "2",
            "--total_steps", "10000000", "--batch_size", "2", "--sequence_length", "8",
            "--learning_starts", "64", "--train_ratio", "8", "--log_interval", "64",
            "--wandb_mode", "disabled", "--video_interval", "0", "--image_interval", "0",
            "--run_dir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and "loss/rec" in metrics.read_text()):
        time.sleep(0.5)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "saving checkpoint" in stderr and "Traceback" not in stderr
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["counters"]["env_steps"] > 64 and ckpt["counters"]["updates"] > 0


def test_atari100k_preset_keeps_explicit_flags():
    cfg, given = train.parse_args(["--env", "ALE/Pong-v5", "--atari100k", "--train_ratio", "128"])
    train.apply_presets(cfg, given)
    assert (cfg.num_envs, cfg.sticky_actions, cfg.total_steps) == (1, 0.0, 100_000)
    assert cfg.train_ratio == 128
