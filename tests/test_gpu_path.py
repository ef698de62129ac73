"""What keeps a CUDA run from stalling, checked on the CPU: the scalar reads an update and an
acting step make (each one is a host sync on a GPU), the replay pipeline that samples the next
batch while an update runs (bit for bit the batches of plain sequential sampling), and the latents
packed on the device (the same bits the replay stored before)."""
import collections
import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model
import train
from model import AgentPolicy, bf16_bits, pack_step
from replay import Loader, Replay, to_bf16_bits
from tests.test_env import trainer_for
from tests.test_model import random_batch, tiny_agent


class ScalarReads(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host: `.item()`, `bool(t)`, `float(t)` and
    `.tolist()` all dispatch to aten._local_scalar_dense, which on CUDA waits for the GPU."""

    def __init__(self):
        super().__init__()
        self.count, self.where = 0, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
            self.where["".join(traceback.format_stack(limit=12)[:-2])] += 1
        return func(*args, **(kwargs or {}))


def filled_replay(steps=40, num_envs=2, latent=(128, 32), seed=3):
    """A replay with random frames, fields and latents (stoch classes < 8, as the tiny model's)."""
    rng = np.random.default_rng(seed)
    replay = Replay(capacity=200, num_envs=num_envs, latent=latent, seed=seed)
    for s in range(steps):
        replay.add(rng.integers(0, 256, (num_envs, 64, 64, 3), np.uint8),
                   action=rng.integers(0, 3, num_envs), reward=rng.normal(size=num_envs).astype(np.float32),
                   is_first=rng.random(num_envs) < 0.1, is_last=rng.random(num_envs) < 0.1,
                   is_terminal=rng.random(num_envs) < 0.05,
                   deter=rng.normal(size=(num_envs, latent[0])).astype(np.float32),
                   stoch=rng.integers(0, 8, (num_envs, latent[1])))
    return replay


def test_the_loop_reads_one_scalar_per_update_and_none_per_acting_step(tmp_path):
    """Iterations of the real training loop (act, store, read the batches ahead, update, send the
    latents back): the only scalar reads are the non-finite checks, one per update."""
    trainer = trainer_for("tests.catch:Catch-v0", tmp_path, batch_size=2, learning_starts=16,
                          train_ratio=64.0)  # 8 updates per collection step of 2 envs
    try:
        while trainer.counters["updates"] < 2:  # past the first updates (optimizer state made)
            trainer.step()
        before = trainer.counters["updates"]
        with ScalarReads() as reads:
            for _ in range(3):
                trainer.step()
        updates = trainer.counters["updates"] - before
    finally:
        trainer.close()
    assert updates == 24 and reads.count == updates, "\n".join(reads.where)
    policy = AgentPolicy(trainer.agent, 3, torch.device("cpu"))
    obs = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), np.uint8)
    with ScalarReads() as reads:
        for first in (True, False):
            policy(obs, np.full(3, first))
            policy.latents()
    assert reads.count == 0, "\n".join(reads.where)


def test_the_sync_count_sees_an_item_in_the_loss(monkeypatch):
    """The counter itself: a scalar read added to the loss is seen."""
    agent, opt = tiny_agent()
    real = agent.loss

    def loss_with_item(*args, **kwargs):
        total, metrics, latents = real(*args, **kwargs)
        metrics["loss/total_host"] = torch.tensor(total.item())
        return total, metrics, latents

    with ScalarReads() as reads:
        train.train_step(agent, opt, random_batch(), loss_with_item)
    assert reads.count == 2


@pytest.mark.parametrize("context", [True, False])
def test_prefetched_batches_equal_sequential_sampling_bit_for_bit(context):
    """Two replays with the same steps and seed: one sampled one batch after the other, with each
    update's latents refreshed before the next sample (as the loop did), the other through the
    Loader, which reads the next batch while the update runs. Every batch, and the replay's
    latents after the refreshes, are identical."""
    latent = (128, 32) if context else None
    plain, piped = filled_replay(latent=latent or (0, 0)), filled_replay(latent=latent or (0, 0))
    if not context:
        plain.context = piped.context = False
    loader = Loader(piped, 4, 6, torch.device("cpu"))
    rng = np.random.default_rng(7)
    for step, due in enumerate([3, 1, 2]):  # updates per collection step
        for i in range(due):
            expected = plain.sample(4, 6)
            got = loader.next(prefetch=i + 1 < due)
            assert expected.keys() == got.keys()
            for k, v in expected.items():
                assert np.array_equal(np.asarray(got[k]), v), (step, i, k)
                assert np.asarray(got[k]).dtype == v.dtype, k
            if context:
                deter = rng.normal(size=(4, 6, 128)).astype(np.float32)
                stoch = rng.integers(0, 8, (4, 6, 32))
                plain.refresh(expected["env"], expected["index"], deter, stoch)
                loader.refresh(got["env"], got["index"],
                               dict(deter=torch.from_numpy(deter), stoch=torch.from_numpy(stoch)))
        loader.flush()  # as Trainer.store does before a step is stored
        frame = np.full((2, 64, 64, 3), step, np.uint8)
        for replay in (plain, piped):
            replay.add(frame, action=np.zeros(2, int), reward=np.zeros(2, np.float32),
                       is_first=np.zeros(2, bool), is_last=np.zeros(2, bool), is_terminal=np.zeros(2, bool),
                       **(dict(deter=np.zeros((2, 128), np.float32), stoch=np.zeros((2, 32), int)) if context else {}))
    for k in plain.data:
        assert np.array_equal(plain.data[k], piped.data[k]), k
    assert plain.rng.bit_generator.state == piped.rng.bit_generator.state
    loader.close()


def test_latents_packed_on_the_device_are_the_bits_the_replay_stored_before():
    """bfloat16 rounding by torch on the device equals the replay's own rounding of the float32
    values (to nearest, ties to even), ties and extremes included, and one packed copy holds the
    action, deter and stoch of an acting step."""
    rng = np.random.default_rng(0)
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 0.0, -0.0, 3.0e38, -3.0e38, 1e-30], np.float32)
    x = np.concatenate([ties, rng.normal(size=5000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 5000)])
    assert np.array_equal(bf16_bits(torch.from_numpy(x)).numpy().view(np.uint16), to_bf16_bits(x))
    agent, _ = tiny_agent()
    policy = AgentPolicy(agent, 4, torch.device("cpu"))
    obs = rng.integers(0, 256, (4, 64, 64, 3), np.uint8)
    torch.manual_seed(1)
    action = policy(obs, np.ones(4, bool))
    deter, stoch, prev_action = policy.state
    latents = policy.latents()
    assert np.array_equal(latents["deter_bits"], to_bf16_bits(deter.numpy()))
    assert np.array_equal(latents["stoch"], agent.rssm.stoch_indices(stoch).numpy().astype(np.uint8))
    assert np.array_equal(action, prev_action.argmax(-1).numpy()) and action.dtype == np.int64
    packed = pack_step(torch.tensor([5, 17]), torch.zeros(2, 3), torch.tensor([[1, 2], [3, 4]]))
    assert packed.dtype == torch.uint8 and packed.shape == (2, 8 + 2 * 3 + 2)


def test_acting_draws_the_same_actions_as_a_validated_categorical():
    """Sampling without argument validation draws what torch's validated Categorical draws."""
    agent, _ = tiny_agent()
    obs = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (64, 64, 64, 3), np.uint8))
    state = agent.initial_state(64, torch.device("cpu"))
    torch.manual_seed(5)
    action, (deter, stoch, _) = agent.act(obs, torch.ones(64, dtype=torch.bool), state)
    logp = agent.policy_logprobs(agent.rssm.feat(deter, stoch))
    # The same RNG draws up to the action (the posterior's sample), then the validated draw.
    torch.manual_seed(5)
    with torch.no_grad():
        d, s, _ = agent.rssm.obs_step(*state[:2], state[2], agent.encoder(obs), torch.ones(64, dtype=torch.bool))
    validated = torch.distributions.Categorical(logits=logp).sample()
    assert torch.equal(action, validated)
    assert torch.equal(d, deter)
    assert model.one_hot(action, 3).sum(-1).eq(1).all()


def test_a_gpu_index_the_machine_does_not_have_is_a_one_line_error():
    assert train.parse_device("cuda:1", cuda_count=2) == torch.device("cuda", 1)
    assert train.parse_device("cuda", cuda_count=1) == torch.device("cuda")
    assert train.parse_device("cpu", cuda_count=0) == torch.device("cpu")
    assert train.parse_device("auto", cuda_count=0) is None
    with pytest.raises(ValueError, match=r"^--device cuda:2: this machine has 2 CUDA devices \(cuda:0 to cuda:1\)$"):
        train.parse_device("cuda:2", cuda_count=2)
    with pytest.raises(ValueError, match="CUDA is not available"):
        train.parse_device("cuda:0", cuda_count=0)
    for name in ("cuda:x", "cuda1", "tpu", ""):
        with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N"):
            train.parse_device(name, cuda_count=1)


@pytest.mark.parametrize("precision,device,bf16", [
    ("auto", "cuda", True), ("auto", "cpu", False), ("fp32", "cuda", False), ("bf16", "cuda", True),
    ("bf16", "cpu", False), ("fp32", "cpu", False)])
def test_precision_is_bf16_autocast_on_cuda_by_default_and_fp32_on_the_cpu(precision, device, bf16):
    assert train.Config().precision == "auto"
    assert train.uses_bf16(precision, torch.device(device)) == bf16


def test_the_machine_that_resumes_chooses_the_device(tmp_path):
    """A run saved with --device cpu (as a GPU run would be saved with cuda) resumes with the
    device the new command line asks for, by default auto, not the one in the checkpoint."""
    cfg = train.Config(env="tests.catch:Catch-v0", model_size="tiny", num_envs=1, batch_size=2,
                       sequence_length=4, capacity=1000, run_dir=str(tmp_path), device="cpu",
                       wandb_mode="disabled", video_interval=0, image_interval=0)
    trainer = train.Trainer(cfg, train.prepare(cfg))
    trainer.save()
    trainer.close()
    resume = str(tmp_path / "checkpoint.pt")
    for argv, device in (([], "auto"), (["--device", "cpu"], "cpu")):
        cfg2, given = train.parse_args(["--resume", resume, *argv])
        checkpoint = train.prepare(cfg2, given)
        assert checkpoint["config"]["device"] == "cpu"
        assert cfg2.device == device and cfg2.model_size == "tiny"  # the rest comes from the checkpoint
