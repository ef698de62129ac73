"""A checkpoint is data, never code: it is written in the types that a safe load
(torch.load(weights_only=True)) accepts and comes back exactly; a file whose pickle would run
a command is refused without running it; a checkpoint of an earlier version (numpy arrays and ALE
states inside) is converted once, on request, and then resumes."""
import collections
import os
import pickle
import random
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import train
from run_state import load_checkpoint, read_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(model_size="tiny", num_envs=2, batch_size=2, sequence_length=8, train_ratio=4.0,
            learning_starts=10**6, imagination_horizon=4, log_interval=32, checkpoint_interval=0,
            wandb_mode="disabled", video_interval=0, image_interval=0, device="cpu", capacity=100)


def train_py(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)


def one_error_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def test_numpy_values_come_back_with_their_types_from_a_safe_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    metadata = collections.OrderedDict(w=torch.ones(2))
    metadata._metadata = {"": {"version": 3}}  # what load_state_dict reads from a state dict
    payload = dict(
        python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
        generator=np.random.default_rng(3).bit_generator.state,  # 128-bit Python ints
        arrays=[np.array([True, False]), np.arange(3, dtype=np.uint8), np.array([0.1, 0.2]),
                np.ones((2, 3), np.float32)[:, 1], np.array([1, -2], np.int64), np.array(7, np.uint16)],
        scalars=[np.int64(5), np.float64(0.1), np.float32(0.1), np.bool_(True), np.uint8(255)],
        plain=(1, 0.5, "s", b"bytes", None, True, [2]), state_dict=metadata)
    save_checkpoint(str(tmp_path / "c.pt"), payload)
    torch.load(tmp_path / "c.pt", weights_only=True)  # the file itself passes the safe load
    back = read_checkpoint(str(tmp_path / "c.pt"))
    for x, y in zip(payload["arrays"] + payload["scalars"], back["arrays"] + back["scalars"], strict=True):
        assert type(x) is type(y) and x.dtype == y.dtype and np.array_equal(x, y), (x, y)
    assert back["plain"] == payload["plain"] and back["generator"] == payload["generator"]
    assert back["python"] == payload["python"]
    assert isinstance(back["numpy"], tuple) and back["numpy"][1].dtype == np.uint32
    np.random.set_state(back["numpy"])  # accepted, and the stream goes on from the seed
    drawn = np.random.random()
    np.random.seed(2)
    assert drawn == np.random.random()
    assert back["state_dict"]._metadata == {"": {"version": 3}}


class RunsCommand:
    """Unpickling this runs `touch marker`, as a hostile checkpoint would run anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("write", ["torch.save", "pickle"])
def test_a_checkpoint_that_would_run_a_command_is_refused_without_running_it(tmp_path, write):
    marker, path = tmp_path / "PWNED", tmp_path / "checkpoint.pt"
    payload = {"agent": {}, "optimizer": {}, "counters": {}, "config": RunsCommand(marker)}
    if write == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    proc = train_py("--resume", str(path))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "holds objects a safe load refuses" in line and f"--convert_checkpoint {path}" in line
    assert not marker.exists()
    # Nor does the conversion of earlier versions' checkpoints run it: it allows their numpy and
    # ALE types by name, nothing else.
    proc = train_py("--convert_checkpoint", str(path))
    assert proc.returncode == 2 and "holds objects that no version of this program wrote" in one_error_line(proc)
    assert not marker.exists() and not (tmp_path / "checkpoint.pt.bak").exists()
    # The file is what it claims: plain unpickling of its pickle runs the command.
    if write == "torch.save":
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    else:
        data = path.read_bytes()
    pickle.loads(data)
    assert marker.exists()


def run(run_dir, steps, resume="", env="tests.catch:Catch-v0"):
    cfg = train.Config(env=env, total_steps=steps, run_dir=str(run_dir), resume=resume, **TINY)
    return train.train(train.Trainer(cfg, train.prepare(cfg)))


@pytest.mark.parametrize("env", ["tests.catch:Catch-v0", "ALE/Pong-v5"])
def test_an_older_checkpoint_is_refused_then_converted_once_and_resumes(tmp_path, env, capsys):
    run(tmp_path, 8, env=env)
    path = tmp_path / "checkpoint.pt"
    # As earlier versions wrote it: numpy arrays and scalars pickled as such, ALE states as objects.
    old = load_checkpoint(str(path))
    for state in old["collector"]["envs"]:
        if "ale" in state["core"]:
            from ale_py import ALEState

            state["core"]["ale"] = ALEState(state["core"]["ale"])
    assert isinstance(old["collector"]["obs"], np.ndarray)
    torch.save(old, path)
    original = path.read_bytes()

    proc = train_py("--resume", str(path))
    assert proc.returncode == 2 and "--convert_checkpoint" in one_error_line(proc)
    proc = train_py("--convert_checkpoint", str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [f"converted {path} to safe types; the original is kept "
                                                f"as {path}.bak"]
    assert (tmp_path / "checkpoint.pt.bak").read_bytes() == original
    torch.load(path, weights_only=True)
    assert "already a safe checkpoint" in train_py("--convert_checkpoint", str(path)).stdout

    # The converted checkpoint resumes as the run that wrote it: replay and envs come back.
    capsys.readouterr()
    resumed = run(tmp_path, 16, resume=str(path), env=env)
    assert "warning:" not in capsys.readouterr().err
    assert resumed.counters["env_steps"] == 16 and resumed.replay.adds == 8


def test_convert_checkpoint_of_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    proc = train_py("--convert_checkpoint", str(path))
    assert proc.returncode == 2 and "not a readable checkpoint" in one_error_line(proc)
    assert not (tmp_path / "notes.txt.bak").exists()
