"""DreamerV3 networks, distributions, losses and optimizer.

Follows the official 2024 (v2) DreamerV3 code: block-GRU RSSM, RMSNorm + SiLU, symexp two-hot
heads, 1% unimix, free bits, percentile return normalisation and LaProp with adaptive gradient
clipping. The module only holds `nn.Module`s and pure functions; the training loop lives in
train.py. Shapes are batch-first, time second: (B, T, ...).
"""
import copy
import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Elementary functions


def symlog(x):
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x):
    return torch.sign(x) * torch.expm1(torch.abs(x))


def softmax(x):
    """torch.softmax over the last axis.

    On the CPU, torch's kernel for a last axis shorter than 16 (the tiny model's 8 classes, the
    4 to 9 actions of many games) takes about ten times as long as the same softmax over the
    second-to-last axis of a transposed view: 0.6 against 0.05 ms for the (128, 32, 8) prior of
    an imagination step at the CPU preset's shape. The two agree to a float rounding. The copy
    back to a contiguous tensor keeps the ops after it (argmax over the classes) fast."""
    if x.device.type == "cpu" and x.dim() > 1 and x.shape[-1] < 16:
        return torch.softmax(x.transpose(-1, -2), -2).transpose(-1, -2).contiguous()
    return torch.softmax(x, -1)


def unimix(logits, mix):
    """Log-probabilities of (1 - mix) * softmax(logits) + mix / K.

    The uniform floor keeps every class reachable, so KL terms and log-probabilities stay
    finite even when the network becomes confident (paper, section 'Robust predictions').
    """
    probs = softmax(logits.float())
    if mix > 0:
        probs = (1 - mix) * probs + mix / logits.shape[-1]
    return torch.log(probs)


def one_hot(index, classes, dtype=torch.float32):
    """F.one_hot without its range check, which on CUDA reads the indices back to the host (a
    sync per call, and no CUDA graph capture); the indices here come from argmax or the replay."""
    out = torch.zeros(*index.shape, classes, dtype=dtype, device=index.device)
    return out.scatter_(-1, index.unsqueeze(-1), 1.0)


def sample_onehot(logprobs):
    """One-hot sample with straight-through gradients: value of the sample, gradient of probs."""
    probs = logprobs.exp()
    gumbel = -torch.log(-torch.log(torch.rand_like(probs).clamp(1e-20, 1.0)))
    index = torch.argmax(logprobs + gumbel, -1)
    onehot = one_hot(index, probs.shape[-1], probs.dtype)
    return onehot + probs - probs.detach()


def previous_actions(action, num_actions, first=None):
    """One-hot a_{t−1} for every step of stored actions (B, T): the action stored with o_t is the
    one chosen AT o_t, and the RSSM consumes the one before it. At the window's start that is
    `first` (B,), the action of the step before the window, or zero without one."""
    onehot = one_hot(action, num_actions)
    before = one_hot(first, num_actions)[:, None] if first is not None else torch.zeros_like(onehot[:, :1])
    return torch.cat([before, onehot[:, :-1]], 1)


def categorical_kl(logp, logq):
    """KL(p || q) for categorical log-probabilities, summed over the last axis."""
    return (logp.exp() * (logp - logq)).sum(-1)


def categorical_entropy(logp):
    return -(logp.exp() * logp).sum(-1)


def lambda_return(reward, cont, boot, lam):
    """TD(λ) returns, computed backwards.

    reward, cont: (N, H) quantities of the NEXT state: r_{t+1} and c_{t+1} = p(continue)·γ.
    boot: (N, H + 1) bootstrap values V_0 .. V_H. lam: float or (N, H) tensor (λ·(1 − is_last)
    for replayed sequences, which cuts the recursion at an episode end).
    R_H = V_H;  R_t = r_{t+1} + c_{t+1}·((1 − λ)·V_{t+1} + λ·R_{t+1}).  Returns R_0 .. R_{H−1}.
    """
    if not torch.is_tensor(lam):
        lam = torch.full_like(reward, lam)
    interm = reward + cont * (1 - lam) * boot[:, 1:]
    ret = boot[:, -1]
    rets = []
    for t in reversed(range(reward.shape[1])):
        ret = interm[:, t] + cont[:, t] * lam[:, t] * ret
        rets.append(ret)
    return torch.stack(rets[::-1], 1)


class TwoHot(nn.Module):
    """Discrete regression over 255 bins at symexp(linspace(−20, 20)) (the v2 form).

    Targets are two-hot encoded by linear interpolation in raw space. The prediction sums the
    weighted bins symmetrically around the middle (zero) bin, so that uniform probabilities,
    i.e. zero-initialised logits, predict exactly 0.
    """

    def __init__(self, bins=255, low=-20.0, high=20.0):
        super().__init__()
        assert bins % 2 == 1 and low == -high
        self.num_bins = bins
        # Built from one half so that the bins are exactly symmetric and the middle one is 0.
        half = symexp(torch.linspace(0.0, high, bins // 2 + 1, dtype=torch.float64))
        self.register_buffer("bins", torch.cat([-half[1:].flip(0), half]).float(), persistent=False)

    def pred(self, logits):
        probs = torch.softmax(logits.float(), -1)
        weighted = probs * self.bins
        m = (self.bins.shape[0] - 1) // 2
        # Pair bin m−1−i with bin m+1+i before summing: for symmetric probs each pair is 0.
        pairs = weighted[..., :m].flip(-1) + weighted[..., m + 1:]
        return pairs.sum(-1) + weighted[..., m]

    def encode(self, x):
        """Two-hot target of shape x.shape + (bins,)."""
        x = x.float()
        bins = self.bins
        above = torch.searchsorted(bins, x.contiguous(), right=True).clamp(1, len(bins) - 1)
        below = above - 1
        lo, hi = bins[below], bins[above]
        w_hi = ((x - lo) / (hi - lo)).clamp(0, 1)
        target = one_hot(below, len(bins)) * (1 - w_hi)[..., None]
        return target + one_hot(above, len(bins)) * w_hi[..., None]

    def loss(self, logits, x):
        """Cross-entropy between the two-hot target of x and softmax(logits)."""
        return -(self.encode(x) * torch.log_softmax(logits.float(), -1)).sum(-1)


class Normalize(nn.Module):
    """Return normalisation: EMA of the 5th and 95th percentiles of the λ-returns.

    scale = max(limit, P95 − P5). As in the official code (`debias: False`) the EMA starts at
    zero, so the scale starts at the floor of 1 and grows over the first ~100 updates.
    """

    def __init__(self, rate=0.01, limit=1.0, low_percentile=5.0, high_percentile=95.0):
        super().__init__()
        self.rate, self.limit = rate, limit
        self.qlo, self.qhi = low_percentile / 100, high_percentile / 100
        # EMAs of the two percentiles.
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        # The percentiles' positions, as a buffer on the model's device: a tensor built from
        # Python numbers inside update() would be a blocking host-to-device copy every update.
        self.register_buffer("quantiles", torch.tensor([self.qlo, self.qhi]), persistent=False)
        # Under torchrun, a function giving x of every rank, (N,) → (ranks·N,), so that all ranks
        # take the same percentiles (set by distributed.synchronise).
        self.gather = None

    @torch.no_grad()
    def update(self, x):
        x = x.detach().float().flatten()
        if self.gather is not None:
            x = self.gather(x)
        quant = torch.quantile(x, self.quantiles)
        self.lo.lerp_(quant[0], self.rate)
        self.hi.lerp_(quant[1], self.rate)

    def stats(self):
        return self.lo, torch.clamp(self.hi - self.lo, min=self.limit)


# ---------------------------------------------------------------------------------------------
# Layers


def init_trunc_normal_(weight, fan_in, scale=1.0):
    """Truncated-normal fan-in init (std of the truncated draw = scale / sqrt(fan_in))."""
    std = scale / math.sqrt(fan_in) / 0.87962566103423978
    with torch.no_grad():
        nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


class RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) · scale over the last axis, with a hand-written backward.

    Autograd of the composite (square, mean, rsqrt, two products, their broadcasts) makes about a
    dozen passes over x per backward; this one makes five. With the tiny model at batch 8 × 16
    the encoder's and decoder's norms over 128 × 32 × 32 × 16 maps were the largest item of a CPU
    update (bench/RESULTS.md). With x̂ = x·r, r = rsqrt(mean(x²) + eps), y = x̂·scale:
    dscale = Σ g·x̂ over the leading axes, dx = r·(g·scale − x̂·mean(g·scale·x̂)).
    """

    @staticmethod
    def forward(ctx, x, scale, eps):
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # bf16 → fp32; fp64 stays (gradcheck)
        r = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        xhat = x * r
        ctx.save_for_backward(xhat, r, scale)
        ctx.dtype = dtype
        return (xhat * scale).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        xhat, r, scale = ctx.saved_tensors
        grad = grad.to(xhat.dtype)
        dscale = (grad * xhat).reshape(-1, xhat.shape[-1]).sum(0)
        gs = grad * scale
        mean = torch.linalg.vecdot(gs, xhat, dim=-1).unsqueeze(-1) / xhat.shape[-1]
        dx = gs.addcmul_(xhat, mean, value=-1).mul_(r)
        return dx.to(ctx.dtype), dscale, None


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32 (eps 1e-4 as in the official code)."""

    def __init__(self, dim, eps=1e-4):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return RMSNormFunction.apply(x, self.scale, self.eps)


class ChannelNorm(RMSNorm):
    """RMSNorm over the channel axis of (N, C, H, W) maps."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Linear(nn.Linear):
    def __init__(self, fan_in, fan_out, bias=True, scale=1.0):
        super().__init__(fan_in, fan_out, bias=bias)
        if scale == 0:
            nn.init.zeros_(self.weight)
        else:
            init_trunc_normal_(self.weight, fan_in, scale)
        if bias:
            nn.init.zeros_(self.bias)


class DenseBlock(nn.Sequential):
    """Linear → RMSNorm → SiLU."""

    def __init__(self, fan_in, fan_out):
        super().__init__(Linear(fan_in, fan_out), RMSNorm(fan_out), nn.SiLU())


class MLP(nn.Sequential):
    """`layers` dense blocks followed by an output Linear with init scale `outscale`."""

    def __init__(self, fan_in, fan_out, units, layers, outscale=1.0):
        blocks = [DenseBlock(fan_in if i == 0 else units, units) for i in range(layers)]
        super().__init__(*blocks, Linear(units if layers else fan_in, fan_out, scale=outscale))


class BlockLinear(nn.Module):
    """Block-diagonal linear map: input (..., g·i) → output (..., g·o), g independent blocks.

    One batched matmul for all blocks, no Python loop over them.
    """

    def __init__(self, fan_in, fan_out, blocks):
        super().__init__()
        assert fan_in % blocks == 0 and fan_out % blocks == 0, (fan_in, fan_out, blocks)
        self.blocks = blocks
        self.weight = nn.Parameter(torch.empty(blocks, fan_in // blocks, fan_out // blocks))
        self.bias = nn.Parameter(torch.zeros(fan_out))
        # Fan-in of one block. The official code takes the full input width (weights √blocks
        # smaller); with it the tiny world model took longer to learn Pong frames (see README).
        init_trunc_normal_(self.weight, fan_in // blocks)

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, self.blocks, x.shape[-1] // self.blocks).transpose(0, 1)  # (g, N, i)
        y = torch.bmm(x, self.weight).transpose(0, 1)  # (N, g, o)
        return y.reshape(*lead, -1) + self.bias


# ---------------------------------------------------------------------------------------------
# World model


class Encoder(nn.Module):
    """64×64×3 uint8 frames → flat embedding, four conv layers down to 4×4.

    Each layer halves the resolution with a 4×4 stride-2 convolution (the DreamerV3 paper's), or,
    for the first `pool` layers, with a stride-1 `kernel`×`kernel` convolution and a 2×2 max pool
    (the official code's current encoder): a one-pixel object at full resolution still reaches
    the next layer at full strength, at several times the FLOPs.
    """

    def __init__(self, depth, mults=(2, 3, 4, 4), image_size=64, pool=0, kernel=5):
        super().__init__()
        assert 0 <= pool <= len(mults) and kernel % 2 == 1, (pool, kernel)
        layers, ch = [], 3
        for i, mult in enumerate(mults):
            if i < pool:
                conv = nn.Conv2d(ch, depth * mult, kernel, padding=kernel // 2)
                init_trunc_normal_(conv.weight, ch * kernel ** 2)
                layers += [conv, nn.MaxPool2d(2)]
            else:
                conv = nn.Conv2d(ch, depth * mult, 4, stride=2, padding=1)
                init_trunc_normal_(conv.weight, ch * 16)
                layers.append(conv)
            nn.init.zeros_(conv.bias)
            layers += [ChannelNorm(depth * mult), nn.SiLU()]
            ch = depth * mult
        self.net = nn.Sequential(*layers)
        self.out_dim = ch * (image_size // 2 ** len(mults)) ** 2

    def forward(self, obs):  # (..., 64, 64, 3) uint8 → (..., out_dim)
        lead = obs.shape[:-3]
        x = obs.reshape(-1, *obs.shape[-3:]).permute(0, 3, 1, 2)
        x = x.to(self.net[0].weight.dtype) / 255.0 - 0.5
        return self.net(x).reshape(*lead, -1)


class Upsample(nn.Module):
    """Nearest-neighbour 2× upsampling of (N, C, H, W) maps."""

    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest")


IMAGE_OUTPUTS = ("sigmoid", "linear")  # the decoder's output layers (train.py's --image_output)


class Decoder(nn.Module):
    """Model state → 64×64×3 image, mirroring the encoder: 4×4 stride-2 transposed convolutions,
    or, for the last `pool` layers, a 2× nearest-neighbour upsampling and a stride-1
    `kernel`×`kernel` convolution (the official code's current decoder).

    output "sigmoid" (the official code's current decoder) gives an image in (0, 1); "linear"
    (the first release's) the last layer's output + 0.5, which is not bounded but does not
    saturate: on a black background a sigmoid settles near 0, where its slope is near 0, and a
    small object's few pixels then pull on the layers below with that small slope.
    """

    def __init__(self, feat_dim, depth, mults=(2, 3, 4, 4), image_size=64, pool=0, kernel=5,
                 output="sigmoid"):
        super().__init__()
        assert 0 <= pool <= len(mults) and kernel % 2 == 1, (pool, kernel)
        assert output in IMAGE_OUTPUTS, output
        self.output = output
        chans = [depth * m for m in mults][::-1]  # e.g. (4d, 4d, 3d, 2d) from 4×4 upwards
        self.start = (chans[0], image_size // 2 ** len(mults), image_size // 2 ** len(mults))
        self.inp = nn.Sequential(Linear(feat_dim, math.prod(self.start)),
                                 RMSNorm(math.prod(self.start)), nn.SiLU())
        layers = []
        outs = chans[1:] + [3]
        for i, (cin, cout) in enumerate(zip(chans, outs)):
            last = i == len(outs) - 1
            if i >= len(outs) - pool:
                conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
                init_trunc_normal_(conv.weight, cin * kernel ** 2)
                layers += [Upsample(), conv]
            else:
                conv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
                init_trunc_normal_(conv.weight, cin * 4)
                layers.append(conv)
            nn.init.zeros_(conv.bias)
            if not last:
                layers += [ChannelNorm(cout), nn.SiLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, feat):  # (..., feat) → (..., 64, 64, 3)
        lead = feat.shape[:-1]
        x = self.inp(feat.reshape(-1, feat.shape[-1])).reshape(-1, *self.start)
        # Channels-last maps (as the encoder's, whose input is a permuted (N, H, W, C) frame):
        # the CPU convolutions run faster on them, ChannelNorm normalises a contiguous last axis,
        # and the (N, H, W, 3) output needs no copy.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.net(x).float()
        x = torch.sigmoid(x) if self.output == "sigmoid" else x + 0.5
        return x.permute(0, 2, 3, 1).reshape(*lead, *x.shape[2:], 3)


class RSSM(nn.Module):
    """Recurrent state-space model with a block GRU and 32 categorical latents.

    State: deter (N, deter) and stoch (N, stoch·classes) one-hot. `img_step` predicts the prior,
    `obs_step` also sees the embedding and gives the posterior.
    """

    def __init__(self, num_actions, embed_dim, deter, hidden, stoch=32, classes=32, blocks=8,
                 unimix=0.01):
        super().__init__()
        self.deter, self.stoch, self.classes, self.blocks = deter, stoch, classes, blocks
        self.num_actions, self.mix = num_actions, unimix
        # deter, stoch and action are each embedded, then broadcast to every GRU block.
        self.in_deter = DenseBlock(deter, hidden)
        self.in_stoch = DenseBlock(stoch * classes, hidden)
        self.in_action = DenseBlock(num_actions, hidden)
        # As in the official code the GRU's hidden layer is as wide as deter (block-diagonal).
        self.gru_hidden = BlockLinear(blocks * (deter // blocks + 3 * hidden), deter, blocks)
        self.gru_norm = RMSNorm(deter)
        self.gru_gates = BlockLinear(deter, 3 * deter, blocks)
        self.prior_net = MLP(deter, stoch * classes, hidden, layers=2)
        self.post_net = MLP(deter + embed_dim, stoch * classes, hidden, layers=1)

    @property
    def feat_dim(self):
        return self.deter + self.stoch * self.classes

    @staticmethod
    def feat(deter, stoch):
        """The model state the heads, actor and critic see: deter and stoch side by side."""
        return torch.cat([deter, stoch], -1)

    def stoch_indices(self, stoch):
        """One-hot stoch (..., S·C) → the class of each latent (..., S), as the replay keeps it."""
        return stoch.reshape(*stoch.shape[:-1], self.stoch, self.classes).argmax(-1)

    def stoch_onehot(self, indices):
        """Class indices (..., S) → one-hot stoch (..., S·C)."""
        return one_hot(indices.long(), self.classes).flatten(-2)

    def initial(self, n, device):
        return (torch.zeros(n, self.deter, device=device),
                torch.zeros(n, self.stoch * self.classes, device=device))

    def _logprobs(self, logits):  # (..., stoch·classes) → (..., stoch, classes)
        return unimix(logits.reshape(*logits.shape[:-1], self.stoch, self.classes), self.mix)

    def _sample(self, logprobs):
        return sample_onehot(logprobs).flatten(-2)

    def prior(self, deter):
        return self._logprobs(self.prior_net(deter))

    # The GRU's hidden layer sees, in every block, that block's slice of deter next to the
    # embeddings of deter, stoch and action. Its weight (blocks, deter/blocks + 3·hidden,
    # deter/blocks) is applied in parts: the embeddings' rows as one dense matmul shared by all
    # blocks (no broadcast copy of them per block), and the action's share ahead of the loop in
    # `observe`, where the actions are known for all steps. Same weights, same sums. The weights
    # are rearranged once per loop, not per step: with gradients, a rearranged copy per step
    # would also cost a full-size gradient per step.

    def step_weights(self):
        """The GRU's hidden weight in its two parts and deter's part of the posterior layer."""
        w = self.gru_hidden.weight  # (g, deter/g + 3·hidden, deter/g)
        own = w[:, :self.deter // self.blocks]  # (g, deter/g, deter/g)
        shared = w[:, self.deter // self.blocks:].transpose(0, 1).flatten(1)  # (3·hidden, deter)
        post = self.post_net[0][0].weight[:, :self.deter].t()  # (deter, hidden)
        return own, shared, post

    def action_share(self, action, weights=None):
        """The action's share of the GRU's hidden layer: (..., A) one-hot → (..., deter)."""
        shared = (weights or self.step_weights())[1]
        hidden = shared.shape[0] // 3
        return self.in_action(action) @ shared[2 * hidden:]

    def _core(self, deter, stoch, action_share, weights):
        own, shared, _ = weights
        hidden = shared.shape[0] // 3
        g = self.blocks
        x = torch.cat([self.in_deter(deter), self.in_stoch(stoch)], -1)  # (N, 2·hidden)
        blocks = torch.bmm(deter.reshape(-1, g, self.deter // g).transpose(0, 1), own)  # (g, N, ·)
        x = torch.addmm(action_share + self.gru_hidden.bias, x, shared[:2 * hidden])
        x = x + blocks.transpose(0, 1).reshape(x.shape)
        x = F.silu(self.gru_norm(x))
        gates = self.gru_gates(x).reshape(-1, g, 3, self.deter // g)
        reset, cand, update = gates.unbind(-2)
        cand = torch.tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update - 1.0)  # bias −1: keep the old state at init
        deter = deter.reshape(cand.shape)
        return torch.lerp(deter, cand, update).flatten(-2)  # update·cand + (1 − update)·deter

    def img_step(self, deter, stoch, action, weights=None):
        """One step of the prior. action: one-hot (N, A). Returns deter, stoch, prior logprobs.
        weights: `step_weights()`, computed once for a loop of steps."""
        weights = weights or self.step_weights()
        deter = self._core(deter, stoch, self.action_share(action, weights), weights)
        prior = self.prior(deter)
        return deter, self._sample(prior), prior

    def embed_share(self, embed):
        """The embedding's share of the posterior's first layer, with its bias: (..., E) →
        (..., hidden)."""
        first = self.post_net[0][0]
        return embed @ first.weight[:, self.deter:].t() + first.bias

    def _post_step(self, deter, stoch, keep, action_share, embed_share, weights):
        """obs_step on shares computed ahead: keep (N, 1) is 0 where is_first."""
        deter = self._core(deter * keep, stoch * keep, action_share, weights)
        _, norm, act = self.post_net[0]
        x = torch.addmm(embed_share, deter, weights[2])
        post = self._logprobs(self.post_net[1](act(norm(x))))
        return deter, self._sample(post), post

    def obs_step(self, deter, stoch, prev_action, embed, is_first):
        """One step of the posterior. Where is_first, state and previous action restart at zero:
        the first frame of an episode must not see the last state and action of the one before.
        """
        keep = (1.0 - is_first.to(deter.dtype)).unsqueeze(-1)
        weights = self.step_weights()
        return self._post_step(deter, stoch, keep, self.action_share(prev_action * keep, weights),
                               self.embed_share(embed), weights)

    def observe(self, embed, prev_action, is_first, state=None):
        """Posterior over a sequence. embed (B, T, E), prev_action (B, T, A) = a_{t−1},
        is_first (B, T). Returns deter (B, T, D), stoch (B, T, S·C), post and prior logprobs
        (B, T, S, C)."""
        B, T = embed.shape[:2]
        deter, stoch = state if state is not None else self.initial(B, embed.device)
        if torch.is_grad_enabled() and not (deter.requires_grad or stoch.requires_grad):
            # A start state that is data (zeros or replayed latents) becomes a leaf that requires
            # grad (its gradient is computed and dropped): every step's inputs then require grad,
            # as from the second step on, so that a compiled step (--compile) is traced once.
            deter, stoch = deter.detach().requires_grad_(), stoch.detach().requires_grad_()
        # Everything that does not depend on the recurrent state, for all T steps at once.
        keep = (1.0 - is_first.to(deter.dtype)).unsqueeze(-1)  # (B, T, 1)
        weights = self.step_weights()
        action_share = self.action_share(prev_action * keep, weights)  # (B, T, deter)
        embed_share = self.embed_share(embed)  # (B, T, hidden)
        deters, stochs, posts = [], [], []
        for t in range(T):
            deter, stoch, post = self._post_step(deter, stoch, keep[:, t], action_share[:, t],
                                                 embed_share[:, t], weights)
            deters.append(deter)
            stochs.append(stoch)
            posts.append(post)
        deter = torch.stack(deters, 1)
        # The prior depends on deter only, so it is computed once for all steps.
        return deter, torch.stack(stochs, 1), torch.stack(posts, 1), self.prior(deter)

    def imagine(self, deter, stoch, policy, horizon):
        """Roll the prior forward from (N, ·) start states, acting with `policy(feat) → one-hot`.
        Returns feats (N, H + 1, F) and one-hot actions (N, H + 1, A); action t was taken in
        state t (the last one is never executed)."""
        feats, actions = [], []
        weights = self.step_weights()
        for t in range(horizon + 1):
            feat = self.feat(deter, stoch)
            action = policy(feat)
            feats.append(feat)
            actions.append(action)
            if t < horizon:
                deter, stoch, _ = self.img_step(deter, stoch, action, weights)
        return torch.stack(feats, 1), torch.stack(actions, 1)


# ---------------------------------------------------------------------------------------------
# Agent


class Dreamer(nn.Module):
    """World model + actor + critic (+ slow critic and return normaliser), with the losses.

    `loss(obs, action, reward, is_first, is_last, is_terminal)` returns (total, metrics);
    train.py does the optimizer step.
    """

    loss_scales = dict(rec=1.0, rew=1.0, con=1.0, dyn=1.0, rep=0.1, policy=1.0, value=1.0,
                       repval=0.3)

    def __init__(self, num_actions, deter=4096, hidden=512, stoch=32, classes=32, depth=32,
                 units=512, blocks=8, mlp_layers=3, head_layers=1, unimix=0.01, horizon=15,
                 discount=0.997, lam=0.95, free_nats=1.0, actent=3e-4, slow_rate=0.02,
                 slowreg=1.0, image_size=64, enc_pool=0, dec_pool=0, pool_kernel=5,
                 image_output="sigmoid"):
        super().__init__()
        self.num_actions, self.horizon, self.discount, self.lam = num_actions, horizon, discount, lam
        self.free_nats, self.actent, self.slow_rate, self.slowreg = free_nats, actent, slow_rate, slowreg
        self.mix = unimix
        self.twohot = TwoHot()
        self.encoder = Encoder(depth, image_size=image_size, pool=enc_pool, kernel=pool_kernel)
        self.rssm = RSSM(num_actions, self.encoder.out_dim, deter, hidden, stoch, classes, blocks,
                         unimix)
        feat = self.rssm.feat_dim
        self.decoder = Decoder(feat, depth, image_size=image_size, pool=dec_pool, kernel=pool_kernel,
                               output=image_output)
        self.reward_head = MLP(feat, self.twohot.num_bins, units, head_layers, outscale=0.0)
        self.cont_head = MLP(feat, 1, units, head_layers)
        self.actor = MLP(feat, num_actions, units, mlp_layers, outscale=0.01)
        self.critic = MLP(feat, self.twohot.num_bins, units, mlp_layers, outscale=0.0)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.retnorm = Normalize()

    # Parameter groups so that --lr, --actor_lr and --critic_lr can differ.
    def world_model_parameters(self):
        for name in ("encoder", "rssm", "decoder", "reward_head", "cont_head"):
            yield from getattr(self, name).parameters()

    def compile_steps(self, **options):
        """torch.compile the pieces of an update one by one: the observe and imagine steps (one
        graph each, reused for all T and H steps, instead of one graph of the unrolled loops, which
        takes minutes to compile), the encoder, the world-model heads and the actor-critic losses.
        Their backward passes are compiled with them; the Python loops between them stay eager."""
        compile = functools.partial(torch.compile, **options)
        self.rssm._post_step = compile(self.rssm._post_step)
        self.rssm.img_step = compile(self.rssm.img_step)
        self.sample_action = compile(self.sample_action)
        self.encoder.compile(**options)
        for name in ("world_model_heads", "behavior_loss", "replay_value_loss"):
            setattr(self, name, compile(getattr(self, name)))
        return self

    # -- acting ---------------------------------------------------------------------------------

    def initial_state(self, n, device):
        deter, stoch = self.rssm.initial(n, device)
        return deter, stoch, torch.zeros(n, self.num_actions, device=device)

    def policy_logprobs(self, feat):
        return unimix(self.actor(feat), self.mix)

    def sample_action(self, feat):
        return sample_onehot(self.policy_logprobs(feat)).detach()

    @torch.no_grad()
    def act(self, obs, is_first, state, greedy=False):
        """obs (N, 64, 64, 3) uint8, is_first (N,) → action indices (N,), new state."""
        deter, stoch, prev_action = state
        deter, stoch, _ = self.rssm.obs_step(deter, stoch, prev_action, self.encoder(obs), is_first)
        logp = self.policy_logprobs(self.rssm.feat(deter, stoch))
        # Without argument validation: it checks the logits on the host, a sync per env step.
        # The draw (torch.multinomial) is the same as with it.
        sample = torch.distributions.Categorical(logits=logp, validate_args=False).sample
        action = logp.argmax(-1) if greedy else sample()
        # Copies of the compiled step's outputs: this state outlives the graph's next replay
        # (CUDA graphs, --compile_mode reduce-overhead, reuse its output memory).
        return action, (deter.clone(), stoch.clone(), one_hot(action, self.num_actions, deter.dtype))

    # -- losses ---------------------------------------------------------------------------------

    def kl_losses(self, post, prior):
        """dyn = KL(sg(post) ‖ prior), rep = KL(post ‖ sg(prior)); each summed over the latents,
        then clipped below at `free_nats` (free bits) per (batch, time) element."""
        dyn = categorical_kl(post.detach(), prior).sum(-1)
        rep = categorical_kl(post, prior.detach()).sum(-1)
        return dyn.clamp(min=self.free_nats), rep.clamp(min=self.free_nats)

    def world_model_loss(self, obs, action, reward, is_first, is_terminal, start=None):
        """Per-(B, T) losses of the world model, the posterior states (dict of deter, stoch and
        feat, each (B, T, ·)) and metrics.

        start: None (the window starts from the zero state; its first step must be is_first), or
        the replay context (deter (B, D), stoch class indices (B, S), action (B,)) of the step
        before the window: the latent the window continues from and the previous action.
        """
        state, prev_action = self.window_start(action, start)
        embed = self.encoder(obs)
        deter, stoch, post, prior = self.rssm.observe(embed, prev_action, is_first, state)
        losses, feat, metrics = self.world_model_heads(obs, reward, is_terminal, deter, stoch, post,
                                                       prior)
        return losses, dict(deter=deter, stoch=stoch, feat=feat), metrics

    def world_model_heads(self, obs, reward, is_terminal, deter, stoch, post, prior):
        """The world model's losses on the posterior states of `observe`."""
        feat = self.rssm.feat(deter, stoch)
        recon = self.decoder(feat)
        target = obs.float() / 255.0
        losses = {}
        losses["rec"] = (recon - target).pow(2).sum((-3, -2, -1))
        losses["rew"] = self.twohot.loss(self.reward_head(feat), reward)
        cont_logit = self.cont_head(feat).squeeze(-1).float()
        losses["con"] = F.binary_cross_entropy_with_logits(
            cont_logit, 1.0 - is_terminal.float(), reduction="none")
        losses["dyn"], losses["rep"] = self.kl_losses(post, prior)
        metrics = {
            "wm/prior_entropy": categorical_entropy(prior).sum(-1).mean(),
            "wm/post_entropy": categorical_entropy(post).sum(-1).mean(),
        }
        return losses, feat, metrics

    def window_start(self, action, start=None):
        """The RSSM state a replayed window starts from (None: zero) and its previous actions
        (B, T, A), from the replay context `start` (see `world_model_loss`)."""
        if start is None:
            return None, previous_actions(action, self.num_actions)
        deter, stoch, first_action = start
        state = (deter.float(), self.rssm.stoch_onehot(stoch))
        return state, previous_actions(action, self.num_actions, first_action)

    def imagine(self, deter, stoch):
        """Imagine `horizon` steps from every replayed posterior state (B, T, ·) (no gradients:
        the actor-critic losses must not reach the world model)."""
        with torch.no_grad():
            return self.rssm.imagine(deter.detach().reshape(-1, deter.shape[-1]),
                                     stoch.detach().reshape(-1, stoch.shape[-1]), self.sample_action,
                                     self.horizon)

    def behavior_loss(self, feats, actions):
        """Actor and critic losses on imagined trajectories feats (N, H+1, F)."""
        with torch.no_grad():
            reward = self.twohot.pred(self.reward_head(feats))
            cont = torch.sigmoid(self.cont_head(feats).squeeze(-1).float()) * self.discount
            slow = self.twohot.pred(self.slow_critic(feats))
            # Weight of state t: probability of reaching it, cumprod(γ·c)/γ (includes the start).
            weight = torch.cumprod(cont, 1) / self.discount
        value_logits = self.critic(feats)
        value = self.twohot.pred(value_logits)
        ret = lambda_return(reward[:, 1:], cont[:, 1:], value.detach(), self.lam)  # (N, H)
        self.retnorm.update(ret)
        _, scale = self.retnorm.stats()
        adv = (ret - value[:, :-1].detach()) / scale
        logp = self.policy_logprobs(feats)  # (N, H+1, A)
        logpi = (logp * actions).sum(-1)[:, :-1]
        entropy = categorical_entropy(logp)[:, :-1]
        w = weight[:, :-1]
        losses = {
            "policy": w * -(logpi * adv.detach() + self.actent * entropy),
            "value": w * (self.twohot.loss(value_logits[:, :-1], ret.detach())
                          + self.slowreg * self.twohot.loss(value_logits[:, :-1], slow[:, :-1])),
        }
        metrics = {
            "actor/entropy": entropy.mean(),
            "actor/return_scale": scale,
            "actor/imag_return": ret.mean(),
            "actor/imag_reward": reward[:, 1:].mean(),
            "actor/value": value.mean(),
            "actor/advantage": adv.mean(),
        }
        return losses, ret, metrics

    def replay_value_loss(self, feat, reward, is_last, is_terminal, boot):
        """Critic loss on the replayed sequence, bootstrapped from the imagination returns.
        Gradients flow into the world model through feat (B, T, F)."""
        value_logits = self.critic(feat)
        with torch.no_grad():
            value = self.twohot.pred(value_logits)
            slow = self.twohot.pred(self.slow_critic(feat))
            live = (1.0 - is_terminal.float()) * self.discount
            lam = self.lam * (1.0 - is_last.float())
            ret = lambda_return(reward[:, 1:], live[:, 1:], boot, lam[:, 1:])
            weight = 1.0 - is_last.float()[:, :-1]
        loss = self.twohot.loss(value_logits[:, :-1], ret) + \
            self.slowreg * self.twohot.loss(value_logits[:, :-1], slow[:, :-1])
        return weight * loss, {"critic/replay_return": ret.mean(), "critic/replay_value": value.mean()}

    def loss(self, obs, action, reward, is_first, is_last, is_terminal, start=None):
        """All losses of one update. Batch tensors are (B, T, ...); `start` as in
        `world_model_loss`. Returns the scaled total, the metrics dict (detached scalars) and the
        posterior latents (deter (B, T, D), stoch class indices (B, T, S); detached) with which
        the replay refreshes its stored context."""
        B, T = action.shape
        losses, post, metrics = self.world_model_loss(obs, action, reward, is_first, is_terminal, start)
        feat = post["feat"]
        feats, actions = self.imagine(post["deter"], post["stoch"])
        beh, ret, beh_metrics = self.behavior_loss(feats, actions)
        losses.update(beh)
        boot = ret[:, 0].reshape(B, T).detach()
        losses["repval"], rv_metrics = self.replay_value_loss(feat, reward, is_last, is_terminal,
                                                              boot)
        total = self.scaled_total(losses)
        metrics.update(beh_metrics)
        metrics.update(rv_metrics)
        metrics.update({f"loss/{k}": v.mean() for k, v in losses.items()})
        metrics["loss/total"] = total
        latents = dict(deter=post["deter"].detach(), stoch=self.rssm.stoch_indices(post["stoch"].detach()))
        return total, {k: v.detach() for k, v in metrics.items()}, latents

    def scaled_total(self, losses):
        """The sum of the losses' means (each (B, T) or (N, H)), each times its scale."""
        return sum(self.loss_scales[k] * v.mean() for k, v in losses.items())

    @torch.no_grad()
    def update_slow_critic(self):
        for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters()):
            slow.lerp_(fast, self.slow_rate)


class AgentPolicy:
    """The agent acting in a vector env: numpy frames and is_first flags in, numpy actions out.
    Holds each env's recurrent state (deter, stoch, previous action) between steps.

    Each step comes back to the host in one copy: the actions and the new latents packed on the
    device as bytes (int64 action, deter's bfloat16 bits, uint8 stoch classes), which `latents`
    then serves to the replay without another transfer."""

    def __init__(self, agent, num_envs, device, greedy=False):
        self.agent, self.device, self.greedy = agent, device, greedy
        self.state = agent.initial_state(num_envs, device)
        self.last = None  # the last step's host copy, split (see `__call__`)

    def __call__(self, obs, is_first):
        action, self.state = self.agent.act(torch.as_tensor(obs, device=self.device),
                                            torch.as_tensor(is_first, device=self.device),
                                            self.state, self.greedy)
        deter, stoch, _ = self.state
        packed = pack_step(action, deter, self.agent.rssm.stoch_indices(stoch)).cpu().numpy()
        # Views of the one host copy: action (N,) int64, deter (N, D) as bfloat16 bits, stoch (N, S) uint8.
        action, bits, stoch = np.split(packed, [8, 8 + 2 * deter.shape[-1]], axis=1)
        self.last = dict(action=action.view(np.int64)[:, 0], deter_bits=bits.view(np.uint16), stoch=stoch)
        return self.last["action"]

    def latents(self):
        """The posterior latent of the last observation, as the replay stores it: deter (N, D) as
        bfloat16 bits and stoch class indices (N, S) uint8."""
        return dict(deter_bits=self.last["deter_bits"], stoch=self.last["stoch"])


def bf16_bits(x):
    """x rounded to bfloat16 (to nearest, ties to even), as int16 bits: the replay's uint16."""
    return x.to(torch.bfloat16).view(torch.int16)


def pack_step(action, deter, stoch):
    """action (N,) int64, deter (N, D) float, stoch class indices (N, S) → (N, 8 + 2·D + S) uint8,
    one tensor for one device-to-host copy."""
    parts = [action.long()[:, None], bf16_bits(deter.float()), stoch.to(torch.uint8)]
    return torch.cat([p.contiguous().view(torch.uint8) for p in parts], -1)


# ---------------------------------------------------------------------------------------------
# Optimizer


class LaProp(torch.optim.Optimizer):
    """LaProp with adaptive gradient clipping, as in the official v2 optimizer chain:

    1. AGC per tensor: g ← g · min(1, clip · max(pmin, ‖θ‖) / ‖g‖)
    2. RMS scaling:    ν ← β2·ν + (1−β2)·g²;  u = g / (sqrt(ν / (1−β2^t)) + eps)
    3. Momentum:       μ ← β1·μ + (1−β1)·u;   θ ← θ − lr_t · μ / (1−β1^t)
    lr_t ramps linearly from 0 to lr over `warmup` updates.
    """

    def __init__(self, params, lr=4e-5, betas=(0.9, 0.999), eps=1e-20, agc=0.3, pmin=1e-3,
                 warmup=1000):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, agc=agc, pmin=pmin,
                                      warmup=warmup))

    @torch.no_grad()
    def step(self):
        # Multi-tensor (foreach) ops: a handful of kernels per parameter group instead of a dozen
        # per tensor, which matters on GPUs where each launch costs microseconds.
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:
                    state.update(step=0, nu=torch.zeros_like(p), mu=torch.zeros_like(p))
                state["step"] += 1
            t = states[0]["step"]
            grads = [p.grad for p in params]
            if group["agc"]:
                pnorm = torch.stack(torch._foreach_norm(params)).clamp(min=group["pmin"])
                gnorm = torch.stack(torch._foreach_norm(grads))
                scale = 1.0 / torch.clamp(gnorm / (group["agc"] * pnorm), min=1.0)
                grads = torch._foreach_mul(grads, list(scale.unbind(0)))
            nus, mus = [s["nu"] for s in states], [s["mu"] for s in states]
            torch._foreach_mul_(nus, beta2)
            torch._foreach_addcmul_(nus, grads, grads, value=1 - beta2)
            denom = torch._foreach_div(nus, 1 - beta2 ** t)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_mul_(mus, beta1)
            torch._foreach_add_(mus, torch._foreach_div(grads, denom), alpha=1 - beta1)
            lr = group["lr"] * min(1.0, t / group["warmup"]) if group["warmup"] else group["lr"]
            torch._foreach_add_(params, mus, alpha=-lr / (1 - beta1 ** t))


@torch.no_grad()
def reconstruct(agent, obs, action, is_first, start=None):
    """The posterior of a replayed batch (obs (N, T, 64, 64, 3) uint8, action (N, T), is_first
    (N, T), start as in `Dreamer.world_model_loss`) and the decoder's frames of it: deter, stoch
    and recon (N, T, 64, 64, 3) in [0, 1] (a linear decoder's output clipped to it)."""
    state, prev_action = agent.window_start(action, start)
    deter, stoch, _, _ = agent.rssm.observe(agent.encoder(obs), prev_action, is_first, state)
    return deter, stoch, agent.decoder(agent.rssm.feat(deter, stoch)).clamp(0, 1)


@torch.no_grad()
def openloop(agent, obs, action, is_first, context=5, start=None):
    """Reconstructions of a replayed batch and open-loop predictions after `context` frames.

    obs (N, T, 64, 64, 3) uint8, action (N, T), is_first (N, T), start: the replay context or
    None (see `Dreamer.world_model_loss`). Returns recon (N, T, 64, 64, 3) from the posterior and
    imagined frames (N, T − context, 64, 64, 3) from the prior driven by the replayed actions,
    both in [0, 1].
    """
    deter, stoch, recon = reconstruct(agent, obs, action, is_first, start)
    prev_action = agent.window_start(action, start)[1]
    d, s = deter[:, context - 1], stoch[:, context - 1]
    feats = []
    for t in range(context, obs.shape[1]):
        d, s, _ = agent.rssm.img_step(d, s, prev_action[:, t])
        feats.append(agent.rssm.feat(d, s))
    return recon, agent.decoder(torch.stack(feats, 1)).clamp(0, 1)
