"""Training on several processes (one per GPU) with torchrun, PyTorch's own launcher:

    torchrun --nproc_per_node 4 train.py --env ALE/Pong-v5

torchrun starts one process (rank) per GPU and sets WORLD_SIZE, RANK and LOCAL_RANK. Without
them (`python train.py`) no process group is made and every function here does nothing (world
size 1, rank 0). Under torchrun each rank runs its own envs and replay; every update averages the
gradients over the ranks before the one optimizer step, so all ranks hold the same weights, slow
critic and optimizer state, and the return normaliser takes its percentiles over the λ-returns of
all ranks. Rank 0 alone logs and writes checkpoints; every rank keeps its own replay on disk
(`<run_dir>/replay/` for rank 0, `<run_dir>/replay/rank_<r>/` for rank r). Collectives go
through this module, so that a rank whose collective fails because another rank died can tell
that apart from its own error.
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

# A rank waits this long for the others at a collective before the job fails: long enough for
# rank 0 to write a checkpoint or run an --eval_interval evaluation while the others wait.
TIMEOUT = datetime.timedelta(minutes=30)

# Test hook: with this variable set to a folder, every rank writes its final weights there as
# rank<R>.pt (tests/test_distributed.py compares them).
WEIGHTS_DIR_VAR = "DREAMER_RANK_WEIGHTS_DIR"


class PeerLost(RuntimeError):
    """A collective failed: another rank died or stopped answering (it reports its own error)."""


class NullLogger:
    """The Logger of every rank but 0: only rank 0 logs."""

    run_id = None

    def scalars(self, step, metrics):
        pass

    def video(self, step, name, path):
        pass

    def image(self, step, name, path):
        pass

    def close(self):
        pass


def launched():
    """True in a process started by torchrun."""
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


def active():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    return rank() == 0


def init(device):
    """Join torchrun's job: NCCL when the run uses CUDA (`--device` auto or cuda and a GPU is
    there), gloo on CPU. A plain `python train.py` returns at once."""
    if not launched() or active():
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                            device_id=torch.device("cuda", local_rank) if cuda else None)


def close():
    if active():
        dist.destroy_process_group()


def rank_device(device):
    """Each rank on its own GPU, cuda:LOCAL_RANK (whatever index --device names)."""
    if active() and device.type == "cuda":
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def rank_seed(seed):
    """Seeds apart per rank (envs, replay sampling, actions); rank 0 keeps `seed`. An env of rank
    r is seeded with seed + 1,000,000·r + its index, so ranks never share env seeds."""
    return seed + 1_000_000 * rank()


def _collective(op, *args, **kwargs):
    try:
        return op(*args, **kwargs)
    except RuntimeError as e:
        raise PeerLost(f"rank {rank()}: lost contact with the other ranks ({e})") from e


def from_main(obj):
    """Rank 0's value of a picklable `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    _collective(dist.broadcast_object_list, box, src=0)
    return box[0]


def gather_objects(obj):
    """[rank 0's obj, rank 1's, ...] of a picklable `obj` on every rank; [obj] without torchrun."""
    if not active():
        return [obj]
    everyone = [None] * world_size()
    _collective(dist.all_gather_object, everyone, obj)
    return everyone


def gather(x):
    """x (N, ...) of every rank concatenated along the first axis: (ranks·N, ...). Every rank
    must pass the same shape."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    _collective(dist.all_gather, parts, x.contiguous())
    return torch.cat(parts)


def synchronise(agent):
    """Start every rank from rank 0's weights, slow critic and normaliser, and have the return
    normaliser take its percentiles over the λ-returns of all ranks (their union, as one process
    with the whole batch would), so that every rank scales its advantages the same way."""
    if not active():
        return
    for tensor in agent.state_dict().values():
        _collective(dist.broadcast, tensor, src=0)
    # Outside any compiled graph (--compile): a collective is a step of its own.
    agent.retnorm.gather = torch.compiler.disable(gather)


def average_gradients(params, finite):
    """Replace each gradient by its mean over the ranks (one all-reduce of all of them, flat), and
    return whether the bool tensor `finite` holds on every rank (carried in the same all-reduce).

    The losses are means over a rank's batch, so the mean of the ranks' gradients is the gradient
    of the mean loss over the job's whole batch (ranks × --batch_size sequences). Without
    torchrun: `finite`, and the gradients as they are.
    """
    if not active():
        return finite
    grads = [p.grad for p in params if p.grad is not None]
    # The last entry counts the ranks whose loss was not finite (a sum is exact in float).
    flat = torch.cat([*(g.reshape(-1) for g in grads), (~finite).to(grads[0].dtype).reshape(1)])
    _collective(dist.all_reduce, flat)
    failed, flat = flat[-1], flat[:-1].div_(world_size())
    torch._foreach_copy_(grads, [mean.view_as(g) for g, mean in zip(grads, flat.split([g.numel() for g in grads]))])
    return failed == 0


def sync_step(finished, stop, num_envs):
    """Once per loop iteration on every rank: the episodes that ended on all ranks and whether any
    rank was asked to stop (SIGINT / SIGTERM), so that all stop after the same update.

    finished: [(env index, return, length)] of this rank; the result numbers the envs across
    ranks (env i of rank r is r·num_envs + i), so env 0 is rank 0's first env. The ranks exchange
    one fixed-size float64 tensor each (stop flag, then per env: ended, return, length), not
    pickled objects: on NCCL one small collective and one copy back per iteration.
    """
    if not active():
        return finished, stop
    mine = torch.zeros(1 + 3 * num_envs, dtype=torch.float64)
    mine[0] = float(stop)
    for i, ret, length in finished:
        mine[1 + 3 * i:4 + 3 * i] = torch.tensor([1.0, ret, length], dtype=torch.float64)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    everyone = torch.empty(world_size() * mine.numel(), dtype=torch.float64, device=device)  # flat (gloo)
    _collective(dist.all_gather_single, everyone, mine.to(device))  # all_gather_into_tensor, renamed
    rows = everyone.view(world_size(), -1).cpu().numpy()
    episodes = [(r * num_envs + i, float(row[2 + 3 * i]), int(row[3 + 3 * i]))
                for r, row in enumerate(rows) for i in range(num_envs) if row[1 + 3 * i]]
    return episodes, bool(rows[:, 0].any())


def local_world_size():
    """Ranks on this machine (torchrun's LOCAL_WORLD_SIZE); 1 without torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if active() else 1


def exit_on_error(error):
    """A rank's run failed with `error` (call from inside the `except`): one `error:` line on
    stderr, none when the cause is another rank's failure (that rank prints its own), the
    traceback into torchrun's error file (its end-of-job summary shows it), and exit status 1."""
    ErrorHandler().record_exception(error)
    if not isinstance(error, PeerLost):
        print(f"error: rank {rank()}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    sys.exit(1)


def dump_weights(agent):
    """Test hook (see WEIGHTS_DIR_VAR): write this rank's final weights."""
    folder = os.environ.get(WEIGHTS_DIR_VAR)
    if folder:
        torch.save(agent.state_dict(), os.path.join(folder, f"rank{rank()}.pt"))
