"""benchmarks/filter_calibration.py on a real tiny clip-border run: one row for the model's own evidence weight and
one per --weights, figures in range; a checkpoint without the lattice filter is one error line."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rollouts.collect import CollectConfig, collect
from worldmodel.config import preset
from worldmodel.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("calibration")
    made = {}
    for border in ("clip", "wrap"):
        data = out / f"data_{border}"
        collect(CollectConfig(env="mnist_map", agent="loop", episodes=6, steps=9, out=data, progress=False,
                              env_kwargs=json.dumps({"grid": 2, "border": border})))
        run = out / f"run_{border}"
        train(dataclasses.replace(preset("debug"), data=str(data), out=str(run), steps=3, seq_len=8, progress=False,
                                  threads=1, val_every=0))
        made[border] = (run, data)
    return made


def calibration(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "filter_calibration.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_the_table_scores_the_models_weight_and_the_ones_asked(runs):
    run, data = runs["clip"]
    done = calibration("--checkpoint", str(run), "--data", str(data), "--context", "3", "--weights", "1", "0.1")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == [rows[0][0], "1", "0.1"] and rows[0][1:3] == ["(the", "model's)"]
    for r in rows:
        log_p, ruled_out, top1, confidence = map(float, r[-4:])
        assert log_p <= 0 and 0 <= ruled_out <= 1 and 0 <= top1 <= 1 and 0 < confidence <= 1


def test_a_checkpoint_without_the_lattice_filter_is_one_error_line(runs):
    run, data = runs["wrap"]
    done = calibration("--checkpoint", str(run), "--data", str(data))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "not the lattice filter with place evidence" in done.stderr


def test_a_bad_flag_value_is_one_error_line():
    done = calibration("--checkpoint", "x", "--data", "y", "--context", "0")
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: --context 0 / --windows 256 / --weights [1.0]: expected >= 1, >= 1 and >= 0")
