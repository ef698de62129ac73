"""Smoke tests of the benchmark scripts in bench/: each runs with tiny settings (the Python ones
print one JSON line); the table and curve scripts on hand-made run directories."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import imageio.v2 as imageio
import pytest
import torch

import train
from env import make_env
from run_state import load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import reconstruction  # noqa: E402  (bench/ is not a package)


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
                  "--warmup_updates", "1", "--device", "cpu", "--threads", "1", "--no-flops",
                  "--peak_size", "0")
    for key in ("params_world_model", "params_actor", "params_critic", "sec_per_update_median",
                "updates_per_sec", "replayed_steps_per_sec", "peak_memory_bytes"):
        assert r[key] > 0, key
    assert r["device"] == "cpu" and r["peak_memory_kind"] == "rss"
    assert r["replayed_steps_per_sec"] == pytest.approx(r["updates_per_sec"] * 2 * 8)


def test_update_speed_counts_flops_and_share_of_peak():
    r = run_bench("update_speed.py", "--model_size", "tiny", "--batch_size", "2",
                  "--sequence_length", "4", "--horizon", "2", "--updates", "1",
                  "--warmup_updates", "0", "--device", "cpu", "--threads", "1", "--peak_size", "256")
    assert r["gflop_per_update"] > 0 and r["peak_gflops"] > 0
    assert r["gflops_achieved"] == pytest.approx(r["gflop_per_update"] / r["sec_per_update_median"])
    assert r["share_of_peak"] == pytest.approx(r["gflops_achieved"] / r["peak_gflops"])


def test_profile_update_lists_the_update_s_ops_and_its_image_stacks():
    r = run_bench("profile_update.py", "--batch_size", "2", "--sequence_length", "4", "--horizon", "2",
                  "--updates", "2", "--warmup_updates", "1", "--top", "4")
    assert (r["model_size"], r["batch_size"], r["threads"]) == ("tiny", 2, 1)
    assert r["updates_per_sec"] == pytest.approx(1 / r["sec_per_update"])
    # Thousands of small ops even at batch 2 × 4 (16 per RSSM step and more, forward and backward).
    assert r["ops_per_update"] > 1000 and len(r["top_ops"]) == 4
    ms = [op["ms_per_update"] for op in r["top_ops"]]
    assert ms == sorted(ms, reverse=True) and all(op["op"].startswith("aten::") for op in r["top_ops"])
    assert 0 < sum(op["share"] for op in r["top_ops"]) <= 1
    assert r["encoder_ms"] > 0 and r["decoder_ms"] > 0



def test_softmax_speed_times_both_softmaxes_alone_and_in_turn_in_the_update():
    r = run_bench("softmax_speed.py", "--batch_size", "2", "--sequence_length", "4", "--horizon", "2",
                  "--pairs", "2", "--repeats", "3")
    # The tiny model's (B·T, 32, 8) and (B, 32, 8) latents and the (B·T, actions) policy.
    assert [op["shape"] for op in r["ops"]] == [[8, 32, 8], [2, 32, 8], [8, 6]]
    assert all(op[k] > 0 for op in r["ops"] for k in ("torch_us", "ours_us", "torch_fwd_bwd_us", "ours_fwd_bwd_us"))
    assert r["pairs"] == 2 and r["update_plain_s"] > 0 and r["update_ours_s"] > 0
    q1, median, q3 = r["update_ratio_quartiles"]
    assert q1 <= median <= q3 and r["update_ratio"] == pytest.approx(median)

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_peak(dtype):
    r = run_bench("peak.py", "--size", "128", "--seconds", "0.1", "--threads", "1", "--dtype", dtype)
    assert r["size"] == 128 and r["dtype"] == dtype and r["gflops"] > 0 and r["repeats"] >= 8


def test_gpu_script_dry_run_prints_rows_on_cpu():
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 1 and "| eager |" in rows[0]
    assert "training loop, tiny" in proc.stdout and "collection, tiny policy" in proc.stdout
    assert proc.stderr.count("dry run, not run") == 2 and "reduce-overhead" in proc.stderr


def test_gpu_script_skips_what_no_longer_fits_its_budget():
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHON=sys.executable, BUDGET_S="10"))
    assert proc.returncode == 1
    assert proc.stderr.count("skipped (budget of 10 s spent)") == 3  # the update, the loop, collection


def test_env_speed_random_actions():
    r = run_bench("env_speed.py", "--num_envs", "2", "--steps", "64")
    assert r["policy"] == "none" and r["steps"] == 64
    assert r["seconds"] > 0 and r["env_steps_per_sec"] > 0


def test_env_speed_with_policy():
    r = run_bench("env_speed.py", "--num_envs", "2", "--steps", "32", "--policy", "tiny",
                  "--device", "cpu", "--threads", "1")
    assert r["policy"] == "tiny" and r["device"] == "cpu" and r["steps"] == 32
    assert r["env_steps_per_sec"] > 0


def test_loop_speed_times_both_orders_of_the_same_loop():
    # 2 envs × train ratio 16 / (2 × 8 replayed steps) = 2 updates per loop iteration.
    r = run_bench("loop_speed.py", "--env", "tests.catch:Catch-v0", "--num_envs", "2",
                  "--train_ratio", "16", "--batch_size", "2", "--sequence_length", "8",
                  "--learning_starts", "16", "--block", "3", "--blocks", "1", "--threads", "1")
    for order in ("overlap", "plain"):
        assert r[order]["agent_steps"] == 2 * 3 and r[order]["updates"] == 2 * 3
        assert r[order]["agent_steps_per_sec"] == pytest.approx(6 / r[order]["seconds"], rel=1e-2)
    assert r["speedup"] == pytest.approx(r["overlap"]["agent_steps_per_sec"] / r["plain"]["agent_steps_per_sec"],
                                         rel=1e-2)


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
    assert os.path.getsize(tmp_path / "return_curve.png") > 1000
    assert final["random"] is None  # no config: no game, no random level


def test_return_curve_counts_the_run_s_own_time_across_jobs(tmp_path):
    # Two jobs of one run: the second starts a day after the first ended, 30 s into the run.
    rows = [{"step": 10, "time": 1000.0, "episode/return": 1.0, "time/elapsed": 20.0},
            {"step": 20, "time": 1010.0, "episode/return": 3.0, "time/elapsed": 30.0},
            {"step": 30, "time": 87_500.0, "episode/return": 5.0, "time/elapsed": 45.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = run_bench("return_curve.py", str(tmp_path), "--csv", str(tmp_path / "c.csv"))
    assert (final["wall_s"], final["mean_return"]) == (45.0, 3.0)
    assert (tmp_path / "c.csv").read_text().splitlines()[1:] == ["10,20.0,1.0", "20,30.0,2.0", "30,45.0,3.0"]


def fake_run(path, env, eval_mean=None, train_returns=()):
    """A run directory as train.py leaves it, by hand: config.json, eval_*.json, metrics.jsonl."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"env": env, "seed": 0}))
    if eval_mean is not None:
        (path / "eval_100000.json").write_text(json.dumps({"env": env, "step": 100000, "mean": eval_mean}))
    rows = [{"step": 100 * i, "time": float(i), "episode/return": r} for i, r in enumerate(train_returns)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_return_curve_png_draws_the_random_level_of_atari_games(tmp_path):
    run = fake_run(tmp_path / "pong", "ALE/Pong-v5", train_returns=[-21.0, -20.0, -19.0])
    final = run_bench("return_curve.py", str(run), "--csv", str(tmp_path / "c.csv"),
                      "--png", str(tmp_path / "curve.png"))
    assert final["random"] == -20.7 and final["mean_return"] == -20.0
    assert os.path.getsize(tmp_path / "curve.png") > 1000


def test_seed_curves_draw_every_run_and_the_random_level(tmp_path):
    runs = [fake_run(tmp_path / f"s{i}", "ALE/Pong-v5", train_returns=[-21.0 + i, -20.0 + i, -19.0 + 2 * i])
            for i in range(2)]
    out = run_bench("seed_curves.py", *map(str, runs), "--png", str(tmp_path / "pong.png"))
    # Seed 0: returns -21, -20, -19 (mean -20); seed 1: -20, -19, -17 (mean -56 / 3, rounded).
    assert out["random"] == -20.7 and [r["final_mean"] for r in out["runs"]] == [-20.0, -18.667]
    assert [(r["label"], r["x_end"]) for r in out["runs"]] == [("seed 0", 200), ("seed 0", 200)]
    assert os.path.getsize(tmp_path / "pong.png") > 1000
    # Runs that differ in a setting: named by --label, drawn against wall-clock minutes (the last
    # episode of each fake run is 2 s after its first: 0.03 minutes).
    out = run_bench("seed_curves.py", *map(str, runs), "--label", "ratio 64", "--label", "ratio 32",
                    "--x", "wall", "--png", str(tmp_path / "wall.png"))
    assert [(r["label"], r["x_end"]) for r in out["runs"]] == [("ratio 64", 0.03), ("ratio 32", 0.03)]
    assert os.path.getsize(tmp_path / "wall.png") > 1000


def test_hns_table_over_games_and_seeds(tmp_path):
    # HNS per run: Pong 1.0 and 0.0 (random −20.7, human 14.6), Breakout 0.5 and 2.0 (random 1.7,
    # human 30.5; the second run has no evaluation: the mean of its last 10 training episodes),
    # Boxing 0.25 (random 0.1, human 12.1). Per game 0.5, 1.25, 0.25: mean 2/3, median 0.5.
    # IQM over the 5 runs [0, 0.25, 0.5, 1, 2]: drop one at each end, mean of 0.25, 0.5, 1.
    fake_run(tmp_path / "Pong-s0", "ALE/Pong-v5", eval_mean=14.6, train_returns=[0.0])
    fake_run(tmp_path / "Pong-s1", "ALE/Pong-v5", eval_mean=-20.7)
    fake_run(tmp_path / "Breakout-s0", "ALE/Breakout-v5", eval_mean=16.1)
    fake_run(tmp_path / "Breakout-s1", "ALE/Breakout-v5", train_returns=[0.0, 0.0] + [59.3] * 10)
    fake_run(tmp_path / "Boxing-s0", "ALE/Boxing-v5", eval_mean=3.1)
    fake_run(tmp_path / "Catch-s0", "tests.catch:Catch-v0", eval_mean=1.0)  # no HNS: left out
    r = run_bench("hns.py", str(tmp_path), "--out", str(tmp_path / "table"))
    assert (r["games"], r["runs"]) == (3, 5)
    assert r["mean_hns"] == pytest.approx(2 / 3)
    assert r["median_hns"] == pytest.approx(0.5)
    assert r["iqm_hns"] == pytest.approx((0.25 + 0.5 + 1.0) / 3)
    assert r["per_game"]["Breakout"]["seeds"] == 2 and r["per_game"]["Breakout"]["hns"] == pytest.approx(1.25)
    assert r["per_game"]["Pong"]["dreamerv3_2023_paper"] == 18
    published = r["published"]["dreamerv3_2024_scorefile"]
    assert published["same_games"]["games"] == 3 and published["all_games"]["games"] == 26
    assert published["all_games"]["mean_hns"] == pytest.approx(1.25, abs=0.01)
    table = (tmp_path / "table" / "atari100k_table.md").read_text()
    assert "| Breakout | 2 |" in table and "**IQM HNS**" in table
    assert os.path.getsize(tmp_path / "table" / "atari100k_hns.png") > 1000


def test_atari100k_script_trains_then_evaluates_with_hns(tmp_path):
    """bench/atari100k.sh with a tiny budget: an --atari100k run, then the final evaluation of its
    checkpoint, which for an Atari game gives the human-normalised score."""
    env = dict(os.environ, RUN_ROOT=str(tmp_path), MODEL_SIZE="tiny", EVAL_EPISODES="1")
    proc = subprocess.run(["bash", "bench/atari100k.sh", "Pong", "3", "--total_steps", "32",
                           "--learning_starts", "1000", "--capacity", "1000", "--batch_size", "2",
                           "--sequence_length", "8", "--wandb_mode", "disabled", "--video_interval", "0",
                           "--image_interval", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "Pong-s3"
    config = load_checkpoint(run / "checkpoint.pt")["config"]
    assert (config["atari100k"], config["num_envs"], config["sticky_actions"], config["seed"]) == (True, 1, 0.0, 3)
    record = json.loads((run / "eval_32.json").read_text())
    assert record["game"] == "Pong" and record["episodes"] == 1 and -21 <= record["mean"] <= 21
    assert record["hns"] == pytest.approx((record["mean"] + 20.7) / 35.3)
    assert "human-normalised" in proc.stdout
    assert (run / "eval_32.mp4").exists() and (run / "return_curve.png").exists()


def test_learn_atari_cpu_script_compares_with_the_random_policy(tmp_path):
    """bench/learn_atari_cpu.sh with a tiny budget (no updates): the run's last episodes next to
    the random policy's on the same game, and the curve with the random level."""
    run = tmp_path / "run"
    env = dict(os.environ, RUN_DIR=str(run), EPISODES="2", BUDGET_S="400")
    proc = subprocess.run(["bash", "bench/learn_atari_cpu.sh", "Pong", "--num_envs", "2",
                           "--total_steps", "2400", "--learning_starts", "100000", "--capacity", "8000"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["env"] == "ALE/Pong-v5" and r["trained_episodes"] == 2 and r["random_episodes"] == 2
    assert -21 <= r["random_mean"] <= -15 and -21 <= r["trained_mean"] <= -15  # untrained: random
    # The trained side is the log's last 2 episodes; the margin is two standard errors of the
    # difference of the two means (sample standard deviations).
    returns = [row["episode/return"] for row in map(json.loads, open(run / "metrics.jsonl"))
               if "episode/return" in row][-2:]
    mean = sum(returns) / 2
    assert r["trained_mean"] == pytest.approx(mean)
    assert r["trained_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in returns)))  # ddof 1
    assert r["margin_2se"] == pytest.approx(2 * math.sqrt(r["trained_std"] ** 2 / 2 + r["random_std"] ** 2 / 2))
    assert r["above_random"] == (r["trained_mean"] - r["random_mean"] > r["margin_2se"])
    assert (run / "return_curve.png").exists() and (run / "versus_random.json").exists()


def test_ddp_speed_at_world_size_2():
    r = run_bench("ddp_speed.py", "--world_sizes", "2", "--batch_size", "2", "--sequence_length", "4",
                  "--horizon", "2", "--updates", "1", "--warmup_updates", "0")
    assert r["world_size"] == 2 and r["backend"] == "gloo"
    assert r["replayed_steps_per_sec"] == pytest.approx(2 * 2 * 4 / r["sec_per_update_median"])


def test_checkpoint_speed_with_a_saved_replay():
    r = run_bench("checkpoint_speed.py", "--capacity", "400", "--num_envs", "2",
                  "--checkpoint_interval", "100")
    assert r["chunks"] == 1 and r["chunk_steps"] == 400  # a chunk is at most the whole ring
    assert r["latents_bytes"] >= 400 * (2 * 128 + 32)  # tiny: deter 128
    assert 400 * 12_303 <= r["replay_disk_bytes"]
    assert max(r["replay_disk_bytes_before_commit"], r["replay_disk_bytes_after_commit"]) <= r["estimate_bytes"]


def test_reconstruction_counts_the_pixels_a_world_model_leaves_out(tmp_path):
    """bench/reconstruction.py on a checkpoint whose decoder draws every frame black: its error is
    the brightness of the random policy's frames, and the pixels brighter than the threshold (the
    ball and the paddle of Catch) are missed."""
    cfg = train.Config(env="tests.catch:Catch-v0", model_size="tiny")
    agent, _ = train.build_agent(cfg, 3, torch.device("cpu"))
    last = agent.decoder.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-30.0)  # sigmoid → 1e-13
    save_checkpoint(str(tmp_path / "checkpoint.pt"), dict(agent=agent.state_dict(), config=dataclasses.asdict(cfg),
                                                         counters=dict(env_steps=7, updates=3)))
    r = run_bench("reconstruction.py", str(tmp_path), "--steps", "40", "--seed", "4", "--threshold", "0.3",
                  "--png", str(tmp_path / "recon.png"))

    data = reconstruction.play(make_env(cfg.env)(), 40, seed=4)
    assert data["is_first"][0] and data["is_first"].sum() > 1  # episodes end inside the 40 steps
    assert len(set(data["action"])) == 3 and (data["is_first"][1:] == data["is_terminal"][:-1]).all()
    error = (data["obs"] / 255.0).mean(-1)
    missed = (error > 0.3).sum((1, 2))
    assert missed.max() > 0 and missed.min() < missed.max()  # the frames differ in what is missed
    assert (r["agent_steps"], r["updates"], r["frames"], r["threshold"]) == (7, 3, 40, 0.3)
    assert r["mean_abs_error"] == pytest.approx(error.mean(), abs=1e-5)
    assert r["missed_pixels_per_frame"] == pytest.approx(missed.mean(), abs=0.01)
    assert r["frames_with_a_missed_pixel"] == pytest.approx((missed > 0).mean(), abs=1e-3)
    assert imageio.imread(r["png"]).shape == (3 * 64 * 4, 8 * 64 * 4, 3)  # 8 frames; frame, model, error


def test_world_model_fit_lowers_the_reconstruction_loss_and_checks_held_out_frames():
    r = run_bench("world_model_fit.py", "Breakout", "--data_steps", "60", "--max_updates", "6", "--every", "3",
                  "--batch_size", "2", "--sequence_length", "8", "--depth", "4", "--deter", "16", "--rep_scale", "0",
                  "--enc_pool", "1", "--dec_pool", "1", "--pool_kernel", "3", "--image_output", "linear")
    assert (r["game"], r["depth"], r["deter"], r["rep_scale"], r["held_out"]) == ("Breakout", 4, 16, 0.0, 200)
    assert (r["enc_pool"], r["dec_pool"], r["pool_kernel"], r["image_output"]) == (1, 1, 3, "linear")
    assert r["threads"] == 1
    first, last = r["curve"]
    assert (first["updates"], last["updates"]) == (3, 6)
    assert last["rec_loss"] < first["rec_loss"] and last["mean_abs_error"] < first["mean_abs_error"]
    assert 0 < last["missed_pixels_per_frame"] <= 64 * 64  # an untrained model misses most of the frame
