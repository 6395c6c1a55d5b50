"""The path-integration loss (`worldmodel.path`, `--path-weight`): the controller state learns where the agent is."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gtmm.cli import UserError
from rollouts import storage
from rollouts.collect import CollectConfig, collect
from worldmodel import checkpoint
from worldmodel.config import preset
from worldmodel.model import GTMM, batch_to_torch
from worldmodel.path import action_counts, displacement, view_changed
from worldmodel.train import RolloutSource, train


@pytest.fixture(scope="module")
def walks(tmp_path_factory) -> dict[str, Path]:
    """Real collected loop walks on 2x2 MNIST maps (56-px sides), with a wrapping and a clipping border."""
    root = tmp_path_factory.mktemp("walks")
    for border in ("wrap", "clip"):
        collect(CollectConfig(env="mnist_map", agent="loop", episodes=6, steps=15, out=root / border, progress=False,
                              env_kwargs=json.dumps({"grid": 2, "border": border})))
    return {"wrap": root / "wrap", "clip": root / "clip"}


def debug(out: Path, data: Path, **kw):
    return dataclasses.replace(preset("debug"), data=str(data), out=str(out), progress=False, threads=1, val_every=0,
                               memory="introspective", address="hidden", **kw)


def test_displacement_unwraps_moves_across_the_seam():
    pose = torch.tensor([[[28.0, 0.0], [14.0, 0.0], [0.0, 0.0], [70.0, 0.0], [70.0, 14.0], [70.0, 0.0]]])
    on_torus = [[0, 0], [-14, 0], [-28, 0], [-42, 0], [-42, 14], [-42, 0]]  # 0 -> 70 on an 84-px side: one step up
    assert displacement(pose, [84.0, 84.0])[0].tolist() == on_torus
    assert displacement(pose)[0, 3].tolist() == [42.0, 0.0]  # no period: the jump is taken as it is
    assert displacement(pose, [None, 84.0])[0, 3].tolist() == [42.0, 0.0]  # that axis does not wrap
    # the recorded walks: unwrapped, every step is one move (or none), and the walk ends where its moves say
    assert (displacement(pose, [84.0, 84.0]).diff(dim=1).abs().sum(-1) <= 14).all()


def test_the_wrapping_map_declares_its_period_and_the_run_records_it(walks, tmp_path):
    assert storage.read_manifest(walks["wrap"])["env"]["action_effects"]["period"] == [56, 56]
    assert "period" not in storage.read_manifest(walks["clip"])["env"]["action_effects"]
    train(debug(tmp_path / "wrap", walks["wrap"], steps=2, path_weight=1.0))
    cfg = json.loads((tmp_path / "wrap" / "config.json").read_text())
    assert json.loads(cfg["path_period"]) == [56, 56]
    model, _ = checkpoint.load(tmp_path / "wrap")
    assert model.path_head is not None and model.cfg.path_period == [56.0, 56.0]
    train(debug(tmp_path / "clip", walks["clip"], steps=2, path_weight=1.0))
    assert json.loads((tmp_path / "clip" / "config.json").read_text())["path_period"] == ""
    assert checkpoint.load(tmp_path / "clip")[0].cfg.path_period == []


def test_path_loss_teaches_the_controller_the_displacement(walks, loss_curve):
    # a few dozen updates on real walks: the linear read-out of h_t gets the displacement far better than at the start
    torch.manual_seed(0)
    cfg = debug(Path("unused"), walks["wrap"], path_weight=1.0, path_period="[56, 56]")
    source = RolloutSource(str(walks["wrap"]), seq_len=12, val_fraction=0.0, seed=0)
    model = GTMM(cfg.model_config(source.obs_shape, source.num_actions, source.pose_dim))
    path = loss_curve(model, source, 60, "path_loss", path_weight=10.0)
    assert np.mean(path[-5:]) < 0.5 * np.mean(path[:5]), path


def test_action_counts_count_each_action_since_the_first_frame_centred():
    # (P2'): the move into frame 0 and a missing action (-1) count for nothing; each row sums to zero
    counts = action_counts(torch.tensor([[3, 0, 0, 2, -1, 1]]), 4)[0]
    raw = [[0, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [2, 0, 1, 0], [2, 0, 1, 0], [2, 1, 1, 0]]
    assert torch.allclose(counts, torch.tensor(raw, dtype=torch.float32) - torch.tensor(raw).float().mean(-1, True))
    assert torch.allclose(counts.sum(-1), torch.zeros(6), atol=1e-6)


def test_moves_count_only_the_actions_whose_view_changed():
    # (P2''): frame 2 repeats frame 1 (a blocked move), so action 0 into it counts for nothing
    obs = torch.tensor([[[1.0], [2.0], [2.0], [3.0]]])  # (B=1, T=4, 1)
    changed = view_changed(obs)
    assert changed.tolist() == [[False, True, False, True]]
    counts = action_counts(torch.tensor([[3, 1, 0, 2]]), 4, changed)[0]
    raw = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.float32)
    assert torch.allclose(counts, raw - raw.mean(-1, True))


@pytest.mark.parametrize("border,target", [("wrap", "actions"), ("clip", "actions"), ("clip", "moves")])
def test_the_displacement_is_linear_in_the_counts_where_the_moves_they_count_add(walks, border, target):
    # what makes (P2') a pose-free stand-in for (P2) on a torus map: d_t = M d'_t exactly, one M for every walk; on a
    # clipping map some moves are blocked and no M fits, unless only the moves that changed the view count (P2'')
    source = RolloutSource(str(walks[border]), seq_len=15, val_fraction=0.0, seed=0)
    batch = source.sample(32, np.random.default_rng(0))
    period = storage.read_manifest(walks[border])["env"]["action_effects"].get("period", [])
    pose = torch.as_tensor(batch["pose"]).double()
    d = displacement(pose, period).reshape(-1, 2)  # (B*T, 2)
    changed = view_changed(torch.as_tensor(batch["obs"]))  # (B, T)
    moved = torch.cat([torch.zeros_like(changed[:, :1]), (pose[:, 1:] != pose[:, :-1]).any(-1)], 1)
    assert torch.equal(changed, moved)  # on these maps a view changes exactly when the agent moves
    happened = changed if target == "moves" else None
    counts = action_counts(torch.as_tensor(batch["prev_action"]), source.num_actions, happened).double()
    counts = counts.reshape(-1, 4)
    moves = torch.linalg.lstsq(counts, d).solution  # (A, 2)
    worst = (counts @ moves - d).abs().max().item()
    if border == "wrap" or target == "moves":
        assert worst < 1e-6, worst
        assert torch.allclose(moves.abs().max(0).values, torch.tensor([14.0, 14.0], dtype=torch.float64))
    else:
        assert (~moved[:, 1:]).any()  # blocked moves
        assert worst > 1.0, worst


@pytest.mark.parametrize("target", ["actions", "moves"])
def test_path_targets_from_the_inputs_train_without_poses(walks, tmp_path, loss_curve, target):
    # the head reads one value per action, the run records the target, the loss falls, and pose-less data is fine
    train(debug(tmp_path / "run", walks["clip"], steps=2, path_weight=1.0, path_target=target))
    model, _ = checkpoint.load(tmp_path / "run")
    assert model.cfg.path_target == target and model.path_head.out.out_features == 4
    assert json.loads((tmp_path / "run" / "config.json").read_text())["path_period"] == ""
    torch.manual_seed(0)
    cfg = debug(Path("unused"), walks["clip"], path_weight=1.0, path_target=target)
    source = RolloutSource(str(walks["clip"]), seq_len=12, val_fraction=0.0, seed=0)
    model = GTMM(cfg.model_config(source.obs_shape, source.num_actions, source.pose_dim))
    batch = source.sample(8, np.random.default_rng(0))
    batch["pose"] = np.full_like(batch["pose"], np.nan)  # the target never reads a pose
    loss = model(batch_to_torch(batch, "cpu"), path_weight=1.0)["path_loss"]
    assert torch.isfinite(loss), loss
    path = loss_curve(model, source, 60, "path_loss", path_weight=10.0)
    assert np.mean(path[-5:]) < 0.5 * np.mean(path[:5]), path


def test_bad_path_flags_are_one_clear_error(walks, tmp_path):
    for kw, expected in (({"path_period": "[56]"}, "one period per pose axis"),
                         ({"path_period": "[56, -1]"}, "positive number or null"),
                         ({"path_period": "84"}, "expected a JSON list"),
                         ({"path_period": "[56,"}, r"--path-period: .\[56,. is not valid JSON"),
                         ({"path_weight": -1.0}, "--path-weight -1.0")):
        with pytest.raises(UserError, match=expected):
            train(debug(tmp_path / "bad", walks["wrap"], steps=1, **{"path_weight": 1.0, **kw}))
    task = dataclasses.replace(preset("debug"), task="perfect_recall", path_weight=1.0, out=str(tmp_path / "t"),
                               progress=False)
    with pytest.raises(UserError, match="has no poses"):
        train(task)
    with pytest.raises(UserError, match="has no poses and no actions"):
        train(dataclasses.replace(task, path_target="actions"))
    with pytest.raises(UserError, match="--path-target 'place': expected one of pose, actions, moves"):
        train(debug(tmp_path / "bad", walks["wrap"], steps=1, path_weight=1.0, path_target="place"))
    for target in ("actions", "moves"):
        with pytest.raises(UserError, match=f"--path-period \\[56, 56\\]: the action counts of --path-target {target}"):
            train(debug(tmp_path / "bad", walks["wrap"], steps=1, path_weight=1.0, path_target=target,
                        path_period="[56, 56]"))


def test_position_probe_prints_the_error_per_horizon_beside_chance_and_control(walks, tmp_path, capsys):
    # benchmarks/position_probe.py on a 2-step model: the table's rows, and the control reads the displacement
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import position_probe as probe
    train(debug(tmp_path / "run", walks["wrap"], steps=2))
    capsys.readouterr()
    probe.main(probe.Args(checkpoint=str(tmp_path / "run"), data=str(walks["wrap"]), test_data=str(walks["wrap"]),
                          windows=16, seq_len=12, context=4, fit_steps=300))
    lines = capsys.readouterr().out.splitlines()
    assert "period [56.0, 56.0]" in lines[0]  # declared by the wrapping map
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["1-1", "2-4", "5-10"]  # 8 steps after a context of 4
    assert all(float(r[4]) < 0.5 * float(r[3]) for r in rows), rows  # the control reads the true displacement
    with pytest.raises(UserError, match="--context 11"):
        probe.main(probe.Args(checkpoint=str(tmp_path / "run"), data=str(walks["wrap"]), test_data=str(walks["wrap"]),
                              windows=16, seq_len=12, context=11))
