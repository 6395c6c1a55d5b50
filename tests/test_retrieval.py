"""Retrieval accuracy: write attribution (FIFO exact, soft writes by mass) and where reads land on a revisit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envs.mnist_map import MnistMapEnv
from worldmodel.address import ADDRESSES
from worldmodel.config import ModelConfig
from worldmodel.memory import MEMORIES, build_memory
from worldmodel.memory.base import slot_shares
from worldmodel.model import GTMM, frames_to_float
from worldmodel.retrieval import attribution_per_step, retrieval_from_steps, retrieval_per_step

torch.set_num_threads(1)

B, H, A, Z, N, R = 3, 16, 8, 5, 4, 2
SOFT = ("ntm", "lru", "dnc")


def make_memory(name: str, **kw):
    torch.manual_seed(0)
    return build_memory(name, z_dim=Z, h_dim=H, addr_dim=A, slots=N, heads=R, **kw)


def write_steps(memory, T: int, seed: int = 0):
    """T writes of random (h, addr, z); returns the states after each write and the latents written."""
    g = torch.Generator().manual_seed(seed)
    state, states, zs = memory.init_state(B, "cpu"), [], []
    for _ in range(T):
        z = torch.randn(B, Z, generator=g)
        state = memory.write(state, torch.randn(B, H, generator=g), torch.randn(B, A, generator=g), z)
        states.append(state)
        zs.append(z)
    return states, torch.stack(zs, 1)  # list of T states, (B, T, Z)


def test_fifo_attribution_is_exact():
    """Slot n of M_{t-1} (what the read of step t sees) holds exactly the write of step t - N + n."""
    memory = make_memory("introspective")
    T = N + 3
    states, zs = write_steps(memory, T)
    shares = list(attribution_per_step(memory, {}, B, T + 1))  # shares[t]: M_{t-1}, t in [0, T]
    for t in range(T + 1):
        expected = torch.zeros(B, t, N)
        for n in range(N):
            if 0 <= t - N + n < t:
                expected[:, t - N + n, n] = 1.0
        assert torch.equal(shares[t], expected), t
        if t > 0:  # the memory really holds those latents
            content = states[t - 1]["content"]  # (B, N, Z)
            assert torch.allclose(torch.einsum("bsn,bsz->bnz", shares[t], zs[:, :t]), content), t


def test_soft_attribution_of_a_hand_made_write_sequence():
    """a_t[s, n] = w_s[n] prod_{s < s' <= t} rho_s'[n], rho = 1 - w e, worked by hand on two slots."""
    memory = make_memory("ntm")  # the base class's erase/add recursion
    e = 0.8
    w = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.0, 1.0]])  # (T=3, N=2) write weights, one batch row
    coefficients = torch.zeros(1, 0, 2)
    for t in range(3):
        record = {"write_weights": w[t:t + 1], "write_retain": 1.0 - e * w[t:t + 1]}
        coefficients = memory.attribute(coefficients, record)
    hand = torch.tensor([
        [0.9 * (1 - 0.8 * 0.5) * (1 - 0.8 * 0.0), 0.1 * (1 - 0.8 * 0.5) * (1 - 0.8 * 1.0)],  # step 0: 0.54, 0.012
        [0.5 * (1 - 0.8 * 0.0), 0.5 * (1 - 0.8 * 1.0)],  # step 1: 0.5, 0.1
        [0.0, 1.0],  # step 2
    ])
    assert torch.allclose(coefficients[0], hand)
    shares = slot_shares(coefficients)[0]
    # slot 0 sums to 1.04 > 1 (an erase below 1 leaves some old content under the new): scaled down to 1
    assert torch.allclose(shares[:, 0], hand[:, 0] / hand[:, 0].sum())
    assert torch.allclose(shares[:, 1], hand[:, 1] / hand[:, 1].sum())  # 1.112 -> 1
    assert torch.allclose(slot_shares(coefficients[:, :1])[0], hand[:1])  # sums below 1: unchanged


@pytest.mark.parametrize("name", SOFT)
def test_soft_attribution_reconstructs_the_memory_content(name):
    """With an erase that is the same in every dimension the attribution is exact: the content of every slot is the
    coefficient-weighted sum of the latents written; the shares sum to at most 1 per slot."""
    memory = make_memory(name)
    with torch.no_grad():
        if hasattr(memory, "erase"):  # ntm, dnc: e = sigmoid(1) in every dimension, a partial erase
            memory.erase.weight.zero_()
            memory.erase.bias.fill_(1.0)
        if hasattr(memory, "usage_decay"):  # lru: sigmoid(alpha) ~ 0.5, half the write goes to the slots just read
            memory.write_gate.bias.fill_(0.0)
    T = 2 * N + 1
    states, zs = write_steps(memory, T)
    coefficients = torch.zeros(B, 0, N)
    for t in range(T):
        coefficients = memory.attribute(coefficients, memory.write_record(states[t]))
        content = states[t]["content"]  # (B, N, Z), started from zeros
        assert torch.allclose(torch.einsum("bsn,bsz->bnz", coefficients, zs[:, :t + 1]), content, atol=1e-5), (name, t)
    assert ((coefficients > 0.01) & (coefficients < 0.99)).any()  # the writes really were soft ...
    assert (coefficients.sum(1) > 1.01).any()  # ... and some slots hold more than one write's worth
    shares = slot_shares(coefficients)
    assert (shares >= 0).all() and (shares.sum(1) <= 1 + 1e-6).all()
    # the per-step helper agrees with the loop above
    records = {k: torch.stack([memory.write_record(s)[k] for s in states], 1) for k in ("write_weights", "write_retain")}
    assert torch.allclose(list(attribution_per_step(memory, records, B, T + 1))[T], shares)


def test_figures_of_hand_made_reads():
    """FIFO of 4 slots, places a, b, a, b: at step 2 memory holds [-, -, a, b], at step 3 [-, a, b, a]."""
    memory = make_memory("introspective")
    pose = torch.tensor([[[0.0, 0.0], [0.0, 14.0], [0.0, 0.0], [0.0, 14.0]]])  # (1, T=4, 2)
    weights = torch.zeros(1, 4, R, N)
    weights[0, 2, 0] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # head 0 on the slot of step 0 (same place)
    weights[0, 2, 1] = torch.tensor([0.0, 0.0, 0.3, 0.7])  # head 1 mostly on step 1's slot (the other place)
    weights[0, 3, 0] = torch.tensor([0.0, 0.2, 0.6, 0.2])  # head 0 mostly on step 1's slot (same place)
    weights[0, 3, 1] = torch.tensor([0.0, 0.5, 0.0, 0.5])  # head 1 on two slots of the other place
    gate = torch.rand(1, 4, R)
    figures = retrieval_from_steps(memory, weights, gate, {}, pose)
    assert figures["target"].tolist() == [[False, False, True, True]]
    nan = float("nan")
    assert torch.equal(figures["precision_at_1"][0].nan_to_num(-1), torch.tensor([[-1, -1], [-1, -1], [1, 0], [1, 0.0]]))
    assert torch.allclose(figures["correct_mass"][0], torch.tensor([[nan, nan], [nan, nan], [1.0, 0.3], [0.6, 0.0]]),
                          equal_nan=True)
    assert torch.allclose(figures["chance_mass"][0], torch.tensor([nan, nan, 1 / 2, 1 / 3]), equal_nan=True)
    assert torch.equal(figures["gate"], gate)


def test_none_attribution_has_no_slots():
    memory = make_memory("none")
    assert memory.write_record(memory.init_state(B)) == {}
    assert memory.attribute(torch.zeros(B, 2, 0), {}).shape == (B, 3, 0)


# -- the model on out-and-back walks -----------------------------------------------------------------------------

OUT = 4  # steps out, then the same number back: T = 2 * OUT + 1 frames
CONTEXT = OUT + 1  # the context sees the way out; every open-loop step revisits a context place


def out_and_back(episodes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """MNIST-map episodes (wrap border: every move has an exact inverse) that walk OUT random steps and back."""
    env = MnistMapEnv(grid=3, border="wrap", max_steps=64)
    rng = np.random.default_rng(seed)
    obs, actions, poses = [], [], []
    for e in range(episodes):
        frame, info = env.reset(seed=seed + e)
        way_out = [int(a) for a in rng.integers(0, 4, OUT)]
        path = way_out + [env.inverse_actions[a] for a in reversed(way_out)]
        frames, pose = [frame], [info["pose"]]
        for action in path:
            frame, _, _, _, info = env.step(action)
            frames.append(frame)
            pose.append(info["pose"])
        obs.append(frames)
        actions.append([-1] + path)
        poses.append(pose)
    poses = np.asarray(poses, dtype=np.float32)
    assert np.array_equal(poses[:, 0], poses[:, -1])  # back at the start
    return {"obs": np.asarray(obs, dtype=np.uint8), "prev_action": np.asarray(actions), "pose": poses}


def tiny_model(memory: str, address: str, seed: int = 0, **kw) -> GTMM:
    torch.manual_seed(seed)
    address_kwargs = {"pose_scale": 7.0} if address == "pose" else {}  # poses 14 px apart: orthogonal addresses
    cfg = ModelConfig(num_actions=4, pose_dim=2, memory=memory, address=address, z_dim=8, h_dim=32, addr_dim=16,
                      slots=2 * OUT + 1, heads=R, embed_dim=32, channels=8, hidden_dim=32,
                      address_kwargs=address_kwargs, **kw)
    return GTMM(cfg).eval()


@pytest.fixture(scope="module")
def walks() -> dict[str, np.ndarray]:
    return out_and_back(episodes=12)


@pytest.mark.parametrize("memory", ["introspective", *SOFT])
def test_a_pose_address_finds_the_earlier_visit(walks, memory):
    """Untrained, the read keys are the identity of the address: with the true pose as the address, the top slot of
    every head is a write of the same place at every revisit."""
    result = retrieval_per_step(tiny_model(memory, "pose"), walks["obs"], walks["prev_action"], walks["pose"],
                                context=CONTEXT)
    assert result["target"].shape == (12, OUT)
    assert result["target"].all() and result["target_from_context"].all()  # every way-back step revisits
    assert np.array_equal(result["precision_at_1"], np.ones((12, OUT, R)))
    assert np.nanmin(result["correct_mass"]) > 0.8  # init sharpness 10 puts most of the mass there too
    assert np.nanmax(result["chance_mass"]) < 0.6  # ... far above what a uniform read would get
    # the context steps: revisits of the way out (a step out that undoes the previous one) are targets too
    assert result["context_target"].shape == (12, CONTEXT) and not result["context_target"][:, :2].any()
    assert (result["context_precision_at_1"][result["context_target"]] == 1.0).all()


def test_an_untrained_hidden_address_retrieves_at_chance(walks):
    """The controller state of an untrained model says little about the place: reads land near chance."""
    result = retrieval_per_step(tiny_model("introspective", "hidden"), walks["obs"], walks["prev_action"],
                                walks["pose"], context=CONTEXT)
    target = result["target"]
    assert target.all()
    precision = result["precision_at_1"][target].mean()
    mass, chance = result["correct_mass"][target].mean(), result["chance_mass"][target].mean()
    assert precision < 0.7, precision
    assert abs(mass - chance) < 0.1, (mass, chance)


def test_no_memory_has_no_target(walks):
    result = retrieval_per_step(tiny_model("none", "pose"), walks["obs"][:2], walks["prev_action"][:2],
                                walks["pose"][:2], context=CONTEXT)
    assert not result["target"].any() and not result["target_from_context"].any()
    assert result["precision_at_1"].shape == (2, OUT, R) and np.isnan(result["precision_at_1"]).all()
    assert np.isnan(result["correct_mass"]).all() and np.isnan(result["chance_mass"]).all()
    assert (result["gate"] == 0).all()


@pytest.mark.parametrize("address", ADDRESSES)
@pytest.mark.parametrize("memory", MEMORIES)
def test_every_memory_and_address_gives_well_formed_figures(walks, memory, address):
    result = retrieval_per_step(tiny_model(memory, address), walks["obs"][:2], walks["prev_action"][:2],
                                walks["pose"][:2], context=3)
    T = 2 * OUT + 1
    for prefix, steps in (("", T - 3), ("context_", 3)):
        target = result[f"{prefix}target"]
        assert target.shape == (2, steps) and target.dtype == bool
        for name in ("precision_at_1", "correct_mass", "gate"):
            assert result[f"{prefix}{name}"].shape == (2, steps, R), name
        assert result[f"{prefix}chance_mass"].shape == (2, steps)
        precision, mass = result[f"{prefix}precision_at_1"], result[f"{prefix}correct_mass"]
        assert np.array_equal(np.isnan(precision), np.broadcast_to(~target[..., None], precision.shape))
        assert np.array_equal(np.isnan(mass), np.isnan(precision))
        assert np.isin(precision[~np.isnan(precision)], (0.0, 1.0)).all()
        assert ((mass[~np.isnan(mass)] >= 0) & (mass[~np.isnan(mass)] <= 1)).all()
        gate = result[f"{prefix}gate"]
        assert ((gate >= 0) & (gate <= 1)).all()
    if memory != "none":
        assert result["target"].any()  # the way back revisits places whose writes are still held


def test_bad_context_and_missing_pose_are_user_errors(walks):
    model = tiny_model("introspective", "hidden")
    with pytest.raises(ValueError, match="context 9"):
        retrieval_per_step(model, walks["obs"][:1], walks["prev_action"][:1], walks["pose"][:1], context=9)
    with pytest.raises(ValueError, match="pose"):
        retrieval_per_step(model, walks["obs"][:1], walks["prev_action"][:1], walks["pose"][:1, :, :0], context=3)


@pytest.mark.parametrize("memory", MEMORIES)
def test_the_cell_returns_the_read_attention_it_used(walks, memory):
    """`read_weights` / `read_gate` in the cell's output are those of the attend call that made the read."""
    model = tiny_model(memory, "actions")
    obs, prev_action, pose = (torch.as_tensor(walks[k][:2]) for k in ("obs", "prev_action", "pose"))
    with torch.no_grad():
        seq = model.observe(obs, prev_action, pose.float(), sample=False)
        state = model.init_state(2)
        embed = model.encoder(frames_to_float(obs)[:, 0])  # (2, E)
        out, _ = model.cell(state, prev_action[:, 0], pose[:, 0].float(), embed, sample=False)
        h = out["h"]
        addr, _ = model.cell.address.step(state.address, h, prev_action[:, 0], pose[:, 0].float())
        attention = model.cell.memory.attend(state.memory, h, addr)
    heads, slots = (0, 0) if memory == "none" else (R, model.cfg.slots)
    assert seq["read_weights"].shape == (2, 2 * OUT + 1, heads, slots)
    assert seq["read_gate"].shape == (2, 2 * OUT + 1, heads)
    assert torch.equal(out["read_weights"], attention["weights"]) and torch.equal(out["read_gate"], attention["gate"])
    assert torch.equal(out["read"], attention["read"])
    if memory in SOFT:
        assert seq["write_weights"].shape == seq["write_retain"].shape == (2, 2 * OUT + 1, slots)


def test_the_step_with_diagnostics_traces_as_one_graph():
    """The cell's step, diagnostics included, has no graph break (it can be compiled / captured later)."""
    torch._dynamo.reset()
    model = tiny_model("ntm", "actions")
    state = model.init_state(2)
    compiled = torch.compile(model.cell, backend="eager", fullgraph=True)
    out, state = compiled(state, torch.tensor([0, -1]), torch.zeros(2, 2), torch.randn(2, 32))
    assert out["read_weights"].shape == (2, R, model.cfg.slots) and out["write_retain"].shape == (2, model.cfg.slots)
