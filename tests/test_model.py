"""Every formula of the algorithm against hand-computed values, and gradient routing."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from model import (
    AgentPolicy,
    ChannelNorm,
    Decoder,
    Encoder,
    LaProp,
    Normalize,
    TwoHot,
    Upsample,
    categorical_kl,
    lambda_return,
    openloop,
    softmax,
    symexp,
    symlog,
    unimix,
)


def tiny_agent(num_actions=3, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = train.Config(env="ALE/Pong-v5", model_size="tiny", **kw)
    agent, opt = train.build_agent(cfg, num_actions, torch.device("cpu"))
    return agent, opt


def random_batch(B=2, T=4, num_actions=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(B, T, dtype=torch.bool)
    first[:, 0] = True
    return dict(obs=torch.randint(0, 256, (B, T, 64, 64, 3), dtype=torch.uint8, generator=g),
                action=torch.randint(0, num_actions, (B, T), generator=g),
                reward=torch.randn(B, T, generator=g), is_first=first,
                is_last=torch.zeros(B, T, dtype=torch.bool),
                is_terminal=torch.zeros(B, T, dtype=torch.bool))


def test_symlog_symexp_are_inverse():
    x = torch.tensor([-1e6, -100.0, -1.0, -0.5, 0.0, 0.3, 1.0, 7.0, 1e4], dtype=torch.float64)
    assert torch.allclose(symexp(symlog(x)), x, rtol=1e-12)
    assert symlog(torch.tensor(math.e - 1)).item() == pytest.approx(1.0)
    assert symlog(torch.tensor(-(math.e - 1))).item() == pytest.approx(-1.0)


def test_twohot_encode_decode_round_trip():
    twohot = TwoHot()
    x = torch.tensor([-300.0, -1.0, -0.01, 0.0, 0.37, 1.0, 21.0, 1234.5])
    target = twohot.encode(x)
    assert torch.allclose(target.sum(-1), torch.ones(len(x)))
    assert ((target > 0).sum(-1) <= 2).all()
    assert torch.allclose((target * twohot.bins).sum(-1), x, rtol=1e-5, atol=1e-6)
    # pred() of a distribution equal to the target decodes the value again.
    assert torch.allclose(twohot.pred(torch.log(target + 1e-30)), x, rtol=1e-4, atol=1e-5)


def test_twohot_bins_are_symexp_of_linspace():
    bins = TwoHot().bins
    assert len(bins) == 255 and bins[127].item() == 0.0
    assert bins[-1].item() == pytest.approx(math.expm1(20.0), rel=1e-5)
    assert torch.allclose(bins, -bins.flip(0))


def test_zero_logits_predict_exactly_zero():
    assert TwoHot().pred(torch.zeros(5, 255)).eq(0).all()


def test_reward_and_critic_heads_start_at_exactly_zero_after_init():
    agent, _ = tiny_agent()
    feat = torch.randn(7, agent.rssm.feat_dim)
    assert agent.twohot.pred(agent.reward_head(feat)).eq(0).all()
    assert agent.twohot.pred(agent.critic(feat)).eq(0).all()
    assert agent.reward_head[-1].weight.eq(0).all() and agent.critic[-1].weight.eq(0).all()


def test_policy_output_starts_small_and_near_uniform():
    agent, _ = tiny_agent()
    out = agent.actor[-1].weight
    hidden = agent.actor[1][0].weight  # same fan-in as the output layer
    assert 0 < out.std() < 0.02 * hidden.std()
    probs = agent.policy_logprobs(torch.randn(100, agent.rssm.feat_dim)).exp()
    assert torch.allclose(probs, torch.full_like(probs, 1 / 3), atol=0.02)


def test_slow_critic_equals_critic_at_start_and_follows_by_ema():
    agent, _ = tiny_agent()
    for slow, fast in zip(agent.slow_critic.parameters(), agent.critic.parameters()):
        assert torch.equal(slow, fast)
        assert not slow.requires_grad
    with torch.no_grad():
        agent.critic[-1].bias.fill_(1.0)
    agent.update_slow_critic()
    assert torch.allclose(agent.slow_critic[-1].bias, torch.full((255,), 0.02))


def test_rms_norm_values_and_its_hand_written_gradient():
    from model import ChannelNorm, RMSNorm
    norm = RMSNorm(2)
    with torch.no_grad():
        norm.scale.copy_(torch.tensor([2.0, 0.5]))
    # x = (3, 4): mean of squares 12.5, so y = (3, 4) / sqrt(12.5 + 1e-4) * (2, 0.5).
    y = norm(torch.tensor([[3.0, 4.0]]))
    r = 1 / math.sqrt(12.5 + 1e-4)
    assert y.tolist()[0] == pytest.approx([6 * r, 2 * r], rel=1e-6)
    # The backward (written by hand) against autograd of the composite, in float64.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    scale = torch.rand(7, dtype=torch.float64, generator=g).add(0.5).requires_grad_()
    grad = torch.randn(3, 5, 7, dtype=torch.float64, generator=g)
    norm = RMSNorm(7).double()
    with torch.no_grad():
        norm.scale.copy_(scale)
    composite = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-4) * scale
    want = torch.autograd.grad(composite, [x, scale], grad)
    got = torch.autograd.grad(norm(x), [x, norm.scale], grad)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    # bf16 in, bf16 out (computed in float32); ChannelNorm normalises axis 1 of (N, C, H, W).
    assert norm.float()(x.detach().bfloat16()).dtype == torch.bfloat16
    maps = torch.randn(2, 7, 3, 3, generator=g)
    channel = ChannelNorm(7)
    expected = maps * torch.rsqrt(maps.pow(2).mean(1, keepdim=True) + 1e-4)
    assert torch.allclose(channel(maps), expected, rtol=1e-6, atol=1e-6)


def test_lambda_return_stops_at_terminal():
    # R_t = r_{t+1} + c_{t+1}((1 − λ)V_{t+1} + λR_{t+1}), R_3 = V_3; c_2 = 0 is a terminal.
    reward = torch.tensor([[1.0, 2.0, 3.0]])
    cont = torch.tensor([[0.9, 0.0, 0.9]])
    value = torch.tensor([[0.0, 10.0, 20.0, 30.0]])
    ret = lambda_return(reward, cont, value, 0.5)
    # R_2 = 3 + 0.9·(15 + 15) = 30; R_1 = 2 + 0 = 2; R_0 = 1 + 0.9·(5 + 1) = 6.4
    assert torch.allclose(ret, torch.tensor([[6.4, 2.0, 30.0]]))


def test_lambda_return_with_per_step_lambda_cuts_at_episode_end():
    reward = torch.tensor([[1.0, 1.0]])
    cont = torch.tensor([[1.0, 1.0]])
    boot = torch.tensor([[0.0, 4.0, 8.0]])
    lam = torch.tensor([[0.0, 1.0]])  # λ = 0 at step 1: R_0 = r_1 + B_1 (no R_1)
    assert torch.allclose(lambda_return(reward, cont, boot, lam), torch.tensor([[5.0, 9.0]]))


def test_return_normalisation_percentiles_ema_and_floor():
    norm = Normalize(rate=0.01, limit=1.0)
    norm.update(torch.arange(101.0))  # P5 = 5, P95 = 95; the EMA starts at 0
    lo, scale = norm.stats()
    assert lo.item() == pytest.approx(0.05) and norm.hi.item() == pytest.approx(0.95)
    assert scale.item() == 1.0  # 0.9 is below the floor
    norm.update(torch.arange(201.0))  # P5 = 10, P95 = 190
    lo2, hi2 = 0.99 * 0.05 + 0.01 * 10, 0.99 * 0.95 + 0.01 * 190
    lo, scale = norm.stats()
    assert lo.item() == pytest.approx(lo2, rel=1e-5)
    assert scale.item() == pytest.approx(hi2 - lo2, rel=1e-5)  # 2.691 > 1
    for _ in range(2000):  # converges to the percentiles of a stationary stream
        norm.update(torch.arange(201.0))
    assert norm.stats()[1].item() == pytest.approx(180.0, rel=1e-3)


def test_kl_free_bits_clip_the_sum_over_latents_per_step():
    agent, _ = tiny_agent()
    p = torch.log(torch.tensor([0.5, 0.5]))
    q = torch.log(torch.tensor([0.9, 0.1]))
    kl_one = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108 per latent
    post = torch.stack([torch.stack([p, p]), torch.stack([p, p])])[None]  # (1, 2, 2 latents, 2)
    prior = torch.stack([torch.stack([q, q]), torch.stack([p, p])])[None]
    assert categorical_kl(p, q).item() == pytest.approx(kl_one)
    dyn, rep = agent.kl_losses(post, prior)
    # t=0: 2·0.5108 = 1.0217 > 1 stays; t=1: 0 is clipped to 1. Clipping each latent first
    # would give 2.0 at t=0.
    assert dyn.shape == (1, 2)
    assert torch.allclose(dyn, torch.tensor([[2 * kl_one, 1.0]]))
    assert torch.allclose(rep, dyn)


def test_unimix_mixes_one_percent_uniform():
    logp = unimix(torch.tensor([0.0, math.log(3.0)]), 0.01)
    assert torch.allclose(logp.exp(), torch.tensor([0.99 * 0.25 + 0.005, 0.99 * 0.75 + 0.005]))
    assert unimix(torch.tensor([-1e9, 0.0, -1e9, -1e9]), 0.01).exp().min().item() == \
        pytest.approx(0.0025)



def test_softmax_over_short_and_long_last_axes_is_torch_s_up_to_rounding():
    """model.softmax takes a last axis shorter than 16 (the tiny model's 8 classes, a game's few
    actions) across a transposed view on the CPU: the same values and gradients as
    torch.softmax over the last axis, within a float rounding, in a contiguous tensor."""
    hand = softmax(torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]]))
    assert torch.allclose(hand, torch.tensor([[0.25, 0.75], [0.8, 0.2]]), atol=1e-7)
    gen = torch.Generator().manual_seed(0)
    for shape in [(128, 32, 8), (4, 6), (2, 3, 15), (2, 3, 16), (5, 255), (7,)]:
        x = (3 * torch.randn(shape, generator=gen)).requires_grad_()
        g = torch.randn(shape, generator=gen)
        ours = softmax(x)
        assert ours.is_contiguous() and ours.shape == x.shape
        (grad,) = torch.autograd.grad(ours, x, g)
        (ref_grad,) = torch.autograd.grad(torch.softmax(x, -1), x, g)
        assert torch.allclose(ours, torch.softmax(x, -1), rtol=0, atol=1e-6), shape
        assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-6), shape
    # unimix over (batch, latents, classes): each latent's own 8 classes
    logits = torch.zeros(2, 32, 8)
    logits[..., 3] = 50.0
    probs = unimix(logits, 0.01).exp()
    assert torch.allclose(probs[..., 3], torch.full((2, 32), 0.99 + 0.01 / 8))
    assert torch.allclose(probs.sum(-1), torch.ones(2, 32))

def laprop_reference(params, grads, lr, warmup, b1=0.9, b2=0.999, eps=1e-20, agc=0.3, pmin=1e-3):
    """The optimizer written out in numpy, step by step, for one tensor."""
    p = np.array(params, dtype=np.float64)
    nu, mu = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = np.array(g, dtype=np.float64)
        upper = agc * max(pmin, np.linalg.norm(p))
        g = g / max(1.0, np.linalg.norm(g) / upper)
        nu = b2 * nu + (1 - b2) * g * g
        u = g / (np.sqrt(nu / (1 - b2 ** t)) + eps)
        mu = b1 * mu + (1 - b1) * u
        p = p - lr * min(1.0, t / warmup) * mu / (1 - b1 ** t)
    return p


def test_laprop_with_agc_matches_written_out_reference():
    grads = [[30.0, 40.0], [0.01, -0.02], [-1.0, 0.5]]
    param = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LaProp([param], lr=0.1, warmup=2)
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    expected = laprop_reference([3.0, 4.0], grads, lr=0.1, warmup=2)
    assert np.allclose(param.detach().numpy(), expected, rtol=1e-12)
    # Several tensors in one group: each is clipped by its own norms.
    a = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.0, 0.0, 1e-4], dtype=torch.float64))
    opt = LaProp([a, b], lr=0.1, warmup=2)
    grads_b = [[1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [1e-5, 0.0, -1e-5]]
    for ga, gb in zip(grads, grads_b):
        a.grad, b.grad = torch.tensor(ga, dtype=torch.float64), torch.tensor(gb, dtype=torch.float64)
        opt.step()
    assert np.allclose(a.detach().numpy(), expected, rtol=1e-12)
    assert np.allclose(b.detach().numpy(), laprop_reference([0.0, 0.0, 1e-4], grads_b, 0.1, 2),
                       rtol=1e-12, atol=1e-15)
    # First step by hand: AGC scales (30, 40) to (0.9, 1.2); RMS makes each entry ±1;
    # warm-up lr = 0.1·1/2.
    param = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LaProp([param], lr=0.1, warmup=2)
    param.grad = torch.tensor([30.0, 40.0], dtype=torch.float64)
    opt.step()
    assert torch.allclose(param.detach(), torch.tensor([2.95, 3.95], dtype=torch.float64))


def grads_of(loss, modules):
    for m in modules:
        m.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return [sum(p.grad.abs().sum().item() for p in m.parameters() if p.grad is not None)
            for m in modules]


def test_dyn_loss_moves_prior_not_encoder_and_rep_loss_the_opposite():
    # One step, so the prior depends on no earlier posterior sample.
    agent, _ = tiny_agent()
    b = random_batch(T=1)
    losses, _, _ = agent.world_model_loss(b["obs"], b["action"], b["reward"], b["is_first"],
                                          b["is_terminal"])
    enc, post, prior = agent.encoder, agent.rssm.post_net, agent.rssm.prior_net
    g_enc, g_post, g_prior = grads_of(losses["dyn"].mean(), [enc, post, prior])
    assert g_prior > 0 and g_enc == 0 and g_post == 0
    g_enc, g_post, g_prior = grads_of(losses["rep"].mean(), [enc, post, prior])
    assert g_enc > 0 and g_post > 0 and g_prior == 0


def test_free_bits_stop_gradients_below_one_nat():
    agent, _ = tiny_agent()
    post = torch.log(torch.full((1, 1, 2, 2), 0.5)).requires_grad_()
    prior = torch.log(torch.tensor([[[[0.6, 0.4], [0.5, 0.5]]]])).requires_grad_()
    dyn, _ = agent.kl_losses(post, prior)  # KL ≈ 0.02 < 1 nat: clipped, no gradient
    dyn.sum().backward()
    assert prior.grad.abs().sum() == 0


def test_policy_loss_does_not_reach_world_model():
    agent, _ = tiny_agent()
    b = random_batch()
    _, post, _ = agent.world_model_loss(b["obs"], b["action"], b["reward"], b["is_first"],
                                        b["is_terminal"])
    feats, actions = agent.imagine(post["deter"], post["stoch"])
    with torch.no_grad():  # make the advantage non-zero so the policy gradient is not trivial
        agent.critic[-1].bias.copy_(torch.linspace(-3, 3, 255))
    losses, _, _ = agent.behavior_loss(feats, actions)
    wm = [agent.encoder, agent.rssm, agent.decoder, agent.reward_head, agent.cont_head]
    agent.zero_grad(set_to_none=True)
    losses["policy"].mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for m in wm for p in m.parameters())
    assert sum(p.grad.abs().sum() for p in agent.actor.parameters()) > 0
    assert all(p.grad is None for p in agent.critic.parameters())


def test_replay_value_loss_reaches_world_model():
    agent, _ = tiny_agent()
    with torch.no_grad():  # the zero-initialised output layer would block every gradient
        torch.nn.init.normal_(agent.critic[-1].weight)
    b = random_batch()
    _, post, _ = agent.world_model_loss(b["obs"], b["action"], b["reward"], b["is_first"],
                                        b["is_terminal"])
    loss, _ = agent.replay_value_loss(post["feat"], b["reward"], b["is_last"], b["is_terminal"],
                                      torch.zeros(2, 4))
    g_enc, g_critic = grads_of(loss.mean(), [agent.encoder, agent.critic])
    assert g_enc > 0 and g_critic > 0


def test_obs_step_resets_state_and_previous_action_at_is_first():
    agent, _ = tiny_agent()
    rssm = agent.rssm
    embed = torch.randn(2, agent.encoder.out_dim)
    deter = torch.randn(2, rssm.deter)
    stoch = F.one_hot(torch.randint(0, rssm.classes, (2, rssm.stoch)), rssm.classes).float().flatten(1)
    action = F.one_hot(torch.tensor([1, 2]), 3).float()
    first = torch.tensor([True, True])
    torch.manual_seed(1)
    d1, _, post1 = rssm.obs_step(deter, stoch, action, embed, first)
    torch.manual_seed(1)
    zeros = rssm.initial(2, "cpu")
    d0, _, post0 = rssm.obs_step(*zeros, torch.zeros_like(action), embed, first)
    assert torch.equal(d1, d0) and torch.equal(post1, post0)
    d2, _, _ = rssm.obs_step(deter, stoch, action, embed, torch.tensor([False, False]))
    assert not torch.allclose(d2, d0)


def test_layers_before_a_norm_have_biases_and_the_split_steps_use_them():
    """As in the official code every dense and conv layer before a norm has a bias (zero at init;
    the RMS norms have no shift). The RSSM step, computed in precomputed parts, must equal the
    plain computation (each GRU block sees its slice of deter next to the embeddings of deter,
    stoch and action; the posterior sees deter and the embedding) with random non-zero biases."""
    agent, _ = tiny_agent()
    rssm = agent.rssm
    before_norm = [rssm.in_deter[0], rssm.in_stoch[0], rssm.in_action[0], rssm.post_net[0][0],
                   rssm.prior_net[0][0], agent.encoder.net[0], agent.decoder.inp[0], agent.decoder.net[0]]
    assert all(layer.bias is not None and not layer.bias.any() for layer in before_norm)
    with torch.no_grad():
        for p in rssm.parameters():
            p.normal_(0, 0.3)
    N, g = 3, rssm.blocks
    embed = torch.randn(N, agent.encoder.out_dim)
    deter = torch.randn(N, rssm.deter)
    stoch = F.one_hot(torch.randint(0, rssm.classes, (N, rssm.stoch)), rssm.classes).float().flatten(1)
    action = F.one_hot(torch.tensor([0, 1, 2]), 3).float()
    d, _, post = rssm.obs_step(deter, stoch, action, embed, torch.zeros(N, dtype=torch.bool))
    shared = torch.cat([rssm.in_deter(deter), rssm.in_stoch(stoch), rssm.in_action(action)], -1)
    x = torch.cat([deter.reshape(N, g, -1), shared[:, None].expand(N, g, -1)], -1).flatten(1)
    x = rssm.gru_gates(F.silu(rssm.gru_norm(rssm.gru_hidden(x)))).reshape(N, g, 3, -1)
    reset, cand, update = x.unbind(-2)
    update = torch.sigmoid(update - 1.0)
    expected = (update * torch.tanh(torch.sigmoid(reset) * cand)
                + (1 - update) * deter.reshape(N, g, -1)).flatten(1)
    torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-5)
    logits = rssm.post_net(torch.cat([expected, embed], -1)).reshape(N, rssm.stoch, rssm.classes)
    torch.testing.assert_close(post, unimix(logits, rssm.mix), rtol=1e-5, atol=1e-5)


def test_block_linear_init_takes_one_blocks_width_as_fan_in():
    """Truncated normal with std 1/sqrt(fan_in) where fan_in is one block's input width: the
    weights of the GRU's gate layer have std sqrt(blocks / deter). (The official code divides by
    the full width; README says why we do not.)"""
    agent, _ = tiny_agent()
    rssm = agent.rssm
    assert abs(rssm.gru_gates.weight.std().item() * math.sqrt(rssm.deter / rssm.blocks) - 1.0) < 0.05


def test_block_gru_keeps_blocks_independent():
    agent, _ = tiny_agent()
    gates = agent.rssm.gru_gates
    x = torch.randn(1, gates.weight.shape[0] * gates.weight.shape[1], requires_grad=True)
    y = gates(x)
    y[0, 0].backward()  # first output belongs to block 0
    in_block = gates.weight.shape[1]
    assert x.grad[0, :in_block].abs().sum() > 0 and x.grad[0, in_block:].abs().sum() == 0


def test_full_loss_and_update_change_parameters_and_stay_finite():
    agent, opt = tiny_agent(warmup=1)
    b = random_batch()
    before = [p.detach().clone() for p in agent.parameters()]
    train.train_step(agent, opt, b)
    # Two updates: on the first, the zero output layers of reward head and critic block the
    # gradient to the layers below them.
    metrics, _ = train.train_step(agent, opt, b)
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert all(not torch.equal(a, p) for a, p in zip(before, agent.parameters()))
    for key in ["loss/rec", "loss/rew", "loss/con", "loss/dyn", "loss/rep", "loss/policy",
                "loss/value", "loss/repval", "actor/entropy", "actor/return_scale",
                "wm/prior_entropy", "wm/post_entropy", "opt/grad_norm_wm",
                "opt/grad_norm_actor", "opt/grad_norm_critic"]:
        assert key in metrics


def test_pooled_image_layers_keep_a_one_pixel_object_at_full_strength():
    # Stride-1 convolution and 2x2 max pool (the official code's encoder): a white pixel on black
    # reaches the pooled map unmixed. 1x1 kernel with weights w: the conv gives w.x at every
    # position (x = +0.5 on the white pixel, -0.5 elsewhere), so the pooled cell holding the
    # pixel is 0.5 * sum(w) and every other cell -0.5 * sum(w).
    torch.manual_seed(0)
    enc = Encoder(depth=1, pool=1, kernel=1)
    conv, pool = enc.net[0], enc.net[1]
    assert (conv.kernel_size, conv.stride, isinstance(pool, torch.nn.MaxPool2d)) == ((1, 1), (1, 1), True)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.25, 0.25]]).reshape(2, 3, 1, 1))
    frame = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    frame[0, 5, 7] = 255
    x = frame.permute(0, 3, 1, 2).float() / 255 - 0.5
    pooled = enc.net[:2](x)[0]
    expected = torch.tensor([-3.0, -0.5]).reshape(2, 1, 1).expand(2, 32, 32).clone()
    expected[:, 2, 3] = torch.tensor([3.0, 0.5])
    assert torch.equal(pooled, expected)
    # A 4x4 stride-2 layer (pool=0) sees the same pixel only through its kernel's weights.
    assert isinstance(Encoder(depth=1).net[1], ChannelNorm)


@pytest.mark.parametrize("pool", [0, 1, 4])
def test_pooled_image_stacks_have_the_strided_shapes_and_train_every_layer(pool):
    torch.manual_seed(0)
    enc, dec = Encoder(depth=2, pool=pool, kernel=3), Decoder(40, depth=2, pool=pool, kernel=3)
    assert enc.out_dim == Encoder(depth=2).out_dim == 8 * 4 * 4
    frames = torch.randint(0, 256, (2, 3, 64, 64, 3), dtype=torch.uint8)
    embed = enc(frames)
    image = dec(torch.randn(2, 3, 40))
    assert embed.shape == (2, 3, 128) and image.shape == (2, 3, 64, 64, 3)
    assert 0 < image.min() and image.max() < 1
    (embed.square().sum() + image.square().sum()).backward()
    convs = [m for m in [*enc.net, *dec.net] if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert sum(m.stride == (1, 1) for m in convs) == 2 * pool
    assert all(m.weight.grad.abs().sum() > 0 for m in convs)
    ups = [i for i, m in enumerate(dec.net) if isinstance(m, Upsample)]
    assert len(ups) == pool and all(isinstance(dec.net[i + 1], torch.nn.Conv2d) for i in ups)


def test_linear_decoder_output_does_not_saturate_where_the_sigmoid_does():
    # The last layer's weights zero and its bias b: every pixel's output is sigmoid(b) or b + 0.5.
    # The gradient of one pixel's (output - 0.5)^2 on b: 2 (p - 0.5) p (1 - p) through a sigmoid,
    # 2 (p - 0.5) through the linear output. At b = -6 (a black background's settled output):
    # sigmoid 2 (0.00247 - 0.5) * 0.00247 * 0.99753 = -0.00245; linear 2 (-5.5 - 0.5) = -12.
    grads = {}
    for output in ("sigmoid", "linear"):
        dec = Decoder(16, depth=1, output=output)
        last = dec.net[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(-6.0)
        image = dec(torch.randn(1, 16))
        p = torch.sigmoid(torch.tensor(-6.0)) if output == "sigmoid" else torch.tensor(-5.5)
        assert torch.allclose(image, p.expand_as(image))
        (image[0, 10, 20, 1] - 0.5).square().backward()
        grads[output] = last.bias.grad
    p = torch.sigmoid(torch.tensor(-6.0))
    assert torch.allclose(grads["sigmoid"], torch.tensor([0.0, 2 * (p - 0.5) * p * (1 - p), 0.0]))
    assert torch.equal(grads["linear"], torch.tensor([0.0, -12.0, 0.0]))
    assert abs(grads["sigmoid"][1] + 0.00245) < 1e-5


def test_openloop_sees_the_context_frames_and_the_actions_but_not_the_later_frames():
    agent, _ = tiny_agent()
    b = random_batch(T=6)
    later = random_batch(T=6, seed=1)["obs"]

    def run(obs, action):
        torch.manual_seed(0)  # the same latent samples: the draws do not depend on the values
        with torch.no_grad():
            return openloop(agent, obs, action, b["is_first"], context=2)

    recon, imagined = run(b["obs"], b["action"])
    assert recon.shape == (2, 6, 64, 64, 3) and imagined.shape == (2, 4, 64, 64, 3)
    assert 0 <= recon.min() and recon.max() <= 1 and 0 <= imagined.min() and imagined.max() <= 1
    # Frames after the context change the reconstructions but not the open-loop predictions.
    obs = torch.cat([b["obs"][:, :2], later[:, 2:]], 1)
    recon_b, imagined_b = run(obs, b["action"])
    assert torch.equal(imagined_b, imagined) and not torch.equal(recon_b[:, 2:], recon[:, 2:])
    assert torch.equal(recon_b[:, :2], recon[:, :2])
    # The last context frame (the rollout starts from its state) and the action chosen at it do.
    obs = torch.cat([b["obs"][:, :1], later[:, 1:2], b["obs"][:, 2:]], 1)
    assert not torch.equal(run(obs, b["action"])[1], imagined)
    action = b["action"].clone()
    action[:, 1] = (action[:, 1] + 1) % 3
    assert not torch.equal(run(b["obs"], action)[1][:, 0], imagined[:, 0])


def test_acting_samples_the_mixed_policy_and_greedy_takes_its_mode():
    """An actor with fixed logits (0, 1, −1): sampled actions follow its probabilities after the 1 %
    uniform mix, within four standard errors over 2,000 envs; greedy acting (evaluation's
    --eval_greedy) takes action 1 whatever the RNG."""
    agent, _ = tiny_agent()
    logits = torch.tensor([0.0, 1.0, -1.0])
    with torch.no_grad():
        agent.actor[-1].weight.zero_()
        agent.actor[-1].bias.copy_(logits)
    p = 0.99 * torch.softmax(logits, -1) + 0.01 / 3
    n = 2000
    obs = torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    first = torch.ones(n, dtype=torch.bool)
    torch.manual_seed(1)
    action, _ = agent.act(obs, first, agent.initial_state(n, torch.device("cpu")))
    freq = torch.bincount(action, minlength=3) / n
    assert ((freq - p).abs() < 4 * (p * (1 - p) / n).sqrt()).all(), (freq, p)
    policy = AgentPolicy(agent, 64, torch.device("cpu"), greedy=True)
    for seed in (0, 1):
        torch.manual_seed(seed)
        assert (policy(obs[:64].numpy(), first[:64].numpy()) == 1).all()


def test_policy_loss_with_zero_advantage_is_the_entropy_bonus_of_actor_entropy():
    """At initialisation reward and critic predict 0 (zero output layers), so every advantage is
    0 and the policy loss is -eta * weight * entropy, eta given by --actor_entropy."""
    eta = 0.01
    agent, _ = tiny_agent(actor_entropy=eta)
    b = random_batch()
    _, post, _ = agent.world_model_loss(b["obs"], b["action"], b["reward"], b["is_first"],
                                        b["is_terminal"])
    feats, actions = agent.imagine(post["deter"], post["stoch"])
    losses, ret, metrics = agent.behavior_loss(feats, actions)
    assert ret.abs().max() < 1e-6 and metrics["actor/advantage"].abs() < 1e-6
    logp = agent.policy_logprobs(feats)
    entropy = -(logp.exp() * logp).sum(-1)[:, :-1]
    weight = torch.cumprod(torch.sigmoid(agent.cont_head(feats).squeeze(-1)) * agent.discount, 1)
    expected = -eta * weight[:, :-1] / agent.discount * entropy
    torch.testing.assert_close(losses["policy"], expected, rtol=1e-4, atol=1e-9)


def test_policy_gradient_raises_probability_of_actions_with_positive_advantage():
    agent, _ = tiny_agent()
    with torch.no_grad():  # reward head predicts +1 everywhere, critic 0: every advantage > 0
        k = int(torch.argmin((agent.twohot.bins - 1.0).abs()))
        agent.reward_head[-1].bias[k] = 30.0
    b = random_batch()
    _, post, _ = agent.world_model_loss(b["obs"], b["action"], b["reward"], b["is_first"],
                                        b["is_terminal"])
    feats, actions = agent.imagine(post["deter"], post["stoch"])
    losses, ret, metrics = agent.behavior_loss(feats, actions)
    assert ret.min() > 0 and metrics["actor/advantage"] > 0
    logpi = lambda: (agent.policy_logprobs(feats) * actions).sum(-1)[:, :-1].mean()  # noqa: E731
    before = logpi().item()
    agent.zero_grad(set_to_none=True)
    losses["policy"].mean().backward()
    with torch.no_grad():
        for p in agent.actor.parameters():
            p -= 0.05 * p.grad
    assert logpi().item() > before
