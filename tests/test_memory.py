"""GTMM memories and address pathways: shapes, gradients, FIFO order, recall by address, gating, compile-safety."""

from __future__ import annotations

import pytest
import torch

from worldmodel.address import ADDRESSES, build_address
from worldmodel.memory import MEMORIES, build_memory

B, H, A, Z, N, R = 3, 16, 8, 5, 6, 2
NUM_ACTIONS, POSE_DIM = 4, 3


def make(name: str, **kw):
    torch.manual_seed(0)
    return build_memory(name, z_dim=Z, h_dim=H, addr_dim=A, slots=N, heads=R, **kw)


def run_steps(memory, address, T: int, seed: int = 0):
    """The model's step order (address -> read -> write) on random controller states; returns reads and states."""
    g = torch.Generator().manual_seed(seed)
    mem_state = memory.init_state(B, "cpu")
    addr_state = address.init_state(B, "cpu")
    reads, zs = [], []
    for _ in range(T):
        h = torch.randn(B, H, generator=g)
        prev_action = torch.randint(-1, NUM_ACTIONS, (B,), generator=g)
        pose = torch.randn(B, POSE_DIM, generator=g)
        z = torch.randn(B, Z, generator=g)
        addr, addr_state = address.step(addr_state, h, prev_action, pose)
        reads.append(memory.read(mem_state, h, addr))
        mem_state = memory.write(mem_state, h, addr, z)
        zs.append(z)
    return torch.stack(reads, 1), mem_state, torch.stack(zs, 1)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="introspective"):
        build_memory("lstm", z_dim=Z, h_dim=H, addr_dim=A)
    with pytest.raises(ValueError, match="hidden"):
        build_address("gps", h_dim=H, num_actions=NUM_ACTIONS, pose_dim=POSE_DIM, addr_dim=A)
    with pytest.raises(ValueError, match="pose_dim=0"):
        build_address("pose", h_dim=H, num_actions=NUM_ACTIONS, pose_dim=0, addr_dim=A)
    with pytest.raises(ValueError, match="num_actions"):
        build_address("actions", h_dim=H, num_actions=0, pose_dim=0, addr_dim=A)
    with pytest.raises(ValueError, match="integrator"):
        build_address("actions", h_dim=H, num_actions=NUM_ACTIONS, pose_dim=0, addr_dim=A, integrator="kalman")


@pytest.mark.parametrize("name", MEMORIES)
@pytest.mark.parametrize("kind", ADDRESSES)
def test_shapes_and_finite_grads_to_every_parameter(name, kind):
    memory = make(name)
    torch.manual_seed(1)
    address = build_address(kind, h_dim=H, num_actions=NUM_ACTIONS, pose_dim=POSE_DIM, addr_dim=A)
    reads, state, _ = run_steps(memory, address, T=N + 2)
    expected_read_dim = 0 if name == "none" else R * Z
    assert memory.read_dim == expected_read_dim
    assert reads.shape == (B, N + 2, expected_read_dim)
    assert all(torch.isfinite(v).all() for v in state.values())
    if name == "none":
        assert list(memory.parameters()) == []
        return
    (reads.square().sum() + sum(v.square().sum() for v in state.values())).backward()
    for module in (memory, address):
        for pname, p in module.named_parameters():
            assert p.grad is not None, f"{name}/{kind}: no gradient for {pname}"
            assert torch.isfinite(p.grad).all(), f"{name}/{kind}: non-finite gradient for {pname}"
            assert p.grad.abs().sum() > 0, f"{name}/{kind}: zero gradient for {pname}"


def test_store_h_widens_the_content():
    memory = make("introspective", store_h=True)
    address = build_address("hidden", h_dim=H, num_actions=NUM_ACTIONS, pose_dim=POSE_DIM, addr_dim=A)
    reads, state, _ = run_steps(memory, address, T=3)
    assert memory.read_dim == R * (Z + H) and reads.shape == (B, 3, R * (Z + H))
    assert state["content"].shape == (B, N, Z + H)


def test_fifo_holds_exactly_the_last_L_latents_in_order():
    memory = make("introspective")
    address = build_address("pose", h_dim=H, num_actions=NUM_ACTIONS, pose_dim=POSE_DIM, addr_dim=A)
    _, state, zs = run_steps(memory, address, T=3)  # not yet full: the first N-3 slots are still empty
    assert torch.equal(state["filled"], torch.tensor([[0.0] * (N - 3) + [1.0] * 3] * B))
    assert torch.equal(state["content"][:, N - 3:], zs)
    T = N + 4
    _, state, zs = run_steps(memory, address, T=T)
    assert torch.equal(state["content"], zs[:, T - N:])  # oldest first, newest last
    assert torch.equal(state["filled"], torch.ones(B, N))


def set_linear(layer, bias):
    layer.weight.zero_()
    layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype).expand_as(layer.bias))


def sharpen(memory, beta: float = 200.0):
    """Set the gates by hand so that every read is exactly by address and every write takes a fresh slot:
    identity keys, huge sharpness, read gate open, plus each memory's own write/location gates."""
    with torch.no_grad():
        memory.keys.from_addr.weight.copy_(torch.eye(A).repeat(R, 1))
        set_linear(memory.keys.sharpness, beta)
        set_linear(memory.gate.from_h, 20.0)
        big = 20.0
        if hasattr(memory, "read_location"):  # ntm: reads by content only; the write head steps one slot forward
            set_linear(memory.read_location.interpolation, big)
            set_linear(memory.read_location.shift, torch.tensor([-big, big, -big]).repeat(R))
            set_linear(memory.read_location.sharpening, -big)
            set_linear(memory.write_location.interpolation, -big)
            set_linear(memory.write_location.shift, torch.tensor([-big, -big, big]))
            set_linear(memory.write_location.sharpening, big)
            set_linear(memory.erase, big)
        if hasattr(memory, "usage_decay"):  # lru: always the least-used slot
            set_linear(memory.write_gate, -big)
        if hasattr(memory, "allocation_gate"):  # dnc: content-mode reads, always write to an allocated slot
            set_linear(memory.read_modes, torch.tensor([-big, big, -big]).repeat(R))
            set_linear(memory.free_gates, -big)
            set_linear(memory.write_gate, big)
            set_linear(memory.allocation_gate, big)
            set_linear(memory.erase, big)
    return memory


SLOT_MEMORIES = [m for m in MEMORIES if m != "none"]


@pytest.mark.parametrize("name", SLOT_MEMORIES)
def test_a_read_at_an_earlier_address_returns_that_steps_latent(name):
    memory = sharpen(make(name))
    g = torch.Generator().manual_seed(3)
    T = N - 1
    addrs = torch.randn(T, B, A, generator=g)  # distinct random places
    zs = torch.randn(T, B, Z, generator=g)  # distinct latents seen there
    h = torch.zeros(B, H)
    state = memory.init_state(B, "cpu")
    for t in range(T):
        state = memory.write(state, h, addrs[t], zs[t])
    for t in range(T):
        out = memory.attend(state, h, addrs[t])
        assert torch.allclose(out["read"].view(B, R, Z), zs[t].unsqueeze(1).expand(B, R, Z), atol=1e-3), (name, t)
        assert out["gate"].min() > 0.99


@pytest.mark.parametrize("name", SLOT_MEMORIES)
def test_reading_an_empty_memory_is_finite_and_gated_off(name):
    memory = make(name)
    state = memory.init_state(B, "cpu")
    h = torch.randn(B, H, requires_grad=True)
    addr = torch.randn(B, A, requires_grad=True)
    out = memory.attend(state, h, addr)
    assert torch.isfinite(out["weights"]).all()
    assert torch.equal(out["gate"], torch.zeros(B, R))
    assert torch.equal(out["read"], torch.zeros(B, memory.read_dim))
    out["read"].sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(addr.grad).all()


def test_the_gate_closes_when_nothing_matches_the_address():
    memory = make("introspective")
    g = torch.Generator().manual_seed(4)
    h = torch.zeros(B, H)
    here = torch.randn(B, A, generator=g)
    state = memory.write(memory.init_state(B, "cpu"), h, here, torch.randn(B, Z, generator=g))
    same = memory.attend(state, h, here)["gate"]
    opposite = memory.attend(state, h, -here)["gate"]  # cosine -1 with the only stored address
    assert (same > 0.9).all() and (opposite < 0.1).all()


def test_pose_address_is_a_function_of_the_pose():
    address = build_address("pose", h_dim=H, num_actions=NUM_ACTIONS, pose_dim=POSE_DIM, addr_dim=A, pose_scale=0.5)
    pose = torch.randn(B, POSE_DIM)
    a1, _ = address.step({}, torch.randn(B, H), torch.tensor([0, 1, -1]), pose)
    a2, _ = address.step({}, torch.randn(B, H), torch.tensor([2, -1, 3]), pose.clone())
    assert torch.equal(a1, a2)
    assert torch.allclose(a1.norm(dim=-1), torch.ones(B))
    wide = build_address("pose", h_dim=H, num_actions=NUM_ACTIONS, pose_dim=POSE_DIM, addr_dim=64, pose_scale=0.5)
    near, _ = wide.step({}, torch.zeros(1, H), torch.tensor([-1]), torch.zeros(1, POSE_DIM))
    far, _ = wide.step({}, torch.zeros(1, H), torch.tensor([-1]), torch.full((1, POSE_DIM), 10.0))
    assert (near * far).sum() < 0.5  # unit vectors: this is their cosine


def test_additive_action_path_returns_to_its_start_after_out_and_back():
    inverse = (1, 0, 3, 2)  # up/down, left/right
    address = build_address("actions", h_dim=H, num_actions=4, pose_dim=0, addr_dim=A, integrator="additive",
                            inverse_actions=inverse)
    state = address.init_state(B, "cpu")
    h = torch.zeros(B, H)
    start, state = address.step(state, h, torch.full((B,), -1), torch.zeros(B, 0))
    out = [[0, 2, 2, 1], [3, 3, 3, 0], [1, 1, 2, 3]]
    back = [[inverse[a] for a in reversed(path)] for path in out]
    visited = []
    for t in range(4):
        addr, state = address.step(state, h, torch.tensor([p[t] for p in out]), torch.zeros(B, 0))
        visited.append(addr)
    for t in range(4):
        addr, state = address.step(state, h, torch.tensor([p[t] for p in back]), torch.zeros(B, 0))
    assert torch.allclose(addr, start, atol=1e-5)
    assert not torch.allclose(visited[1], start, atol=1e-2)
    with pytest.raises(ValueError, match="involution"):
        build_address("actions", h_dim=H, num_actions=4, pose_dim=0, addr_dim=A, integrator="additive",
                      inverse_actions=(1, 2, 3, 0))


def test_no_action_leaves_the_action_path_where_it_is():
    for integrator in ("gru", "additive"):
        address = build_address("actions", h_dim=H, num_actions=4, pose_dim=0, addr_dim=A, integrator=integrator)
        state = address.init_state(B, "cpu")
        first, state = address.step(state, torch.zeros(B, H), torch.tensor([0, 1, 2]), torch.zeros(B, 0))
        again, state = address.step(state, torch.zeros(B, H), torch.full((B,), -1), torch.zeros(B, 0))
        assert torch.allclose(first, again), integrator


@pytest.mark.parametrize("name", MEMORIES)
def test_step_traces_as_one_graph(name):
    """No .item(), no Python branch on tensor values: dynamo captures the whole step without a graph break."""
    torch._dynamo.reset()
    memory = make(name)
    address = build_address("actions", h_dim=H, num_actions=NUM_ACTIONS, pose_dim=POSE_DIM, addr_dim=A)

    def step(mem_state, addr_state, h, prev_action, pose, z):
        addr, addr_state = address.step(addr_state, h, prev_action, pose)
        read = memory.read(mem_state, h, addr)
        return read, memory.write(mem_state, h, addr, z), addr_state

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    mem_state, addr_state = memory.init_state(B, "cpu"), address.init_state(B, "cpu")
    read, mem_state, addr_state = compiled(mem_state, addr_state, torch.randn(B, H), torch.tensor([0, -1, 3]),
                                           torch.randn(B, POSE_DIM), torch.randn(B, Z))
    assert read.shape == (B, memory.read_dim)


def write_sequence(memory, T: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    addrs, zs = torch.randn(T, B, A, generator=g), torch.randn(T, B, Z, generator=g)
    state = memory.init_state(B, "cpu")
    for t in range(T):
        state = memory.write(state, torch.zeros(B, H), addrs[t], zs[t])
    return state, addrs, zs


def test_ntm_write_head_is_a_ring_that_overwrites_the_oldest_slot():
    memory = sharpen(make("ntm"))
    state, addrs, zs = write_sequence(memory, T=N + 2)
    # writes went to slots 1, 2, ..., N-1, 0, 1, 2: the last N writes fill the ring, the two oldest are gone
    expected = torch.stack([zs[t] for t in (N - 1, N, N + 1, 2, 3, 4)], dim=1)  # slot order 0..N-1
    assert torch.allclose(state["content"], expected, atol=1e-4)
    out = memory.attend(state, torch.zeros(B, H), addrs[N + 1])
    assert torch.allclose(out["read"].view(B, R, Z)[:, 0], zs[N + 1], atol=1e-3)


def test_lru_recycles_the_least_used_slot_once_full():
    memory = sharpen(make("lru"))
    state, addrs, zs = write_sequence(memory, T=N)
    assert torch.allclose(state["content"], zs.transpose(0, 1), atol=1e-5)  # empty slots filled in order
    assert torch.equal(state["written"], torch.ones(B, N))
    g = torch.Generator().manual_seed(6)
    h = torch.zeros(B, H)
    for _ in range(3):  # sigmoid(alpha) = 0: each new write replaces the then least-used slot, the rest stays
        least_used = state["usage"].argmin(-1)  # (B,)
        before = state["content"]
        z_new = torch.randn(B, Z, generator=g)
        state = memory.write(state, h, torch.randn(B, A, generator=g), z_new)
        replaced = torch.nn.functional.one_hot(least_used, N).bool()  # (B, N)
        assert torch.allclose(state["content"][replaced], z_new, atol=1e-5)
        assert torch.allclose(state["content"][~replaced], before[~replaced], atol=1e-6)


def test_dnc_allocates_fresh_slots_and_its_links_follow_the_write_order():
    memory = sharpen(make("dnc"))
    T = N - 2
    g = torch.Generator().manual_seed(5)
    addrs, zs = torch.randn(T, B, A, generator=g), torch.randn(T, B, Z, generator=g)
    state = memory.init_state(B, "cpu")
    h = torch.zeros(B, H)
    slots = []
    for t in range(T):
        state = memory.write(state, h, addrs[t], zs[t])
        assert state["write_weights"].max(-1).values.min() > 0.99  # one slot per write
        slots.append(state["write_weights"].argmax(-1))  # (B,)
    slots = torch.stack(slots, 1)  # (B, T)
    assert all(len(set(row.tolist())) == T for row in slots)  # every write took a fresh slot
    with torch.no_grad():  # "last read = the slot of item 1"; the forward link leads to item 2, the backward to item 0
        state = dict(state, read_weights=torch.nn.functional.one_hot(slots[:, 1:2].expand(B, R), N).float())
        memory.read_modes.bias.copy_(torch.tensor([-20.0, -20.0, 20.0]).repeat(R))
        forward = memory.attend(state, h, addrs[0])["read"].view(B, R, Z)
        memory.read_modes.bias.copy_(torch.tensor([20.0, -20.0, -20.0]).repeat(R))
        backward = memory.attend(state, h, addrs[0])["read"].view(B, R, Z)
    assert torch.allclose(forward[:, 0], zs[2], atol=1e-3)
    assert torch.allclose(backward[:, 0], zs[0], atol=1e-3)


def test_dnc_allocation_prefers_the_freest_slot():
    from worldmodel.memory.dnc import allocation_weights

    usage = torch.tensor([[1.0, 0.2, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    a = allocation_weights(usage)
    assert a[0].argmax() == 3 and a[0, 3] > 0.99 and a[0, 0] < 1e-3
    assert a[1, 0] > 0.99 and a[1, 1:].sum() < 1e-3  # ties: lowest index first


def test_reset_state_restarts_only_the_flagged_rows():
    from worldmodel.memory import reset_state

    memory = make("dnc")
    state, _, _ = write_sequence(memory, T=3)
    fresh = memory.init_state(B, "cpu")
    restarted = reset_state(state, fresh, torch.tensor([True, False, True]))
    for key, value in restarted.items():
        assert torch.equal(value[0], fresh[key][0]) and torch.equal(value[2], fresh[key][2]), key
        assert torch.equal(value[1], state[key][1]), key


def test_bad_address_options_are_value_errors():
    with pytest.raises(ValueError, match="pose_scale"):
        build_address("pose", h_dim=H, num_actions=0, pose_dim=3, addr_dim=A, pose_scale=(1.0, 2.0))
    with pytest.raises(ValueError, match="even"):
        build_address("pose", h_dim=H, num_actions=0, pose_dim=3, addr_dim=7)
    with pytest.raises(ValueError, match="additive"):
        build_address("actions", h_dim=H, num_actions=2, pose_dim=0, addr_dim=A, inverse_actions=(1, 0))


def test_a_readout_learns_to_recall_what_was_seen_at_a_place():
    """End to end: random walks on a 3x3 grid, a new random latent per cell each episode; predicting the current
    cell's latent from the memory read alone (the controller state carries nothing) is only possible by place."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    grid, T, batch = 3, 12, 16
    memory = build_memory("introspective", z_dim=Z, h_dim=H, addr_dim=A, slots=T, heads=1)
    address = build_address("actions", h_dim=H, num_actions=4, pose_dim=0, addr_dim=A, integrator="additive")
    readout = torch.nn.Linear(memory.read_dim, Z)
    optimizer = torch.optim.Adam([*memory.parameters(), *address.parameters(), *readout.parameters()], lr=3e-2)
    moves = torch.tensor([[-1, 0], [1, 0], [0, -1], [0, 1]])
    rows = torch.arange(batch)

    def episode_loss():
        cells = torch.randn(batch, grid * grid, Z, generator=g)
        pos = torch.randint(0, grid, (batch, 2), generator=g)
        prev_action = torch.full((batch,), -1)
        seen = torch.zeros(batch, grid * grid, dtype=torch.bool)
        mem_state, addr_state, h = memory.init_state(batch), address.init_state(batch), torch.zeros(batch, H)
        errors, revisits = [], []
        for _ in range(T):
            cell = pos[:, 0] * grid + pos[:, 1]
            addr, addr_state = address.step(addr_state, h, prev_action, torch.zeros(batch, 0))
            prediction = readout(memory.read(mem_state, h, addr))
            errors.append((prediction - cells[rows, cell]).square().mean(-1))
            revisits.append(seen[rows, cell].clone())
            seen[rows, cell] = True
            mem_state = memory.write(mem_state, h, addr, cells[rows, cell])
            action = torch.randint(0, 4, (batch,), generator=g)
            moved = pos + moves[action]
            inside = ((moved >= 0) & (moved < grid)).all(-1)  # a move off the grid is not taken: no action
            prev_action = torch.where(inside, action, torch.full_like(action, -1))
            pos = torch.where(inside.unsqueeze(-1), moved, pos)
        errors, revisits = torch.stack(errors, 1), torch.stack(revisits, 1)
        return (errors * revisits).sum() / revisits.sum()

    first = episode_loss().item()
    for _ in range(40):
        loss = episode_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = sum(episode_loss().item() for _ in range(3)) / 3
    assert first > 0.8 and last < 0.3, (first, last)  # the latents have unit variance: 1.0 = no recall at all
