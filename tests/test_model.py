"""The GTMM world model at tiny sizes: shapes, gradients, learning, open loop, checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from worldmodel import checkpoint
from worldmodel.config import ModelConfig, TrainConfig
from worldmodel.memory import MEMORIES
from worldmodel.model import GTMM, param_groups

torch.set_num_threads(1)

FRAME_SHAPES = [(28, 28, 1), (64, 64, 3)]


def tiny_config(obs_shape=(28, 28, 1), memory="introspective", address="actions", **kw) -> ModelConfig:
    base = dict(obs_shape=obs_shape, num_actions=4, pose_dim=2, memory=memory, address=address, z_dim=8, h_dim=32,
                addr_dim=8, slots=8, heads=2, embed_dim=32, channels=8, hidden_dim=32)
    base.update(kw)
    return ModelConfig(**base)


def random_batch(cfg: ModelConfig, B: int = 2, T: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prev_action = torch.randint(0, cfg.num_actions, (B, T), generator=g)
    prev_action[:, 0] = -1  # episode start: no action
    return {
        "obs": torch.randint(0, 256, (B, T, *cfg.obs_shape), generator=g, dtype=torch.uint8),
        "prev_action": prev_action,
        "revisit": torch.rand(B, T, generator=g) < 0.5,
        "pose": torch.randn(B, T, cfg.pose_dim, generator=g),
    }


@pytest.mark.parametrize("obs_shape", FRAME_SHAPES, ids=["28x28x1", "64x64x3"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_every_memory_forward_backward_both_frame_sizes(memory, obs_shape):
    torch.manual_seed(0)
    cfg = tiny_config(obs_shape, memory=memory)
    model = GTMM(cfg)
    batch = random_batch(cfg)
    out = model(batch, free_nats=0.1, kl_balance=0.8)
    B, T = batch["prev_action"].shape
    assert out["nll"].shape == (B, T) and out["kl"].shape == (B, T)
    assert out["z"].shape == (B, T, cfg.z_dim)
    assert out["logits"].shape == (B, T, obs_shape[2], obs_shape[0], obs_shape[1])
    assert torch.isfinite(out["loss"]) and bool((out["kl"] >= 0).all())
    out["loss"].backward()
    for name in ("encoder", "decoder", "cell.prior", "cell.posterior", "cell.lstm"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), f"no gradient reaches {name}"
    if memory != "none":  # the memory read must feed the loss
        grads = [p.grad for p in model.cell.memory.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient reaches memory {memory}"


@pytest.mark.parametrize("options", [{}, {"write_latent": "mean", "prior_skip": True, "prior_outlier": 0.01,
                                      "memory_kwargs": {"content_keys": True}}], ids=["paper", "issue14-options"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(options):
    torch.manual_seed(0)
    cfg = tiny_config(**options)
    model = GTMM(cfg)
    batch = random_batch(cfg, B=4, T=5)
    # structured frames (a bright left half, a dark right half): learnable within a few steps, unlike noise
    batch["obs"].zero_()
    batch["obs"][..., :14, :] = 255
    opt = torch.optim.Adam(param_groups(model, 1e-2, 3.0))
    losses = []
    for _ in range(25):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_address_path_gets_its_own_learning_rate():
    model = GTMM(tiny_config(address="actions"))
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 5.0)}
    assert groups["address"]["lr"] == pytest.approx(5e-3) and groups["model"]["lr"] == pytest.approx(1e-3)
    n_address = sum(p.numel() for p in groups["address"]["params"])
    assert n_address == sum(p.numel() for p in model.cell.address.parameters()) > 0


def test_bad_shapes_are_named():
    model = GTMM(tiny_config())
    batch = random_batch(model.cfg)
    with pytest.raises(AssertionError, match=r"obs: expected \(2, 6, 28, 28, 1\).*got \(2, 6, 28, 28, 3\)"):
        model.observe(batch["obs"].repeat(1, 1, 1, 1, 3), batch["prev_action"], batch["pose"])
    with pytest.raises(AssertionError, match=r"pose: expected \(2, 6, 2\)"):
        model.observe(batch["obs"], batch["prev_action"], batch["pose"][..., :1])
    with pytest.raises(ValueError, match="unknown memory"):
        GTMM(tiny_config(memory="tape"))


def test_open_loop_step_prior_matches_imagine_and_needs_no_frames():
    torch.manual_seed(0)
    model = GTMM(tiny_config(memory="introspective", address="actions")).eval()
    batch = random_batch(model.cfg, B=3, T=7)
    K = 3
    state = model.warmup(batch["obs"][:, :K], batch["prev_action"][:, :K], batch["pose"][:, :K])
    with torch.no_grad():
        dream = model.imagine(state, batch["prev_action"][:, K:], sample=False)
    assert dream["frames"].shape == (3, 4, 28, 28, 1)
    assert float(dream["frames"].min()) >= 0.0 and float(dream["frames"].max()) <= 1.0
    # the same dream one step at a time, as a Gymnasium DreamEnv would run it
    s = state
    for t in range(4):
        frame, s = model.step_prior(s, batch["prev_action"][:, K + t], sample=False)
        torch.testing.assert_close(frame, dream["frames"][:, t])
    res = model.predict_open_loop(batch["obs"], batch["prev_action"], batch["pose"], K)
    torch.testing.assert_close(res["pred"], dream["frames"])
    assert res["recon"].shape == (3, 7, 28, 28, 1)


def test_pose_address_refuses_to_dream_without_pose():
    model = GTMM(tiny_config(address="pose"))
    state = model.init_state(2)
    with pytest.raises(ValueError, match="pose"):
        model.step_prior(state, torch.zeros(2, dtype=torch.long))


def test_prior_can_recall_through_the_memory():
    """With the pose address, a revisit's prior must come from the memory: zeroing the read changes it."""
    torch.manual_seed(0)
    model = GTMM(tiny_config(memory="introspective", address="pose")).eval()
    batch = random_batch(model.cfg, B=2, T=6)
    batch["pose"][:, 4] = batch["pose"][:, 1]  # step 4 revisits step 1's place
    with torch.no_grad():
        out = model.observe(batch["obs"], batch["prev_action"], batch["pose"], sample=False)
    assert out["read"].shape == (2, 6, model.cell.memory.read_dim)
    assert out["read"][:, 4].abs().sum() > 0  # something was read at the revisit


def test_checkpoint_roundtrip_rebuilds_the_same_model(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(obs_shape=(64, 64, 3), memory="introspective", address="hidden")
    model = GTMM(cfg)
    train_cfg = dataclasses.replace(TrainConfig(), preset="debug", seq_len=6)
    path = checkpoint.save(tmp_path / "run" / "ckpt.pt", model=model, optimizer=None, config=train_cfg, step=7)
    assert not list((tmp_path / "run").glob(".*tmp"))  # the atomic write left no temp file
    loaded, loaded_cfg = checkpoint.load(tmp_path / "run", "cpu")
    assert loaded_cfg == train_cfg and loaded.cfg == cfg and not loaded.training
    batch = random_batch(cfg)
    with torch.no_grad():
        a = model.eval().observe(batch["obs"], batch["prev_action"], batch["pose"], sample=False)
        b = loaded.observe(batch["obs"], batch["prev_action"], batch["pose"], sample=False)
    torch.testing.assert_close(a["nll"], b["nll"])
    assert checkpoint.load_raw(path)["step"] == 7
    with pytest.raises(ValueError, match="no such file"):
        checkpoint.load(tmp_path / "missing", "cpu")


def test_robust_prior_kl_is_an_upper_bound_that_caps_a_confident_miss():
    """`outlier_kl`: eps = 0 is the Gaussian KL; otherwise it bounds the true KL to the mixture from above (Monte
    Carlo, 200k draws), adds -log(1 - eps) to a good match, and caps a confident wrong prior near
    -log eps + KL(q || N(0, I))."""
    from worldmodel.nets import gaussian_kl, outlier_kl

    torch.manual_seed(0)
    qm, qs = torch.randn(3, 4) * 2, torch.rand(3, 4) * 0.5 + 0.1
    pm, ps = qm + torch.randn(3, 4) * torch.tensor([[0.0], [1.0], [8.0]]), torch.full((3, 4), 0.2)
    assert torch.equal(outlier_kl(qm, qs, pm, ps, 0.0), gaussian_kl(qm, qs, pm, ps))
    eps = 0.01
    bound = outlier_kl(qm, qs, pm, ps, eps)  # (3,)
    z = qm + qs * torch.randn(200_000, 3, 4)  # (S, 3, 4) draws of q
    normal = torch.distributions.Normal
    log_q = normal(qm, qs).log_prob(z).sum(-1)
    log_p = torch.logaddexp(normal(pm, ps).log_prob(z).sum(-1) + torch.log1p(torch.tensor(-eps)),
                            normal(0.0, 1.0).log_prob(z).sum(-1) + torch.log(torch.tensor(eps)))
    true_kl = (log_q - log_p).mean(0)  # (3,)
    assert (bound >= true_kl - 0.05).all(), (bound, true_kl)
    plain, broad = gaussian_kl(qm, qs, pm, ps), gaussian_kl(qm, qs, torch.zeros(3, 4), torch.ones(3, 4))
    assert (bound <= torch.minimum(plain - torch.log1p(torch.tensor(-eps)), broad - torch.log(torch.tensor(eps)))).all()
    assert bound[0] == pytest.approx(plain[0].item() - torch.log1p(torch.tensor(-eps)).item(), abs=1e-3)
    assert plain[2] > 1000 and bound[2] <= broad[2] - torch.log(torch.tensor(eps)) + 1e-4  # the miss is capped
