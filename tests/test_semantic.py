"""Semantic recall (worldmodel.semantic): the shipped digit classifier on real held-out digits, which MNIST-map
windows are centred on a digit (checked against the pixels of real env walks), label agreement, the training
command, and refusing weights files that would run code."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import envs
from envs.digits import load_digits
from gtmm.cli import UserError
from worldmodel import semantic
from worldmodel.semantic import (DEFAULT_PATH, SemanticConfig, centred_on_digit, digit_agreement, digit_at,
                                 load_classifier, train_classifier)

ROOT = Path(__file__).resolve().parents[1]
UP, DOWN, LEFT, RIGHT = range(4)


def spread_test_digits(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """``n`` held-out digits spread over the classes (the split is ordered by class): (n, 28, 28) uint8, (n,)."""
    x, y = load_digits("test")
    pick = np.linspace(0, len(x) - 1, n).round().astype(int)
    return x[pick], y[pick]


# --------------------------------------------------------------------------------------------------------------------
# The shipped classifier


def test_shipped_classifier_is_small_loads_weights_only_and_reads_held_out_digits():
    assert DEFAULT_PATH.stat().st_size < 200 * 1024
    payload = torch.load(DEFAULT_PATH, weights_only=True)  # plain containers and tensors only
    assert payload["header"]["format"] == semantic.FORMAT and payload["header"]["input_shape"] == [28, 28, 1]
    classifier = load_classifier()
    assert load_classifier() is classifier  # cached per process
    assert not classifier.training and semantic.num_parameters(classifier) < 100_000
    x, y = load_digits("test")
    acc = semantic.accuracy(classifier, x, y)
    assert acc >= 0.95, acc
    assert acc == pytest.approx(classifier.header["test_accuracy"])  # the header says what the file really does


# --------------------------------------------------------------------------------------------------------------------
# Which windows are centred on a digit


def tile_index(env, obs: np.ndarray) -> int:
    """The map cell (row * grid + col) whose digit tile equals the window's pixels, -1 if none does."""
    grid, (h, w) = env.unwrapped.geometry.grid, env.unwrapped.geometry.digit_shape
    tiles = env.unwrapped.map.reshape(grid, h, grid, w).transpose(0, 2, 1, 3).reshape(grid * grid, h, w)
    equal = (tiles == obs[..., 0]).all(axis=(1, 2))  # (grid*grid,)
    return int(np.argmax(equal)) if equal.any() else -1


@pytest.mark.parametrize("kwargs", [
    {},  # the defaults: clip, step 14
    {"border": "wrap"},
    {"border": "clip", "step": 7},
    {"border": "wrap", "step": 7},
])
def test_centred_windows_are_exactly_the_digit_tiles_of_a_real_walk(kwargs):
    env = envs.make("mnist_map", max_steps=300, **kwargs)
    rng = np.random.default_rng(0)
    obs, info = env.reset(seed=3)
    frames, poses = [obs], [info["pose"]]
    for _ in range(300):
        obs, _, _, _, info = env.step(int(rng.integers(4)))
        frames.append(obs)
        poses.append(info["pose"])
    cells = digit_at(np.stack(poses)[None], kwargs)[0]  # (T,) from the poses alone
    shown = np.array([tile_index(env, f) for f in frames])  # (T,) from the pixels
    np.testing.assert_array_equal(cells, shown)
    assert 0 < (cells >= 0).sum() < len(cells)  # the walk met centred and off-centre windows
    np.testing.assert_array_equal(centred_on_digit(np.stack(poses)[None], kwargs)[0], shown >= 0)
    # the digit under a centred window is the map's digit of that cell
    labels = env.unwrapped.map_labels.reshape(-1)
    assert all(labels[c] == labels[tile_index(env, f)] for c, f in zip(cells, frames) if c >= 0)


def test_a_larger_window_is_centred_across_the_torus_edge():
    # window 32 over 28-pixel digits: centred at top-left 28k - 2 (mod 84), so digit 0's window crosses the edge
    kwargs = {"border": "wrap", "window": 32, "step": 2}
    env = envs.make("mnist_map", max_steps=2000, **kwargs)
    obs, info = env.reset(seed=0)
    row, col = (int(v) for v in info["pose"])
    seen = {}
    for target_row in (82, 26, 54):
        for target_col in (82, 26, 54):
            for _ in range(((target_row - row) % 84) // 2):
                obs, _, _, _, info = env.step(DOWN)
            for _ in range(((target_col - col) % 84) // 2):
                obs, _, _, _, info = env.step(RIGHT)
            row, col = (int(v) for v in info["pose"])
            assert (row, col) == (target_row, target_col)
            cell = int(digit_at(info["pose"], kwargs))
            seen[cell] = obs
            assert tile_index(env, obs[2:30, 2:30]) == cell  # the middle 28x28 is that digit's tile
            obs, _, _, _, info = env.step(RIGHT)  # one step off: centred on nothing
            assert int(digit_at(info["pose"], kwargs)) == -1
            obs, _, _, _, info = env.step(LEFT)
    assert sorted(seen) == list(range(9))


def test_digit_at_refuses_poses_and_kwargs_of_other_envs():
    with pytest.raises(UserError, match="MNIST-map only"):
        digit_at(np.zeros((2, 5, 3), np.float32), {})  # MiniWorld (x, z, heading)
    with pytest.raises(UserError, match="room_size"):
        centred_on_digit(np.zeros((2, 5, 2), np.float32), {"room_size": 6})
    assert digit_at(np.array([28.5, 28.0]), {}) == -1  # off the pixel grid
    assert digit_at(np.array([28.0, 28.0]), {}) == 4  # the centre digit of the default 3x3 map


# --------------------------------------------------------------------------------------------------------------------
# Agreement


def test_agreement_of_truth_with_itself_a_blur_a_blank_and_other_digits():
    x, y = spread_test_digits(40)
    truth = (x.astype(np.float32) / 255).reshape(4, 10, 28, 28, 1)  # (N, T, H, W, 1)
    same = digit_agreement(truth, truth)
    assert same["agree"].shape == (4, 10) and same["agree"].dtype == bool and same["agree"].all()
    np.testing.assert_array_equal(same["pred_label"], same["true_label"])
    assert (same["true_label"].reshape(-1) == y).mean() >= 0.9  # the reference is the digit really there
    assert np.all((0 < same["true_confidence"]) & (same["true_confidence"] <= 1))
    # uint8 frames read the same as their float version
    np.testing.assert_array_equal(digit_agreement(truth, (truth * 255).round().astype(np.uint8))["agree"], same["agree"])
    # a blurred, fainter recall of the right digit still agrees, though its pixel error is far from zero
    t = torch.from_numpy(truth.reshape(40, 28, 28, 1)).permute(0, 3, 1, 2)
    blurred = (semantic._blur(t, torch.full((40,), 1.0)) * 0.7).permute(0, 2, 3, 1).numpy().reshape(truth.shape)
    assert ((blurred - truth) ** 2).mean() > 0.01
    assert digit_agreement(blurred, truth)["agree"].mean() >= 0.85
    # a blank frame and a different digit mostly disagree
    assert digit_agreement(np.zeros_like(truth), truth)["agree"].mean() <= 0.3
    assert (np.roll(y, 4) != y).all()  # 4 digits per class: 4 spots on is always another class
    other = np.roll(truth.reshape(40, 28, 28, 1), 4, axis=0).reshape(truth.shape)
    assert digit_agreement(other, truth)["agree"].mean() <= 0.3


def test_agreement_refuses_frames_that_are_not_mnist_windows():
    rgb = np.zeros((2, 3, 64, 64, 3), np.float32)
    with pytest.raises(UserError, match="MNIST-map only"):
        digit_agreement(rgb, rgb)
    digits = np.zeros((2, 3, 28, 28, 1), np.float32)
    with pytest.raises(UserError, match="differ in shape"):
        digit_agreement(digits, digits[:1])
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        digit_agreement(digits + 255, digits)


# --------------------------------------------------------------------------------------------------------------------
# Training and the weights file


def test_training_command_writes_a_loadable_file_and_is_deterministic(tmp_path):
    out = tmp_path / "sub" / "clf.pt"
    result = subprocess.run([sys.executable, "-m", "worldmodel.semantic", "--out", str(out), "--steps", "4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout and "test accuracy" in result.stdout
    classifier = load_classifier(out)
    assert classifier.header["updates"] == 4 and classifier.header["config"]["steps"] == 4
    assert 0 <= classifier.header["test_accuracy"] <= 1
    # the same budget trained in this process gives the same weights, bit for bit
    again, _ = train_classifier(SemanticConfig(out="unused", steps=4))
    for key, value in again.state_dict().items():
        assert torch.equal(value, classifier.state_dict()[key]), key


def test_training_command_rejects_bad_flags(tmp_path):
    with pytest.raises(UserError, match="--epochs 0: expected >= 1"):
        semantic.main(["--out", str(tmp_path / "x.pt"), "--epochs", "0"])
    with pytest.raises(UserError, match="is a folder"):
        semantic.main(["--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


class _RunsCode:
    """Unpickling this object runs ``touch marker``: what a malicious weights file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the plain-pickle file
def test_a_weights_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_RunsCode(proof)))  # the crafted object really runs code when unpickled
    assert proof.exists()
    marker = tmp_path / "marker"
    as_torch, as_pickle = tmp_path / "torch.pt", tmp_path / "pickle.pt"
    torch.save({"header": _RunsCode(marker), "state_dict": {}}, as_torch)
    as_pickle.write_bytes(pickle.dumps({"header": _RunsCode(marker)}))
    for path in (as_torch, as_pickle):
        with pytest.raises(UserError, match="rebuild it with `python -m worldmodel.semantic --out"):
            load_classifier(path)
    assert not marker.exists()


def test_missing_or_foreign_weights_files_say_how_to_rebuild(tmp_path):
    with pytest.raises(UserError, match=r"no such file; rebuild it with `python -m worldmodel.semantic --out"):
        load_classifier(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(UserError, match="expected a gtmm-digit-classifier file"):
        load_classifier(foreign)
    wrong = tmp_path / "wrong.pt"
    header = dict(load_classifier().header)
    torch.save({"header": header, "state_dict": {"head.weight": torch.zeros(2, 2)}}, wrong)
    with pytest.raises(UserError, match="weights do not fit"):
        load_classifier(wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a weights-only torch file"):
        load_classifier(garbage)
