"""Faults that a long run survives: kill -9 (also in the middle of a save), a full disk, a
non-finite update, a dead env worker, an unreachable wandb server and a second run on the same
directory. The runs are real train.py processes with a tiny model on Catch;
`tests/faulty_train.py` injects the faults that cannot be caused from outside."""
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
from env import Collector, make_vector_env
from run_state import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Few and cheap updates: these tests are about the run surviving, not about learning.
FAST = ["--env", "tests.catch:Catch-v0", "--model_size", "tiny", "--num_envs", "2",
        "--batch_size", "2", "--sequence_length", "4", "--imagination_horizon", "2",
        "--learning_starts", "16", "--train_ratio", "2", "--capacity", "1000",
        "--log_interval", "16", "--wandb_mode", "disabled", "--video_interval", "0",
        "--image_interval", "0"]
NO_UPDATES = ["--learning_starts", "1000000"]  # for tests where only the loop around them matters


def start(tmp_path, *args, env=None, name="run"):
    """A train.py process (through the fault injector) in its own process group, so that its
    env workers can be killed with it; stderr goes to a file (a pipe could fill and block)."""
    stderr = open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tests.faulty_train", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                            env={**os.environ, **(env or {})})
    proc.stderr_path = tmp_path / f"{name}.err"
    return proc


def finish(proc, timeout=180):
    """Wait for the process; returns (exit code, stderr)."""
    try:
        proc.wait(timeout)
    finally:
        kill_group(proc)
    return proc.returncode, proc.stderr_path.read_text()


def kill_group(proc):
    proc.kill()  # SIGKILL: no handler, no checkpoint, no cleanup
    proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the env workers it leaves behind


def wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended early:\n{proc.stderr_path.read_text()[-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------
# kill -9


def test_kill_9_at_random_moments_always_leaves_a_checkpoint_that_resumes(tmp_path):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    ckpt = tmp_path / "checkpoint.pt"
    args = [*FAST, "--total_steps", "100000", "--checkpoint_interval", "8", "--run_dir", str(tmp_path)]
    steps = []
    for kill in range(3):
        proc = start(tmp_path, *(args if kill == 0 else ["--resume", str(ckpt)]))
        if kill == 0:
            wait_for(ckpt.exists, proc)
        delay = rng.uniform(0.5, 5.0)
        time.sleep(delay)
        kill_group(proc)
        # The last complete checkpoint loads (a kill -9 leaves the old or the new one, whole).
        steps.append(load_checkpoint(str(ckpt))["counters"]["env_steps"])
        assert steps == sorted(steps), f"kill {kill} after {delay:.2f} s (seed {seed})"

    # Once in the middle of a save: half of the new file is written when the process dies.
    before = digest(ckpt)
    tmp = tmp_path / "checkpoint.pt.tmp"
    tmp.unlink(missing_ok=True)  # what a kill above may have left
    proc = start(tmp_path, "--resume", str(ckpt), env={"FAULT_SLOW_SAVE": "1"})
    wait_for(lambda: "fault: slow save" in proc.stderr_path.read_text(), proc)
    kill_group(proc)
    assert digest(ckpt) == before
    saved = load_checkpoint(str(ckpt))["counters"]["env_steps"]

    # The killed runs' locks are gone with them: the resume runs to the end.
    proc = start(tmp_path, "--resume", str(ckpt), "--total_steps", str(saved + 16), name="last")
    code, stderr = finish(proc)
    assert code == 0, stderr[-2000:]
    assert load_checkpoint(str(ckpt))["counters"]["env_steps"] == saved + 16
    assert not tmp.exists()


# ---------------------------------------------------------------------------------------------
# Preemption and wall-clock budgets (runs on shared clusters)


def test_the_same_command_starts_a_run_and_continues_it_after_a_kill_9(tmp_path):
    """--resume auto: a job killed by the scheduler and requeued with the same command continues
    the run (counters, replay, wandb run) instead of starting it again."""
    ckpt = tmp_path / "checkpoint.pt"
    command = [*FAST, "--device", "cpu", "--wandb_mode", "offline", "--total_steps", "100000",
               "--checkpoint_interval", "8", "--run_dir", str(tmp_path), "--resume", "auto"]
    proc = start(tmp_path, *command, name="first")
    wait_for(lambda: ckpt.exists() and load_checkpoint(str(ckpt))["counters"]["updates"] > 0, proc)
    kill_group(proc)
    first = load_checkpoint(str(ckpt))
    assert first["wandb_id"] and first["config"]["resume"] == ""  # the first job started afresh

    proc = start(tmp_path, *command, name="requeued")
    steps = first["counters"]["env_steps"]
    wait_for(lambda: load_checkpoint(str(ckpt))["counters"]["env_steps"] >= steps + 16, proc)
    proc.send_signal(signal.SIGINT)
    code, stderr = finish(proc)
    assert code == 0, stderr[-2000:]
    assert "warning:" not in stderr, stderr[-2000:]  # the replay and the envs came back: no refill
    last = load_checkpoint(str(ckpt))
    assert last["config"]["resume"] == str(ckpt)
    assert last["wandb_id"] == first["wandb_id"]
    assert last["counters"]["updates"] > first["counters"]["updates"]
    assert last["trainer"]["replay_steps"] == last["counters"]["env_steps"]  # one replay, never refilled
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    counts = [r["episode/count"] for r in rows if "episode/count" in r]
    assert counts[-1] == last["counters"]["episodes"] > first["counters"]["episodes"]


def test_max_time_stops_the_run_and_counts_the_time_of_every_job(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    proc = start(tmp_path, *FAST, *NO_UPDATES, "--total_steps", "100000000", "--log_interval", "2",
                 "--run_dir", str(tmp_path), "--max_time", "3s", name="first")
    code, stderr = finish(proc)
    assert code == 0, stderr[-2000:]
    assert "--max_time 3s spent" in stderr and "error" not in stderr
    first = load_checkpoint(str(ckpt))["counters"]["elapsed_s"]
    assert 3 <= first < 4

    # A requeued job with a budget of 6 s runs the 3 s that are left, not 6.
    proc = start(tmp_path, "--resume", str(ckpt), "--max_time", "6s", name="second")
    code, stderr = finish(proc)
    assert code == 0, stderr[-2000:]
    second = load_checkpoint(str(ckpt))["counters"]["elapsed_s"]
    assert 6 <= second < 7
    # time/elapsed is logged as the total over both jobs.
    elapsed = [r["time/elapsed"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "time/elapsed" in r]
    assert elapsed == sorted(elapsed) and elapsed[0] < 3 and 5 < elapsed[-1] <= second


# ---------------------------------------------------------------------------------------------
# Damaged files


@pytest.fixture(scope="module")
def run_with_replay(tmp_path_factory):
    """A tiny Catch run whose ring has wrapped: its checkpoint needs chunk 0, a tail and the
    ring's latents."""
    run_dir = tmp_path_factory.mktemp("replay")
    proc = start(run_dir, *FAST, *NO_UPDATES, "--capacity", "100", "--total_steps", "140",
                 "--run_dir", str(run_dir))
    code, stderr = finish(proc)
    assert code == 0, stderr[-2000:]
    return run_dir


@pytest.mark.parametrize("name,damage", [("chunk_000000000.npz", "truncated"),
                                         ("chunk_000000000.npz", "changed in the middle"),
                                         ("latents", "changed in the middle")])
def test_resume_with_a_damaged_replay_file_is_a_one_line_error(run_with_replay, tmp_path, name, damage):
    """As for a missing file: the resume stops with one line naming the file (exit 2), and
    --no-save_replay is the way to go on without it."""
    run_dir = tmp_path / "run"
    shutil.copytree(run_with_replay, run_dir, ignore=shutil.ignore_patterns("*.err", ".lock"))
    if name == "latents":
        name = load_checkpoint(str(run_dir / "checkpoint.pt"))["replay"]["latents"]
    path = run_dir / "replay" / name
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    proc = start(tmp_path, "--resume", str(run_dir / "checkpoint.pt"), "--total_steps", "160")
    code, stderr = finish(proc)
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr[-2000:]
    assert errors[0].startswith(f"error: --resume {run_dir / 'checkpoint.pt'}: replay file {path} is "
                                f"missing or unreadable (BadZipFile: "), errors[0]
    assert errors[0].endswith("; add --no-save_replay to resume with an empty replay")
    if damage == "changed in the middle":
        return
    proc = start(tmp_path, "--resume", str(run_dir / "checkpoint.pt"), "--total_steps", "160",
                 "--no-save_replay", name="without")
    code, stderr = finish(proc)
    assert code == 0, stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Disk full


def test_disk_full_keeps_the_previous_checkpoint_retries_and_fails_at_the_end(tmp_path):
    # Writes at steps 16 (ok), 32 (full), 48 (ok: the retry), 64, 80 and the final one (full).
    proc = start(tmp_path, *FAST, *NO_UPDATES, "--total_steps", "80", "--checkpoint_interval", "16",
                 "--run_dir", str(tmp_path), env={"FAULT_ENOSPC": "2,4-"})
    code, stderr = finish(proc)
    assert code == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    warnings = [line for line in stderr.splitlines() if "could not write the checkpoint" in line]
    assert len(warnings) == 3 and all(line.startswith("warning:") for line in warnings)
    assert "No space left on device" in warnings[0] and "checkpoint of step 16 is kept" in warnings[0]
    errors = error_lines(stderr)
    assert len(errors) == 1 and "could not write the final checkpoint" in errors[0], stderr[-2000:]
    assert "checkpoint of step 48 is kept" in errors[0]
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["counters"]["env_steps"] == 48
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert max(r["step"] for r in rows) == 80  # training went on after every failed write


# ---------------------------------------------------------------------------------------------
# Non-finite updates


def tiny_agent(seed=0):
    torch.manual_seed(seed)
    cfg = train.Config(env="tests.catch:Catch-v0", model_size="tiny", imagination_horizon=3)
    return train.build_agent(cfg, 3, torch.device("cpu"))


def batch(rng, B=2, T=4):
    return dict(obs=torch.as_tensor(rng.integers(0, 256, (B, T, 64, 64, 3), dtype=np.uint8)),
                action=torch.as_tensor(rng.integers(0, 3, (B, T))),
                reward=torch.as_tensor(rng.normal(size=(B, T)), dtype=torch.float32),
                is_first=torch.zeros(B, T, dtype=torch.bool), is_last=torch.zeros(B, T, dtype=torch.bool),
                is_terminal=torch.zeros(B, T, dtype=torch.bool))


def snapshot(agent, opt):
    state = {f"agent.{k}": v.clone() for k, v in agent.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        state.update({f"opt.{i}.{k}": torch.as_tensor(v).clone() for k, v in s.items()})
    return state


def test_update_with_a_nan_loss_is_skipped_and_changes_nothing():
    agent, opt = tiny_agent()
    rng = np.random.default_rng(0)
    assert train.train_step(agent, opt, batch(rng))[0] is not None  # the optimizer has state now
    before = snapshot(agent, opt)
    bad = batch(rng)
    bad["reward"][0, 1] = float("nan")
    assert train.train_step(agent, opt, bad) == (None, None)
    after = snapshot(agent, opt)
    assert before.keys() == after.keys()
    for k in before:  # parameters, slow critic, return normaliser and optimizer state
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in agent.parameters())
    # A finite batch trains as before; the optimizer's step count skipped the bad batch.
    assert train.train_step(agent, opt, batch(rng))[0] is not None
    assert not torch.equal(agent.state_dict()["retnorm.hi"], before["agent.retnorm.hi"])
    assert next(iter(opt.state.values()))["step"] == 2


def test_a_run_of_non_finite_updates_stops_with_its_last_checkpoint(tmp_path):
    # Updates start at step 16, one every other collection step (every 4 agent steps); batches
    # the k-th batch comes at step 14 + 4k, and batches after the 4th are NaN: 16 skips by the
    # checkpoint at step 96, the 20th skip in a row at step 110.
    proc = start(tmp_path, *FAST, "--total_steps", "100000", "--checkpoint_interval", "32",
                 "--run_dir", str(tmp_path), env={"FAULT_NAN_AFTER": "4"})
    code, stderr = finish(proc)
    assert code == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr[-2000:]
    assert f"{train.MAX_SKIPPED_UPDATES} updates in a row had a non-finite loss" in errors[0]
    assert "checkpoint of step 96 is kept" in errors[0]
    assert len([line for line in stderr.splitlines() if "skipped: non-finite" in line]) == 1
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ckpt["counters"]["env_steps"] == 96 and ckpt["counters"]["skipped_updates"] == 16
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    logged = [r["opt/skipped_updates"] for r in rows if "opt/skipped_updates" in r]
    assert logged[0] == 0 and logged[-1] == 16


# ---------------------------------------------------------------------------------------------
# A dead env worker


def test_collector_replaces_a_vector_env_whose_worker_died(capsys):
    def make():
        return make_vector_env("tests.catch:Catch-v0", 2)

    collector = Collector(make(), seed=0, rebuild=make)
    stored = []

    def store(obs, **step):
        stored.append({k: np.array(v) for k, v in step.items()})

    def policy(obs, is_first):
        return np.ones(2, np.int64)

    try:
        for _ in range(3):
            collector.step(policy, store)
        old = collector.envs
        old.processes[1].kill()
        old.processes[1].join()
        assert collector.step(policy, store) == []  # the episodes in flight are not reported
        assert collector.envs is not old and old.closed
        assert "env worker 1 (exit code -9) died" in capsys.readouterr().err
        for _ in range(7):  # a Catch episode: the reset observation, then 5 steps
            collector.step(policy, store)
    finally:
        collector.envs.close()
    # The step stored after the rebuild is the new reset observation: first, reward 0, not
    # last and not terminal; then the episodes run to their ends as usual.
    after = stored[4]
    assert after["is_first"].all() and not after["is_last"].any() and not after["is_terminal"].any()
    assert (after["reward"] == 0).all()
    assert [s["is_last"].all() for s in stored[5:]] == [False] * 4 + [True, False]
    assert stored[10]["is_first"].all()


def children(pid):
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def test_run_survives_a_killed_env_worker(tmp_path):
    proc = start(tmp_path, *FAST, "--total_steps", "64", "--run_dir", str(tmp_path))
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and "loss/rec" in metrics.read_text(), proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    code, stderr = finish(proc)
    assert code == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    warnings = [line for line in stderr.splitlines() if "died" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: env worker 0"), stderr[-2000:]
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["counters"]["env_steps"] == 64


# ---------------------------------------------------------------------------------------------
# wandb without a server


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_unreachable_wandb_server_falls_back_to_offline_after_a_bounded_wait(tmp_path):
    key = tmp_path / "key.txt"
    key.write_text("0123456789abcdef0123456789abcdef01234567")
    address = f"http://127.0.0.1:{closed_port()}"
    # Every request (the server, and anything else wandb would fetch) goes to the closed port.
    offline = {"WANDB_BASE_URL": address, "HTTP_PROXY": address, "HTTPS_PROXY": address,
               "http_proxy": address, "https_proxy": address, "NO_PROXY": "", "no_proxy": "",
               "WANDB_INIT_TIMEOUT": "3", "WANDB_ERROR_REPORTING": "false"}
    run_dir = tmp_path / "run"
    args = [a for a in FAST if a not in ("--wandb_mode", "disabled")]
    started = time.time()
    proc = start(tmp_path, *args, *NO_UPDATES, "--total_steps", "32", "--wandb_key", str(key),
                 "--run_dir", str(run_dir), env=offline)
    code, stderr = finish(proc)
    assert code == 0, stderr[-2000:]
    assert time.time() - started < 90
    warnings = [line for line in stderr.splitlines() if "wandb" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: wandb could not start online within 3 s")
    assert [d for d in os.listdir(run_dir / "wandb") if d.startswith("offline-run")]
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert max(r["step"] for r in rows) == 32


# ---------------------------------------------------------------------------------------------
# Two runs on one directory


def test_second_run_on_the_same_run_dir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FAST, *NO_UPDATES, "--checkpoint_interval", "0", "--run_dir", str(run_dir)]
    first = start(tmp_path, *args, "--total_steps", "100000", name="first")
    try:
        wait_for((run_dir / "metrics.jsonl").exists, first)
        second = start(tmp_path, *args, "--total_steps", "16", name="second")
        code, stderr = finish(second)
        assert code == 2 and "Traceback" not in stderr
        assert error_lines(stderr) == [f"error: --run_dir {run_dir} is in use by another run (pid "
                                       f"{first.pid}); wait for it to end or choose another --run_dir"]
        assert first.poll() is None  # the first run goes on
    finally:
        kill_group(first)
    # kill -9 leaves the lock file, but not the lock: a new run starts there.
    third = start(tmp_path, *args, "--total_steps", "16", name="third")
    code, stderr = finish(third)
    assert code == 0, stderr[-2000:]


def test_lock_is_released_when_the_trainer_closes(tmp_path):
    cfg = train.Config(env="tests.catch:Catch-v0", model_size="tiny", num_envs=1, capacity=100,
                       sequence_length=4, run_dir=str(tmp_path), wandb_mode="disabled")
    trainer = train.Trainer(cfg, train.prepare(cfg))
    try:
        with pytest.raises(ValueError, match="in use by another run"):
            train.Trainer(dataclasses.replace(cfg), None)
    finally:
        trainer.close()
    train.Trainer(dataclasses.replace(cfg), None).close()
