"""The fast paths of an update against plain ones: the restructured RSSM steps against the
straightforward formulas, and the compiled update against the eager one (tiny model)."""
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F

import train
from tests.test_model import random_batch, tiny_agent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_core(rssm, deter, stoch, action):
    """The block GRU written out as in the paper's code: concatenate, broadcast to every block."""
    g = rssm.blocks
    x = torch.cat([rssm.in_deter(deter), rssm.in_stoch(stoch), rssm.in_action(action)], -1)
    x = x.unsqueeze(-2).expand(*x.shape[:-1], g, x.shape[-1])  # (N, g, 3·hidden)
    x = torch.cat([deter.reshape(*deter.shape[:-1], g, -1), x], -1).flatten(-2)
    x = F.silu(rssm.gru_norm(rssm.gru_hidden(x)))
    gates = rssm.gru_gates(x).reshape(*deter.shape[:-1], g, 3, -1)
    reset = torch.sigmoid(gates[..., 0, :])
    cand = torch.tanh(reset * gates[..., 1, :])
    update = torch.sigmoid(gates[..., 2, :] - 1.0)
    deter = deter.reshape(cand.shape)
    return (update * cand + (1 - update) * deter).flatten(-2)


def reference_img_step(rssm, deter, stoch, action, weights=None):  # weights: not needed here
    deter = reference_core(rssm, deter, stoch, action)
    prior = rssm.prior(deter)
    return deter, rssm._sample(prior), prior


def reference_observe(rssm, embed, prev_action, is_first, state=None):
    """One obs_step after the other, each concatenating deter and embed for the posterior."""
    deter, stoch = state if state is not None else rssm.initial(embed.shape[0], embed.device)
    deters, stochs, posts = [], [], []
    for t in range(embed.shape[1]):
        keep = (1.0 - is_first[:, t].float()).unsqueeze(-1)
        deter = reference_core(rssm, deter * keep, stoch * keep, prev_action[:, t] * keep)
        post = rssm._logprobs(rssm.post_net(torch.cat([deter, embed[:, t]], -1)))
        stoch = rssm._sample(post)
        deters.append(deter)
        stochs.append(stoch)
        posts.append(post)
    deter = torch.stack(deters, 1)
    return deter, torch.stack(stochs, 1), torch.stack(posts, 1), rssm.prior(deter)


def loss_and_grads(agent, batch, seed=1):
    torch.manual_seed(seed)
    agent.zero_grad(set_to_none=True)
    total, metrics, _ = agent.loss(batch["obs"], batch["action"], batch["reward"], batch["is_first"],
                                   batch["is_last"], batch["is_terminal"], batch.get("start"))
    total.backward()
    return metrics, {n: p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None}


def assert_close(a, b, rtol=1e-4):
    """Every tensor of dict a equals b's up to rtol of b's norm: float32 sums in another order
    differ by rounding, which a single entry's relative error may magnify where terms cancel."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k].double(), b[k].double()
        assert (x - y).norm() <= rtol * y.norm() + 1e-7, (k, float((x - y).norm()), float(y.norm()))


def test_fast_rssm_steps_match_the_plain_formulas_in_losses_and_gradients():
    agent, _ = tiny_agent()
    with torch.no_grad():  # a non-zero critic output layer, so that every gradient is exercised
        torch.nn.init.normal_(agent.critic[-1].weight, std=0.01)
    ref_agent, _ = tiny_agent()
    ref_agent.load_state_dict(agent.state_dict())
    batch = random_batch(B=3, T=6)
    batch["is_first"][1, 3] = True  # a reset inside the window
    batch["is_first"][:, 0] = False  # the windows continue from a replay context
    batch["start"] = (torch.randn(3, agent.rssm.deter), torch.randint(0, 8, (3, 32)), torch.tensor([0, 1, 2]))
    fast = loss_and_grads(agent, batch)
    rssm = ref_agent.rssm
    rssm.observe = types.MethodType(reference_observe, rssm)
    rssm.img_step = types.MethodType(reference_img_step, rssm)
    ref = loss_and_grads(ref_agent, batch)
    assert_close(fast[0], ref[0])
    assert_close(fast[1], ref[1], rtol=1e-3)  # float32 rounding through 6 recurrent steps
    # obs_step (acting) is the same step as observe's
    embed = torch.randn(2, agent.encoder.out_dim)
    deter, stoch = torch.randn(2, rssm.deter), F.one_hot(torch.randint(0, 8, (2, 32)), 8).float().flatten(1)
    action, first = F.one_hot(torch.tensor([0, 2]), 3).float(), torch.tensor([False, True])
    torch.manual_seed(2)
    d, s, post = agent.rssm.obs_step(deter, stoch, action, embed, first)
    keep = torch.tensor([[1.0], [0.0]])
    d_ref = reference_core(rssm, deter * keep, stoch * keep, action * keep)
    post_ref = rssm._logprobs(rssm.post_net(torch.cat([d_ref, embed], -1)))
    torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(post, post_ref, rtol=1e-5, atol=1e-5)


def test_compiled_update_matches_eager_on_cpu(monkeypatch):
    # Inductor draws its own random numbers unless told to use torch's, as the eager code does.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    batch = random_batch(B=2, T=3)
    results = []
    for compiled in (False, True):
        agent, opt = tiny_agent(warmup=1, imagination_horizon=2)
        if compiled:
            train.compile_agent(agent, opt)
        torch.manual_seed(3)
        # Every compiled piece is traced once: the step functions see the same shapes and
        # requires_grad at every step of their loops (the observe loop's start state included).
        with torch._dynamo.config.patch(error_on_recompile=compiled):
            metrics = [train.train_step(agent, opt, batch)[0] for _ in range(3)]
        results.append((metrics, {n: p.detach().clone() for n, p in agent.named_parameters()}))
    (eager_metrics, eager_params), (comp_metrics, comp_params) = results
    for m_eager, m_comp in zip(eager_metrics, comp_metrics):
        assert_close(m_eager, m_comp, rtol=1e-3)
    # What the three steps moved agrees within 1% of the move: a bias before a norm gets a
    # gradient whose terms nearly cancel, so rounding (fused kernels sum in another order) is a
    # larger share of it than of the weights' (where 1e-4 of the parameters held before biases).
    init = {n: p.detach().clone() for n, p in tiny_agent(warmup=1, imagination_horizon=2)[0].named_parameters()}
    assert_close({n: p - init[n] for n, p in comp_params.items()},
                 {n: p - init[n] for n, p in eager_params.items()}, rtol=1e-2)


def test_phase_timer_counts_nested_phases_once():
    timer = train.PhaseTimer(torch.device("cpu"))
    with timer.phase("env"):
        time.sleep(0.01)
        timer.timed("act", time.sleep)(0.2)
    times = timer.read()
    assert set(times) == {"time/env", "time/act"}
    assert times["time/act"] >= 0.2 and 0.01 <= times["time/env"] < 0.2  # without act's 0.2 s
    assert timer.read() == {}


def test_log_lines_hold_seconds_per_phase(tmp_path):
    args = ["--env", "tests.catch:Catch-v0", "--model_size", "tiny", "--num_envs", "2", "--batch_size", "2",
            "--sequence_length", "4", "--imagination_horizon", "2", "--learning_starts", "16",
            "--train_ratio", "4", "--capacity", "1000", "--log_interval", "16", "--total_steps", "64",
            "--wandb_mode", "disabled", "--video_interval", "0", "--image_interval", "0",
            "--run_dir", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    trained = [r for r in rows if "loss/total" in r]
    assert trained
    for r in trained:
        phases = {k: v for k, v in r.items() if k.startswith("time/")}
        assert set(phases) >= {"time/env", "time/act", "time/replay", "time/update", "time/logging"}, r
        assert all(v >= 0 for v in phases.values())
    assert "upd_s=" in proc.stderr


FAULTS_OF_REALLOCATIONS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from utils import keep_freed_memory

def faults_of_reallocations(n=10):
    for _ in range(3):  # the heap grows to what the loop needs
        x = torch.ones(2**24)  # 64 MB, above glibc's largest mmap threshold (32 MB)
        del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        x = torch.ones(2**24)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_reallocations()
kept = keep_freed_memory()
print(default, kept, faults_of_reallocations())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_lets_large_blocks_be_reused_without_page_faults():
    """By default every 64 MB block is a fresh mmap whose 16,384 pages fault in one by one; after
    keep_freed_memory (the Trainer's setting on the CPU) freed blocks are mostly reused as they are."""
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_REALLOCATIONS.format(root=ROOT)],
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    default, kept, after = int(out[0]), out[1] == "True", int(out[2])
    assert kept
    assert default > 10 * 16_000  # every one of the 10 allocations faults in all its pages
    # Freed blocks are reused (small allocations in between can split a freed block, so some
    # still grow the heap: 2 or 3 of the 10 on 2026-11-30, 6 in one run of 2026-12-02). Without
    # the setting every one of them faults in all its pages again.
    assert after < 0.75 * default
