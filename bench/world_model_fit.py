"""How many updates the world model needs to draw a game's small objects (a ball of one or two
pixels): the world model alone fitted to the frames of a random policy, and the missed pixels of
`bench/reconstruction.py` on frames it was not fitted to, every `--every` updates.

    python bench/world_model_fit.py Breakout --data_steps 20000 --minutes 20 --every 1000

The frames: `--data_steps` agent steps of a uniformly random policy on one env (the CPU preset's
env settings), and another 200 held out. The update: `train.train_step` with the world model's
losses only (reconstruction, reward, continue, dynamics and representation; no imagination,
actor or critic), the CPU preset's optimizer settings, windows of `--batch_size` ×
`--sequence_length` drawn uniformly, each starting from the zero state. `--depth`, `--deter`,
`--hidden`, `--classes` and `--units` change the tiny model's widths, `--enc_pool`, `--dec_pool`
and `--pool_kernel` its image stacks (stride-1 convolutions with max pooling and upsampling, as
the official code's, in place of stride-2 ones), `--image_output` the decoder's output layer,
`--lr` the world model's learning rate, `--rep_scale` the representation loss's scale.
Prints one JSON line with the curve: updates, seconds, reconstruction loss (the mean of the
last `--every` updates) and missed pixels per held-out frame.
"""
import argparse
import dataclasses
import inspect
import sys
import time

import numpy as np
import torch

import common
import train
from env import make_env
from evaluate import atari_id
from model import IMAGE_OUTPUTS, Dreamer, Encoder
from reconstruction import pixel_errors, play

HELD_OUT = 200


def world_model_only(agent):
    """A loss function for `train.train_step`: the world model's scaled losses of a batch."""

    def loss_fn(obs, action, reward, is_first, is_last, is_terminal, start):
        losses, _, metrics = agent.world_model_loss(obs, action, reward, is_first, is_terminal, start)
        total = agent.scaled_total(losses)
        metrics.update({f"loss/{k}": v.mean() for k, v in losses.items()})
        return total, {k: v.detach() for k, v in metrics.items()}, None

    return loss_fn


def sample(data, batch_size, seq_len, rng):
    """Windows (B, T) drawn uniformly from the frames, each marked as an episode's first step."""
    starts = rng.integers(0, len(data["obs"]) - seq_len + 1, batch_size)
    index = starts[:, None] + np.arange(seq_len)
    batch = {key: torch.as_tensor(value[index]) for key, value in data.items()}
    batch["is_first"][:, 0] = True
    batch["is_last"] = torch.zeros_like(batch["is_first"])
    return batch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("game", help="an Atari game (Breakout, Pong, ...)")
    p.add_argument("--data_steps", type=int, default=20_000, help="agent steps of random play to fit")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget of the updates")
    p.add_argument("--max_updates", type=int, default=0, help="stop after this many updates (0: the budget)")
    p.add_argument("--every", type=int, default=1000, help="updates between two checks of the held-out frames")
    for key, what in [("depth", "the image stacks' base width"), ("deter", "the recurrent state's width"),
                      ("hidden", "the RSSM's hidden width"), ("classes", "classes of each of the 32 latents"),
                      ("units", "the heads' width")]:
        p.add_argument(f"--{key}", type=int, default=train.SIZES["tiny"][key], help=f"{what} (the tiny model's)")
    p.add_argument("--enc_pool", type=int, default=0,
                   help="encoder layers (from the first) that convolve at stride 1 and max-pool (0: all stride 2)")
    p.add_argument("--dec_pool", type=int, default=0,
                   help="decoder layers (from the last) that upsample and convolve at stride 1 (0: all transposed)")
    p.add_argument("--pool_kernel", type=int, default=5, help="the kernel of those layers (odd)")
    p.add_argument("--image_output", default="sigmoid", choices=IMAGE_OUTPUTS,
                   help="the decoder's output layer (train.py's --image_output)")
    p.add_argument("--lr", type=float, default=train.PRESETS["cpu"]["lr"], help="the world model's learning rate")
    p.add_argument("--rep_scale", type=float, default=Dreamer.loss_scales["rep"],
                   help="the representation loss's scale (a diagnostic: how much the KL keeps the ball out)")
    p.add_argument("--batch_size", type=int, default=train.PRESETS["cpu"]["batch_size"])
    p.add_argument("--sequence_length", type=int, default=train.PRESETS["cpu"]["sequence_length"])
    p.add_argument("--threshold", type=float, default=0.25, help="error of a missed pixel (0 to 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    size = {key: getattr(args, key) for key in train.SIZES["tiny"]}
    pooling = dict(enc_pool=args.enc_pool, dec_pool=args.dec_pool, pool_kernel=args.pool_kernel)
    layers = len(inspect.signature(Encoder).parameters["mults"].default)
    if not (0 <= args.enc_pool <= layers and 0 <= args.dec_pool <= layers and args.pool_kernel % 2 == 1):
        p.error(f"--enc_pool and --dec_pool must be 0 to {layers} (the image stacks' layers), --pool_kernel odd")
    if min(args.data_steps, args.every, args.batch_size, *size.values()) <= 0 or args.sequence_length < 2:
        p.error("--data_steps, --every, --batch_size and the widths must be positive, --sequence_length at least 2")
    blocks = inspect.signature(Dreamer).parameters["blocks"].default
    if size["deter"] % blocks:
        p.error(f"--deter must be a multiple of {blocks} (the GRU's blocks)")
    threads = common.set_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    with common.quiet_stdout():
        cfg = dataclasses.replace(train.Config(env=atari_id(args.game)), **{**train.PRESETS["cpu"], "lr": args.lr,
                                                                            "image_output": args.image_output})
        try:
            env = make_env(cfg.env, cfg.sticky_actions)()
        except Exception as e:
            raise SystemExit(f"error: {cfg.env}: {e}") from None
        data = play(env, args.data_steps, args.seed)
        held_out = play(env, HELD_OUT, args.seed + 1)
        env.close()
        train.SIZES["fit"] = {**size, **pooling}
        agent, opt = train.build_agent(dataclasses.replace(cfg, model_size="fit"), int(env.action_space.n),
                                       torch.device("cpu"))
        agent.loss_scales = dict(agent.loss_scales, rep=args.rep_scale)
        loss_fn, curve, rec, start, updates = world_model_only(agent), [], [], time.perf_counter(), 0
        while True:
            metrics, _ = train.train_step(agent, opt, sample(data, args.batch_size, args.sequence_length, rng),
                                          loss_fn)
            updates += 1
            rec.append(float(metrics["loss/rec"]) if metrics else float("nan"))
            seconds = time.perf_counter() - start
            over = seconds > 60 * args.minutes or updates == args.max_updates
            if updates % args.every == 0 or over:
                _, error, missed = pixel_errors(agent, held_out, args.threshold)
                curve.append(dict(updates=updates, seconds=round(seconds, 1), rec_loss=round(float(np.mean(rec)), 4),
                                  mean_abs_error=round(float(error.mean()), 5),
                                  missed_pixels_per_frame=round(float(missed.mean()), 2)))
                print(curve[-1], file=sys.stderr, flush=True)  # progress
                rec = []
            if over:
                break
    common.emit(dict(game=args.game, data_steps=args.data_steps, held_out=HELD_OUT, **size, **pooling,
                     image_output=args.image_output, lr=args.lr,
                     rep_scale=args.rep_scale, batch_size=args.batch_size, sequence_length=args.sequence_length,
                     threads=threads, threshold=args.threshold, curve=curve))


if __name__ == "__main__":
    main()
