"""The real train.py end to end: smoke run on ALE Pong, resume, and one-line errors."""
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from run_state import load_checkpoint

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
    assert "wandb" not in result.stderr and "could not write" not in result.stderr
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    episodes = [r for r in rows if "episode/return" in r]
    assert episodes and all(-21 <= r["episode/return"] <= 21 for r in episodes)
    elapsed = [r["time/elapsed"] for r in episodes]  # the run's own seconds, for curves over jobs
    assert elapsed == sorted(elapsed) and 0 < elapsed[0]
    trained = [r for r in rows if "loss/rec" in r]
    assert trained and all("fps/env" in r and "replay/size" in r for r in trained)
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    assert ckpt["counters"]["env_steps"] == 2000
    assert ckpt["counters"]["updates"] == pytest.approx((2000 - 256) * 8 / 64, abs=2)


def test_resume_continues_from_saved_counters(smoke_run, tmp_path):
    # A copy of the smoke run: the other tests read the original, whatever the order.
    run_dir = str(tmp_path / "run")
    shutil.copytree(smoke_run[0], run_dir)
    path = os.path.join(run_dir, "checkpoint.pt")
    before = load_checkpoint(path)
    # Only the new budget is given: every other setting comes from the checkpoint.
    result = run_train("--resume", path, "--total_steps", "2400")
    assert result.returncode == 0, result.stderr[-2000:]
    after = load_checkpoint(path)
    assert after["counters"]["env_steps"] == 2400
    assert after["counters"]["updates"] > before["counters"]["updates"]
    assert after["wandb_id"] == before["wandb_id"]
    assert after["config"]["num_envs"] == 2 and after["config"]["model_size"] == "tiny"
    # The updates went on (that the normaliser, slow critic and optimizer come back exactly is
    # tested below and by the bit-for-bit resumes of tests/test_resume.py).
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
    trainer.update(trainer.batches.next())
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
    (["--env", "ALE/Pong-v5", "--sequence_length", "1"], "--sequence_length must be at least 2"),
    (["--env", "ALE/Pong-v5", "--device", "cuda:3"], "--device cuda:3: CUDA is not available"),
    (["--env", "ALE/Pong-v5", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--env", "ALE/Pong-v5", "--precision", "fp16"], "--precision must be auto, fp32 or bf16"),
    (["--env", "ALE/Pong-v5", "--compile_mode", "fast"], "--compile_mode must be one of"),
    (["--env", "ALE/Pong-v5", "--max_time", "abc"], "--max_time abc: not a duration"),
    (["--env", "ALE/Pong-v5", "--max_time", "-5"], "--max_time -5: not a duration"),
    (["--env", "ALE/Pong-v5", "--max_time", "0"], "--max_time 0: must be positive"),
])
def test_bad_input_is_one_line_error(tmp_path, args, message):
    result = run_train(*args, "--run_dir", str(tmp_path / "run"), timeout=120)
    assert not (tmp_path / "run").exists()  # nothing is created for a run that cannot start
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error")]) == 1


@pytest.mark.parametrize("flag,value,message", [
    ("lives", "reset", "--lives must be unused or discount, got reset"),
    ("image_output", "tanh", "--image_output must be sigmoid or linear, got tanh"),
    ("actor_entropy", -1e-3, "--actor_entropy must be >= 0, got -0.001"),
])
def test_bad_lives_and_actor_entropy_are_clear_errors(flag, value, message):
    cfg = train.Config(env="ALE/Pong-v5", **{flag: value})
    with pytest.raises(ValueError, match=message):
        train.check_config(cfg)


def test_resume_auto_without_run_dir_is_one_line_error():
    result = run_train("--env", "ALE/Pong-v5", "--resume", "auto", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: --resume auto needs --run_dir (the folder whose checkpoint.pt it resumes)"]


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


def fake_checkpoint(path, agent_state, **config):
    cfg = dataclasses.asdict(train.Config(**config))
    torch.save(dict(agent=agent_state, optimizer={}, counters={}, config=cfg), path)
    return str(path)


def test_checkpoint_of_another_model_is_one_line_error_and_exits(tmp_path):
    """The env workers are already running when the weights are loaded: the error must still
    be one line, and the process must exit instead of waiting for the workers."""
    path = fake_checkpoint(tmp_path / "checkpoint.pt", {"bogus": torch.zeros(1)},
                           env="tests.catch:Catch-v0", model_size="tiny", num_envs=2)
    result = run_train("--resume", path, "--wandb_mode", "disabled", timeout=120)
    assert result.returncode == 2 and "do not fit this program's tiny model" in result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len([line for line in lines if not line.startswith("warning")]) == 1


def test_failed_start_stops_the_env_workers(tmp_path):
    import multiprocessing

    path = fake_checkpoint(tmp_path / "checkpoint.pt", {"bogus": torch.zeros(1)},
                           env="tests.catch:Catch-v0", model_size="tiny", num_envs=2)
    cfg, given = train.parse_args(["--resume", path, "--wandb_mode", "disabled", "--capacity",
                                   "1000", "--run_dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match="do not fit"):
        train.Trainer(cfg, train.prepare(cfg, given))
    assert multiprocessing.active_children() == []
    assert not (tmp_path / "run").exists()


def test_resumed_atari100k_run_keeps_the_values_it_was_saved_with(tmp_path):
    path = fake_checkpoint(tmp_path / "checkpoint.pt", {}, env="ALE/Pong-v5", atari100k=True,
                           num_envs=1, sticky_actions=0.0, total_steps=200_000, train_ratio=128)
    cfg, given = train.parse_args(["--resume", path])
    train.prepare(cfg, given)
    assert (cfg.atari100k, cfg.total_steps, cfg.train_ratio) == (True, 200_000, 128)
    cfg, given = train.parse_args(["--resume", path, "--no-atari100k"])
    with pytest.raises(ValueError, match="atari100k"):
        train.prepare(cfg, given)


def test_on_off_flags_can_be_switched_off():
    cfg, given = train.parse_args(["--env", "ALE/Pong-v5", "--no-atari100k", "--no-compile"])
    assert (cfg.atari100k, cfg.compile) == (False, False)
    assert {"atari100k", "compile"} <= given


def test_logging_failures_never_stop_training(tmp_path, capsys):
    from utils import Logger, write_media

    class Run:  # stands in for a live wandb run
        id, logged = "x", []

        def log(self, data):
            self.logged.append(data)

    logger = Logger(str(tmp_path), {}, "disabled")
    logger.wandb = Run()
    logger.scalars(1, {"a": 1.0})
    assert Run.logged == [{"a": 1.0, "agent_step": 1}]
    logger.video(2, "episode/video", str(tmp_path / "missing.mp4"))  # wandb.Video raises
    assert logger.wandb is None and "wandb log failed" in capsys.readouterr().err
    logger.scalars(3, {"a": 2.0})  # metrics.jsonl goes on
    logger.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2

    def broken_writer(path, data):
        raise OSError("disk full")

    write_media(broken_writer, str(tmp_path / "v.mp4"), None, logger.video, 4, "episode/video")
    assert "could not write" in capsys.readouterr().err


def test_help_documents_every_flag():
    result = run_train("--help", timeout=60)
    assert result.returncode == 0
    for f in dataclasses.fields(train.Config):
        assert f"--{f.name}" in result.stdout
    assert "(default: )" not in result.stdout  # flags without a default say what happens without them


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
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["counters"]["env_steps"] > 64 and ckpt["counters"]["updates"] > 0


def test_atari100k_preset_keeps_explicit_flags():
    cfg, given = train.parse_args(["--env", "ALE/Pong-v5", "--atari100k", "--train_ratio", "128"])
    train.apply_presets(cfg, given)
    assert (cfg.num_envs, cfg.sticky_actions, cfg.total_steps) == (1, 0.0, 100_000)
    assert cfg.train_ratio == 128


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU preset is chosen where there is no GPU")
def test_without_a_gpu_a_new_run_uses_the_cpu_preset_and_says_so(capsys):
    cfg, given = train.parse_args(["--env", "ALE/Pong-v5", "--num_envs", "8"])
    train.apply_presets(cfg, given)
    assert (cfg.preset, cfg.model_size, cfg.batch_size, cfg.sequence_length, cfg.train_ratio, cfg.lives,
            cfg.actor_entropy) == ("cpu", "tiny", 8, 16, 64.0, "discount", 1e-3)
    assert cfg.num_envs == 8  # given explicitly
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "--preset cpu" in note and "--preset none" in note
    for argv in (["--model_size", "12m"], ["--preset", "none"], ["--atari100k"], ["--device", "cpu"]):
        cfg, given = train.parse_args(["--env", "ALE/Pong-v5", *argv])
        train.apply_presets(cfg, given)
        assert cfg.preset != "cpu" and cfg.batch_size == 16 and cfg.lives == "unused", argv
        assert cfg.actor_entropy == 3e-4, argv
    assert capsys.readouterr().err == ""
    cfg, given = train.parse_args(["--env", "ALE/Pong-v5", "--preset", "cpu", "--actor_entropy", "3e-4"])
    assert train.apply_presets(cfg, given).actor_entropy == 3e-4  # given explicitly
    cfg, given = train.parse_args(["--env", "ALE/Pong-v5", "--preset", "atari100k"])
    assert train.apply_presets(cfg, given).atari100k and cfg.num_envs == 1
    cfg, given = train.parse_args(["--env", "ALE/Pong-v5", "--preset", "gpu"])
    with pytest.raises(ValueError, match="--preset must be one of none, atari100k, cpu"):
        train.apply_presets(cfg, given)
    # The CPU preset's note is the only line: no second "training on CPU (slow)" warning after it;
    # a bigger model on the CPU still gets the warning.
    capsys.readouterr()
    assert train.pick_device("auto", warn=False).type == "cpu" and capsys.readouterr().err == ""
    assert train.pick_device("auto").type == "cpu" and "training on CPU (slow)" in capsys.readouterr().err


def test_a_resumed_run_keeps_the_preset_it_was_saved_with(tmp_path):
    cfg = train.apply_presets(train.Config(env="tests.catch:Catch-v0", preset="cpu", run_dir=str(tmp_path),
                                           wandb_mode="disabled", video_interval=0, image_interval=0, capacity=4000))
    prepared = train.prepare(cfg)
    cfg.actor_entropy = 3e-4  # as a run saved before the preset's entropy scale became 1e-3
    trainer = train.Trainer(cfg, prepared)
    trainer.save()
    trainer.close()
    cfg2, given = train.parse_args(["--resume", str(tmp_path / "checkpoint.pt")])
    train.prepare(cfg2, given)
    assert (cfg2.preset, cfg2.model_size, cfg2.batch_size, cfg2.lr) == ("cpu", "tiny", 8, 1e-3)
    assert cfg2.actor_entropy == 3e-4  # the saved value, not the preset's


def bad_path_cases(tmp_path):
    (tmp_path / "afile").write_text("x")
    return {
        "under a file": (str(tmp_path / "afile" / "sub" / "run"), "is a file, so no directory"),
        "an existing file": (str(tmp_path / "afile"), "exists and is not a directory"),
    }


@pytest.mark.parametrize("case", ["under a file", "an existing file"])
def test_run_dir_that_cannot_be_made_is_one_line_error(tmp_path, case):
    run_dir, message = bad_path_cases(tmp_path)[case]
    result = run_train("--env", "tests.catch:Catch-v0", "--run_dir", run_dir, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (tmp_path / "afile").read_text() == "x"  # the user's file is left alone


def test_one_line_names_the_file_or_else_the_run_dir():
    """How main and every torchrun rank print an error that got past the start-up checks."""
    full = OSError(28, "No space left on device")
    assert train.one_line(full, "runs/pong") == "runs/pong: No space left on device"
    assert train.one_line(full) == "No space left on device"
    denied = PermissionError(13, "Permission denied", "runs/pong/checkpoint.pt")
    assert train.one_line(denied, "runs/pong") == "runs/pong/checkpoint.pt: Permission denied"
    assert train.one_line(ValueError("--num_envs must be positive"), "runs/pong") == "--num_envs must be positive"


@contextlib.contextmanager
def unwritable_dir(path):
    """A directory nobody may write in: mode 555, and for root (who ignores modes) immutable."""
    os.mkdir(path, 0o555)
    os.chmod(path, 0o555)
    if os.geteuid() == 0 and subprocess.run(["chattr", "+i", path], capture_output=True).returncode:
        pytest.skip("running as root without chattr: no directory is unwritable")
    try:
        yield path
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", path], capture_output=True)


def test_run_dir_without_write_permission_is_one_line_error(tmp_path):
    with unwritable_dir(str(tmp_path / "locked")) as locked:
        for run_dir, what in ((locked, "write in"), (os.path.join(locked, "run"), "create directories in")):
            result = run_train("--env", "tests.catch:Catch-v0", "--run_dir", run_dir, timeout=120)
            assert result.returncode == 2, result.stderr[-2000:]
            assert f"no permission to {what} {locked}" in result.stderr
            assert "Traceback" not in result.stderr
        assert os.listdir(locked) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_resume_and_wandb_key_are_one_line_errors(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0o000)
    for args, flag in [(["--env", "tests.catch:Catch-v0", "--wandb_key", str(secret)], "--wandb_key"),
                       (["--resume", str(secret)], "--resume")]:
        result = run_train(*args, "--run_dir", str(tmp_path / "run"), timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"{flag} {secret}: not readable (permission denied)" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_file_the_system_refuses_to_read_is_a_one_line_error(tmp_path, monkeypatch):
    """The checks of the test above, for a process that may read every file (root, as on the CI
    machine, which skips that test): here the system's access check refuses the one file."""
    secret = tmp_path / "secret"
    secret.write_text("x")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and str(path) != str(secret))
    cfg = train.Config(env="tests.catch:Catch-v0", wandb_key=str(secret))
    path = re.escape(str(secret))
    with pytest.raises(ValueError, match=rf"^--wandb_key {path}: not readable \(permission denied\)$"):
        train.check_config(cfg)
    with pytest.raises(ValueError, match=rf"^--resume {path}: not readable \(permission denied\)$"):
        load_checkpoint(str(secret))


def test_too_little_disk_space_warns_once(tmp_path, monkeypatch, capsys):
    cfg = train.Config(env="tests.catch:Catch-v0", model_size="12m", run_dir=str(tmp_path / "run"),
                       save_replay=False)  # the replay is counted in tests/test_resume.py
    free = 100 * 2**20  # two 12m checkpoints are about 290 MiB
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, free))
    train.warn_if_disk_too_small(cfg)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "0.10 GiB free" in err and "0.29 GiB" in err
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, 10**12))
    train.warn_if_disk_too_small(cfg)
    assert capsys.readouterr().err == ""
