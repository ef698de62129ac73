"""Time train.train_step (world model + imagination + actor-critic, one optimizer step) on synthetic batches.

    python bench/update_speed.py --model_size 50m --device cuda --precision bf16

Prints one JSON line: seconds per update, replayed steps per second, parameter counts, peak memory,
the FLOPs of one update (torch.utils.flop_counter over a whole eager update: forward, backward
and optimizer step), the achieved GFLOP/s and their share of this machine's matmul peak in the
update's precision (bench/peak.py: fp32, or bf16 for a bf16 update), and with --compile the
compile time (the untimed first updates minus as many timed ones).
"""
import argparse
import contextlib
import platform
import resource
import statistics
import sys
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import common  # also puts the repo root on sys.path
import peak
import train


def synthetic_batch(B, T, num_actions, device, seed=0):
    """A batch shaped like Replay.sample's, as tensors on `device`."""
    rng = np.random.default_rng(seed)
    terminal = rng.random((B, T)) < 0.02
    first = np.zeros((B, T), bool)
    first[:, 0] = True
    first[:, 1:] |= terminal[:, :-1]  # a reset observation follows every episode end
    batch = dict(obs=rng.integers(0, 256, (B, T, 64, 64, 3), dtype=np.uint8),
                 action=rng.integers(0, num_actions, (B, T), dtype=np.int64),
                 reward=rng.normal(size=(B, T)).astype(np.float32),
                 is_first=first, is_last=terminal, is_terminal=terminal)
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_allocated"
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "rss"


def count_flops(agent, opt, batch, autocast):
    """FLOPs of one eager update (it is a real update: the parameters move)."""
    with FlopCounterMode(display=False) as counter:
        train.train_step(agent, opt, batch, agent.loss, autocast)
    return counter.get_total_flops()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_size", default="tiny", choices=list(train.SIZES))
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--sequence_length", type=int, default=64)
    p.add_argument("--horizon", type=int, default=15, help="imagination horizon")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU (as train.py); bf16 = torch.autocast")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="compile the update as train.py --compile does")
    p.add_argument("--compile_mode", default=None,
                   help="torch.compile mode, e.g. reduce-overhead (CUDA graphs); default: torch's default")
    p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                   help="count the FLOPs of one update (one extra eager update)")
    p.add_argument("--peak_size", type=int, default=2048, help="matrix size of the matmul peak (0: skip)")
    common.add_timing_args(p, warmup=2, updates=5, threads=0, threads_help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.updates < 1:
        p.error("--updates must be >= 1")

    with common.quiet_stdout():
        threads = common.set_threads(args.threads)
        train.seed_everything(args.seed)
        device = train.pick_device(args.device)
        # As the Trainer does (on the CPU: flush denormals, keep freed memory; on CUDA: TF32 unless fp32)
        train.set_up_device(device, args.precision)
        # auto: bf16 on CUDA as in training; bf16 given explicitly also runs on the CPU here
        autocast_on = args.precision == "bf16" or train.uses_bf16(args.precision, device)
        precision = "bf16" if autocast_on else "fp32"
        cfg = train.Config(env="ALE/Pong-v5", model_size=args.model_size, batch_size=args.batch_size,
                           sequence_length=args.sequence_length, imagination_horizon=args.horizon)
        agent, opt = train.build_agent(cfg, args.num_actions, device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if autocast_on else contextlib.nullcontext()
        batch = synthetic_batch(args.batch_size, args.sequence_length, args.num_actions, device, args.seed)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        flops = count_flops(agent, opt, batch, autocast) if args.flops else None
        if args.compile:
            train.compile_agent(agent, opt, mode=args.compile_mode)

        warmup, times = [], []
        for i in range(args.warmup_updates + args.updates):
            sync()
            start = time.perf_counter()
            train.train_step(agent, opt, batch, autocast=autocast)
            sync()  # CUDA runs asynchronously: wait for the step before reading the clock
            (times if i >= args.warmup_updates else warmup).append(time.perf_counter() - start)
        memory, memory_kind = peak_memory(device)
        peak_dtype = "bf16" if autocast_on else "fp32"
        peak_gflops = peak.matmul_gflops(args.peak_size, 2.0, device, peak_dtype)[0] if args.peak_size else None

    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    median = statistics.median(times)
    common.emit(dict(
        device=device.type,
        device_name=device_name(device),
        torch=torch.__version__, model_size=args.model_size,
        params_world_model=count(agent.world_model_parameters()),
        params_actor=count(agent.actor.parameters()), params_critic=count(agent.critic.parameters()),
        batch_size=args.batch_size, sequence_length=args.sequence_length, horizon=args.horizon,
        precision=precision, precision_requested=args.precision, compile=args.compile,
        compile_mode=args.compile_mode, threads=threads,
        sec_per_update_median=median, sec_per_update_min=min(times), sec_per_update_max=max(times),
        updates_per_sec=1 / median,
        first_update_sec=(warmup or times)[0],
        compile_sec=max(0.0, sum(warmup) - len(warmup) * median) if args.compile and warmup else None,
        gflop_per_update=flops / 1e9 if flops else None,
        gflops_achieved=flops / 1e9 / median if flops else None,
        peak_gflops=peak_gflops, peak_size=args.peak_size, peak_dtype=peak_dtype if args.peak_size else None,
        share_of_peak=flops / 1e9 / median / peak_gflops if flops and peak_gflops else None,
        replayed_steps_per_sec=args.batch_size * args.sequence_length / median,
        peak_memory_bytes=int(memory), peak_memory_kind=memory_kind,
    ))


if __name__ == "__main__":
    sys.exit(main())
