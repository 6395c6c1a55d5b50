"""The SE(2) path integrator and the blocked-move gate (issue 13): the geometry exactly, the gate learned for real.

The geometry tests use MiniWorld's declared moves (30-degree turns, 0.4 m steps) and 90-degree turns; the gate tests
collect a few tiny MiniWorld episodes, train a `debug` model on them, and walk the agent into a wall.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from envs.miniworld import INVERSE_ACTIONS, action_effects
from gtmm.cli import UserError
from worldmodel.address import build_address, se2_features
from worldmodel.gate import targets

TURN_LEFT, TURN_RIGHT, FORWARD, BACK = 0, 1, 2, 3
MOVES_90 = [[math.pi / 2, 0.0], [-math.pi / 2, 0.0], [0.0, 0.4], [0.0, -0.4]]


def se2_address(moves=MOVES_90, **kw):
    return build_address("actions", h_dim=4, num_actions=4, pose_dim=3, addr_dim=64, integrator="se2", moves=moves,
                         inverse_actions=list(INVERSE_ACTIONS), **kw)


def walk(address, actions, moved=None):
    """Addresses (T+1, addr_dim) along `actions` from the start (step 0: no action), and the final path state."""
    state = address.init_state(1)
    prev = torch.tensor([[-1] + list(actions)])
    m = None if moved is None else torch.tensor([[1.0] + list(moved)])
    out = []
    for t in range(prev.shape[1]):
        addr, state = address.step(state, torch.zeros(1, 4), prev[:, t], None, None if m is None else m[:, t])
        out.append(addr[0])
    return torch.stack(out), state["path"][0]


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1))


def test_out_and_back_and_four_quarter_turns_return_to_the_start_address():
    address = se2_address()
    out = [FORWARD, FORWARD, TURN_LEFT, FORWARD, TURN_RIGHT, FORWARD]
    back = [INVERSE_ACTIONS[a] for a in reversed(out)]
    addrs, path = walk(address, out + back)
    assert torch.allclose(path, torch.zeros(3), atol=1e-6)
    assert cos(addrs[0], addrs[-1]) == pytest.approx(1.0, abs=1e-6)
    addrs, path = walk(address, [TURN_LEFT] * 4)  # heading 2 pi: the same heading, so the same address
    assert path[2] == pytest.approx(2 * math.pi, abs=1e-6)
    assert cos(addrs[0], addrs[-1]) == pytest.approx(1.0, abs=1e-6)
    # a square walked with left turns closes too
    addrs, path = walk(address, [FORWARD, TURN_LEFT] * 4)
    assert torch.allclose(path[:2], torch.zeros(2), atol=1e-6)
    assert cos(addrs[0], addrs[-1]) == pytest.approx(1.0, abs=1e-5)


def test_different_places_and_headings_have_different_addresses():
    address = se2_address(moves=action_effects(30.0, 0.4)["moves"])
    addrs, _ = walk(address, [FORWARD, BACK, TURN_LEFT, TURN_RIGHT, FORWARD, FORWARD, FORWARD])
    start, ahead, turned, far = addrs[0], addrs[1], addrs[3], addrs[-1]
    assert cos(start, addrs[2]) == pytest.approx(1.0, abs=1e-6)  # back where it started
    assert cos(start, ahead) < 0.5 and cos(start, turned) < 0.5 and abs(cos(start, far)) < 0.2
    # forward then turn != turn then forward (the step follows the heading): with quarter turns, (0.4, 0) vs (0, 0.4)
    quarter = se2_address()
    a, path_a = walk(quarter, [FORWARD, TURN_LEFT])
    b, path_b = walk(quarter, [TURN_LEFT, FORWARD])
    assert torch.allclose(path_a, torch.tensor([0.4, 0.0, math.pi / 2])), path_a
    assert torch.allclose(path_b, torch.tensor([0.0, 0.4, math.pi / 2]), atol=1e-6), path_b
    assert cos(a[-1], b[-1]) < 0.5


def test_heading_is_periodic_in_the_encoding():
    freq = torch.randn(4, 32)
    pos = torch.zeros(2)
    near_pi = se2_features(pos, torch.tensor(math.pi - 1e-4), freq, 1.0, 0.25)
    near_minus_pi = se2_features(pos, torch.tensor(-math.pi + 1e-4), freq, 1.0, 0.25)
    assert cos(near_pi, near_minus_pi) == pytest.approx(1.0, abs=1e-4)
    pose = build_address("pose", h_dim=4, num_actions=4, pose_dim=3, addr_dim=32, se2=True, pose_scale=0.2,
                         heading_scale=0.26)
    p1 = torch.tensor([[1.0, 2.0, math.pi - 1e-4]])
    p2 = torch.tensor([[1.0, 2.0, -math.pi + 1e-4]])
    h = torch.zeros(1, 4)
    assert cos(pose.step({}, h, torch.tensor([0]), p1)[0][0], pose.step({}, h, torch.tensor([0]), p2)[0][0]) > 0.999


def test_a_blocked_move_leaves_the_path_and_sequence_equals_steps():
    address = se2_address()
    blocked, _ = walk(address, [FORWARD, FORWARD, BACK], moved=[1.0, 0.0, 1.0])
    assert cos(blocked[0], blocked[-1]) == pytest.approx(1.0, abs=1e-6)  # the second forward did not happen
    naive, _ = walk(address, [FORWARD, FORWARD, BACK])
    assert cos(naive[0], naive[-1]) < 0.5  # assuming every move happened, it is one step off
    torch.manual_seed(0)
    prev = torch.randint(-1, 4, (3, 12))
    moved = torch.rand(3, 12)
    for kw in ({}, {"moves": None}):  # declared moves, and the learned variant
        a = se2_address(**kw)
        seq, last = a.sequence(a.init_state(3), prev, None, moved)
        state, steps = a.init_state(3), []
        for t in range(12):
            addr, state = a.step(state, torch.zeros(3, 4), prev[:, t], None, moved[:, t])
            steps.append(addr)
        assert torch.allclose(torch.stack(steps, 1), seq, atol=1e-5)
        assert torch.allclose(state["path"], last["path"], atol=1e-5)


def test_learned_se2_moves_are_tied_by_the_inverse_table_and_train():
    address = se2_address(moves=None)
    table = address.se2_table()
    assert torch.allclose(table[INVERSE_ACTIONS[FORWARD]], -table[FORWARD])
    out = [FORWARD, TURN_LEFT, FORWARD]
    addrs, path = walk(address, out + [INVERSE_ACTIONS[a] for a in reversed(out)])
    assert torch.allclose(path, torch.zeros(3), atol=1e-6)
    assert address.se2_moves_learned.requires_grad
    with pytest.raises(UserError, match="moves needs 4 finite"):
        se2_address(moves=[[0.0, 1.0]])
    with pytest.raises(UserError, match="are for the se2 and lattice integrators"):
        build_address("actions", h_dim=4, num_actions=4, pose_dim=0, addr_dim=8, integrator="additive",
                      moves=MOVES_90)


def test_gate_targets_from_the_pose():
    pose = torch.tensor([[[0.0, 0.0, 0.0], [0.4, 0.0, 0.0], [0.4, 0.0, 0.0], [0.4, 0.0, 0.5], [math.nan] * 3]])
    prev = torch.tensor([[-1, FORWARD, FORWARD, TURN_LEFT, FORWARD]])
    moved, valid = targets(pose, prev)
    assert moved[0].tolist()[:4] == [0.0, 1.0, 0.0, 1.0]
    assert valid[0].tolist() == [False, True, True, True, False]  # no label at the start or for an unknown pose


# -- the gate learned on MiniWorld ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def miniworld_rollouts(tmp_path_factory, one_thread):
    from rollouts.collect import CollectConfig, collect

    out = tmp_path_factory.mktemp("mw") / "data"
    collect(CollectConfig(env="miniworld", agent="random", episodes=12, steps=40, out=out, seed=3,
                          env_kwargs='{"obs_size": 16, "num_rows": 1, "num_cols": 1, "room_size": 2.5, "num_objects": 1}',
                          progress=False))
    return out


@pytest.mark.slow
def test_the_gate_learns_to_close_on_a_walk_into_a_wall(miniworld_rollouts, tmp_path):
    import dataclasses

    import envs
    from worldmodel import checkpoint
    from worldmodel.config import preset
    from worldmodel.model import batch_to_torch
    from worldmodel.train import train

    cfg = dataclasses.replace(preset("debug"), data=str(miniworld_rollouts), out=str(tmp_path / "run"), steps=120,
                              seq_len=16, batch=8, val_every=0, progress=False, lr=3e-3)
    result = train(cfg)
    assert json_kwargs(result["config"])["gate"] is True and json_kwargs(result["config"])["integrator"] == "se2"
    losses = [loss for _, loss in result["losses"]]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])  # the tiny MiniWorld run lowers the loss
    model, _ = checkpoint.load(tmp_path / "run")
    model.eval()

    # a scripted walk: straight ahead until long after the wall stops it
    env = envs.make("miniworld", obs_size=16, num_rows=1, num_cols=1, room_size=2.5, num_objects=1, max_steps=40)
    obs, info = env.reset(seed=11)
    frames, poses, prev = [obs], [info["pose"]], [-1]
    for _ in range(14):
        obs, _, _, _, info = env.step(FORWARD)
        frames.append(obs), poses.append(info["pose"]), prev.append(FORWARD)
    env.close()
    batch = batch_to_torch({"obs": np.stack(frames)[None], "prev_action": np.array([prev]),
                            "revisit": np.zeros((1, len(prev)), bool), "pose": np.stack(poses)[None]}, "cpu")
    with torch.no_grad():
        seq = model.observe(batch["obs"], batch["prev_action"], batch["pose"], sample=False)
    label, valid = targets(batch["pose"], batch["prev_action"])
    m = torch.sigmoid(seq["gate_logits"])[0]
    blocked, moving = valid[0] & (label[0] == 0), valid[0] & (label[0] == 1)
    assert blocked.sum() >= 3 and moving.sum() >= 1, "the scripted walk must reach the wall"
    assert float(m[blocked].max()) < 0.5 < float(m[moving].min())


def json_kwargs(config):
    import json

    return json.loads(config.address_kwargs)


@pytest.mark.parametrize("address_kwargs", ["{}", '{"integrator": "additive", "inverse_actions": [1, 0, 3, 2], '
                                                  '"gate": true, "gate_walls": true}'])
def test_a_dream_on_a_clip_map_tells_the_address_of_a_blocked_move(tmp_path, one_thread, address_kwargs):
    """On the MNIST map the dream's dead reckoning knows the declared border and tells the address. The lattice
    filter (what auto picks): after the walk is stopped at the top, every start hypothesis left stands at the top
    row. The additive integrator with the gate: a move into the border leaves its path where it was."""
    import dataclasses

    from rollouts.collect import CollectConfig, collect
    from worldmodel.config import preset
    from worldmodel.dream import DreamEnv
    from worldmodel.train import train

    data = tmp_path / "data"
    collect(CollectConfig(env="mnist_map", agent="random", episodes=6, steps=12, out=data, seed=0, progress=False))
    cfg = dataclasses.replace(preset("debug"), data=str(data), out=str(tmp_path / "run"), steps=2, val_every=0,
                              progress=False, address="auto" if address_kwargs == "{}" else "actions",
                              address_kwargs=address_kwargs)
    kwargs = json_kwargs(train(cfg)["config"])
    assert kwargs["gate"] is True  # clip border: auto adds the gate
    lattice = kwargs["integrator"] == "lattice"
    assert lattice == (address_kwargs == "{}")
    env = DreamEnv(checkpoint=str(tmp_path / "run"), data=str(data), context=3, threads=1)
    env.reset(seed=0)
    held = 0
    for _ in range(6):  # up (action 0) until long after the top border stops the walk
        before = {k: v.clone() for k, v in env.dreams.state.address.items()}
        pose_before = env.dreams.pose.copy()
        _, _, _, _, info = env.step(0)
        assert info["pose_source"] in ("recorded", "integrated")
        same_pose = bool((info["pose"] == pose_before[0]).all())
        held += same_pose
        if not lattice:
            assert same_pose == torch.equal(env.dreams.state.address["path"], before["path"])
    if lattice:  # the row belief: all its weight on hypotheses now at row 0
        state = env.dreams.state.address
        weights, rows = state["log_w"][0, 0].exp(), state["place"][0, 0]
        assert float(weights[rows == 0].sum()) > 0.99
    env.close()
    assert held >= 2  # the walk reached the border


def test_gate_walls_track_reach_and_walls_and_sequence_equals_steps():
    """The additive path's wall memory (gate_walls): the projection where a move was blocked is remembered, so the
    gate's open-loop guess can tell that the same move from the same place is blocked again."""
    UP, DOWN = 0, 1
    address = build_address("actions", h_dim=4, num_actions=4, pose_dim=2, addr_dim=16, integrator="additive",
                            inverse_actions=[1, 0, 3, 2], gate=True, gate_walls=True, embed_dim=8, z_dim=4)
    state = address.init_state(1)
    for action, moved in [(UP, 1.0), (UP, 1.0), (UP, 0.0), (DOWN, 1.0)]:  # two steps up, blocked, one back down
        _, state = address.step(state, torch.zeros(1, 4), torch.tensor([action]), None, torch.tensor([moved]))
    behind, to_wall, span = address.gate_features(state)[0].split(4)
    assert to_wall[UP] == pytest.approx(1.0, abs=1e-5)  # the top border is one up-step away
    assert to_wall[DOWN] == pytest.approx(4.0)  # no wall seen downwards (clamped "far")
    assert behind[UP] == pytest.approx(-1.0, abs=1e-5) and span[UP] == pytest.approx(2.0, abs=1e-5)
    torch.manual_seed(0)
    prev, moved = torch.randint(-1, 4, (3, 10)), (torch.rand(3, 10) > 0.3).float()
    seq, last = address.sequence(address.init_state(3), prev, None, moved)
    state, steps, features = address.init_state(3), [], []
    for t in range(10):
        features.append(address.gate_features(state))
        addr, state = address.step(state, torch.zeros(3, 4), prev[:, t], None, moved[:, t])
        steps.append(addr)
    assert torch.allclose(torch.stack(steps, 1), seq, atol=1e-5)
    assert all(torch.allclose(state[k], last[k], atol=1e-5) for k in ("path", "reach", "wall"))
    assert torch.allclose(torch.stack(features, 1), address.gate_feature_sequence(address.init_state(3), prev, moved),
                          atol=1e-5)


CLIP_MOVES = [[-14, 0], [14, 0], [0, -14], [0, 14]]  # the MNIST map's declared moves (pixels): up, down, left, right


def lattice_address(**kw):
    return build_address("actions", h_dim=4, num_actions=4, pose_dim=2, addr_dim=64, integrator="lattice",
                         moves=CLIP_MOVES, extent=[56, 56], gate=True, embed_dim=8, z_dim=4, **kw)


def test_the_lattice_filter_reads_the_start_from_moves_and_blocks_and_hedges_in_open_loop():
    """Three moves right that all happen leave starts 0 and 1 of 5; a fourth that is blocked pins the start to 1.
    With the start known the address is the displacement's encoding exactly; in open loop (no m_t) each
    hypothesis walks on, blocked at its own edge."""
    from worldmodel.address import fourier_features

    UP, RIGHT = 0, 3
    address = lattice_address()
    state = address.init_state(1)
    h = torch.zeros(1, 4)
    for moved in (1.0, 1.0, 1.0):
        _, state = address.step(state, h, torch.tensor([RIGHT]), None, torch.tensor([moved]))
    cols = state["log_w"][0, 1].exp()
    assert cols[:2].tolist() == pytest.approx([0.5, 0.5], abs=1e-3) and float(cols[2:].sum()) < 1e-3
    assert state["log_w"][0, 0].exp().tolist() == pytest.approx([0.2] * 5)  # no row move: rows untouched
    addr, state = address.step(state, h, torch.tensor([RIGHT]), None, torch.tensor([0.0]))  # blocked
    assert float(state["log_w"][0, 1].exp()[1]) > 0.999
    # the start row is unknown, but every hypothesis has moved 0 rows: the address is exact
    assert cos(addr[0], fourier_features(torch.tensor([[0.0, 3.0]]), address.frequencies)[0]) > 0.999
    for _ in range(4):  # open loop: up 4 times; the start rows 0..4 are blocked after 0..4 steps
        addr, state = address.step(state, h, torch.tensor([UP]), None, None)
    rows = sorted((state["place"][0, 0] - torch.arange(5.0)).tolist())
    assert rows == [-4.0, -3.0, -2.0, -1.0, 0.0]  # displacement of each hypothesis
    hedged = [cos(addr[0], fourier_features(torch.tensor([[r, 3.0]]), address.frequencies)[0]) for r in rows]
    assert max(hedged) < 0.6 and min(hedged) > 0.2  # like each of the five equally likely places, none exactly
    # a walk with every start pinned gives exactly the encoding of its displacement, from step and from sequence
    prev = torch.tensor([[UP, UP, UP, UP, UP, RIGHT, RIGHT, RIGHT, RIGHT, RIGHT]])
    moved = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]])  # top-left wall met on each axis
    seq, last = address.sequence(address.init_state(1), prev, None, moved)
    assert cos(seq[0, -1], fourier_features(torch.tensor([[-4.0, 4.0]]), address.frequencies)[0]) > 0.999
    state, steps = address.init_state(1), []
    for t in range(prev.shape[1]):
        a, state = address.step(state, h, prev[:, t], None, moved[:, t])
        steps.append(a)
    assert torch.allclose(torch.stack(steps, 1), seq, atol=1e-6)
    assert not address.guesses_moves  # the model asks the gate for no open-loop guess


def test_the_lattice_filter_refuses_what_it_cannot_use():
    with pytest.raises(UserError, match=r"needs the gate"):
        build_address("actions", h_dim=4, num_actions=4, pose_dim=2, addr_dim=64, integrator="lattice",
                      moves=CLIP_MOVES, extent=[56, 56])
    with pytest.raises(UserError, match=r"whole multiples of the smallest move"):
        build_address(
            "actions", h_dim=4, num_actions=4, pose_dim=2, addr_dim=64, integrator="lattice", moves=CLIP_MOVES,
            extent=[50, 56], gate=True, embed_dim=8, z_dim=4)
    with pytest.raises(UserError, match=r"needs moves, 4 translations"):
        build_address("actions", h_dim=4, num_actions=4, pose_dim=2, addr_dim=64, integrator="lattice",
                      moves=CLIP_MOVES[:3], extent=[56, 56], gate=True, embed_dim=8, z_dim=4)
    with pytest.raises(UserError, match=r"extent \(the lattice's range\) is for integrator lattice"):
        build_address("actions", h_dim=4, num_actions=4, pose_dim=2, addr_dim=64, integrator="additive",
                      extent=[56, 56])


def test_the_lattice_place_evidence_weighs_hypotheses_and_learns_from_labels():
    """A place head that tells even from odd columns (as an MNIST frame does: a digit whole or split in two) keeps
    only the start columns of the frame's phase; the head itself learns from the pose (cross-entropy) alone."""
    address = build_address("actions", h_dim=4, num_actions=4, pose_dim=2, addr_dim=64, integrator="lattice",
                            moves=CLIP_MOVES, extent=[56, 56], gate=True, embed_dim=2, z_dim=4, place_evidence=True)
    state = address.init_state(1)
    _, same = address.step(state, torch.zeros(1, 4), torch.tensor([-1]), None, None, torch.zeros(1, 2))
    assert torch.allclose(same["log_w"], state["log_w"])  # untrained (zero) head: no evidence
    with torch.no_grad():  # e[0] = 1 says "an even column"
        address.place_head.weight.zero_()
        address.place_head.weight[5 + torch.tensor([0, 2, 4]), 0] = 5.0  # axis 1 (columns) rows of the (D*L) head
    _, state = address.step(state, torch.zeros(1, 4), torch.tensor([-1]), None, None, torch.tensor([[1.0, 0.0]]))
    cols = state["log_w"][0, 1].exp()
    assert float(cols[[1, 3]].sum()) < 0.01 and cols[[0, 2, 4]].tolist() == pytest.approx([1 / 3] * 3, abs=0.01)
    assert state["log_w"][0, 0].exp().tolist() == pytest.approx([0.2] * 5, abs=1e-4)  # rows: no word on them
    # the place loss trains the head from labels: embeddings that carry the column's parity
    torch.manual_seed(0)
    pose = torch.randint(0, 5, (8, 6, 2)).float() * 14
    embed = torch.stack([(pose[..., 1] / 14 % 2 == 0).float(), torch.ones(8, 6)], dim=-1)  # (B, T, 2)
    nn_opt = torch.optim.SGD(address.place_head.parameters(), lr=0.5)
    address.place_head.weight.data.zero_()
    first = float(address.place_loss(embed, pose).detach())  # log 5 on both axes
    for _ in range(200):
        nn_opt.zero_grad()
        address.place_loss(embed, pose).backward()
        nn_opt.step()
    # the columns' parity is learnt (rows stay at log 5: the embeddings say nothing of them): the mean of log 5 and
    # about log 2.5 at best
    assert float(address.place_loss(embed, pose).detach()) < first - 0.25
    # a step off the lattice (a pose beyond it on both axes) is skipped, whatever its frame, not an error
    off, other = pose.clone(), embed.clone()
    off[0, 0], other[0, 0] = torch.tensor([84.0, -14.0]), torch.tensor([0.0, 5.0])
    assert torch.isfinite(address.place_loss(embed, off))
    assert torch.equal(address.place_loss(embed, off), address.place_loss(other, off))


def test_the_weight_of_place_evidence_is_learnt_by_the_filters_score_of_the_true_place_alone():
    """A frame seen again and again is one piece of evidence, not T: a head that is right 70% of the time, added at
    every step of a standing walk, makes the filter sure of wrong starts. `start_loss` (-log P(true place)) lowers
    the evidence's weight tau and with it the loss; the filter the model runs uses tau detached (no ELBO gradient);
    a checkpoint from before tau loads with tau = 1."""
    address = build_address("actions", h_dim=4, num_actions=4, pose_dim=2, addr_dim=64, integrator="lattice",
                            moves=CLIP_MOVES, extent=[56, 56], gate=True, embed_dim=2, z_dim=4, place_evidence=True)
    with torch.no_grad():  # e[0] = 1 says "an even column", sharply
        address.place_head.weight.zero_()
        address.place_head.weight[5 + torch.tensor([0, 2, 4]), 0] = 3.0
    B, T = 40, 12
    column = torch.tensor([0, 2, 4, 0, 2, 4, 0, 1, 3, 1] * 4).float()  # (B,) 30% odd: the head is wrong there
    pose = torch.stack([torch.full((B,), 28.0), column * 14], dim=-1).unsqueeze(1).expand(B, T, 2)  # standing still
    prev_action, moved = torch.full((B, T), -1), torch.ones(B, T)
    embed = torch.tensor([1.0, 0.0]).expand(B, T, 2)
    opt = torch.optim.Adam([address.place_log_temperature], lr=0.1)
    first = float(address.start_loss(prev_action, moved, embed, pose).detach())
    for _ in range(60):
        opt.zero_grad()
        address.start_loss(prev_action, moved, embed, pose).backward()
        opt.step()
    tau = float(address.place_log_temperature.detach().exp())
    assert tau < 0.5 and float(address.start_loss(prev_action, moved, embed, pose).detach()) < first - 0.3
    assert address.place_head.weight.grad is None  # the score trains tau, not the head (its labels do)
    _, state = address.step(address.init_state(1), torch.zeros(1, 4), torch.tensor([-1]), None, None,
                            torch.tensor([[1.0, 0.0]]))
    assert not state["log_w"].requires_grad  # the model's filter: tau detached, no ELBO gradient into it
    old = {k: v for k, v in address.state_dict().items() if k != "place_log_temperature"}
    address.load_state_dict(old)  # an older checkpoint: strict load still works, tau back to 1
    assert float(address.place_log_temperature.detach()) == 0.0


def test_the_lattice_hypotheses_merge_starts_by_displacement_and_the_model_mixes_its_reads():
    """Starts that walked to the same displacement are one place; in open loop the model reads memory at each
    place and mixes the reads by probability (one attend on B*H rows equals H attends)."""
    from worldmodel.address import fourier_features

    RIGHT = 3
    address = lattice_address()
    state, h = address.init_state(1), torch.zeros(1, 4)
    for _ in range(3):  # seen to move 3 times: starts 0 and 1 left, both now 3 steps right of their start
        _, state = address.step(state, h, torch.tensor([RIGHT]), None, torch.tensor([1.0]))
    addrs, prob = address.hypotheses(state)
    assert float(prob[0, 0]) > 0.999
    assert cos(addrs[0, 0], fourier_features(torch.tensor([[0.0, 3.0]]), address.frequencies)[0]) > 0.9999
    for _ in range(2):  # open loop: start 0 moves once more then meets the edge, start 1 is blocked twice
        _, state = address.step(state, h, torch.tensor([RIGHT]), None, None)
    addrs, prob = address.hypotheses(state)
    assert prob[0, :2].tolist() == pytest.approx([0.5, 0.5], abs=1e-3) and float(prob.sum()) == pytest.approx(1.0)
    found = {round(cos(addrs[0, i], fourier_features(torch.tensor([[0.0, c]]), address.frequencies)[0]), 4)
             for i in range(2) for c in (3.0, 4.0)}
    assert 1.0 in found
    # the mixture read of the model equals the probability-weighted mean of one attend per place
    from worldmodel.config import preset

    kwargs = json.dumps({"integrator": "lattice", "moves": CLIP_MOVES, "extent": [56, 56], "gate": True})
    cfg = dataclasses.replace(preset("debug"), address="actions", address_kwargs=kwargs).model_config((28, 28, 1), 4, 2)
    from worldmodel.model import GTMM

    torch.manual_seed(0)
    model = GTMM(cfg)
    obs = torch.randint(0, 255, (2, 5, 28, 28, 1), dtype=torch.uint8)
    mstate = model.observe(obs, torch.tensor([[-1, 3, 3, 3, 3]] * 2), torch.zeros(2, 5, 2), sample=False)["state"]
    places = model.cell.address.hypotheses(mstate.address)
    mixed = model.cell._attend_mixture(mstate.memory, mstate.h, *places)
    reads = [model.cell.memory.attend(mstate.memory, mstate.h, places[0][:, i]) for i in range(places[0].shape[1])]
    expected = sum(places[1][:, i:i + 1] * r["read"] for i, r in enumerate(reads))
    assert torch.allclose(mixed["read"], expected, atol=1e-5)


def test_a_hedged_forecast_is_the_expected_frame_over_the_likely_places():
    """`imagine(hedge=True)`: the frame is the probability-weighted mean of the frames decoded at each likely place
    (the prior's mean there), not the frame of the mixed read; the run itself (z, state) is unchanged, and an
    address without places (the additive integrator) forecasts as before."""
    from worldmodel.config import preset
    from worldmodel.model import GTMM

    kwargs = json.dumps({"integrator": "lattice", "moves": CLIP_MOVES, "extent": [56, 56], "gate": True})
    cfg = dataclasses.replace(preset("debug"), address="actions", address_kwargs=kwargs).model_config((28, 28, 1), 4, 2)
    torch.manual_seed(0)
    model = GTMM(cfg)
    with torch.no_grad():  # an untrained decoder is nearly linear around grey: make frames depend on z for real
        for p in [*model.decoder.parameters(), *model.cell.prior.parameters(), *model.cell.posterior.parameters()]:
            p.mul_(8.0)
    obs = torch.randint(0, 255, (2, 5, 28, 28, 1), dtype=torch.uint8)
    state = model.observe(obs, torch.tensor([[-1, 3, 3, 3, 3]] * 2), torch.zeros(2, 5, 2), sample=False)["state"]
    actions = torch.tensor([[3, 3, 2], [0, 1, 3]])
    with torch.no_grad():
        plain = model.imagine(state, actions, torch.zeros(2, 3, 2), hedge=False)
        hedged = model.imagine(state, actions, torch.zeros(2, 3, 2), hedge=True)
    torch.testing.assert_close(hedged["z"], plain["z"])
    P = hedged["place_prob"].shape[-1]
    assert hedged["place_mean"].shape == (2, 3, P, cfg.z_dim)
    torch.testing.assert_close(hedged["place_prob"].sum(-1), torch.ones(2, 3))
    # by hand: each place's read -> the prior's mean there -> its frame, weighted by the place's probability
    expected = sum(hedged["place_prob"][:, :, i, None, None, None] * model.decode_mean(hedged["place_mean"][:, :, i])
                   for i in range(P))
    torch.testing.assert_close(hedged["frames"], expected)
    assert not torch.allclose(hedged["frames"], plain["frames"], atol=1e-4)  # a blend of frames, not of reads
    additive = json.dumps({"integrator": "additive", "inverse_actions": [1, 0, 3, 2]})
    other = GTMM(dataclasses.replace(preset("debug"), address="actions", address_kwargs=additive).model_config(
        (28, 28, 1), 4, 2))
    state = other.observe(obs, torch.tensor([[-1, 3, 3, 3, 3]] * 2), torch.zeros(2, 5, 2), sample=False)["state"]
    with torch.no_grad():
        a = other.imagine(state, actions, torch.zeros(2, 3, 2), hedge=True)
        b = other.imagine(state, actions, torch.zeros(2, 3, 2), hedge=False)
    torch.testing.assert_close(a["frames"], b["frames"])
    assert "place_mean" not in a


def test_the_lattice_filter_over_a_window_is_the_step_by_step_filter():
    """`sequence` and `start_loss` run the filter over the whole window at once (cumulative evidence, normalised
    once per step): the same addresses, final state, score and gradient into tau as `step` called T times, on walks
    that hit the edges (blocked moves), with uncertain `moved` and place evidence."""
    address = build_address("actions", h_dim=4, num_actions=4, pose_dim=2, addr_dim=64, integrator="lattice",
                            moves=CLIP_MOVES, extent=[56, 56], gate=True, embed_dim=3, z_dim=4, place_evidence=True)
    torch.manual_seed(0)
    with torch.no_grad():
        address.place_head.weight.normal_(0, 2.0)
        address.place_log_temperature.fill_(-0.7)
    B, T = 6, 20
    prev_action = torch.randint(-1, 4, (B, T))
    moved = torch.rand(B, T)
    embed = torch.randn(B, T, 3)
    pose = torch.randint(0, 5, (B, T, 2)).float() * 14
    addrs, final = address.sequence(address.init_state(B), prev_action, None, moved, embed)  # (B, T, addr_dim)
    state, stepped = address.init_state(B), []
    for t in range(T):
        addr, state = address.step(state, torch.zeros(B, 4), prev_action[:, t], None, moved[:, t], embed[:, t])
        stepped.append(addr)
    torch.testing.assert_close(addrs, torch.stack(stepped, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final["place"], state["place"])
    torch.testing.assert_close(final["log_w"].exp(), state["log_w"].exp(), atol=1e-5, rtol=1e-5)
    # the score, and its gradient into tau, against the step-by-step filter with the live tau
    tau = address.place_log_temperature.exp()
    state, losses = address.init_state(B), []
    onehot = torch.nn.functional.one_hot(prev_action + 1, 5)[..., 1:].float()  # (B, T, A), -1: no action
    truth = pose / 14
    for t in range(T):
        state = address._lattice_step(state, onehot[:, t], moved[:, t], embed[:, t], tau)
        at_truth = state["place"] == truth[:, t].unsqueeze(-1)
        losses.append(-state["log_w"].log_softmax(-1).masked_fill(~at_truth, -1e4).logsumexp(-1).sum(-1))
    reference = torch.stack(losses, 1).sum() / (B * T * 2)
    (grad_ref,) = torch.autograd.grad(reference, address.place_log_temperature)
    loss = address.start_loss(prev_action, moved, embed, pose)
    (grad,) = torch.autograd.grad(loss, address.place_log_temperature)
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)
    # open loop (no frames): the weights do not move, the hypotheses still walk
    addrs, final = address.sequence(address.init_state(B), prev_action, None)
    state = address.init_state(B)
    for t in range(T):
        addr, state = address.step(state, torch.zeros(B, 4), prev_action[:, t], None)
    torch.testing.assert_close(addrs[:, -1], addr)
    torch.testing.assert_close(final["place"], state["place"])
