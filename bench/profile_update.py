"""Where the time of one update goes, at a given shape (default: the CPU preset's, tiny at batch
8 × 16, one torch thread).

    python bench/profile_update.py                       # --preset cpu's shape
    python bench/profile_update.py --model_size 12m --batch_size 16 --sequence_length 64

Prints one JSON line:
- `sec_per_update`: the median of --updates plain updates (no profiler), as bench/update_speed.py;
- `ops_per_update`: the aten operators the profiler counted per update (forward, backward and
  optimizer step: the number of small ops is what bounds a small update);
- `top_ops`: the operators with the most self time under the profiler, each with its calls and
  milliseconds per update and its share of the profiled time (the profiler adds a few µs to every
  op, so the shares of many small ops read high);
- `encoder_ms`, `decoder_ms`: the forward and backward of the image encoder and decoder on the
  batch's B·T frames, timed alone (the convolution stacks, the largest part of a small update on
  the CPU).
"""
import argparse
import contextlib
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import common  # also puts the repo root on sys.path
import train
from update_speed import synthetic_batch


def timed(step, repeats):
    """Median seconds of `step()` over `repeats` calls, after one untimed call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def image_stacks_ms(agent, batch, repeats):
    """Forward + backward of the encoder on the batch's frames and of the decoder on as many
    model states, in milliseconds (median)."""
    obs = batch["obs"]
    feat = torch.randn(*obs.shape[:2], agent.decoder.inp[0].in_features, device=obs.device)
    encoder = timed(lambda: agent.encoder(obs).square().mean().backward(), repeats)
    decoder = timed(lambda: agent.decoder(feat).square().mean().backward(), repeats)
    agent.zero_grad(set_to_none=True)
    return 1e3 * encoder, 1e3 * decoder


def cpu_update(args, model_size):
    """Torch threads, seed and allocator as a CPU run sets them; an agent of `model_size`, its
    optimizer and a synthetic batch at the shape of args (batch_size, sequence_length, horizon,
    num_actions, threads, seed). Returns (threads, agent, opt, batch)."""
    threads = common.set_threads(args.threads)
    train.seed_everything(args.seed)
    device = torch.device("cpu")
    train.set_up_device(device)
    cfg = train.Config(env="ALE/Pong-v5", model_size=model_size, batch_size=args.batch_size,
                       sequence_length=args.sequence_length, imagination_horizon=args.horizon)
    agent, opt = train.build_agent(cfg, args.num_actions, device)
    batch = synthetic_batch(args.batch_size, args.sequence_length, args.num_actions, device, args.seed)
    return threads, agent, opt, batch


def main(argv=None):
    preset = train.PRESETS["cpu"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_size", default=preset["model_size"], choices=list(train.SIZES))
    p.add_argument("--batch_size", type=int, default=preset["batch_size"])
    p.add_argument("--sequence_length", type=int, default=preset["sequence_length"])
    p.add_argument("--horizon", type=int, default=15, help="imagination horizon")
    p.add_argument("--top", type=int, default=12, help="how many operators to list")
    common.add_timing_args(p, warmup=2, updates=10, threads=1, threads_help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.updates < 1 or args.top < 1:
        p.error("--updates and --top must be >= 1")

    with common.quiet_stdout():
        threads, agent, opt, batch = cpu_update(args, args.model_size)
        update = lambda: train.train_step(agent, opt, batch, autocast=contextlib.nullcontext())  # noqa: E731
        for _ in range(args.warmup_updates):
            update()
        seconds = timed(update, args.updates)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.updates):
                update()
        encoder_ms, decoder_ms = image_stacks_ms(agent, batch, args.updates)

    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    profiled_us = sum(e.self_cpu_time_total for e in prof.key_averages())
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    common.emit(dict(
        model_size=args.model_size, batch_size=args.batch_size, sequence_length=args.sequence_length,
        horizon=args.horizon, threads=threads, torch=torch.__version__,
        sec_per_update=seconds, updates_per_sec=1 / seconds,
        ops_per_update=sum(e.count for e in ops) / args.updates,
        top_ops=[dict(op=e.key, calls_per_update=e.count / args.updates,
                      ms_per_update=e.self_cpu_time_total / 1e3 / args.updates,
                      share=e.self_cpu_time_total / profiled_us) for e in top],
        encoder_ms=encoder_ms, decoder_ms=decoder_ms,
    ))


if __name__ == "__main__":
    main()
