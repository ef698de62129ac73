"""Smoke test of the benchmark scripts in bench/: each runs with tiny settings and prints one JSON line."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(name, *args):
    proc = subprocess.run([sys.executable, os.path.join("bench", name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be one JSON line, got: {proc.stdout!r}"
    return json.loads(lines[0])


def test_update_speed():
    # One torch thread: the test may share the cores with other jobs, and oversubscribed
    # threads make even a tiny update take seconds.
    r = run_bench("update_speed.py", "--model_size", "tiny", "--batch_size", "2",
                  "--sequence_length", "8", "--horizon", "3", "--updates", "1",
                  "--warmup_updates", "1", "--device", "cpu", "--threads", "1")
    for key in ("params_world_model", "params_actor", "params_critic", "sec_per_update_median",
                "updates_per_sec", "replayed_steps_per_sec", "peak_memory_bytes"):
        assert r[key] > 0, key
    assert r["device"] == "cpu" and r["peak_memory_kind"] == "rss"
    assert r["replayed_steps_per_sec"] == pytest.approx(r["updates_per_sec"] * 2 * 8)


def test_env_speed_random_actions():
    r = run_bench("env_speed.py", "--num_envs", "2", "--steps", "64")
    assert r["policy"] == "none" and r["steps"] == 64
    assert r["seconds"] > 0 and r["env_steps_per_sec"] > 0


def test_env_speed_with_policy():
    r = run_bench("env_speed.py", "--num_envs", "2", "--steps", "32", "--policy", "tiny",
                  "--device", "cpu", "--threads", "1")
    assert r["policy"] == "tiny" and r["device"] == "cpu" and r["steps"] == 32
    assert r["env_steps_per_sec"] > 0


def test_replay_memory():
    r = run_bench("replay_memory.py", "--capacity", "2000", "--num_envs", "2")
    assert r["nominal_bytes"] == 2000 * 12288
    assert 12288 <= r["bytes_per_step"] <= 12400
    assert 0.9 <= r["ratio_to_nominal"] <= 1.2


def test_return_curve_averages_the_last_ten_episodes(tmp_path):
    rows = [{"step": 0, "time": 100.0, "loss/rec": 1.0}]
    rows += [{"step": 10 * i, "time": 100.0 + i, "episode/return": float(i)} for i in range(1, 13)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_path = tmp_path / "curve.csv"
    final = run_bench("return_curve.py", str(tmp_path), "--csv", str(csv_path))
    # Episodes 3..12 are the last ten: mean 7.5, 12 s after the first line.
    assert (final["episodes"], final["step"], final["wall_s"], final["mean_return"]) == (12, 120, 12.0, 7.5)
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "step,wall_s,mean_return" and lines[1] == "10,1.0,1.0" and len(lines) == 13
