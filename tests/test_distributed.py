"""Training on two CPU processes (gloo) with torchrun: the same weights on every rank, one
distributed update equal to one update on the whole batch, rank 0 alone writing the run directory
and every rank its replay, a replay write failing on one rank, resuming in one process and on two
ranks (each with its own replay), SIGTERM on one rank and a rank that fails."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import distributed
import model
import run_state
import train
from replay import Replay, ReplayStore, available_memory
from run_state import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model_size", "tiny", "--num_envs", "1", "--batch_size", "2", "--sequence_length", "8",
        "--imagination_horizon", "3", "--train_ratio", "8", "--learning_starts", "16",
        "--log_interval", "16", "--capacity", "1000", "--wandb_mode", "disabled",
        "--video_interval", "0", "--image_interval", "0"]


def torchrun(*args, weights_dir=None, wait=True, faults=None):
    """`torchrun --standalone --nproc_per_node 2 train.py ARGS` (a Popen when not wait); with
    `faults` (variables of tests/faulty_train.py) through the fault injector."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(faults or {}))
    if weights_dir is not None:
        env[distributed.WEIGHTS_DIR_VAR] = str(weights_dir)
    script = ["-m", "tests.faulty_train"] if faults else ["train.py"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *script, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def rank_weights(folder):
    return [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(2)]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:  # complete lines (a run may be writing)
        return [json.loads(line) for line in f if line.endswith("\n")]


def test_without_torchrun_nothing_distributed_is_initialised(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    distributed.init("cpu")
    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.sync_step([(0, 1.0, 5)], True, 1) == ([(0, 1.0, 5)], True)
    x = torch.arange(3.0)
    assert distributed.gather(x) is x and distributed.rank_seed(7) == 7


def rank_replays(run_dir, checkpoint, ranks=2):
    """Each rank's replay of a checkpoint (TINY's sizes), loaded from its folder."""
    replays = []
    for rank, record in zip(range(ranks), checkpoint["replay_ranks"]):
        replays.append(Replay(1000, 1, latent=train.replay_latent(train.Config(model_size="tiny"))))
        ReplayStore(run_state.replay_dir(str(run_dir), rank), replays[-1]).load(record)
    return replays


def same_steps(a, b, steps):
    """Whether two replays hold the same first `steps` steps (frames and fields; the latents are
    refreshed by training). Rings that have not wrapped: step i is at index i."""
    assert a.adds <= a.length and b.adds <= b.length and min(a.adds, b.adds) >= steps
    return np.array_equal(a.obs[:, :steps], b.obs[:, :steps]) and \
        all(np.array_equal(a.data[k][:, :steps], b.data[k][:, :steps]) for k in Replay.FIELDS)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    # The checkpoint at step 32 fails: rank 1 cannot write its replay (disk full); the final one
    # at step 64 is written.
    run_dir, weights = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("weights")
    result = torchrun("--env", "tests.catch:Catch-v0", *TINY, "--total_steps", "64",
                      "--checkpoint_interval", "32", "--run_dir", str(run_dir), weights_dir=weights,
                      faults={"FAULT_REPLAY_ENOSPC": "1:1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, weights, result


def test_ranks_hold_identical_weights_after_updates(two_rank_run):
    run_dir, weights, _ = two_rank_run
    rank0, rank1 = rank_weights(weights)
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    # 64 agent steps of the job are 32 per rank. Updates start once the job has stored 16 steps
    # (8 per rank) and each rank's replay holds a window of 8 and the step before it (9 steps);
    # each of the 24 collection steps of a rank from then on earns 8 / (2·8) of an update: 12
    # updates, the same on both ranks, nothing carried over.
    assert ckpt["counters"]["env_steps"] == 64 and ckpt["counters"]["updates"] == 12
    assert rank0.keys() == rank1.keys()
    for name in rank0:  # weights, slow critic and the return normaliser's EMAs
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], ckpt["agent"][name]), name
    # The updates moved every part: compare with what the init sets whatever the seed (biases 0,
    # norm scales 1, the zero output layers of the reward head and the critics, the return
    # normaliser at 0), which two agents built from different seeds share.
    torch.manual_seed(1)
    init, _ = train.build_agent(train.Config(model_size="tiny"), 3, torch.device("cpu"))
    torch.manual_seed(2)
    other, _ = train.build_agent(train.Config(model_size="tiny"), 3, torch.device("cpu"))
    init, other = init.state_dict(), other.state_dict()
    fixed = [name for name in init if torch.equal(init[name], other[name])]
    for part in ("encoder.", "rssm.", "decoder.", "reward_head.", "cont_head.", "actor.", "critic.",
                 "slow_critic.", "retnorm."):
        names = [name for name in fixed if name.startswith(part) and init[name].is_floating_point()]
        assert names, part
        assert any(not torch.equal(init[name], rank0[name]) for name in names), part


def test_only_rank_0_writes_and_every_ranks_episodes_reach_the_log(two_rank_run):
    run_dir, _, result = two_rank_run
    # rank 0's lock; replay/ holds every rank's replay (below)
    assert sorted(os.listdir(run_dir)) == [".lock", "checkpoint.pt", "metrics.jsonl", "replay"]
    assert result.stdout.count("done:") == 1
    rows = metrics(run_dir)
    episodes = [r["episode/count"] for r in rows if "episode/return" in r]
    # A Catch episode takes 5 steps plus the reset step: 32 steps of each rank end 5 episodes,
    # 10 in all, each written once.
    assert episodes == list(range(1, 11))
    trained = [r["step"] for r in rows if "train/updates" in r]
    assert trained == sorted(set(trained)) and trained[-1] == 64


def test_every_rank_keeps_its_replay_named_in_the_checkpoint(two_rank_run):
    run_dir = two_rank_run[0]
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    records = ckpt["replay_ranks"]
    assert len(records) == 2 and ckpt["replay"] == records[0]  # where one process looks
    # 32 steps per rank, all in the open tail (a chunk is 1000 steps of the one env); the files
    # of the failed checkpoint at step 32 are gone.
    assert [r["adds"] for r in records] == [32, 32]
    assert sorted(os.listdir(run_dir / "replay")) == sorted(["rank_1", records[0]["tail"], records[0]["latents"]])
    assert sorted(os.listdir(run_dir / "replay" / "rank_1")) == sorted([records[1]["tail"], records[1]["latents"]])
    rank0, rank1 = rank_replays(run_dir, ckpt)
    assert not same_steps(rank0, rank1, 32)  # the ranks' envs are seeded apart


def test_a_replay_write_failing_on_one_rank_skips_that_checkpoint_on_every_rank(two_rank_run):
    stderr = two_rank_run[2].stderr
    warnings = [line for line in stderr.splitlines() if "could not write" in line]
    assert warnings == ["warning: could not write the checkpoint at step 32 (rank 1: No space left on "
                        "device); no checkpoint was written; training continues and retries in 32 "
                        "steps"], stderr[-3000:]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("step", [1, 2])  # another rank's replay write fails; rank 0's checkpoint write fails
def test_no_replay_files_are_deleted_when_a_rank_could_not_save(tmp_path, monkeypatch, step):
    """One process that the gathered outcomes tell about another rank's failure at the given
    step of a save: it raises OSError naming that rank and keeps the previous checkpoint's files."""
    cfg = train.Config(env="tests.catch:Catch-v0", model_size="tiny", num_envs=1, capacity=100,
                       learning_starts=10**6, wandb_mode="disabled", video_interval=0, image_interval=0,
                       device="cpu", run_dir=str(tmp_path))
    trainer = train.Trainer(cfg, train.prepare(cfg))
    try:
        for _ in range(3):
            trainer.step()
        trainer.save()
        kept = (tmp_path / "replay" / "tail_000000000003.npz").read_bytes()
        for _ in range(3):
            trainer.step()
        calls, real = [], distributed.gather_objects

        def gather_objects(obj):
            calls.append(obj)
            # The other rank's (replay record, rank state) is this rank's; the second call carries None.
            other = (obj[0], (28, "No space left on device") if len(calls) == step else None)
            return [*real(obj), other] if step == 1 else [other, *real(obj)]

        monkeypatch.setattr(distributed, "gather_objects", gather_objects)
        with pytest.raises(OSError, match=f"rank {2 - step}: No space left on device"):
            trainer.save()
        assert len(calls) == step and trainer.saved_step == 3
        assert (tmp_path / "replay" / "tail_000000000003.npz").read_bytes() == kept
        assert (tmp_path / "replay" / "tail_000000000006.npz").exists()  # written, not yet named
    finally:
        trainer.close()


def test_distributed_checkpoint_resumes_in_one_process_with_rank_0s_replay(two_rank_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_rank_run[0], run_dir)
    path = str(run_dir / "checkpoint.pt")
    before = load_checkpoint(path)
    result = subprocess.run([sys.executable, "train.py", "--resume", path, "--total_steps", "96"],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "replay was saved by 2 ranks; this run of 1 loads rank 0's" in result.stderr
    after = load_checkpoint(path)
    # One process with one env: 32 more agent steps, each earning half an update, with rank 0's
    # replay from the start (no refill): 16 updates.
    assert after["counters"]["env_steps"] == 96
    assert after["counters"]["updates"] == 12 + 16
    assert len(after["replay_ranks"]) == 1 and after["replay"]["adds"] == 32 + 32
    (resumed,), (saved, _) = rank_replays(run_dir, after, 1), rank_replays(two_rank_run[0], before)
    assert same_steps(resumed, saved, 32)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deterministic_sample(logprobs):
    """The most likely class with straight-through gradients: one process and two processes
    then draw the same latents and imagined actions."""
    probs = logprobs.exp()
    onehot = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
    return onehot + probs - probs.detach()


def _agent():
    """A tiny agent with every weight, including the zero-initialised heads, randomised, so that
    rewards, values and λ-returns (and their percentiles) are far from zero."""
    torch.manual_seed(0)
    cfg = train.Config(model_size="tiny", warmup=0, imagination_horizon=3, lr=1e-3,
                       actor_lr=1e-3, critic_lr=1e-3)
    agent, opt = train.build_agent(cfg, 3, torch.device("cpu"))
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.3 * torch.randn_like(p))
        agent.slow_critic.load_state_dict(agent.critic.state_dict())
    return agent, opt


def _update(agent, opt, batch):
    """One train_step; the gradients and the state after it."""
    model.sample_onehot = _deterministic_sample
    train.train_step(agent, opt, batch)
    grads = {n: p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None}
    return grads, {k: v.clone() for k, v in agent.state_dict().items()}


def _rank_with_half_a_batch(rank, port, batch):
    """Join a two-rank gloo group as `rank` (the variables torchrun would set): the synchronised
    agent, its optimizer and this rank's half of `batch`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init("cpu")
    agent, opt = _agent()
    distributed.synchronise(agent)
    return agent, opt, {k: v.chunk(2)[rank] for k, v in batch.items()}


def _half_batch_update(rank, port, batch, out):
    agent, opt, half = _rank_with_half_a_batch(rank, port, batch)
    torch.save(_update(agent, opt, half), os.path.join(out, f"rank{rank}.pt"))
    distributed.close()


def test_half_batches_on_two_ranks_equal_one_update_on_the_whole_batch(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from update_speed import synthetic_batch
    batch = synthetic_batch(4, 8, 3, torch.device("cpu"))
    mp.spawn(_half_batch_update, args=(_free_port(), batch, str(tmp_path)), nprocs=2)
    monkeypatch.setattr(model, "sample_onehot", _deterministic_sample)
    agent, opt = _agent()
    grads, state = _update(agent, opt, batch)
    assert abs(float(state["retnorm.hi"] - state["retnorm.lo"])) > 1e-3  # percentiles matter
    (grads0, state0), (grads1, state1) = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert grads0.keys() == grads.keys() and state0.keys() == state.keys()
    # The mean over ranks is the whole batch's gradient, to float rounding (sums in another
    # order): within 1e-3 of each tensor's largest entry (rounding reaches 2e-4 where biases
    # before a norm make gradient terms cancel; a sum instead of a mean, or a missing
    # all-reduce, is off by tens of percent). (The weights after the step are not
    # compared with the one-process ones: LaProp's first step is about lr·sign(gradient), so an
    # entry whose gradient is rounding noise may step either way.)
    for name in grads:
        assert close(grads0[name], grads[name]), name
    # The return normaliser's EMAs moved towards the percentiles of the union of the ranks'
    # returns, as one process's did towards those of its whole batch.
    for name in ("retnorm.lo", "retnorm.hi"):
        assert close(state0[name], state[name]), name
    # The two ranks hold the very same gradients, then weights, slow critic and EMAs.
    assert all(torch.equal(grads0[name], grads1[name]) for name in grads)
    assert all(torch.equal(state0[name], state1[name]) for name in state)


def close(a, b, tol=1e-3):
    return float((a - b).abs().max()) <= tol * float(b.abs().max()) + 1e-7


def _rank_pid(torchrun_pid, rank):
    """The pid of a rank's process: a child of torchrun with RANK=<rank> in its environment."""
    with open(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children") as f:
        for pid in f.read().split():
            with open(f"/proc/{pid}/environ", "rb") as env:
                if f"RANK={rank}".encode() in env.read().split(b"\0"):
                    return int(pid)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's pid in /proc")
def test_two_rank_resume_then_sigterm_on_one_rank_stops_both_with_one_checkpoint(two_rank_run, tmp_path):
    run_dir, weights = tmp_path / "run", tmp_path / "weights"
    shutil.copytree(two_rank_run[0], run_dir)
    weights.mkdir()
    before = load_checkpoint(run_dir / "checkpoint.pt")
    proc = torchrun("--resume", str(run_dir / "checkpoint.pt"), "--total_steps", "100000",
                    weights_dir=weights, wait=False)
    try:
        deadline = time.time() + 120
        while not any(r["step"] > 96 and "train/updates" in r for r in metrics(run_dir)):
            assert time.time() < deadline and proc.poll() is None, "the resumed run did not train"
            time.sleep(0.5)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert err.count("SIGTERM: saving checkpoint and stopping") == 1  # only rank 1 got it
    after = load_checkpoint(run_dir / "checkpoint.pt")
    assert 96 < after["counters"]["env_steps"] < 100_000
    assert after["counters"]["updates"] > before["counters"]["updates"]
    assert after["wandb_id"] == before["wandb_id"] and after["config"]["num_envs"] == 1
    rank0, rank1 = rank_weights(weights)
    assert all(torch.equal(rank0[k], rank1[k]) and torch.equal(rank0[k], after["agent"][k]) for k in rank0)
    # Every rank went on with its own replay: the first log after the resume counts the 32 steps
    # of each rank's replay (no refill), and each rank's replay saved at the end starts with the
    # steps that rank had saved.
    first = next(r for r in metrics(run_dir) if r["step"] > 64 and "replay/size" in r)
    assert first["step"] == 80 and first["replay/size"] == 2 * (32 + 8)
    saved, resumed = rank_replays(two_rank_run[0], before), rank_replays(run_dir, after)
    assert all(same_steps(s, r, 32) for s, r in zip(saved, resumed))


def test_a_failing_rank_ends_the_job_with_one_error_line(tmp_path):
    start = time.time()
    result = torchrun("--env", "tests.crash:CrashOnRank1-v0", *TINY, "--total_steps", "100000",
                      "--run_dir", str(tmp_path / "run"))
    assert result.returncode != 0
    assert time.time() - start < 120  # the other rank does not wait for its lost peer
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    # One line from the failing rank; the other rank, whose collective failed, adds none (its
    # traceback is in torchrun's error file, which torchrun's closing summary shows).
    assert errors == ["error: rank 1: RuntimeError: the env of rank 1 crashed"], result.stderr[-3000:]


def _update_with_an_infinite_loss_on_rank_1(rank, port, batch, out):
    agent, opt, half = _rank_with_half_a_batch(rank, port, batch)
    assert train.train_step(agent, opt, half)[0] is not None  # the optimizer has state now
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    real = agent.loss

    def loss(*args, **kwargs):  # rank 1's loss is inf; its gradients stay finite
        total, metrics, latents = real(*args, **kwargs)
        return total + (float("inf") if rank == 1 else 0.0), metrics, latents

    metrics, _ = train.train_step(agent, opt, half, loss)
    torch.save((metrics is None, before, agent.state_dict(), opt.state_dict()["state"][0]["step"]),
               os.path.join(out, f"rank{rank}.pt"))
    distributed.close()


def test_a_non_finite_loss_on_one_rank_skips_the_update_on_every_rank(tmp_path):
    """The skip is decided together: rank 0, whose loss is finite, skips with rank 1, so the
    weights, normaliser and optimizer of the two ranks stay equal (and unchanged)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from update_speed import synthetic_batch
    batch = synthetic_batch(4, 8, 3, torch.device("cpu"))
    mp.spawn(_update_with_an_infinite_loss_on_rank_1, args=(_free_port(), batch, str(tmp_path)), nprocs=2)
    (skipped0, before0, after0, step0), (skipped1, before1, after1, step1) = \
        [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert skipped0 and skipped1 and step0 == step1 == 1
    for name in after0:
        assert torch.equal(after0[name], after1[name]) and torch.equal(after0[name], before0[name]), name


def test_a_capacity_that_fits_one_rank_but_not_two_on_the_machine_is_one_line_error(tmp_path):
    capacity = int(0.7 * available_memory() / Replay.step_bytes(latent=(128, 32)))
    args = [*TINY, "--capacity", str(capacity), "--no-save_replay"]
    result = torchrun("--env", "tests.catch:Catch-v0", *args, "--total_steps", "64",
                      "--run_dir", str(tmp_path / "run"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "for the 2 ranks on this machine" in errors[0], result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def warnings(stderr):
    """The run's warning lines, but the one that says it trains on the CPU."""
    return [line for line in stderr.splitlines() if "warning" in line.lower() and "CUDA not available" not in line]


def assert_same_checkpoint(a, b):
    """Two checkpoints of two-rank runs hold the same weights, optimizer state, counters (but the
    wall-clock time) and every rank's RNGs, observations and acting state, bit for bit."""
    a, b = load_checkpoint(str(a)), load_checkpoint(str(b))
    for name, x in a["agent"].items():
        assert torch.equal(x, b["agent"][name]), name
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k]["step"] == sb[k]["step"] and torch.equal(sa[k]["nu"], sb[k]["nu"]) and \
            torch.equal(sa[k]["mu"], sb[k]["mu"]), k
    counters = [{k: v for k, v in c["counters"].items() if k != "elapsed_s"} for c in (a, b)]
    assert counters[0] == counters[1] and counters[0]["updates"] > 0
    assert len(a["rank_states"]) == len(b["rank_states"]) == 2
    for x, y in zip(a["rank_states"], b["rank_states"]):
        assert x["rng"]["replay"] == y["rng"]["replay"] and torch.equal(x["rng"]["torch"], y["rng"]["torch"])
        assert np.array_equal(x["collector"]["obs"], y["collector"]["obs"])
        assert all(torch.equal(s, t) for s, t in zip(x["policy"], y["policy"]))


def kill_tree(pid):
    """SIGKILL a process and all its descendants (Linux: found through /proc)."""
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{tree[-1]}/task"):
                with open(f"/proc/{tree[-1]}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks' pids in /proc")
def test_a_two_rank_job_killed_after_a_checkpoint_resumes_bit_for_bit(two_rank_run, tmp_path):
    """N = 32 agent steps and a checkpoint, kill -9 of the whole job, then a resume to 2N, against
    two_rank_run (2N straight): every rank restores its own RNGs, envs, episodes and acting state,
    so the weights, optimizer and every rank's state are the same bit for bit. (A run that stops
    at N and is resumed to 2N takes the same path: its last checkpoint is the one at N.)"""
    run_dir = tmp_path / "run"
    proc = torchrun("--env", "tests.catch:Catch-v0", *TINY, "--total_steps", "100000", "--checkpoint_interval",
                    "32", "--run_dir", str(run_dir), wait=False)
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoint.pt").exists():
            assert time.time() < deadline and proc.poll() is None, \
                f"no checkpoint was written: {proc.poll() and proc.communicate()[1][-3000:]}"
            time.sleep(0.1)
    finally:
        kill_tree(proc.pid)  # torchrun, both ranks (in sessions of their own) and their env workers
        proc.communicate()
    assert load_checkpoint(str(run_dir / "checkpoint.pt"))["counters"]["env_steps"] == 32
    resumed = torchrun("--resume", str(run_dir / "checkpoint.pt"), "--total_steps", "64", "--checkpoint_interval", "0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not warnings(resumed.stderr), resumed.stderr[-3000:]
    assert_same_checkpoint(run_dir / "checkpoint.pt", two_rank_run[0] / "checkpoint.pt")
