"""Train DreamerV3 on an Atari game (or any gymnasium env with RGB images and discrete actions).

    python train.py --env ALE/Pong-v5

The loop: collect one step in every env → store it in the replay → run as many updates as the
train ratio asks (world model, imagination, actor-critic in one optimizer step) → log →
checkpoint. See README.md for the flags and for how the code follows DreamerV3.
"""
import argparse
import contextlib
import dataclasses
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import distributed
import replay
from env import Collector, check_env, make_env, make_vector_env
from evaluate import describe, evaluate, summary, write_report
from model import IMAGE_OUTPUTS, AgentPolicy, Dreamer, LaProp, openloop
from replay import CHUNK_STEPS, Loader, Replay, ReplayStore
from run_state import RunState, convert_checkpoint, load_checkpoint, load_weights, replay_dir, replay_records
from utils import Logger, keep_freed_memory, lock_run_dir, panels, warn, write_image, write_media, write_video

SIZES = {  # --model_size presets (stoch is always 32 latents)
    "tiny": dict(deter=128, hidden=64, classes=8, depth=8, units=64),
    "12m": dict(deter=2048, hidden=256, classes=16, depth=16, units=256),
    "25m": dict(deter=3072, hidden=384, classes=24, depth=24, units=384),
    "50m": dict(deter=4096, hidden=512, classes=32, depth=32, units=512),
    "100m": dict(deter=6144, hidden=768, classes=48, depth=48, units=768),
    "200m": dict(deter=8192, hidden=1024, classes=64, depth=64, units=1024),
}


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    env: str = arg("", "gymnasium id, e.g. ALE/Pong-v5 (any ALE game; also module:EnvId ids); required unless --resume")
    num_envs: int = arg(16, "number of parallel environments (AsyncVectorEnv workers)")
    total_steps: int = arg(1_000_000, "agent steps to train for (env steps after action repeat, summed over envs)")
    capacity: int = arg(1_000_000, "replay capacity in steps (about 12.3 KB each, plus 2·deter + 32 bytes of "
                                   "latent with --replay_context), split over the envs")
    save_replay: bool = arg(True, "keep the replay with the run in <run_dir>/replay (frames written once, in "
                                  "chunks; under torchrun rank r > 0 in replay/rank_r) so that --resume "
                                  "continues with the same data; off: a resumed run refills --learning_starts")
    replay_context: bool = arg(True, "store each step's posterior latent and start replayed windows from the "
                                     "step before them (official v2); off: from the zero state")
    sequence_length: int = arg(64, "length T of the replayed training sequences")
    batch_size: int = arg(16, "number B of replayed sequences per update")
    imagination_horizon: int = arg(15, "imagined steps from every replayed state")
    lr: float = arg(4e-5, "world model learning rate")
    actor_lr: float = arg(4e-5, "actor learning rate")
    critic_lr: float = arg(4e-5, "critic learning rate")
    warmup: int = arg(1000, "updates of linear learning-rate warm-up")
    discount: float = arg(0.997, "discount factor gamma (horizon 333)")
    lam: float = arg(0.95, "lambda of the lambda-returns")
    actor_entropy: float = arg(3e-4, "actor entropy regulariser eta (the policy loss is -(log pi * advantage + "
                                     "eta * entropy), advantages divided by the return scale)")
    train_ratio: float = arg(32.0, "replayed steps per agent step (updates per agent step = ratio / (B*T))")
    model_size: str = arg("50m", "model preset: " + ", ".join(SIZES))
    learning_starts: int = arg(1024, "agent steps collected before the first update")
    sticky_actions: float = arg(0.25, "ALE repeat_action_probability (0.25 as in ALE v5)")
    lives: str = arg("unused", "Atari lives: unused (a lost life is neither terminal nor last, as in the official "
                               "code) or discount (a lost life is terminal for the continue and value targets; "
                               "the episode goes on until the game is over)")
    image_output: str = arg("sigmoid", "the decoder's output layer: sigmoid (the official code's) or linear "
                                       "(its first release's: the output + 0.5, which does not saturate "
                                       "on a black background)")
    preset: str = arg("", "settings preset: atari100k, cpu (the tiny model and many small updates: some "
                          "Atari games learn within the hour on two CPU cores) or none "
                          "(the defaults); flags given explicitly win. Default: cpu when --device auto finds no "
                          "GPU and no --model_size is given, else none")
    atari100k: bool = arg(False, "Atari100k preset: 1 env, no sticky actions, 100k steps, train ratio 256 "
                                 "(the same as --preset atari100k)")
    video_interval: int = arg(100, "write an mp4 of every N-th episode of env 0 (0: never)")
    image_interval: int = arg(2000, "updates between reconstruction / open-loop panels (0: never)")
    log_interval: int = arg(1000, "agent steps between logged training scalars")
    checkpoint_interval: int = arg(50_000, "agent steps between checkpoints (also written at the end and on Ctrl-C)")
    keep_checkpoints: int = arg(0, "also keep the weights (and return normaliser) of the last N checkpoints as "
                                   "checkpoint_<step>.pt, small files for evaluation only (bench/eval_curve.py); "
                                   "0: none")
    max_time: str = arg("", "wall-clock budget, e.g. 3h50m, 90m, 45s or seconds (5400), counted over all the "
                            "jobs of a resumed run: once spent, the run saves its checkpoint and stops (empty: none)")
    eval_interval: int = arg(0, "agent steps between evaluations during training, logged as eval/return and "
                                "eval/hns (0: never)")
    eval_episodes: int = arg(10, "episodes per evaluation; given with --resume (without --eval_interval): "
                                 "evaluate the checkpoint and exit")
    eval_envs: int = arg(4, "parallel envs of an evaluation")
    eval_greedy: bool = arg(False, "evaluate with the most likely action instead of sampling as in training")
    run_dir: str = arg("", "where checkpoint.pt, metrics.jsonl, videos and images go "
                           "(default runs/<game>-<time>, or the checkpoint's folder on resume)")
    wandb_key: str = arg("", "file holding a wandb API key; with it the run logs online")
    wandb_mode: str = arg("offline", "wandb mode without a key: offline (local files) or disabled; "
                                     "online needs --wandb_key")
    wandb_project: str = arg("dreamerv3-atari", "wandb project name")
    resume: str = arg("", "checkpoint.pt to resume from (counters, optimizer, slow critic, normaliser, wandb id); "
                          "auto: <run_dir>/checkpoint.pt if there is one, else a fresh start")
    resume_wandb_id: str = arg("", "wandb run id to continue (default: the one stored in the checkpoint)")
    convert_checkpoint: str = arg("", "rewrite a checkpoint.pt of an earlier version, which a safe load refuses, "
                                      "in safe types (the original kept as PATH.bak) and exit; its load allows "
                                      "only those versions' numpy and ALE types")
    seed: int = arg(0, "random seed")
    device: str = arg("auto", "auto (cuda if available), cuda, cuda:N or cpu")
    precision: str = arg("auto", "auto (bf16 autocast on CUDA, with TF32 for what stays in fp32; fp32 on the "
                                 "CPU), fp32 (full fp32 everywhere) or bf16 (autocast, CUDA only)")
    compile: bool = arg(False, "torch.compile the update piece by piece: the observe and imagine step functions "
                               "(one graph each, reused over the loop), encoder, heads and losses (slow start)")
    compile_mode: str = arg("default", "torch.compile mode with --compile: default, reduce-overhead (CUDA "
                                       "graphs) or max-autotune")


def _parser(suppress_defaults=False):
    parser = argparse.ArgumentParser(
        description="DreamerV3 for Atari", argument_default=argparse.SUPPRESS if suppress_defaults else None)
    for f in dataclasses.fields(Config):
        # An empty default means "not set"; such flags say in their help what happens without them.
        help = f.metadata["help"] + (f" (default: {f.default})" if f.default != "" else "")
        default = {} if suppress_defaults else {"default": f.default}
        if f.type is bool or f.type == "bool":
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help,
                                **default)
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), help=help, **default)
    return parser


def parse_args(argv=None):
    """The Config of the command line, and the names of the flags given explicitly (on resume,
    the others come from the checkpoint)."""
    cfg = Config(**vars(_parser().parse_args(argv)))
    return cfg, set(vars(_parser(suppress_defaults=True).parse_args(argv)))


def check_config(cfg):
    """Raise ValueError with one line for values that cannot work, before anything starts."""
    positive = ["num_envs", "total_steps", "capacity", "batch_size", "imagination_horizon",
                "train_ratio", "eval_episodes", "eval_envs"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.sequence_length < 2:  # the replay value loss bootstraps from the next step
        raise ValueError(f"--sequence_length must be at least 2, got {cfg.sequence_length}")
    for name in ["lr", "actor_lr", "critic_lr"]:
        if not 0 < getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be in (0, 1), got {getattr(cfg, name)}")
    for name in ["discount", "lam"]:
        if not 0 < getattr(cfg, name) <= 1:
            raise ValueError(f"--{name} must be in (0, 1], got {getattr(cfg, name)}")
    for name in ["video_interval", "image_interval", "log_interval", "checkpoint_interval",
                 "keep_checkpoints", "learning_starts", "warmup", "eval_interval", "actor_entropy"]:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.sticky_actions <= 1:
        raise ValueError(f"--sticky_actions must be in [0, 1], got {cfg.sticky_actions}")
    if cfg.image_output not in IMAGE_OUTPUTS:
        raise ValueError(f"--image_output must be {' or '.join(IMAGE_OUTPUTS)}, got {cfg.image_output}")
    if cfg.lives not in ("unused", "discount"):
        raise ValueError(f"--lives must be unused or discount, got {cfg.lives}")
    if cfg.model_size not in SIZES:
        raise ValueError(f"--model_size must be one of {', '.join(SIZES)}, got {cfg.model_size}")
    if cfg.wandb_mode not in ("online", "offline", "disabled"):
        raise ValueError(f"--wandb_mode must be online, offline or disabled, got {cfg.wandb_mode}")
    if cfg.wandb_mode == "online" and not cfg.wandb_key:
        raise ValueError("--wandb_mode online needs --wandb_key FILE")
    if cfg.wandb_key and not os.path.isfile(cfg.wandb_key):
        raise ValueError(f"--wandb_key {cfg.wandb_key}: no such file")
    if cfg.wandb_key and not os.access(cfg.wandb_key, os.R_OK):
        raise ValueError(f"--wandb_key {cfg.wandb_key}: not readable (permission denied)")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--precision must be auto, fp32 or bf16, got {cfg.precision}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ValueError(f"--compile_mode must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode}")
    parse_device(cfg.device)
    parse_duration(cfg.max_time)
    if cfg.capacity // cfg.num_envs < cfg.sequence_length:
        raise ValueError(f"--capacity {cfg.capacity} gives {cfg.capacity // cfg.num_envs} steps per env, "
                         f"fewer than --sequence_length {cfg.sequence_length}")
    if not cfg.env:
        raise ValueError("--env is required, e.g. --env ALE/Pong-v5")
    check_env(cfg.env)


def parse_duration(text):
    """Seconds of a --max_time: 3h50m, 90m, 45s, 1h30m15s or plain seconds (5400); None for ""."""
    if not text:
        return None
    number = r"(\d+(?:\.\d+)?)"
    if re.fullmatch(number, text):
        seconds = float(text)
    else:
        match = re.fullmatch(f"(?:{number}h)?(?:{number}m)?(?:{number}s)?", text)
        if match is None or not any(match.groups()):
            raise ValueError(f"--max_time {text}: not a duration; use e.g. 3h50m, 90m, 45s or seconds (5400)")
        hours, minutes, secs = (float(g or 0) for g in match.groups())
        seconds = 3600 * hours + 60 * minutes + secs
    if seconds <= 0:
        raise ValueError(f"--max_time {text}: must be positive (leave it out for no limit)")
    return seconds


PRESETS = {
    "none": {},
    "atari100k": dict(num_envs=1, sticky_actions=0.0, total_steps=100_000, train_ratio=256.0),
    # Many small updates per CPU-second (bench/RESULTS.md: RoadRunner learns within an hour on two
    # cores): the tiny model, batch 8 × 16 steps (with replay context a short window starts from
    # the stored latent of the step before it), train ratio 64, the learning rates of the CPU
    # learning tests and a short warm-up. A lost life is terminal (--lives discount): within the
    # hour it took RoadRunner past its run-left plateau; games without lives are unchanged. The
    # entropy scale is 1e-3 (the official 3e-4 lets the tiny actor's entropy collapse early: within
    # the hour RoadRunner and KungFuMaster scored higher at 1e-3, Boxing no lower).
    "cpu": dict(model_size="tiny", num_envs=4, batch_size=8, sequence_length=16, train_ratio=64.0,
                lr=1e-3, actor_lr=3e-4, critic_lr=1e-3, warmup=100, learning_starts=1000,
                log_interval=2000, checkpoint_interval=20_000, lives="discount", actor_entropy=1e-3),
}


def apply_presets(cfg, given=None):
    """--preset (or --atari100k) sets its values, except for flags given explicitly on the command
    line. A new run without a preset on a machine without a GPU (--device auto) gets the CPU
    preset, unless --model_size was given; one line says so."""
    if cfg.atari100k:
        cfg.preset = cfg.preset or "atari100k"
    if cfg.preset == "atari100k":
        cfg.atari100k = True
    if not cfg.preset and given is not None and "model_size" not in given and cfg.device == "auto" \
            and not torch.cuda.is_available():
        cfg.preset = "cpu"
        if distributed.is_main():
            print("note: no GPU found, so this run uses --preset cpu (tiny model, 4 envs, batch 8 x 16, train "
                  "ratio 64, lost lives terminal, entropy scale 1e-3); give --preset none or --model_size to "
                  "train another size on the CPU",
                  file=sys.stderr)
    if cfg.preset not in PRESETS and cfg.preset:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {cfg.preset}")
    for key, value in PRESETS.get(cfg.preset, {}).items():
        if given is None or key not in given:
            setattr(cfg, key, value)
    return cfg


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def parse_device(name, cuda_count=None):
    """The torch.device that --device names (auto: None), or a one-line ValueError: a malformed
    name, CUDA on a machine without it, or a GPU index the machine does not have. `cuda_count`:
    the number of GPUs (default: this machine's)."""
    if name == "auto":
        return None
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name}")
    if name == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if count == 0:
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    device = torch.device(name)
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                         f"(cuda:0 to cuda:{count - 1})")
    return device


def pick_device(name, warn=True):
    """--device as a torch.device: auto is CUDA where there is one, else the CPU (with a warning,
    unless `warn` is False: the CPU preset, which says so itself, is made for the CPU)."""
    device = parse_device(name)
    if device is not None:
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if warn:
        print("warning: CUDA not available, training on CPU (slow)", file=sys.stderr)
    return torch.device("cpu")


def uses_bf16(precision, device):
    """Whether the update runs under bf16 autocast: --precision auto or bf16, on CUDA. (On the
    CPU bf16 was 4x slower than fp32, so it stays fp32 there.)"""
    return precision in ("auto", "bf16") and device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# Schedules


class UpdateSchedule:
    """How many updates the train ratio asks for: every agent step earns
    train_ratio / (batch_size · sequence_length) updates, run whole as the credit reaches them;
    the remainder carries over (and is saved in the checkpoint)."""

    def __init__(self, train_ratio, batch_size, sequence_length, credit=0.0):
        self.train_ratio, self.batch_steps = train_ratio, batch_size * sequence_length
        self.credit = credit

    def __call__(self, agent_steps):
        self.credit += agent_steps * self.train_ratio / self.batch_steps
        due = 0
        while self.credit >= 1:
            self.credit -= 1
            due += 1
        return due


class Every:
    """Due once `interval` agent steps have passed since it was last due (interval 0: never)."""

    def __init__(self, interval, last=0):
        self.interval, self.last = interval, last

    def __call__(self, step):
        if not self.interval or step - self.last < self.interval:
            return False
        self.last = step
        return True


class PhaseTimer:
    """Seconds spent per phase of the loop (env, act, replay, update, logging) since the last read.

    Phases nest: time in an inner phase (acting inside the env step) counts for the inner one only.
    On CUDA the updates run asynchronously, so their host time says little; they are timed with
    CUDA events instead, read at log time, which adds no host sync to the hot path (a host phase
    that waits for the GPU, e.g. acting after the updates, includes that wait).
    """

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.seconds, self.inner, self.events = {}, [], []

    @contextlib.contextmanager
    def phase(self, name):
        events = None
        if self.cuda and name == "update":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        start = time.perf_counter()
        self.inner.append(0.0)
        try:
            yield
        finally:
            elapsed, inner = time.perf_counter() - start, self.inner.pop()
            if events is not None:
                events[1].record()
                self.events.append(events)
            else:
                self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            if self.inner:
                self.inner[-1] += elapsed

    def timed(self, name, fn):
        """fn, timed as phase `name` at every call."""
        def call(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return call

    def read(self):
        """{"time/<phase>": seconds} since the last read."""
        if self.events:
            self.events[-1][1].synchronize()
            gpu = sum(start.elapsed_time(end) for start, end in self.events) / 1000
            self.seconds["update"] = self.seconds.get("update", 0.0) + gpu
        times = {f"time/{k}": v for k, v in self.seconds.items()}
        self.seconds, self.events = {}, []
        return times


# ---------------------------------------------------------------------------------------------
# Training

# Updates in a row with a non-finite loss or gradient after which the run stops: one bad batch is
# skipped, but a run whose every update fails has diverged and only wastes its budget.
MAX_SKIPPED_UPDATES = 20


class RunError(RuntimeError):
    """A fault the run cannot go on from; the last checkpoint written is kept as it is."""


def set_up_device(device, precision="auto"):
    """Process-wide settings for training on `device` (the Trainer's, and the benchmarks')."""
    if device.type == "cuda":
        # The current device, so that CUDA events, synchronise and new tensors without an index
        # use the run's GPU (--device cuda:1), not GPU 0.
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        # TF32 tensor cores for the matmuls and convolutions that run in fp32 (outside autocast);
        # --precision fp32 keeps full fp32.
        tf32 = precision != "fp32"
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
        return
    # Early updates of a small model make many denormal floats, each of which costs the CPU
    # dozens of cycles (a tiny Catch run took 3.6x the time); GPUs and XLA flush them.
    torch.set_flush_denormal(True)
    keep_freed_memory()  # large activations reuse freed memory instead of fresh pages


class Trainer(RunState):
    """Holds the run's state: envs, agent, optimizer, replay, counters, logger. What saves and
    restores it (checkpoint, snapshots, resume) is in run_state.RunState."""

    def __init__(self, cfg, checkpoint=None):
        # --max_time counts from here (a resumed replay's loading counts), plus the earlier jobs'.
        self.started, self.elapsed_before = time.monotonic(), 0.0
        self.max_time = parse_duration(cfg.max_time)
        if not distributed.is_main():  # under torchrun only rank 0 writes media and evaluates
            cfg = dataclasses.replace(cfg, video_interval=0, image_interval=0, eval_interval=0)
        self.cfg = cfg
        self.ranks = distributed.world_size()
        self.device = distributed.rank_device(pick_device(cfg.device, warn=cfg.preset != "cpu"))
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=uses_bf16(cfg.precision, self.device))
        set_up_device(self.device, cfg.precision)
        seed = distributed.rank_seed(cfg.seed)
        seed_everything(seed)
        self.replay = Replay(cfg.capacity, cfg.num_envs, latent=replay_latent(cfg), seed=seed,
                             ranks_on_node=distributed.local_world_size())
        self.batches = Loader(self.replay, cfg.batch_size, cfg.sequence_length, self.device)
        # Collection and updates alternate (the workers wait while torch runs and the other way
        # round), so torch keeps its default threads. Any failure from here on must close the
        # workers, or the process would wait for them forever.
        envs = make_vector_env(cfg.env, cfg.num_envs, cfg.sticky_actions)
        self.lock = None
        self.replay_files = None
        self.recent_returns = []
        self.train_metrics = []  # [(names, values (n,))] of the updates since the last log
        self.video_frames = None
        self.env0_episodes = 0
        self.replay_steps = 0  # steps stored (by all ranks) since the replay started
        self.skipped_in_a_row = 0
        try:
            self.num_actions = int(envs.single_action_space.n)
            self.agent, self.opt = build_agent(cfg, self.num_actions, self.device)
            if cfg.compile:
                compile_agent(self.agent, self.opt, cfg.compile_mode)
            self.loss_fn = self.agent.loss
            self.counters = dict(env_steps=0, updates=0, episodes=0, best_return=None,
                                 skipped_updates=0)
            self.updates_due = UpdateSchedule(cfg.train_ratio, cfg.batch_size, cfg.sequence_length)
            run_id = cfg.resume_wandb_id or None
            if checkpoint is not None:
                self.restore(checkpoint)
                run_id = run_id or checkpoint.get("wandb_id")
            distributed.synchronise(self.agent)
            # A worker that dies (killed, emulator segfault) gets the vector env rebuilt.
            self.collector = Collector(
                envs, seed=seed + 1000 * self.counters["updates"],
                rebuild=lambda: make_vector_env(cfg.env, cfg.num_envs, cfg.sticky_actions), lives=cfg.lives)
            self.policy = AgentPolicy(self.agent, cfg.num_envs, self.device)
            # Last: the run directory must not exist for a failed start. The lock comes before
            # anything is written there: a second run on the same directory stops here. Under
            # torchrun rank 0 makes and locks the run directory, and the other ranks make their
            # replay folders in it only once that has worked; a start that fails on any rank
            # fails on all (with_every_rank).
            self.logger = distributed.NullLogger()

            def open_run_dir():
                self.lock = lock_run_dir(cfg.run_dir)
                self.logger = Logger(cfg.run_dir, dataclasses.asdict(cfg), cfg.wandb_mode,
                                     cfg.wandb_key, run_id, cfg.wandb_project)

            def open_replay():
                if cfg.save_replay:
                    self.replay_files = ReplayStore(replay_dir(cfg.run_dir, distributed.rank()), self.replay)
                if checkpoint is not None:
                    self.resume_collection(checkpoint)

            with_every_rank(open_run_dir if distributed.is_main() else None)
            with_every_rank(open_replay)
        except BaseException:
            envs.close(terminate=True)
            if self.lock is not None:
                self.lock.close()
            raise
        self.saved_step = self.counters["env_steps"] if checkpoint is not None else None
        self.timer = PhaseTimer(self.device)
        step = self.counters["env_steps"]
        # log_interval 0 logs at every collection step, checkpoint_interval 0 only at the end.
        self.log_due = Every(max(cfg.log_interval, 1), last=step)
        self.checkpoint_due = Every(cfg.checkpoint_interval, last=step)
        self.eval_due = Every(cfg.eval_interval, last=step)
        # (time, env steps, updates) at the last log of training scalars, for the rates
        self.since_log = (time.time(), step, self.counters["updates"])

    @property
    def envs(self):  # the collector's: it replaces the vector env when a worker dies
        return self.collector.envs

    def elapsed(self):
        """Wall-clock seconds the run has spent, over all its jobs (what --max_time counts)."""
        return self.elapsed_before + time.monotonic() - self.started

    def out_of_time(self):
        return self.max_time is not None and self.elapsed() >= self.max_time

    # -- steps of the loop ----------------------------------------------------------------------

    def collect(self):
        """Act in every env once and store the step; returns finished episodes."""
        self.send()
        return self.receive()

    def send(self):
        """Act on the current frames, store the step and send the actions to the env workers."""
        self.record_video_frame()
        with self.timer.phase("env"):
            self.collector.send(self.timer.timed("act", self.policy), self.timer.timed("replay", self.store))
        # Agent steps count the whole job: under torchrun every rank stepped its envs once.
        self.counters["env_steps"] += self.cfg.num_envs * self.ranks
        self.replay_steps += self.cfg.num_envs * self.ranks

    def receive(self):
        """Wait for the env workers' step; returns finished episodes."""
        with self.timer.phase("env"):
            return self.collector.receive()

    def step(self, overlap=True):
        """One iteration of the loop: act and store, the updates the train ratio asks for, and the
        env step; returns finished episodes. With `overlap` the env workers step while the updates
        run. The stored data is the same either way: the step is stored before the updates, and
        the next action is chosen after them."""
        self.send()
        if not overlap:
            finished = self.receive()
        self.run_updates()
        return self.receive() if overlap else finished

    def run_updates(self):
        """The updates that the train ratio asks for after one collection step."""
        cfg = self.cfg
        if self.replay_steps < cfg.learning_starts or not self.replay.can_sample(cfg.sequence_length):
            return
        due = self.updates_due(cfg.num_envs)
        for i in range(due):
            with self.timer.phase("replay"):  # the next batch is read while this update runs
                batch = self.batches.next(prefetch=i + 1 < due)
            with self.timer.phase("update"):
                metrics = self.update(batch)
            if metrics is None:  # skipped: a non-finite loss or gradient
                continue
            # One copy of the update's scalars, kept on the device until the next log: with CUDA
            # graphs (--compile_mode reduce-overhead) a graph's outputs are overwritten by its
            # next replay.
            self.train_metrics.append((tuple(metrics), torch.stack([v.float() for v in metrics.values()])))
            if cfg.image_interval and self.counters["updates"] % cfg.image_interval == 0:
                with self.timer.phase("logging"):
                    self.log_images(batch)

    def store(self, obs, **step):
        """Replay.add, with the acting latent of every env when the replay keeps context."""
        self.batches.flush()  # the last update's latents, before a step may overwrite a slot
        if self.replay.context:
            step.update(self.policy.latents())
        self.replay.add(obs, **step)
        if self.replay_files is not None:
            self.replay_files.after_add()

    def update(self, batch):
        """One update on a batch of `self.batches`; None when it was skipped (non-finite loss or
        gradient: nothing changed). Raises RunError after MAX_SKIPPED_UPDATES skips in a row."""
        if self.cfg.compile:  # a new step for CUDA graphs: the last step's outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        metrics, latents = train_step(self.agent, self.opt, batch, self.loss_fn, self.autocast)
        if metrics is None:
            self.counters["skipped_updates"] += 1
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row == 1:
                warn(f"update {self.counters['updates'] + 1} skipped: non-finite loss or gradient "
                     f"(weights, optimizer and normaliser unchanged)")
            if self.skipped_in_a_row >= MAX_SKIPPED_UPDATES:
                raise RunError(f"{self.skipped_in_a_row} updates in a row had a non-finite loss or "
                               f"gradient; stopping ({self.kept()})")
            return None
        self.skipped_in_a_row = 0
        if self.replay.context:  # the stored context of the replayed steps, from the newer model
            self.batches.refresh(batch["env"], batch["index"], latents)
        self.counters["updates"] += 1
        return metrics

    def record_video_frame(self):
        if self.collector.episodes.is_first[0] and self.cfg.video_interval:
            record = self.env0_episodes % self.cfg.video_interval == 0
            self.video_frames = [] if record else None
        if self.video_frames is not None and len(self.video_frames) < 20_000:
            self.video_frames.append(self.collector.obs[0].copy())

    def log_episodes(self, finished):
        step, elapsed = self.counters["env_steps"], self.elapsed()
        for env_index, ret, length in finished:
            self.counters["episodes"] += 1
            best = self.counters["best_return"]
            self.counters["best_return"] = ret if best is None else max(best, ret)
            self.recent_returns = (self.recent_returns + [ret])[-100:]
            self.logger.scalars(step, {"episode/return": ret, "episode/length": length,
                                       "episode/best_return": self.counters["best_return"],
                                       "episode/count": self.counters["episodes"],
                                       "time/elapsed": elapsed})  # for curves against the run's own time
            if env_index == 0:
                if self.video_frames:
                    self.video_frames.append(self.collector.obs[0].copy())  # the last frame
                    path = os.path.join(self.cfg.run_dir, "videos",
                                        f"episode_{self.env0_episodes:06d}_step_{step}.mp4")
                    write_media(write_video, path, self.video_frames, self.logger.video, step,
                                     "episode/video")
                self.video_frames = None
                self.env0_episodes += 1

    def log_train(self):
        step, (t0, s0, u0) = self.counters["env_steps"], self.since_log
        now = time.time()
        metrics = {}
        if self.train_metrics:  # one read of the device for all of them
            names = self.train_metrics[0][0]
            metrics = dict(zip(names, torch.stack([v for _, v in self.train_metrics]).mean(0).tolist()))
        metrics["fps/env"] = (step - s0) / max(now - t0, 1e-9)
        metrics["fps/updates"] = (self.counters["updates"] - u0) / max(now - t0, 1e-9)
        metrics["replay/size"] = len(self.replay) * self.ranks
        if self.replay_files is not None:
            metrics["replay/disk_bytes"] = self.replay_files.disk_bytes()
        metrics["train/updates"] = self.counters["updates"]
        metrics["opt/skipped_updates"] = self.counters["skipped_updates"]
        metrics.update(self.timer.read())
        metrics["time/elapsed"] = self.elapsed()  # over all the run's jobs
        if self.recent_returns:
            metrics["episode/mean_return"] = float(np.mean(self.recent_returns[-10:]))
        self.logger.scalars(step, metrics)
        self.train_metrics, self.since_log = [], (now, step, self.counters["updates"])
        return metrics

    def log_images(self, batch):
        n, context = min(4, self.cfg.batch_size), min(5, self.cfg.sequence_length - 1)
        b = {k: v[:n] for k, v in batch.items() if torch.is_tensor(v)}
        recon, imagined = openloop(self.agent, b["obs"], b["action"], b["is_first"], context,
                                   window_start(b))
        truth = b["obs"].float().cpu().numpy() / 255.0
        rec_img, ol_img = panels(truth, recon.float().cpu().numpy(), imagined.float().cpu().numpy(),
                                 context)
        step = self.counters["env_steps"]
        for name, image in (("reconstruction", rec_img), ("openloop", ol_img)):
            path = os.path.join(self.cfg.run_dir, "images", f"{name}_{step:09d}.png")
            write_media(write_image, path, image, self.logger.image, step, f"images/{name}")

    def run_evaluation(self):
        """--eval_interval: an evaluation on its own envs, logged and written to eval_<step>.json."""
        cfg, step = self.cfg, self.counters["env_steps"]
        result = evaluate(self.agent, cfg.env, cfg.eval_episodes, cfg.eval_envs, eval_seed(cfg),
                          cfg.sticky_actions, cfg.eval_greedy)
        record = write_report(result, cfg.run_dir, cfg.env, step, cfg.eval_greedy, eval_seed(cfg))
        metrics = {"eval/return": record["mean"]}
        if "hns" in record:
            metrics["eval/hns"] = record["hns"]
        self.logger.scalars(step, metrics)
        return record

    def close(self):
        self.batches.close()
        self.envs.close()
        self.logger.close()
        if self.lock is not None:
            self.lock.close()  # releases the run directory


def one_line(error, path=None):
    """A ValueError's or OSError's message, as main prints it after "error: ". An OSError names its
    file, or `path` (the folder it was working on) when it names none."""
    if isinstance(error, OSError):
        where = error.filename or path
        return f"{f'{where}: ' if where else ''}{error.strerror or error}"
    return str(error)


def with_every_rank(step):
    """Run `step()` (None: nothing on this rank), then, under torchrun, learn whether it failed
    on any rank: a ValueError or OSError on one rank is raised on all of them, the failing
    rank's own and a ValueError with its message on the others (rank 0 prints it, see main), so
    that no rank waits for one that has stopped. Without torchrun: `step()`."""
    error = None
    try:
        if step is not None:
            step()
    except (ValueError, OSError) as e:
        error = e
    failed = [m for m in distributed.gather_objects(None if error is None else one_line(error)) if m]
    if error is not None:
        raise error
    if failed:
        raise ValueError(failed[0])


def replay_latent(cfg):
    """(deter, stoch) sizes of the latent the replay keeps per step, or None without context."""
    return (SIZES[cfg.model_size]["deter"], 32) if cfg.replay_context else None


def build_agent(cfg, num_actions, device):
    """The agent of `cfg.model_size` and its optimizer (one LaProp, a parameter group per lr)."""
    agent = Dreamer(num_actions, discount=cfg.discount, lam=cfg.lam, actent=cfg.actor_entropy,
                    horizon=cfg.imagination_horizon, image_output=cfg.image_output,
                    **SIZES[cfg.model_size]).to(device)
    opt = LaProp([dict(params=list(agent.world_model_parameters()), lr=cfg.lr),
                  dict(params=list(agent.actor.parameters()), lr=cfg.actor_lr),
                  dict(params=list(agent.critic.parameters()), lr=cfg.critic_lr)],
                 warmup=cfg.warmup)
    return agent, opt


def compile_agent(agent, opt, mode=None):
    """torch.compile the update piece by piece (see Dreamer.compile_steps) with static shapes;
    compilation happens on the first update (and on the first acting step). The optimizer step
    stays eager: LaProp keeps its step count and learning rate as host-side Python numbers, which
    a compiled step would bake in (a new graph every update)."""
    agent.compile_steps(dynamic=False, mode=mode)
    return agent, opt


def window_start(batch):
    """The replay context of a batch (latent and action of the step before each window), or None
    for windows that start from the zero state."""
    if "start_deter" not in batch:
        return None
    return batch["start_deter"], batch["start_stoch"], batch["start_action"]


def train_step(agent, opt, batch, loss_fn=None, autocast=None):
    """One optimizer step on all losses (world model, actor, critic, replay value); returns the
    metrics and the posterior latents of the batch (see `Dreamer.loss`), or (None, None) when the
    loss or a gradient is not finite: then the step is skipped and nothing changes (parameters,
    optimizer state, slow critic, return normaliser).

    batch: dict of tensors (B, T, ...) on the agent's device, as `Replay.sample` gives them.
    """
    agent.train()
    # The return normaliser's EMAs move inside the loss: keep them to put back on a skip.
    buffers = [b.clone() for b in agent.buffers()]
    with autocast or contextlib.nullcontext():
        total, metrics, latents = (loss_fn or agent.loss)(batch["obs"], batch["action"], batch["reward"],
                                                           batch["is_first"], batch["is_last"],
                                                           batch["is_terminal"], window_start(batch))
    opt.zero_grad(set_to_none=True)
    total.backward()
    # torchrun: the same mean gradient on all ranks, and whether the loss was finite on all of
    # them (in the same all-reduce), so that every rank skips the same updates.
    finite = distributed.average_gradients(agent.parameters(), torch.isfinite(total.detach().float()))
    norms = []
    for group, params in zip(("wm", "actor", "critic"), opt.param_groups):
        grads = [p.grad for p in params["params"] if p.grad is not None]
        norms.append(torch.nn.utils.get_total_norm(grads))  # before LaProp's clipping
        metrics[f"opt/grad_norm_{group}"] = norms[-1]
    # A NaN or inf anywhere in a group's gradients makes its norm non-finite (the same on every
    # rank: the gradients are averaged). This is the one host sync an update keeps (a blocking
    # scalar read on CUDA): LaProp counts its steps in Python, so a skip cannot stay on the
    # device. Nothing else in an update reads a value back (tests/test_gpu_path.py counts them).
    finite = torch.stack([finite, *[torch.isfinite(n) for n in norms]]).all()
    if not finite.item():
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in zip(agent.buffers(), buffers):
                b.copy_(saved)
        return None, None
    opt.step()
    agent.update_slow_critic()
    return metrics, latents


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StopFlag:
    """Turns SIGINT / SIGTERM into a flag so the loop can write its checkpoint and exit."""

    def __init__(self):
        self.stop, self.since = False, None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.stop:
            # A second Ctrl-C stops at once, without saving (see train). Under torchrun one
            # Ctrl-C reaches a rank twice (from the terminal, then forwarded by torchrun): a
            # signal within a second of the first is the same request.
            if time.monotonic() - self.since > 1.0:
                raise KeyboardInterrupt
            return
        self.stop, self.since = True, time.monotonic()
        print(f"\n{signal.Signals(signum).name}: saving checkpoint and stopping", file=sys.stderr)


def train(trainer):
    """The loop: collect → update → log → checkpoint, until total_steps or a stop signal."""
    cfg = trainer.cfg
    flag = StopFlag()
    c, interrupted, failure, stop, ended = trainer.counters, False, None, False, False
    bar = tqdm(total=cfg.total_steps, initial=min(c["env_steps"], cfg.total_steps), unit="step",
               dynamic_ncols=True, mininterval=1.0, disable=not distributed.is_main())
    try:
        while c["env_steps"] < cfg.total_steps and not stop:
            finished = trainer.step()
            with trainer.timer.phase("logging"):
                # Under torchrun: every rank's episodes, and a stop asked of any rank (a signal,
                # or --max_time spent) stops all.
                out_of_time = trainer.out_of_time()
                finished, stop = distributed.sync_step(finished, flag.stop or out_of_time, cfg.num_envs)
                if stop and out_of_time and not flag.stop and distributed.is_main():
                    print(f"--max_time {cfg.max_time} spent ({trainer.elapsed():.0f} s over the run's "
                          f"jobs): saving checkpoint and stopping", file=sys.stderr)
                trainer.log_episodes(finished)
                bar.update(cfg.num_envs * trainer.ranks)
                if trainer.log_due(c["env_steps"]):
                    metrics = trainer.log_train()
                    nan = float("nan")
                    last = trainer.recent_returns[-1] if trainer.recent_returns else nan
                    best = c["best_return"] if c["best_return"] is not None else nan
                    bar.set_postfix(fps=f"{metrics['fps/env']:.0f}", updates=c["updates"],
                                    upd_s=f"{metrics['fps/updates']:.2f}", ret=f"{last:.1f}",
                                    best=f"{best:.1f}")
            if trainer.eval_due(c["env_steps"]):
                trainer.run_evaluation()
            if trainer.checkpoint_due(c["env_steps"]):
                trainer.save_or_warn()
        ended = True
    except KeyboardInterrupt:
        # A second signal may land inside an optimizer step: keep the last checkpoint instead.
        interrupted = True
    except RunError as e:
        failure = str(e)
    finally:
        bar.close()
        try:
            # After an error of its own a rank is out of step with the others (torchrun): it
            # saves nothing, as the checkpoint is a step of every rank.
            if not interrupted and failure is None and (ended or not distributed.active()):
                trainer.save()
        except OSError as e:
            failure = f"could not write the final checkpoint at step {c['env_steps']} " \
                      f"({e.strerror or e}); {trainer.kept()}"
        finally:
            trainer.close()
    if interrupted:
        print("stopped without saving; the last checkpoint is kept", file=sys.stderr)
        sys.exit(130)
    if failure is not None:  # the same on every rank: rank 0 says it
        if distributed.is_main():
            print(f"error: {failure}", file=sys.stderr)
        sys.exit(1)
    if distributed.is_main():
        print(f"done: {c['env_steps']} steps, {c['updates']} updates, {c['episodes']} episodes; "
              f"checkpoint in {os.path.join(cfg.run_dir, 'checkpoint.pt')}")
    return trainer


def eval_seed(cfg):
    """Evaluation envs are seeded apart from the training envs, the same way at every evaluation."""
    return cfg.seed + 100_000


def evaluation_only(cfg, given):
    """`--resume ... --eval_episodes N` evaluates the checkpoint and exits; with --eval_interval
    on the same command line, --eval_episodes is the size of the evaluations of a resumed run."""
    return bool(cfg.resume) and "eval_episodes" in (given or ()) and "eval_interval" not in given


def evaluate_checkpoint(cfg, checkpoint, report=True):
    """The checkpoint's agent plays --eval_episodes episodes on fresh envs with the run's settings
    (sticky actions, ...); writes eval_<step>.json and eval_<step>.mp4 (the best episode), or with
    `report` False writes nothing. Returns the evaluation's record (see evaluate.summary)."""
    device = pick_device(cfg.device, warn=cfg.preset != "cpu")
    seed_everything(cfg.seed)
    num_actions = checkpoint.get("num_actions")
    if num_actions is None:
        env = make_env(cfg.env, cfg.sticky_actions)()
        num_actions = int(env.action_space.n)
        env.close()
    agent, _ = build_agent(cfg, num_actions, device)
    load_weights(cfg, checkpoint, agent)
    step = checkpoint["counters"].get("env_steps", 0)
    result = evaluate(agent, cfg.env, cfg.eval_episodes, cfg.eval_envs, eval_seed(cfg),
                      cfg.sticky_actions, cfg.eval_greedy, video=report, progress=True)
    if not report:
        return summary(result, cfg.env, step, cfg.eval_greedy, eval_seed(cfg))
    return write_report(result, cfg.run_dir, cfg.env, step, cfg.eval_greedy, eval_seed(cfg))


def prepare(cfg, given=None):
    """Validate the config, load the checkpoint to resume from and fix the run directory.

    On resume, every setting not in `given` (the flags typed on this command line; None means
    all) is taken from the checkpoint, so `--resume checkpoint.pt` alone continues the run.
    """
    checkpoint = None
    if cfg.resume == "auto":  # one command for the first start and every requeue of a job
        if not cfg.run_dir:
            raise ValueError("--resume auto needs --run_dir (the folder whose checkpoint.pt it resumes)")
        existing = os.path.join(cfg.run_dir, "checkpoint.pt")
        cfg.resume = existing if os.path.exists(existing) else ""
    if cfg.resume:
        checkpoint = load_checkpoint(cfg.resume, evaluation=evaluation_only(cfg, given))
        saved = checkpoint["config"]
        if given is not None:
            # The machine that resumes chooses the device: a run saved on a GPU goes on on the CPU
            # (and the other way round) with --device's default, auto.
            for f in dataclasses.fields(Config):
                if f.name in saved and f.name not in given | {"resume", "resume_wandb_id", "run_dir", "device"}:
                    setattr(cfg, f.name, saved[f.name])
        for key in ("env", "model_size", "atari100k"):  # a preset's values are set at the start
            if saved.get(key, False) != getattr(cfg, key):
                raise ValueError(f"--resume {cfg.resume}: checkpoint has {key}={saved.get(key)}, "
                                 f"this run asks for {getattr(cfg, key)}")
        cfg.run_dir = cfg.run_dir or os.path.dirname(os.path.abspath(cfg.resume))
        records = replay_records(checkpoint)
        record = records[0] if distributed.world_size() <= len(records) else None  # it loads (sizes as every rank's)
        if cfg.save_replay and record and (cfg.num_envs, cfg.capacity // max(cfg.num_envs, 1)) != \
                (record["num_envs"], record["length"]):
            raise ValueError(f"--resume {cfg.resume}: its replay was saved with --num_envs {saved['num_envs']} "
                             f"--capacity {saved['capacity']}; resume with those, or add --no-save_replay "
                             f"to start with an empty replay")
    else:  # a resumed run keeps the values its presets gave it
        apply_presets(cfg, given)
        if given is not None and "eval_episodes" in given and not cfg.eval_interval:
            raise ValueError("--eval_episodes needs --resume CHECKPOINT (evaluate it) or --eval_interval N "
                             "(evaluate during training)")
    check_config(cfg)
    if not cfg.run_dir:  # under torchrun, rank 0's: the ranks may start in different seconds
        game = cfg.env.split(":")[-1].replace("ALE/", "").replace("/", "_")
        cfg.run_dir = distributed.from_main(os.path.join("runs", f"{game}-{time.strftime('%Y%m%d-%H%M%S')}"))
    check_run_dir(cfg.run_dir)
    existing = os.path.join(cfg.run_dir, "checkpoint.pt")
    if checkpoint is None and os.path.exists(existing):
        raise ValueError(f"--run_dir {cfg.run_dir} already holds a checkpoint; continue it with "
                         f"--resume {existing} or choose another --run_dir")
    warn_if_disk_too_small(cfg)
    return checkpoint  # the run directory is made by the Logger, once every check has passed


def nearest_existing(path):
    """`path` itself if it exists, else its closest existing ancestor."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_run_dir(run_dir):
    """Can the run directory be made (or used) and written? Checked without creating anything."""
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"--run_dir {run_dir} exists and is not a directory")
    base = nearest_existing(run_dir)
    if not os.path.isdir(base):
        raise ValueError(f"--run_dir {run_dir}: {base} is a file, so no directory can be made under it")
    if not os.access(base, os.W_OK | os.X_OK):
        what = "write in" if base == os.path.abspath(run_dir) else "create directories in"
        raise ValueError(f"--run_dir {run_dir}: no permission to {what} {base}")


def checkpoint_bytes(cfg, num_actions=18):
    """Size of checkpoint.pt for this config: float32 parameters, the optimizer's two moments and
    the slow critic. Counted on the meta device (no memory); 18 actions is the full ALE set."""
    with torch.device("meta"):
        agent = Dreamer(num_actions, **SIZES[cfg.model_size])
    params = sum(p.numel() for p in agent.parameters())
    return 4 * 3 * params


def snapshot_bytes(cfg, num_actions=18):
    """Size of a checkpoint_<step>.pt of --keep_checkpoints: the float32 weights (with the slow
    critic) and the normaliser, plus a little for the config and the file's own structure."""
    with torch.device("meta"):
        agent = Dreamer(num_actions, **SIZES[cfg.model_size])
    return sum(t.numel() * t.element_size() for t in agent.state_dict().values()) + 2**16


def replay_disk_bytes(cfg):
    """Disk used by --save_replay at most: the steps (frames, fields, latents) of the capacity,
    plus those stored since the last checkpoint (the ring's overwritten chunks are deleted after
    each checkpoint) and a chunk; with replay context small enough for exact resume, two copies of
    the ring's latents (the checkpoint's and the next one's, written before the checkpoint)."""
    if not cfg.save_replay:
        return 0
    latent = replay_latent(cfg)
    steps = Replay.step_bytes(latent=latent) * (cfg.capacity + cfg.checkpoint_interval + CHUNK_STEPS)
    ring_latents = cfg.capacity * (Replay.step_bytes(latent=latent) - Replay.step_bytes())
    return steps + (2 * ring_latents if replay.saves_ring_latents(ring_latents) else 0)


def warn_if_disk_too_small(cfg):
    """One warning when the free space where the run writes is clearly too small: a checkpoint is
    written next to the previous one before it replaces it, so two must fit, with the replay and
    the snapshots of --keep_checkpoints (N, and the new one before the oldest is deleted)."""
    kept = (cfg.keep_checkpoints + 1) * snapshot_bytes(cfg) if cfg.keep_checkpoints else 0
    need = 2 * checkpoint_bytes(cfg) + kept + distributed.world_size() * replay_disk_bytes(cfg)  # a replay per rank
    free = shutil.disk_usage(nearest_existing(cfg.run_dir)).free
    if free < need and distributed.is_main():
        warn(f"only {free / 2**30:.2f} GiB free where --run_dir {cfg.run_dir} writes; its "
             f"checkpoints{' and replay' if cfg.save_replay else ''} need about {need / 2**30:.2f} GiB")


def main(argv=None):
    cfg, given = parse_args(argv)
    if cfg.convert_checkpoint:
        try:
            print(convert_checkpoint(cfg.convert_checkpoint))
        except (ValueError, OSError) as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)
        return
    distributed.init(cfg.device)  # only under torchrun
    try:
        checkpoint = prepare(cfg, given)
        if evaluation_only(cfg, given):
            if distributed.is_main():
                record = evaluate_checkpoint(cfg, checkpoint)
                print(f"{describe(record)}; written to {record['path']}")
            return
        trainer = Trainer(cfg, checkpoint)
    except ValueError as e:  # the same on every rank of a torchrun job: rank 0 says it
        if distributed.is_main():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a path that passed the checks and failed anyway (a race, a full disk)
        if distributed.is_main():
            print(f"error: {one_line(e, cfg.run_dir)}", file=sys.stderr)
        sys.exit(2)
    try:
        train(trainer)
    except Exception as e:
        if not distributed.active():
            raise
        distributed.exit_on_error(e)  # one line, not one traceback per rank
    distributed.dump_weights(trainer.agent)
    distributed.close()


if __name__ == "__main__":
    main()
