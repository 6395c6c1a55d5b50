"""benchmarks/clip_ceiling.py: the Bayes posterior over a clip map's start on a hand-made walk, and the table on a
tiny recorded folder (the oracle row is exact; knowing more never lowers the hit rate; bad input is one line)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.clip_ceiling import axis_posterior, measure
from rollouts.collect import CollectConfig, collect

ROOT = Path(__file__).resolve().parents[1]


def test_axis_posterior_keeps_the_starts_that_explain_the_context():
    # lattice of 5; the walk goes +1 three times (moved, moved, blocked) in the context, then -1 twice in open loop
    index = np.array([2, 3, 4, 4, 3, 2])
    actions = np.array([1, 1, 1, -1, -1])
    paths = axis_posterior(index, actions, size=5, context=4, period=None)
    # only a start at 2 moves twice and is then blocked: the wall is met, the place is known
    assert paths.tolist() == [[0, 1, 2, 2, 1, 0]]
    # a context that met no wall (two moves) leaves starts 0, 1, 2 (a start at 3 or 4 would have been blocked)
    paths = axis_posterior(index[:3], actions[:2], size=5, context=3, period=None)
    assert paths[:, -1].tolist() == [2, 2, 2] and len(paths) == 3
    # the phase (index mod 2) of the true start (2) leaves starts 0 and 2
    assert len(axis_posterior(index[:3], actions[:2], size=5, context=3, period=2)) == 2


def test_the_table_on_a_recorded_clip_folder(tmp_path):
    data = tmp_path / "clip"
    collect(CollectConfig(env="mnist_map_test", agent="loop", episodes=6, steps=23, out=data, progress=False))
    figures = measure(data, context=6, seq_len=24, windows=256)
    assert figures["true moves"]["hit"] == 1.0 and figures["true moves"]["mse_guess"] == 0.0
    hits = [figures[row]["hit"] for row in ("every move happens", "extent known", "extent + phase")]
    assert hits == sorted(hits) and figures["extent known"]["steps"] > 0
    for row in ("every move happens", "true moves"):  # one hypothesis: hedging is the guess
        assert figures[row]["mse_hedged"] == figures[row]["mse_guess"]
    proc = subprocess.run([sys.executable, "benchmarks/clip_ceiling.py", "--data", str(data), "--context", "6",
                           "--seq-len", "24"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "| extent + phase |" in proc.stdout, proc.stderr
    wrap = tmp_path / "wrap"
    collect(CollectConfig(env="mnist_map", episodes=1, steps=5, out=wrap, env_kwargs='{"border": "wrap"}',
                          progress=False))
    proc = subprocess.run([sys.executable, "benchmarks/clip_ceiling.py", "--data", str(wrap)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --data: border 'wrap', expected 'clip' (under 'wrap' every move happens)"], proc.stderr
