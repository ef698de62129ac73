"""Exact resume: the replay is saved with the run, and a run stopped and resumed ends bit for bit
where one that never stopped does (CPU), on the scripted Catch env and on ALE Pong."""
import dataclasses
import os

import numpy as np
import pytest
import torch

import replay as replay_module
import train
from replay import Replay, ReplayStore
from run_state import load_checkpoint

# Half an update per collection step of the 2 envs: few updates, as each costs about 0.3 s.
TINY = dict(model_size="tiny", num_envs=2, batch_size=2, sequence_length=8, train_ratio=4.0,
            learning_starts=48, imagination_horizon=4, log_interval=32, checkpoint_interval=0,
            wandb_mode="disabled", video_interval=0, image_interval=0, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny model's ops are far too small for two threads, and on a busy machine their
    # waits for each other make acting 40 times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fill(replay, steps, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        e = replay.num_envs
        replay.add(rng.integers(0, 256, (e, *replay.obs.shape[2:]), np.uint8), action=rng.integers(0, 4, e),
                   reward=rng.normal(size=e).astype(np.float32), is_first=rng.random(e) < 0.1,
                   is_last=rng.random(e) < 0.1, is_terminal=rng.random(e) < 0.05,
                   **({"deter": rng.normal(size=(e, 16)).astype(np.float32),
                       "stoch": rng.integers(0, 8, (e, 32))} if replay.context else {}))
        yield


def assert_same_replay(a, b):
    assert (a.pos, a.filled, a.adds) == (b.pos, b.filled, b.adds)
    assert np.array_equal(a.obs, b.obs)
    for k in a.data:
        assert np.array_equal(a.data[k], b.data[k]), k


def test_replay_store_writes_full_chunks_once_and_loads_back_the_ring(tmp_path):
    replay = Replay(60, 2, latent=(16, 32))  # 30 steps per env
    store = ReplayStore(str(tmp_path), replay, chunk_steps=16)  # 8 write positions per chunk
    for _ in fill(replay, 20):
        store.after_add()
    assert sorted(os.listdir(tmp_path)) == ["chunk_000000000.npz", "chunk_000000001.npz"]
    record = store.save()
    store.commit(record)
    assert record["tail"] in os.listdir(tmp_path) and record["latents"] in os.listdir(tmp_path)
    # The ring wraps: chunks it has overwritten go with the next checkpoint, not before.
    for _ in fill(replay, 50, seed=1):
        store.after_add()
    assert "chunk_000000000.npz" in os.listdir(tmp_path)
    record = store.save()
    store.commit(record)  # 70 adds: steps 40..69 are in the ring, chunk 5 (40..47) is the oldest
    names = sorted(os.listdir(tmp_path))
    assert names == [f"chunk_00000000{k}.npz" for k in range(5, 8)] + [record["latents"], record["tail"]]
    loaded = Replay(60, 2, latent=(16, 32))
    ReplayStore(str(tmp_path), loaded).load(record)
    assert_same_replay(loaded, replay)


def test_disk_bytes_counts_the_other_ranks_folders_and_skips_a_file_gone_since_the_listing(tmp_path):
    """Rank 0's replay folder holds the other ranks' folders, whose files those ranks rename and
    delete while rank 0 counts: a name listed whose file is gone (here a link to nothing, as a
    .tmp renamed between the listing and the size) counts 0 bytes and is not an error."""
    replay = Replay(60, 2, latent=(16, 32))
    store = ReplayStore(str(tmp_path), replay, chunk_steps=16)
    for _ in fill(replay, 8):
        store.after_add()
    other = tmp_path / "rank_1"
    other.mkdir()
    (other / "chunk_000000000.npz").write_bytes(b"x" * 1000)
    os.symlink(other / "tail_000000000032.npz.tmp", other / "tail_000000000032.npz")  # its target is gone
    assert store.disk_bytes() == os.path.getsize(tmp_path / "chunk_000000000.npz") + 1000


def test_a_large_ring_saves_each_steps_latent_as_its_chunk_was_written(tmp_path):
    """Above exact_latents_bytes a checkpoint writes no ring latents: a full chunk brings back the
    latents its steps had when it was written, the tail those of the checkpoint."""
    replay = Replay(60, 2, latent=(16, 32))
    store = ReplayStore(str(tmp_path), replay, chunk_steps=16, exact_latents_bytes=0)
    for _ in fill(replay, 8):
        store.after_add()  # chunk 0 (adds 0..7) is written here
    at_chunk = {k: replay.data[k].copy() for k in ("deter", "stoch")}
    for _ in fill(replay, 4, seed=1):
        store.after_add()
    replay.refresh(np.array([0, 1]), np.array([[2, 3], [9, 10]]),  # training refreshes steps
                   np.ones((2, 2, 16), np.float32), np.full((2, 2, 32), 7))  # of chunk 0 and the tail
    record = store.save()
    store.commit(record)
    assert record["latents"] is None and not any(n.startswith("latents_") for n in os.listdir(tmp_path))
    loaded = Replay(60, 2, latent=(16, 32))
    ReplayStore(str(tmp_path), loaded).load(record)
    for k in ("deter", "stoch"):
        assert np.array_equal(loaded.data[k][:, :8], at_chunk[k][:, :8]), k  # refreshed after writing
        assert np.array_equal(loaded.data[k][:, 8:12], replay.data[k][:, 8:12]), k  # the tail
        assert not np.array_equal(loaded.data[k][0, 2:4], replay.data[k][0, 2:4]), k
    assert np.array_equal(loaded.obs, replay.obs) and np.array_equal(loaded.data["action"], replay.data["action"])


def test_a_crash_between_replay_and_checkpoint_keeps_the_previous_checkpoint_whole(tmp_path):
    replay = Replay(40, 2, latent=(16, 32))
    store = ReplayStore(str(tmp_path), replay, chunk_steps=8)
    for _ in fill(replay, 13):
        store.after_add()
    record = store.save()
    store.commit(record)
    saved = Replay(40, 2, latent=(16, 32))
    ReplayStore(str(tmp_path), saved).load(record)
    for _ in fill(replay, 30, seed=1):  # the ring wraps past the checkpoint's steps
        store.after_add()
    store.save()  # ... and the process dies before the checkpoint naming this tail is written
    loaded = Replay(40, 2, latent=(16, 32))
    ReplayStore(str(tmp_path), loaded).load(record)
    assert_same_replay(loaded, saved)


def run(run_dir, steps, resume="", env="tests.catch:Catch-v0", **overrides):
    cfg = train.Config(env=env, total_steps=steps, run_dir=str(run_dir), resume=resume,
                       **{**TINY, "capacity": 100, **overrides})
    return train.train(train.Trainer(cfg, train.prepare(cfg)))


def assert_same_run(b, c, run_dir_b, run_dir_c):
    assert b.counters == c.counters and b.updates_due.credit == c.updates_due.credit
    for (name, x), y in zip(b.agent.state_dict().items(), c.agent.state_dict().values()):
        assert torch.equal(x, y), name
    sb, sc = b.opt.state_dict()["state"], c.opt.state_dict()["state"]
    assert sb.keys() == sc.keys()
    for k in sb:
        assert sb[k]["step"] == sc[k]["step"]
        assert torch.equal(sb[k]["nu"], sc[k]["nu"]) and torch.equal(sb[k]["mu"], sc[k]["mu"])
    assert_same_replay(b.replay, c.replay)
    assert b.replay.rng.bit_generator.state == c.replay.rng.bit_generator.state
    assert np.array_equal(b.collector.obs, c.collector.obs)
    for x, y in zip(b.policy.state, c.policy.state):
        assert torch.equal(x, y)
    # ... and what is on disk: the checkpoint's replay loads as the ring it had.
    ckpt = load_checkpoint(os.path.join(run_dir_b, "checkpoint.pt"))
    loaded = Replay(b.cfg.capacity, b.cfg.num_envs, latent=train.replay_latent(b.cfg))
    ReplayStore(os.path.join(run_dir_b, "replay"), loaded).load(ckpt["replay"])
    assert_same_replay(loaded, c.replay)


def test_resumed_run_ends_bit_for_bit_where_an_unbroken_run_does(tmp_path, monkeypatch):
    monkeypatch.setattr(replay_module, "CHUNK_STEPS", 16)  # several chunks, and the ring wraps
    a = run(tmp_path / "ab", 70)
    assert a.counters["updates"] > 0 and a.replay.adds > a.replay.length / 2
    # Catch's episodes last 5 steps: A stops on a last step, so B's envs must reset first.
    assert a.collector.episodes.is_last.all()
    b = run(tmp_path / "ab", 140, resume=str(tmp_path / "ab" / "checkpoint.pt"))
    c = run(tmp_path / "c", 140)
    assert c.replay.adds > c.replay.length and c.counters["episodes"] > 5
    assert_same_run(b, c, str(tmp_path / "ab"), str(tmp_path / "c"))


def test_resumed_pong_run_ends_bit_for_bit_where_an_unbroken_run_does(tmp_path):
    # The emulators come back with their RNGs (sticky actions) and the no-op RNG; a few updates.
    pong = dict(env="ALE/Pong-v5", learning_starts=256, capacity=1000)
    run(tmp_path / "ab", 160, **pong)
    b = run(tmp_path / "ab", 320, resume=str(tmp_path / "ab" / "checkpoint.pt"), **pong)
    c = run(tmp_path / "c", 320, **pong)
    assert c.counters["updates"] > 0
    assert_same_run(b, c, str(tmp_path / "ab"), str(tmp_path / "c"))


NO_UPDATES = dict(learning_starts=10**6)


def test_resume_with_another_num_envs_is_refused_unless_the_replay_starts_afresh(tmp_path):
    run(tmp_path, 8, **NO_UPDATES)
    cfg = train.Config(env="tests.catch:Catch-v0", resume=str(tmp_path / "checkpoint.pt"),
                       **{**TINY, **NO_UPDATES, "capacity": 100, "num_envs": 4})
    with pytest.raises(ValueError, match="replay was saved with --num_envs 2 --capacity 100.*"
                                         "--no-save_replay"):
        train.prepare(dataclasses.replace(cfg))
    train.prepare(dataclasses.replace(cfg, save_replay=False))  # then the envs restart (below)


def test_what_cannot_be_restored_is_said_once(tmp_path, capsys):
    # The scripted envs have no get_state / set_state: their episodes restart.
    run(tmp_path, 8, env="tests.scripted:Terminate-v0", **NO_UPDATES)
    capsys.readouterr()
    resumed = run(tmp_path, 16, env="tests.scripted:Terminate-v0", save_replay=False,
                  resume=str(tmp_path / "checkpoint.pt"), **NO_UPDATES)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warnings) == 2, warnings
    assert "--no-save_replay: the replay starts empty" in warnings[0]
    assert "Terminate-v0 has no get_state / set_state" in warnings[1]
    assert resumed.replay.adds == 4 and resumed.replay.data["is_first"][:, 0].all()


def test_disk_check_counts_the_replay(tmp_path, monkeypatch, capsys):
    cfg = train.Config(env="tests.catch:Catch-v0", model_size="12m", capacity=100_000,
                       checkpoint_interval=10_000, run_dir=str(tmp_path / "run"))
    assert train.replay_disk_bytes(dataclasses.replace(cfg, save_replay=False)) == 0
    # frames, fields and latents of capacity + interval + a chunk; two copies of the ring's
    # latents while they are saved whole (412.8 MB at 100k steps of 12m, not 825.6 MB at 200k)
    step = 12_303 + 4128
    expected = step * (100_000 + 10_000 + replay_module.CHUNK_STEPS) + 2 * 100_000 * 4128
    assert train.replay_disk_bytes(cfg) == expected
    larger = dataclasses.replace(cfg, capacity=200_000)
    assert train.replay_disk_bytes(larger) == step * (200_000 + 10_000 + replay_module.CHUNK_STEPS)
    monkeypatch.setattr(train.shutil, "disk_usage",
                        lambda path: train.shutil._ntuple_diskusage(10**12, 0, 2 * 2**30))
    train.warn_if_disk_too_small(cfg)
    assert "checkpoints and replay need about 2.80 GiB" in capsys.readouterr().err


def test_missing_replay_file_is_a_one_line_error(tmp_path):
    run(tmp_path, 8, **NO_UPDATES)
    for name in os.listdir(tmp_path / "replay"):
        os.unlink(tmp_path / "replay" / name)
    cfg = train.Config(env="tests.catch:Catch-v0", resume=str(tmp_path / "checkpoint.pt"),
                       **{**TINY, **NO_UPDATES, "capacity": 100})
    with pytest.raises(ValueError, match=r"^--resume .*checkpoint.pt: replay file .*tail_000000000004.npz "
                                         r"is missing or unreadable .*; add --no-save_replay"):
        train.Trainer(cfg, train.prepare(cfg))


# ---------------------------------------------------------------------------------------------
# What is on disk is checked before it is trusted


def small_saved_replay(tmp_path):
    """A wrapped ring of 8 steps per env on disk: chunk 0 (adds 0..7, of which 4..7 are still in
    the ring), the tail (8..11) and the ring's latents; 4×4 frames keep the files small."""
    replay = Replay(16, 2, obs_shape=(4, 4, 3), latent=(16, 32))
    store = ReplayStore(str(tmp_path), replay, chunk_steps=16)
    for _ in fill(replay, 12):
        store.after_add()
    record = store.save()
    store.commit(record)
    return replay, record


def damaged_positions(path, rng, n=300):
    """(offset, bit) pairs worth changing in an .npz: every digit of the .npy headers (a shape
    (2, 8, ...) read as (2, 0, ...) is never read to the end, so its CRC is never checked), and
    `n` of the bytes of the members' zip headers, the central directory and the data."""
    import zipfile

    data = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        starts = [m.header_offset for m in z.infolist()]
        directory = z.start_dir
    headers = [p for s in starts for p in range(s, s + 30 + 16 + 128)]  # zip header, name, .npy header
    digits = [(p, 0x08) for p in headers if data[p:p + 1].isdigit()]  # "8" ^ 0x08 is "0"
    others = [*headers, *range(directory, len(data)), *rng.integers(0, len(data), n // 10).tolist()]
    chosen = rng.choice(len(others), min(n, len(others)), replace=False)
    return digits + [(others[i], 0x01) for i in chosen]


def test_a_changed_byte_anywhere_in_a_replay_file_is_refused_or_harmless(tmp_path):
    """Bytes of the zip and .npy headers and of the data, changed one at a time: loading the
    replay either refuses with one line naming the file, or (a byte the zip reader never uses,
    e.g. a timestamp) gives the ring exactly as it was saved. A changed data byte is caught by the
    member's CRC, a shortened .npy shape by the checks of what the file holds."""
    saved, record = small_saved_replay(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("chunk_000000000.npz", record["latents"]):
        path = tmp_path / name
        original = path.read_bytes()
        refused = 0
        for position, bit in damaged_positions(path, rng):
            damaged = bytearray(original)
            damaged[position] ^= bit
            path.write_bytes(bytes(damaged))
            loaded = Replay(16, 2, obs_shape=(4, 4, 3), latent=(16, 32))
            try:
                ReplayStore(str(tmp_path), loaded).load(record)
            except ValueError as e:
                assert str(e).startswith(f"replay file {path} is missing or unreadable ("), str(e)
                assert "\n" not in str(e)
                refused += 1
                continue
            assert_same_replay(loaded, saved)
        path.write_bytes(original)
        assert refused > 100, name


@pytest.mark.parametrize("damage", ["truncated", "changed in the middle"])
def test_a_damaged_chunk_is_refused(tmp_path, damage):
    saved, record = small_saved_replay(tmp_path)
    path = tmp_path / "chunk_000000000.npz"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF  # in the frames: only the CRC tells
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"chunk_000000000.npz is missing or unreadable \(BadZipFile"):
        ReplayStore(str(tmp_path), Replay(16, 2, obs_shape=(4, 4, 3), latent=(16, 32))).load(record)


def test_checkpoint_writes_the_latents_of_the_filled_steps_only(tmp_path):
    """A short run with a large replay: the latents file holds the filled positions, not the
    whole preallocated ring (a 300-step tiny run wrote 288 MB of them at 1M capacity)."""
    trainer = run(tmp_path, 40, capacity=20_000, **NO_UPDATES)
    record = load_checkpoint(str(tmp_path / "checkpoint.pt"))["replay"]
    assert record["adds"] == trainer.replay.filled == 20
    latent_bytes = 2 * 128 + 32  # tiny: deter 128 in bfloat16, 32 classes
    size = os.path.getsize(tmp_path / "replay" / record["latents"])
    filled = 2 * 20 * latent_bytes  # 2 envs
    assert filled <= size < filled + 2048, size  # the ring would be 20,000 × 288 B = 5.8 MB
    loaded = Replay(20_000, 2, latent=train.replay_latent(trainer.cfg))
    ReplayStore(str(tmp_path / "replay"), loaded).load(record)
    assert_same_replay(loaded, trainer.replay)
