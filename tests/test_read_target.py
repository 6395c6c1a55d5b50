"""The read loss (`worldmodel.read_target`, `--read-weight`): on a revisit the read learns to land on the place."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gtmm.cli import UserError
from rollouts.collect import CollectConfig, collect
from worldmodel.config import preset
from worldmodel.model import GTMM, batch_to_torch
from worldmodel.read_target import fifo_frame_targets, fifo_read_targets, read_loss
from worldmodel.retrieval import retrieval_from_steps
from worldmodel.train import RolloutSource, train


@pytest.fixture(scope="module")
def walks(tmp_path_factory) -> Path:
    """Real collected random walks on a wrapping 2x2 MNIST map (56-px sides, 16 places): many revisits."""
    root = tmp_path_factory.mktemp("walks") / "wrap"
    collect(CollectConfig(env="mnist_map", agent="random", episodes=6, steps=20, out=root, progress=False,
                          env_kwargs=json.dumps({"grid": 2, "border": "wrap"})))
    return root


def debug(out: Path, data: Path, **kw):
    return dataclasses.replace(preset("debug"), data=str(data), out=str(out), progress=False, threads=1, val_every=0,
                               **{"memory": "introspective", "address": "hidden", **kw})


def model_and_batch(walks: Path, slots: int, seq_len: int = 16, **kw):
    cfg = debug(Path("unused"), walks, slots=slots, **kw)
    source = RolloutSource(str(walks), seq_len=seq_len, val_fraction=0.0, seed=0)
    model = GTMM(cfg.model_config(source.obs_shape, source.num_actions, source.pose_dim))
    return model, source


def test_targets_are_the_slots_the_retrieval_diagnostics_call_correct(walks):
    # (P4) from the FIFO's order must name the same slots as the exact write attribution that the retrieval metrics
    # use, also once the window is longer than the memory (slots fall out); and the fast path's weights (what the
    # loss reads) must be the reference step's
    torch.manual_seed(0)
    for slots in (5, 32):
        model, source = model_and_batch(walks, slots)
        batch = batch_to_torch(source.sample(6, np.random.default_rng(1)), "cpu")
        with torch.no_grad():
            ref = model.observe(batch["obs"], batch["prev_action"], batch["pose"], sample=False, diagnostics=True)
            fast = model.observe(batch["obs"], batch["prev_action"], batch["pose"], sample=False, diagnostics=False)
        torch.testing.assert_close(fast["read_weights"], ref["read_weights"])
        records = {k[len("write_"):]: v for k, v in ref.items() if k.startswith("write_")}
        metrics = retrieval_from_steps(model.cell.memory, ref["read_weights"], ref["read_gate"], records,
                                       batch["pose"])
        held = fifo_read_targets(batch["pose"], slots)  # (B, T, N)
        assert torch.equal(held.any(-1), metrics["target"])
        assert int(held.any(-1).sum()) > 10  # the walks revisit
        if slots == 5:
            earlier = fifo_read_targets(batch["pose"], 64).any(-1)
            assert (earlier & ~held.any(-1)).any()  # some places fell out of the short memory
        mass = (ref["read_weights"] * held.unsqueeze(2)).sum(-1)  # (B, T, R)
        target = metrics["target"]
        torch.testing.assert_close(mass[target], metrics["correct_mass"][target])


def test_read_loss_is_the_negative_log_mass_on_the_place_over_revisits_only():
    pose = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [2.0, 0.0]]])  # step 2 revisits step 0's place
    held = fifo_read_targets(pose, slots=3)
    assert held[0].int().tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]]  # M_1: slots hold steps -1, 0, 1
    weights = torch.zeros(1, 4, 2, 3)
    weights[0, 2, 0] = torch.tensor([0.0, 0.5, 0.5])
    weights[0, 2, 1] = torch.tensor([0.0, 0.25, 0.75])
    weights[0, [0, 1, 3]] = 1 / 3  # first visits: whatever they read adds nothing
    expected = -(np.log(0.5) + np.log(0.25)) / 2
    assert float(read_loss(weights, held)) == pytest.approx(expected, rel=1e-4)
    no_revisit = fifo_read_targets(pose[:, [0, 1, 3]], slots=3)
    loss = read_loss(weights[:, :3].requires_grad_(), no_revisit)
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_frame_targets_mark_the_slots_of_the_same_view_which_on_the_map_are_the_pose_targets(walks):
    # (P4'): on the MNIST map a view is its place, so the targets from the frames alone are (P4)'s from the poses
    for slots in (5, 32):
        _, source = model_and_batch(walks, slots)
        batch = batch_to_torch(source.sample(6, np.random.default_rng(1)), "cpu")
        from_frames = fifo_frame_targets(batch["obs"], slots)
        assert torch.equal(from_frames, fifo_read_targets(batch["pose"], slots))
        assert int(from_frames.any(-1).sum()) > 10
    # a hand case: views equal up to float rounding and a faint change count, other views do not
    obs = torch.zeros(1, 5, 4, 4, 1, dtype=torch.uint8)
    obs[0, 0, 0, 0] = 200  # view A
    obs[0, 1, 1, 1] = 200  # view B
    obs[0, 2] = obs[0, 0]  # A again: M_1 holds steps 0 and 1 in its last two slots (of 3)
    obs[0, 3, 0, 0], obs[0, 3, 3, 3] = 200, 1  # A with one pixel off by 1/255: the same view as steps 0 and 2
    obs[0, 4, 0, 0] = 100  # A at half brightness: MSE 0.0096, another view
    held = fifo_frame_targets(obs, slots=3)
    assert held[0].int().tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0]]


def test_read_loss_teaches_the_keys_to_find_the_place(walks, loss_curve):
    # a few dozen updates of the paper's address (keys from h_t) on real walks: the read mass on the revisited
    # place's slots rises far above a uniform read's
    torch.manual_seed(0)
    model, source = model_and_batch(walks, slots=32)
    losses = loss_curve(model, source, 80, "read_loss", read_weight=10.0)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_the_open_loop_read_loss_is_p5_on_the_dreams_reads_and_trains_the_controller(walks):
    # (P6): (P5) on the reads of the open-loop branch (4 frames seen, then actions only), with frame targets (no
    # pose): the same value as the loss on an `imagine` from the same state, and a gradient into the LSTM, which is
    # what must learn to integrate the actions
    model, source = model_and_batch(walks, slots=32)
    batch = batch_to_torch(source.sample(8, np.random.default_rng(3)), "cpu")
    obs, act, pose = batch["obs"], batch["prev_action"], batch["pose"]
    torch.manual_seed(5)
    out = model(batch, read_weight=1.0, read_target="frame", open_loop_weight=1.0, open_loop_context=4,
                read_open_loop=True)
    torch.manual_seed(5)  # the same draws: the whole window's latents, then the context's; the dream takes means
    with torch.no_grad():
        model.observe(obs, act, pose, sample=True, diagnostics=False)
        seen = model.observe(obs[:, :4], act[:, :4], pose[:, :4], sample=True, diagnostics=False)
        dream = model.imagine(seen["state"], act[:, 4:], pose[:, 4:], sample=False, diagnostics=False)
    held = fifo_frame_targets(obs, model.cell.memory.slots)[:, 4:]  # (B, T-4, N)
    assert int(held.any(-1).sum()) > 10  # the imagined steps revisit
    torch.testing.assert_close(out["read_loss_open_loop"], read_loss(dream["read_weights"], held))
    grads = torch.autograd.grad(out["read_loss_open_loop"], list(model.cell.lstm.parameters()))
    assert all(float(g.abs().sum()) > 0 for g in grads)


def test_training_with_the_read_loss_logs_it_and_bad_flags_are_one_clear_error(walks, tmp_path, capsys):
    train(debug(tmp_path / "run", walks, steps=2, log_every=1, read_weight=1.0))
    assert " read " in capsys.readouterr().out
    for kw, expected in (({"read_weight": -1.0}, "--read-weight -1.0: expected a number >= 0"),
                         ({"memory": "ntm"}, "--read-weight: expected --memory introspective .* got --memory ntm")):
        with pytest.raises(UserError, match=expected):
            train(debug(tmp_path / "bad", walks, steps=1, **{"read_weight": 1.0, **kw}))
    train(debug(tmp_path / "ol", walks, steps=2, log_every=1, read_weight=1.0, open_loop_weight=1.0,
                open_loop_context=4, read_open_loop=True))
    assert " open-loop read " in capsys.readouterr().out
    with pytest.raises(UserError, match="--read-open-loop .* expected --read-weight > 0 and --open-loop-weight > 0"):
        train(debug(tmp_path / "bad", walks, steps=1, read_weight=1.0, read_open_loop=True))
    with pytest.raises(UserError, match="--read-target 'place': expected 'pose' or 'frame'"):
        train(debug(tmp_path / "bad", walks, steps=1, read_weight=1.0, read_target="place"))
    task = dataclasses.replace(preset("debug"), task="perfect_recall", read_weight=1.0, out=str(tmp_path / "t"),
                               progress=False, memory="introspective", address="hidden", val_every=0)
    with pytest.raises(UserError, match="has no poses; it needs --data rollouts or --read-target frame"):
        train(task)
    assert not (tmp_path / "t").exists()


def test_frame_targets_need_no_pose_a_sequence_task_trains_with_them(tmp_path, capsys):
    # perfect recall shows its first half again: the recall steps' views are in memory, and no pose is recorded
    cfg = dataclasses.replace(preset("debug"), task="perfect_recall", read_weight=1.0, read_target="frame",
                              out=str(tmp_path / "t"), progress=False, memory="introspective", address="hidden",
                              val_every=0, steps=2, log_every=1, threads=1)
    train(cfg)
    logged = [line for line in capsys.readouterr().out.splitlines() if " read " in line]
    assert logged and all(float(line.split(" read ")[1].split()[0]) > 0 for line in logged), logged


def test_the_model_refuses_the_read_loss_without_fifo_order_or_with_an_unknown_target(walks):
    model, source = model_and_batch(walks, slots=8, memory="ntm")
    batch = batch_to_torch(source.sample(2, np.random.default_rng(0)), "cpu")
    with pytest.raises(UserError, match=r"read_weight > 0: expected the FIFO memory \(introspective\), got ntm"):
        model(batch, read_weight=1.0)
    fifo, _ = model_and_batch(walks, slots=8)
    with pytest.raises(UserError, match="read_target 'frames': expected 'pose' or 'frame'"):
        fifo(batch, read_weight=1.0, read_target="frames")
