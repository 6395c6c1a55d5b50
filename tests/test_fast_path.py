"""The fast training path (issue 12) against the straightforward step-by-step reference, on the CPU.

`GTMM.observe(..., diagnostics=False)` (what `GTMM.forward` and so training run) fuses the per-step layers, hoists
what does not depend on the recurrence out of the step loop, lets the FIFO precompute its similarities, and can be
compiled (`GTMM.compile_step`). Here every memory and address must give the same losses, latents, final states and
gradients as `GTMMCell.forward` stepped one by one (`diagnostics=True`), compiled or not; checkpoints keep the
state-dict keys and shapes of the model before this work; and the CPU-only layer variants (channels-last encoder,
the last transposed convolution through ATen's own kernel) compute the same sums as the plain modules.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
import torch.nn.functional as F

from worldmodel.address import ADDRESSES
from worldmodel.config import ModelConfig, preset
from worldmodel.memory import MEMORIES
from worldmodel.model import GTMM, ModelState
from worldmodel.nets import Decoder, Encoder

torch.set_num_threads(1)

B, T = 3, 7


def tiny_config(memory: str, address: str, obs_shape=(28, 28, 1), **kw) -> ModelConfig:
    base = dict(obs_shape=obs_shape, num_actions=4, pose_dim=2, memory=memory, address=address, z_dim=6, h_dim=16,
                addr_dim=8, slots=5, heads=2, embed_dim=16, channels=4, hidden_dim=16)
    base.update(kw)
    return ModelConfig(**base)


def random_inputs(cfg: ModelConfig, seed: int = 0, steps: int = T) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prev_action = torch.randint(-1, cfg.num_actions, (B, steps), generator=g)  # -1 mid-window too: "no action"
    return {
        "obs": torch.randint(0, 256, (B, steps, *cfg.obs_shape), generator=g, dtype=torch.uint8),
        "prev_action": prev_action,
        "pose": torch.randn(B, steps, cfg.pose_dim, generator=g),
        "revisit": torch.zeros(B, steps, dtype=torch.bool),
    }


def elbo_loss(seq: dict) -> torch.Tensor:
    return (seq["nll"] + seq["kl"]).mean()


def both_paths(model: GTMM, inputs: dict, sample: bool = True, state: ModelState | None = None) -> tuple[dict, dict]:
    """observe() through the reference and the fast path, with the same latent noise (the same seed)."""
    out = []
    for diagnostics in (True, False):
        torch.manual_seed(7)
        out.append(model.observe(inputs["obs"], inputs["prev_action"], inputs["pose"], state=state, sample=sample,
                                 diagnostics=diagnostics))
    return out[0], out[1]


def grads(model: GTMM, loss: torch.Tensor) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True))


def assert_close_grads(model: GTMM, reference: list, fast: list, rtol: float = 1e-4) -> None:
    """Equal gradients up to float rounding, relative to the largest gradient of the model (a parameter whose
    gradient is 1e-10 would fail any per-tensor relative test on rounding alone)."""
    scale = max(g.abs().max().item() for g in reference if g is not None)
    for (name, _), a, b in zip(model.named_parameters(), reference, fast):
        assert (a is None) == (b is None), f"{name}: gradient in one path only"
        if a is not None:
            torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def assert_same_state(reference: ModelState, fast: ModelState, memory: str) -> None:
    for key in ("h", "c", "z", "read"):
        torch.testing.assert_close(getattr(fast, key), getattr(reference, key), rtol=1e-4, atol=1e-5)
    assert fast.memory.keys() == reference.memory.keys()
    for key in reference.memory:
        torch.testing.assert_close(fast.memory[key], reference.memory[key], rtol=1e-4, atol=1e-5, msg=key)
    if memory != "none":  # with no memory the fast path does not run the address (it feeds nothing)
        for key in reference.address:
            torch.testing.assert_close(fast.address[key], reference.address[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("address", ADDRESSES)
@pytest.mark.parametrize("memory", MEMORIES)
def test_fast_path_matches_the_step_by_step_reference(memory, address):
    torch.manual_seed(0)
    model = GTMM(tiny_config(memory, address))
    inputs = random_inputs(model.cfg)
    ref, fast = both_paths(model, inputs)
    for key in ("nll", "kl", "z", "h", "read", "prior_mean", "prior_std", "post_mean", "post_std"):
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-4, atol=1e-4, msg=key)
    assert_same_state(ref["state"], fast["state"], memory)
    assert_close_grads(model, grads(model, elbo_loss(ref)), grads(model, elbo_loss(fast)))


@pytest.mark.parametrize("memory", ["introspective", "ntm", "lru", "dnc"])
@pytest.mark.parametrize("kwargs", [{"store_h": True}, {"key_from_h": True}], ids=["store_h", "key_from_h"])
def test_fast_path_with_memory_options(memory, kwargs):
    """store_h widens the content; key_from_h makes the FIFO's keys depend on h_t (no precomputed similarities)."""
    torch.manual_seed(0)
    model = GTMM(tiny_config(memory, "actions", memory_kwargs=kwargs))
    inputs = random_inputs(model.cfg)
    ref, fast = both_paths(model, inputs)
    torch.testing.assert_close(fast["z"], ref["z"], rtol=1e-4, atol=1e-4)
    assert_same_state(ref["state"], fast["state"], memory)
    assert_close_grads(model, grads(model, elbo_loss(ref)), grads(model, elbo_loss(fast)))


@pytest.mark.parametrize("memory", ["introspective", "lru"])
def test_writing_the_latents_mean(memory):
    """`write_latent="mean"`: both paths store the posterior's mean, not the draw (the FIFO's slots hold exactly the
    last means), and agree on losses and gradients; the draw still drives the step (z is not the mean)."""
    torch.manual_seed(0)
    model = GTMM(tiny_config(memory, "actions", write_latent="mean"))
    inputs = random_inputs(model.cfg)
    ref, fast = both_paths(model, inputs)
    torch.testing.assert_close(fast["kl"], ref["kl"], rtol=1e-4, atol=1e-4)
    assert_same_state(ref["state"], fast["state"], memory)
    assert_close_grads(model, grads(model, elbo_loss(ref)), grads(model, elbo_loss(fast)))
    assert not torch.allclose(ref["z"], ref["post_mean"])
    if memory == "introspective":
        N = model.cfg.slots
        torch.testing.assert_close(fast["state"].memory["content"], ref["post_mean"][:, -N:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory", ["introspective", "dnc"])
def test_prior_skip_in_both_paths_and_open_loop(memory):
    """`prior_skip`: the prior's linear path from the read starts at zero (the same numbers as without it), and once
    trained (here: random) both paths agree, teacher forced and in open loop, where the prior drives the step."""
    torch.manual_seed(0)
    plain = GTMM(tiny_config(memory, "actions"))
    model = GTMM(tiny_config(memory, "actions", prior_skip=True))
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["cell.prior.skip.weight"] and not unexpected
    inputs = random_inputs(model.cfg)
    with torch.no_grad():
        a, b = (m.observe(inputs["obs"], inputs["prev_action"], inputs["pose"], sample=False) for m in (plain, model))
    torch.testing.assert_close(b["prior_mean"], a["prior_mean"])
    with torch.no_grad():
        model.cell.prior.skip.weight.normal_(0.0, 0.5)
    ref, fast = both_paths(model, inputs)
    torch.testing.assert_close(fast["prior_mean"], ref["prior_mean"], rtol=1e-4, atol=1e-4)
    assert_close_grads(model, grads(model, elbo_loss(ref)), grads(model, elbo_loss(fast)))
    assert any(p is model.cell.prior.skip.weight for p in model.parameters())  # trained with the rest
    dreams = [model.imagine(ref["state"], inputs["prev_action"], inputs["pose"], sample=False, diagnostics=d)
              for d in (True, False)]
    torch.testing.assert_close(dreams[1]["frames"], dreams[0]["frames"], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        without = model.cell.prior.net(torch.cat([ref["h"], ref["read"]], dim=-1))[..., :model.cfg.z_dim]
    assert not torch.allclose(without, ref["prior_mean"], atol=1e-3)  # the skip path is really used


@pytest.mark.parametrize("memory", MEMORIES)
def test_continuing_from_a_state_and_open_loop(memory):
    """A window continued from a carried state (TBPTT, open loop after a context: the FIFO's precomputed
    similarities then include the slots written before), and `imagine` from it, in both paths."""
    torch.manual_seed(0)
    model = GTMM(tiny_config(memory, "pose", slots=4))
    first, second = random_inputs(model.cfg, seed=1), random_inputs(model.cfg, seed=2)
    with torch.no_grad():
        state = model.observe(first["obs"], first["prev_action"], first["pose"], sample=False)["state"]
    ref, fast = both_paths(model, second, sample=True, state=state)
    torch.testing.assert_close(fast["kl"], ref["kl"], rtol=1e-4, atol=1e-4)
    assert_same_state(ref["state"], fast["state"], memory)
    dreams = [model.imagine(ref["state"], second["prev_action"], second["pose"], sample=False, diagnostics=d)
              for d in (True, False)]
    torch.testing.assert_close(dreams[1]["frames"], dreams[0]["frames"], rtol=1e-4, atol=1e-5)
    assert_same_state(dreams[0]["state"], dreams[1]["state"], memory)


def fifo_push_reference(buffer: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """The FIFO push before issue 12, for the record: drop the oldest slot, append the newest."""
    return torch.cat([buffer[:, 1:], item.unsqueeze(1)], dim=1)


def test_fifo_final_state_holds_the_last_latents_in_order():
    """The FIFO's fast path carries only the content and rebuilds addresses and fill flags at the end: the final
    memory must be the old per-step push's, slot for slot, including a window shorter than the FIFO."""
    torch.manual_seed(0)
    for steps in (3, 9):  # fewer and more steps than the 5 slots
        model = GTMM(tiny_config("introspective", "actions"))
        inputs = random_inputs(model.cfg, steps=steps)
        with torch.no_grad():
            seq = model.observe(inputs["obs"], inputs["prev_action"], inputs["pose"], diagnostics=False)
        memory, N = model.cell.memory, model.cfg.slots
        expected = memory.init_state(B)
        addr, _ = model.cell.address.sequence(model.cell.address.init_state(B), inputs["prev_action"], inputs["pose"])
        for t in range(steps):
            expected = {"addr": fifo_push_reference(expected["addr"], F.normalize(addr[:, t], dim=-1, eps=1e-6)),
                        "content": fifo_push_reference(expected["content"], seq["z"][:, t]),
                        "filled": fifo_push_reference(expected["filled"], torch.ones(B))}
        for key in expected:
            torch.testing.assert_close(seq["state"].memory[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
        assert seq["state"].memory["filled"].sum(-1).eq(min(steps, N)).all()


@pytest.mark.parametrize("memory", MEMORIES)
def test_compiled_step_gives_the_eager_losses_and_gradients(memory):
    """`compile_step` traces the step as one graph (fullgraph: no break) and changes no number. aot_eager runs
    dynamo and AOTAutograd (what inductor compiles) without the C++ build, to stay fast."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GTMM(tiny_config(memory, "actions"))
    batch = random_inputs(model.cfg)
    torch.manual_seed(1)
    eager = model(batch, free_nats=0.1, kl_balance=0.8)
    eager_grads = grads(model, eager["loss"])
    model.compile_step(backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    compiled = model(batch, free_nats=0.1, kl_balance=0.8)
    torch.testing.assert_close(compiled["loss"], eager["loss"])
    assert_close_grads(model, eager_grads, grads(model, compiled["loss"]), rtol=1e-6)
    assert set(model.state_dict()) == set(GTMM(model.cfg).state_dict())  # no weights of its own
    with torch.no_grad():  # evaluation runs the same step eagerly
        pred = model.predict_open_loop(batch["obs"], batch["prev_action"], batch["pose"], context=3)
    model.compile_step(None, backend=None)
    with torch.no_grad():
        torch.testing.assert_close(pred["pred"], model.predict_open_loop(batch["obs"], batch["prev_action"],
                                                                         batch["pose"], context=3)["pred"])
    assert model._compiled_step is None


@pytest.mark.slow
def test_inductor_compiled_step_on_the_cpu():
    """The real compiler (C++ kernels built here; ~20-60 s): same loss and gradients as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GTMM(tiny_config("introspective", "actions"))
    batch = random_inputs(model.cfg)
    torch.manual_seed(1)
    eager = model(batch)
    eager_grads = grads(model, eager["loss"])
    model.compile_step(fullgraph=True)
    torch.manual_seed(1)
    compiled = model(batch)
    torch.testing.assert_close(compiled["loss"], eager["loss"], rtol=1e-5, atol=1e-4)
    assert_close_grads(model, eager_grads, grads(model, compiled["loss"]), rtol=1e-4)


def test_bf16_autocast_path_agrees_with_the_reference():
    """Under autocast (the GPU preset runs bf16) the fast path casts its fused weights once per sequence; on the
    CPU with bf16 autocast both paths must still agree to bf16 precision."""
    torch.manual_seed(0)
    model = GTMM(tiny_config("ntm", "actions"))
    inputs = random_inputs(model.cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, fast = both_paths(model, inputs, sample=False)
    torch.testing.assert_close(fast["z"].float(), ref["z"].float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(fast["kl"], ref["kl"], rtol=0.05, atol=0.05)


# -- checkpoints: the same weights as before the fast path ---------------------------------------------------------

# sha256 of "memory/address/key:shape" over every memory x address at the debug preset (28x28x1 frames, 4 actions,
# 2 pose dims), as GTMM.state_dict() listed them at commit c5aec21, before the fast path: 578 entries.
STATE_DICT_LAYOUT = "b74045ff32482ec82fd7690957bbeda66c3297ae9a78b81ca510b20ad1e21173"


def test_state_dict_keys_and_shapes_are_those_of_before():
    lines = []
    for memory in MEMORIES:
        for address in ("hidden", "actions", "pose"):
            cfg = dataclasses.replace(preset("debug"), memory=memory, address=address).model_config((28, 28, 1), 4, 2)
            lines += [f"{memory}/{address}/{k}:{tuple(v.shape)}" for k, v in GTMM(cfg).state_dict().items()]
    assert len(lines) == 578
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == STATE_DICT_LAYOUT


# -- CPU layer variants: the same sums as the plain modules ---------------------------------------------------------

@pytest.mark.parametrize("obs_shape", [(28, 28, 1), (64, 64, 3)], ids=["28x28x1", "64x64x3"])
def test_cpu_encoder_and_decoder_variants_compute_the_plain_layers(obs_shape):
    torch.manual_seed(0)
    encoder, decoder = Encoder(obs_shape, 16, 8), Decoder(obs_shape, 6, 8)
    frames = torch.rand(4, obs_shape[2], obs_shape[0], obs_shape[1], requires_grad=True)
    z = torch.randn(4, 6, requires_grad=True)

    def plain_encoder(x):
        return F.gelu(encoder.fc(encoder.convs(x - 0.5).flatten(1)))

    def plain_decoder(v):
        return decoder.deconvs(F.gelu(decoder.fc(v)).view(-1, decoder.start_ch, *decoder.start_hw))

    for module, plain, x in ((encoder, plain_encoder, frames), (decoder, plain_decoder, z)):
        out, expected = module(x), plain(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        inputs = [x, *module.parameters()]
        for a, b in zip(torch.autograd.grad(out.square().sum(), inputs),
                        torch.autograd.grad(expected.square().sum(), inputs)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("obs_shape", [(28, 28, 1), (64, 64, 3)], ids=["28x28x1", "64x64x3"])
def test_bf16_encoder_and_decoder_compute_the_fp32_layers_rounded(obs_shape):
    # `GTMM.set_conv_bf16` (--precision bf16-convs): the same layers in bf16, outputs back in fp32, gradients to every
    # parameter; switched off, the model computes exactly what it did before
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("debug"), memory="none").model_config(obs_shape, 4, 2)
    model = GTMM(cfg)
    frames = torch.rand(6, obs_shape[2], obs_shape[0], obs_shape[1])
    z = torch.randn(6, cfg.z_dim)
    fp32 = model.encoder(frames), model.decoder(z)
    model.set_conv_bf16(True)
    bf16 = model.encoder(frames), model.decoder(z)
    for a, b in zip(fp32, bf16):
        assert b.dtype == torch.float32 and not torch.equal(a, b)
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)
    (bf16[0].square().sum() + bf16[1].square().sum()).backward()
    for module in (model.encoder, model.decoder):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    model.set_conv_bf16(False)
    assert torch.equal(model.encoder(frames), fp32[0]) and torch.equal(model.decoder(z), fp32[1])


@pytest.mark.parametrize("obs_shape", [(28, 28, 1), (64, 64, 3)], ids=["28x28x1", "64x64x3"])
def test_cpu_encoder_runs_its_conv_stack_channels_last(obs_shape):
    # A 1-channel frame is both layouts at once, and oneDNN then returned the first conv's output contiguous, which
    # kept the whole stack (and its slower backward) off channels-last without changing a single sum.
    encoder = Encoder(obs_shape, 16, 8)
    layouts = []
    for layer in encoder.convs:
        layer.register_forward_hook(lambda m, inp, out: layouts.append(
            (type(m).__name__, inp[0].is_contiguous(memory_format=torch.channels_last) and inp[0].shape[1] > 1)))
    encoder(torch.rand(4, obs_shape[2], obs_shape[0], obs_shape[1]))
    deep = layouts[1:]  # every layer after the first conv sees multi-channel maps
    assert deep and all(cl for _, cl in deep), layouts


# -- data pipeline: one gather per batch, batches made ahead ---------------------------------------------------------

@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    """A rollout folder of 5 numpy-made episodes of different lengths, in the on-disk format, as 6-frame windows."""
    import numpy as np

    from rollouts import storage
    from rollouts.dataset import RolloutWindows

    root = tmp_path_factory.mktemp("rollouts")
    rng = np.random.default_rng(0)
    manifest = storage.new_manifest(env_name="synthetic", env_id="synthetic", env_kwargs={}, agent_name="random",
                                    agent_kwargs={}, seed=0, steps_per_episode=12, obs_shape=(8, 8, 3),
                                    num_actions=4, pose_dim=2, episodes_requested=5)
    for index, steps in enumerate((12, 5, 9, 12, 7)):
        episode = {"obs": rng.integers(0, 256, (steps + 1, 8, 8, 3), dtype=np.uint8),
                   "action": rng.integers(0, 4, steps).astype(np.int64), "reward": np.zeros(steps, np.float32),
                   "terminated": np.zeros(steps, bool), "truncated": np.zeros(steps, bool),
                   "pose": rng.normal(size=(steps + 1, 2)).astype(np.float32), "revisit": rng.random(steps + 1) < 0.5,
                   "visit_count": np.zeros(steps + 1, np.int32)}
        file = storage.episode_filename(index)
        sha = storage.save_episode(root / file, episode, storage.episode_identity(manifest, index, index, index))
        manifest["episodes"].append(storage.episode_record(index, file, sha, (root / file).stat().st_size, episode,
                                                           env_seed=index, agent_seed=index))
    storage.write_manifest(root, manifest)
    return RolloutWindows(root, seq_len=6, split="all", cache_dir=tmp_path_factory.mktemp("cache"))


def test_sample_batch_is_the_stack_of_the_windows(windows):
    import numpy as np

    index = np.array([0, len(windows) - 1, 3, 3, 17])  # repeats and the last window of the last episode
    batch = windows.sample_batch(index)
    for key, value in batch.items():
        expected = np.stack([windows[int(i)][key].numpy() for i in index])
        assert value.dtype == expected.dtype and value.shape == expected.shape, key
        np.testing.assert_array_equal(value, expected, err_msg=key)
    assert batch["obs"].shape == (5, 6, 8, 8, 3) and batch["prev_action"].dtype == np.int64
    with pytest.raises(ValueError, match="1-D integer"):
        windows.sample_batch(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(IndexError, match="out of range"):
        windows.sample_batch(np.array([len(windows)]))


def test_prefetcher_hands_out_each_steps_batch_in_order_and_raises_make_errors(windows):
    import numpy as np

    from rollouts.dataset import Prefetcher

    def make(step: int) -> dict:
        if step == 6:
            raise RuntimeError("bad step 6")
        return windows.sample_batch(np.random.default_rng([0, step]).integers(len(windows), size=3))

    with Prefetcher(make, "cpu", start=2, depth=2, dtypes={"pose": torch.float64}) as loader:
        for step in range(2, 6):  # a resumed run starting at step 2 gets the batches of steps 2, 3, ...
            batch = loader.get(step)
            expected = make(step)
            assert torch.equal(batch["obs"], torch.from_numpy(expected["obs"]))
            assert batch["pose"].dtype == torch.float64
        with pytest.raises(RuntimeError, match="bad step 6"):
            loader.get(6)
        with pytest.raises(ValueError, match="next prefetched step is 7"):
            loader.get(9)
    assert not loader._thread.is_alive()



def test_fast_path_check_compares_every_training_step(capsys) -> None:
    """benchmarks/fast_path_check.py (the GPU check of the compiled step on the paper-task model): on the CPU the
    traced step agrees with the uncompiled one at every step of a short run, and the table names each step."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fast_path_check

    rows = fast_path_check.main(["--device", "cpu", "--modes", "default", "--precisions", "fp32", "--steps", "3",
                                 "--batch", "4", "--backend", "aot_eager"])
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[-1]["loss"] < rows[0]["loss"]  # it trains: the reference's steps lower the loss
    for row in rows:
        assert abs(row["loss_diff"]) < 1e-3 and row["grad_diff"] < 1e-5 and row["worst"] < 1e-4, row
    out = capsys.readouterr().out
    assert "similarity_cued_recall / introspective" in out and out.count("default          fp32") == 3
