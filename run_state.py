"""What a run keeps: what checkpoint.pt holds, its safe save and load, the kept snapshots, and the
restore of a run from it (weights, optimizer, counters, RNG states, and the collection and replay
of every rank), so that train.py reads as the loop and its command line.

A checkpoint is one atomic file (utils.write_atomic) that names everything a resume needs: the
replay's files on disk (replay.ReplayStore, written before it), and under torchrun every rank's
state, gathered to rank 0. It holds data only and is loaded with torch.load(weights_only=True).
"""
import dataclasses
import os
import pickle
import random
import re
import shutil
import warnings
import zipfile

import numpy as np
import torch

import distributed
from utils import warn, write_atomic

# ---------------------------------------------------------------------------------------------
# Safe save and load


# A checkpoint is data, never code: it holds only what torch.load(weights_only=True) accepts
# (tensors, numbers, strings, bytes, None, lists, tuples, dicts), so that loading a checkpoint.pt
# someone hands you cannot run anything. numpy arrays and scalars (RNG states, the collector's
# observations and episode flags) are stored as tensors tagged with NUMPY, and come back as numpy
# with the dtype they had: resume stays bit-exact.
NUMPY = "__numpy__"  # {NUMPY: tensor} is a numpy array, {NUMPY: tensor, "scalar": True} a scalar

# What the safe load says about a file that is not made of the types above.
UNSAFE = ("holds objects a safe load refuses (an older version's checkpoint, or not a checkpoint); "
          "if you trust it, convert it once with: python train.py --convert_checkpoint {path}")


def to_safe(obj):
    """`obj` with every numpy array and scalar replaced by its tagged tensor (the rest as it is).
    Raises TypeError for anything a safe load would refuse."""
    if isinstance(obj, np.generic):  # before the Python types: np.float64 is a float
        return {NUMPY: torch.from_numpy(np.array(obj)), "scalar": True}
    if isinstance(obj, np.ndarray):
        return {NUMPY: torch.from_numpy(obj.copy())}  # a copy: the array goes on changing
    if isinstance(obj, (dict, list, tuple)):
        return _walk(obj, to_safe)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype,
                                       torch.device)):
        return obj
    raise TypeError(f"a checkpoint holds data only, not {type(obj).__name__}")


def from_safe(obj):
    """The inverse of `to_safe`: tagged tensors back to numpy arrays and scalars."""
    if isinstance(obj, dict) and NUMPY in obj:
        array = obj[NUMPY].numpy()
        return array[()] if obj.get("scalar") else array  # array[()] of a 0-d array: its scalar
    if isinstance(obj, (dict, list, tuple)):
        return _walk(obj, from_safe)
    return obj


def _walk(obj, fn):
    """`fn` applied to the values of a dict, list or tuple; `obj` itself when nothing changed
    (a state dict keeps its OrderedDict and the `_metadata` that load_state_dict reads)."""
    items = list(obj.items() if isinstance(obj, dict) else enumerate(obj))
    new = [(k, fn(v)) for k, v in items]
    if all(n is v for (_, v), (_, n) in zip(items, new)):
        return obj
    if isinstance(obj, dict):
        return dict(new)
    return type(obj)(v for _, v in new)


def save_checkpoint(path, payload):
    """torch.save `payload` (made safe, see `to_safe`) to `path` with `write_atomic`."""
    safe = to_safe(payload)
    write_atomic(path, lambda f: torch.save(safe, f))


def is_pickle(path):
    """Whether a file is what torch.save or pickle writes: a zip archive (torch's format) or a
    pickle stream (its PROTO opcode first)."""
    with open(path, "rb") as f:
        return zipfile.is_zipfile(f) or f.seek(0) == 0 and f.read(1) == b"\x80"


def safe_load(path, mmap=False):
    """torch.load with weights_only: plain data and the globals allowed around it, nothing run."""
    with warnings.catch_warnings():  # torch's note on a plain pickle file: the error says it
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_checkpoint(path, mmap=False):
    """The payload of a checkpoint file, loaded safely (weights_only: no code runs) and with its
    numpy values back (`from_safe`). Raises ValueError with one line for a file the safe load
    refuses, and the load's own error for an unreadable one."""
    try:
        payload = safe_load(path, mmap)
    except pickle.UnpicklingError:
        if not is_pickle(path):  # junk, not a refused object: the caller's "not readable"
            raise
        # A global (a class, a function) that is not plain data: refused, never run.
        raise ValueError(f"{path}: {UNSAFE.format(path=path)}") from None
    return from_safe(payload)


def load_checkpoint(path, evaluation=False):
    """Load a checkpoint dict, or raise ValueError with one line saying what is wrong. A snapshot
    of --keep_checkpoints (weights only) is accepted only for `evaluation`."""
    if not os.path.isfile(path):
        raise ValueError(f"--resume {path}: no such checkpoint file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"--resume {path}: not readable (permission denied)")
    try:
        payload = read_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"--resume {e}") from None
    except Exception as e:  # truncated or not a torch file
        raise ValueError(f"--resume {path}: not a readable checkpoint ({type(e).__name__})") from None
    keys = set(payload if isinstance(payload, dict) else ())
    if "snapshot" in keys and not evaluation:
        folder = os.path.dirname(path) or "."
        raise ValueError(f"--resume {path}: a snapshot for evaluation only (weights, no optimizer or replay): "
                         f"evaluate it with --eval_episodes N, or resume training from "
                         f"{os.path.join(folder, 'checkpoint.pt')}")
    missing = {"agent", "counters", "config", *(() if evaluation else ("optimizer",))} - keys
    if missing:
        raise ValueError(f"--resume {path}: not a checkpoint of this program (missing {sorted(missing)})")
    return payload


# ---------------------------------------------------------------------------------------------
# The Trainer's saving and restoring


class RunState:
    """The part of train.Trainer that saves and restores a run (its checkpoint, snapshots and the
    resume of collection and replay). It uses the Trainer's fields: cfg, agent, opt, counters,
    updates_due, replay, replay_files, batches, collector, policy, logger, ranks and the
    trainer's episode bookkeeping."""

    def kept(self):
        """What a failure leaves on disk, for its message."""
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"the checkpoint of step {self.saved_step} is kept"

    def restore(self, checkpoint):
        """Agent, optimizer, counters and RNG states of a checkpoint (from `load_checkpoint`)."""
        load_weights(self.cfg, checkpoint, self.agent, self.opt)
        counters = dict(checkpoint["counters"])
        # The update credit was called train_acc in checkpoints of earlier versions.
        self.updates_due.credit = counters.pop("update_credit", counters.pop("train_acc", 0.0))
        self.elapsed_before = counters.pop("elapsed_s", 0.0)
        self.counters.update(counters)
        own = saved_rank_state(checkpoint, distributed.rank(), self.ranks)
        if own is None and distributed.is_main():  # saved by another number of ranks: rank 0 takes
            own = dict(rng=checkpoint.get("rng"))  # rank 0's RNGs, the others keep their seeds
        rng = (own or {}).get("rng") or {}
        restore_rng(rng)
        if "replay" in rng:
            self.replay.rng.bit_generator.state = rng["replay"]

    def resume_collection(self, checkpoint):
        """The replay (with --save_replay), the envs, the acting state and the episode counters of
        a checkpoint, so that the run goes on as if it had never stopped; what cannot be restored
        is said in one warning line each (by rank 0 under torchrun)."""
        say = warn if distributed.is_main() else (lambda message: None)
        refill = f"the resumed run collects --learning_starts {self.cfg.learning_starts} agent steps " \
                 f"before it trains again"
        records, trainer = replay_records(checkpoint), checkpoint.get("trainer", {})
        saved_by = len(records)
        # Rank r loads the replay that rank r saved. Every rank loads or none does: the ranks
        # update in lock step, which needs the same amount of replay on all of them.
        if self.replay_files is not None and records[0] is not None and self.ranks <= saved_by:
            try:
                self.replay_files.load(records[distributed.rank()])
            except ValueError as e:
                raise ValueError(f"--resume {self.cfg.resume}: {e}; add --no-save_replay to resume "
                                 f"with an empty replay") from None
            self.replay_steps = trainer["replay_steps"]
            if self.ranks < saved_by:
                which = "rank 0's" if self.ranks == 1 else f"those of ranks 0 to {self.ranks - 1}"
                say(f"the checkpoint's replay was saved by {saved_by} ranks; this run of {self.ranks} "
                    f"loads {which}")
        elif not self.cfg.save_replay:
            say(f"--no-save_replay: the replay starts empty; {refill}")
        elif records[0] is None:
            say(f"the checkpoint holds no replay (saved with --no-save_replay, or under torchrun by an "
                f"older version); {refill}")
        else:
            say(f"the checkpoint's replay was saved by {saved_by} process{'es' if saved_by > 1 else ''}, "
                f"this run has {self.ranks}: every rank starts with an empty replay; {refill}")
        own = saved_rank_state(checkpoint, distributed.rank(), self.ranks)
        state = None if own is None else own.get("collector")
        if own is None:
            why = f"saved by {len(checkpoint['rank_states'])} ranks, this run has {self.ranks}" \
                if "rank_states" in checkpoint else f"saved by one process, this run has {self.ranks}"
        elif state is None:
            why = "the checkpoint holds none (saved under torchrun by an older version)"
        elif len(state["envs"]) != self.cfg.num_envs:
            why = f"saved with {len(state['envs'])} envs, this run has {self.cfg.num_envs}"
        elif not self.collector.set_state(state):
            why = f"{self.cfg.env} has no get_state / set_state"
        else:
            self.policy.state = tuple(t.to(self.device) for t in own["policy"])
            self.env0_episodes = trainer["env0_episodes"]
            self.recent_returns = list(trainer["recent_returns"])
            return
        say(f"the env states were not restored ({why}): every env starts a new episode")

    def save(self):
        """Write checkpoint.pt (after the replay's tail, which it names). Raises OSError (e.g.
        disk full) with the previous one intact. Draws no random numbers: a run that saves goes
        on exactly as one that does not.

        Under torchrun (call it on every rank): every rank writes its replay's tail, rank 0
        writes the checkpoint with every rank's replay record, and only then does every rank
        delete the replay files that the previous checkpoint needed. A failure on any rank
        raises OSError on every rank, and then no rank deletes anything."""
        record, error = None, None
        self.batches.flush()
        if self.replay_files is not None:
            try:
                record = self.replay_files.save()
            except OSError as e:
                error = e
        # Every rank's replay record and its own state (RNGs, envs, acting state: kilobytes), in one
        # exchange; rank 0 writes them all into checkpoint.pt.
        records, states = zip(*all_or_none((record, self.rank_state()), error))
        error = None
        if distributed.is_main():  # under torchrun rank 0 alone writes the checkpoint
            try:
                save_checkpoint(os.path.join(self.cfg.run_dir, "checkpoint.pt"), {
                    "agent": self.agent.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "counters": dict(self.counters, update_credit=self.updates_due.credit,
                                     elapsed_s=self.elapsed()),
                    "config": dataclasses.asdict(self.cfg),
                    "wandb_id": self.logger.run_id,
                    "num_actions": self.num_actions,
                    # Rank 0's replay, where a one-process run looks, and every rank's (see
                    # replay_records).
                    "replay": record,
                    "replay_ranks": list(records),
                    # What continues the collection exactly (see resume_collection): rank 0's
                    # RNGs, envs and acting state at the top, where a one-process run looks,
                    # and under torchrun every rank's.
                    **states[0],
                    **({"rank_states": list(states)} if self.ranks > 1 else {}),
                    "trainer": dict(replay_steps=self.replay_steps, env0_episodes=self.env0_episodes,
                                    recent_returns=list(self.recent_returns)),
                })
            except OSError as e:
                error = e
        all_or_none(None, error)  # the other ranks wait for the checkpoint before they commit
        self.checkpoint_due.last = self.saved_step = self.counters["env_steps"]
        if record is not None:
            self.replay_files.commit(record)
        if distributed.is_main() and self.cfg.keep_checkpoints:
            self.keep_snapshot()

    def save_or_warn(self):
        """The periodic checkpoint: a failed write warns (rank 0), and the next interval tries
        again."""
        try:
            self.save()
        except OSError as e:
            if distributed.is_main():
                warn(f"could not write the checkpoint at step {self.counters['env_steps']} "
                     f"({e.strerror or e}); {self.kept()}; training continues and retries in "
                     f"{self.cfg.checkpoint_interval} steps")

    def keep_snapshot(self):
        """--keep_checkpoints: checkpoint_<step>.pt with what evaluating it needs (weights,
        return normaliser, config, counters), written after checkpoint.pt; then the snapshots
        older than the last N are deleted. A failed write warns: checkpoint.pt is written."""
        step = self.counters["env_steps"]
        path = os.path.join(self.cfg.run_dir, f"checkpoint_{step:09d}.pt")
        try:
            save_checkpoint(path, {"snapshot": True, "agent": self.agent.state_dict(),
                                   "config": dataclasses.asdict(self.cfg), "counters": dict(self.counters),
                                   "num_actions": self.num_actions})
            for _, old in snapshots(self.cfg.run_dir)[:-self.cfg.keep_checkpoints]:
                os.unlink(old)
        except OSError as e:
            warn(f"could not write {path} ({e.strerror or e}); checkpoint.pt is written, training continues")

    def rank_state(self):
        """What this rank alone holds and a resume needs (see `saved_rank_state`): its RNG states
        (python, numpy, torch, CUDA and the replay's sampler), its envs and episodes, and its
        acting state. Draws no random numbers."""
        return dict(rng=dict(rng_state(), replay=self.replay.rng.bit_generator.state),
                    collector=self.collector.get_state(), policy=tuple(t.cpu() for t in self.policy.state))


# ---------------------------------------------------------------------------------------------
# Pieces of a checkpoint


def replay_dir(run_dir, rank=0):
    """Where a rank keeps its replay: rank 0 (and a one-process run) in <run_dir>/replay, rank r
    of a torchrun job in <run_dir>/replay/rank_<r>."""
    path = os.path.join(run_dir, "replay")
    return path if rank == 0 else os.path.join(path, f"rank_{rank}")


def saved_rank_state(checkpoint, rank, ranks):
    """What rank `rank` of a job of `ranks` saved (`RunState.rank_state`), or None when the
    checkpoint was saved by another number of ranks. A one-process checkpoint (or one of an older
    version) holds its one state at the top level."""
    states = checkpoint.get("rank_states") or [
        dict(rng=checkpoint.get("rng"), collector=checkpoint.get("collector"), policy=checkpoint.get("policy"))]
    return states[rank] if len(states) == ranks else None


def replay_records(checkpoint):
    """The replay record of every rank that saved the checkpoint, [None] without a replay. A
    one-process checkpoint, or one of a version before "replay_ranks", has its one "replay"."""
    return checkpoint.get("replay_ranks") or [checkpoint.get("replay")]


def all_or_none(value, error):
    """A step of a checkpoint, done on every rank: `value` of every rank, or OSError on every rank
    when it failed with `error` (an OSError) on any (its own on the failing rank, the first
    failure's errno and message, naming the rank, on the others)."""
    failure = None if error is None else (error.errno, error.strerror or str(error))
    outcomes = distributed.gather_objects((value, failure))
    if error is not None:
        raise error
    for rank, (_, failure) in enumerate(outcomes):
        if failure is not None:
            raise OSError(failure[0], f"rank {rank}: {failure[1]}")
    return [v for v, _ in outcomes]


def load_weights(cfg, checkpoint, agent, opt=None):
    """The agent's (and optimizer's) state from a checkpoint, or a one-line ValueError."""
    try:
        agent.load_state_dict(checkpoint["agent"])
        if opt is not None:
            opt.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if not line.startswith("Error(s)")), "")[:100]
        raise ValueError(f"--resume {cfg.resume}: its weights do not fit this program's "
                         f"{cfg.model_size} model ({type(e).__name__}: {detail})") from None


def rng_state():
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def snapshots(run_dir):
    """[(agent steps, path)] of the checkpoint_<step>.pt snapshots of a run (--keep_checkpoints),
    oldest first."""
    found = [(int(m.group(1)), os.path.join(run_dir, name)) for name in os.listdir(run_dir)
             if (m := re.fullmatch(r"checkpoint_(\d+)\.pt", name))]
    return sorted(found)


def earlier_versions_globals():
    """The classes and functions that checkpoints of earlier versions pickled besides plain data:
    numpy arrays, dtypes and scalars (under numpy 2's module names and numpy 1's) and ALE states.
    The conversion's load allows these by name and nothing else, so no other code in a file can
    run."""
    from ale_py import ALEState

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [np.ndarray, np.dtype, ALEState]
    if hasattr(np, "dtypes"):  # numpy 2 pickles a dtype with its class (np.dtypes.UInt8DType, ...)
        allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(multiarray, name)
        allowed += [(fn, f"numpy._core.multiarray.{name}"), (fn, f"numpy.core.multiarray.{name}")]
    return allowed


def convert_checkpoint(path):
    """--convert_checkpoint: rewrite a checkpoint of an earlier version (numpy arrays and ALE
    states inside, which the plain safe load refuses) in safe types, keeping the original as
    PATH.bak. Its load is still weights_only, with those types allowed by name
    (`earlier_versions_globals`). Returns the line to print."""
    if not os.path.isfile(path):
        raise ValueError(f"--convert_checkpoint {path}: no such file")
    try:
        read_checkpoint(path)
        return f"{path} is already a safe checkpoint; nothing to convert"
    except ValueError:  # refused by the safe load: convert it below
        pass
    except Exception as e:
        raise ValueError(f"--convert_checkpoint {path}: not a readable checkpoint ({type(e).__name__})") from None
    try:
        with torch.serialization.safe_globals(earlier_versions_globals()):
            payload = safe_load(path)
    except pickle.UnpicklingError:
        raise ValueError(f"--convert_checkpoint {path}: holds objects that no version of this program "
                         f"wrote; not loaded") from None
    except Exception as e:
        raise ValueError(f"--convert_checkpoint {path}: not a readable checkpoint ({type(e).__name__})") from None
    missing = {"agent", "optimizer", "counters", "config"} - set(payload if isinstance(payload, dict) else ())
    if missing:
        raise ValueError(f"--convert_checkpoint {path}: not a checkpoint of this program (missing {sorted(missing)})")
    for state in (payload.get("collector") or {}).get("envs", []):
        core = (state or {}).get("core")
        if isinstance(core, dict) and "ale" in core and not isinstance(core["ale"], bytes):
            core["ale"] = core["ale"].serialize()  # earlier versions kept the ALEState object
    try:
        safe = to_safe(payload)
    except TypeError as e:
        raise ValueError(f"--convert_checkpoint {path}: {e}") from None
    shutil.copy2(path, f"{path}.bak")
    write_atomic(path, lambda f: torch.save(safe, f))
    return f"converted {path} to safe types; the original is kept as {path}.bak"
