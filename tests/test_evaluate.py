"""worldmodel.evaluate, worldmodel.metrics and worldmodel.report: image metrics against direct computations, the
memory score and bootstrap on constructed arrays, lag bins on a hand-made path, the CLI end to end on a tiny
checkpoint (eval.json, strip.png, lag.png in <run>/eval/<data name>), the report from two eval.json files, and bad
inputs as real subprocesses (one `error:` line, exit 2, nothing overwritten)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rollouts.collect import CollectConfig, collect
from worldmodel import metrics
from worldmodel.config import preset
from worldmodel.evaluate import EvalConfig, run
from worldmodel.report import EVAL_VERSION, ReportConfig, report, results_table
from worldmodel.train import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
GRID = json.dumps({"grid": 2})


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Tiny MNIST-map rollouts (train digits; held-out test digits walked by the loop agent, which comes back) and
    two 2-step `debug` checkpoints: a `none` model and an introspective one with the pose address."""
    root = tmp_path_factory.mktemp("evaluate")
    collect(CollectConfig(env="mnist_map", out=root / "train", episodes=4, steps=12, env_kwargs=GRID, progress=False))
    collect(CollectConfig(env="mnist_map_test", agent="loop", out=root / "heldout", episodes=5, steps=15, seed=1,
                          env_kwargs=GRID, progress=False))
    runs = {}
    for name, memory, address in (("none", "none", "hidden"), ("intro", "introspective", "pose")):
        cfg = dataclasses.replace(preset("debug"), data=str(root / "train"), out=str(root / name), steps=2,
                                  memory=memory, address=address, progress=False, threads=1, val_fraction=0.0)
        train(cfg)
        runs[name] = root / name
    return {"root": root, "train": root / "train", "heldout": root / "heldout", **runs}


def evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worldmodel.evaluate", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


# -- metrics -----------------------------------------------------------------------------------------------------------

def test_psnr_mse_bce_match_a_direct_computation():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.2, 0.8, (2, 3, 16, 16, 1))  # (B, T, H, W, C)
    pred = np.clip(truth + rng.normal(0, 0.05, truth.shape), 0, 1)
    pred[0, 0] = truth[0, 0]  # an exact prediction: infinite PSNR, capped
    got = metrics.frame_metrics(torch.tensor(pred, dtype=torch.float32), torch.tensor(truth, dtype=torch.float32))
    p32, t32 = pred.astype(np.float32).astype(np.float64), truth.astype(np.float32).astype(np.float64)
    mse = ((p32 - t32) ** 2).reshape(2, 3, -1).mean(-1)
    np.testing.assert_allclose(got["mse"], mse, rtol=1e-5, atol=1e-12)
    with np.errstate(divide="ignore"):
        psnr = np.minimum(10 * np.log10(1.0 / mse), metrics.PSNR_CAP_DB)
    np.testing.assert_allclose(got["psnr"], psnr, rtol=1e-4)
    assert got["psnr"][0, 0] == metrics.PSNR_CAP_DB
    clamped = np.clip(p32, metrics.BCE_EPS, 1 - metrics.BCE_EPS)
    bce = -(t32 * np.log(clamped) + (1 - t32) * np.log(1 - clamped)).reshape(2, 3, -1).mean(-1)
    np.testing.assert_allclose(got["bce"], bce, rtol=1e-4)


def test_ssim_matches_the_formula_on_flat_frames_and_torchmetrics_class_per_frame():
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    # flat frames a, b: variances and covariance are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 1)^2
    # (to float32 precision: the local variances come out ~1e-8 instead of 0, against C2 = 9e-4)
    a, b = 0.3, 0.6
    flat = metrics.frame_metrics(torch.full((1, 1, 28, 28, 1), a), torch.full((1, 1, 28, 28, 1), b))
    c1 = 0.01 ** 2
    assert flat["ssim"][0, 0] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=5e-4)
    same = metrics.frame_metrics(torch.full((1, 1, 28, 28, 1), a), torch.full((1, 1, 28, 28, 1), a))
    assert same["ssim"][0, 0] == pytest.approx(1.0, abs=5e-4)
    # textured frames: each frame's SSIM equals the class API's value on that frame alone
    gen = torch.Generator().manual_seed(1)
    pred, truth = torch.rand(2, 2, 20, 20, 3, generator=gen), torch.rand(2, 2, 20, 20, 3, generator=gen)
    got = metrics.frame_metrics(pred, truth)["ssim"]
    for i in range(2):
        for t in range(2):
            ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
            want = ssim(pred[i, t].permute(2, 0, 1)[None], truth[i, t].permute(2, 0, 1)[None]).item()
            assert got[i, t] == pytest.approx(want, abs=1e-5)


def test_memory_score_is_one_for_the_oracle_and_zero_for_none():
    rng = np.random.default_rng(0)
    mask = rng.random((20, 10)) < 0.4  # (N, S) revisits of context places
    mask[0] = True
    e_oracle = rng.uniform(0.01, 0.02, mask.shape)
    e_none = e_oracle + rng.uniform(0.05, 0.08, mask.shape)
    boot = metrics.Bootstrap.make(20, resamples=200, seed=0)
    assert boot.score(e_none, e_oracle, e_oracle, mask)["mean"] == pytest.approx(1.0)
    assert boot.score(e_none, e_oracle, e_oracle, mask)["ci"] == pytest.approx([1.0, 1.0])
    assert boot.score(e_none, e_none, e_oracle, mask)["mean"] == pytest.approx(0.0, abs=1e-12)
    halfway = (e_none + e_oracle) / 2
    score = boot.score(e_none, halfway, e_oracle, mask)
    assert score["mean"] == pytest.approx(0.5)
    assert score["n"] == int(mask.sum()) and score["windows"] == int(mask.any(1).sum())
    assert metrics.memory_score(e_none, halfway, e_oracle, mask) == pytest.approx(0.5)
    # an oracle no better than none leaves the score undefined rather than dividing by ~0
    assert boot.score(e_none, halfway, e_none, mask)["mean"] is None
    assert math.isnan(metrics.memory_score(e_none, halfway, e_none, mask))


def test_bootstrap_pools_steps_so_windows_with_more_steps_weigh_more():
    values = np.array([[1.0, 0, 0, 0], [0.0, 0, 0, 0]])
    mask = np.array([[True, False, False, False], [True, True, True, False]])
    boot = metrics.Bootstrap.make(2, resamples=500, seed=3)
    stat = boot.mean(values, mask)
    assert stat["mean"] == pytest.approx(0.25) and stat["n"] == 4 and stat["windows"] == 2  # not (1 + 0) / 2
    assert 0.0 <= stat["ci"][0] <= 0.25 <= stat["ci"][1] <= 1.0
    assert stat["ci"] == pytest.approx([0.0, 1.0])  # resamples of only window 2 / only window 1
    assert metrics.Bootstrap.make(2, 500, seed=3).mean(values, mask) == stat  # seeded
    empty = boot.mean(values, np.zeros_like(mask))
    assert empty["mean"] is None and empty["ci"] == [None, None] and empty["n"] == 0


def test_lag_visits_oracle_source_and_bins_on_a_hand_made_path():
    # places A B C A B A D A over 8 steps (one window, 2-D poses), context K = 3
    places = {"A": (0, 0), "B": (0, 14), "C": (14, 14), "D": (14, 0)}
    path = "ABCABADA"
    pose = np.array([[places[p] for p in path]], np.float32)  # (1, 8, 2)
    lag, visits = metrics.lag_and_visits(pose)
    assert lag.tolist() == [[0, 0, 0, 3, 3, 2, 0, 2]]
    assert visits.tolist() == [[0, 0, 0, 1, 1, 2, 0, 3]]
    # the latest CONTEXT step (< 3) at each open-loop step's place: A -> 0, B -> 1, A -> 0, D -> none, A -> 0
    assert metrics.oracle_source(pose, 3).tolist() == [[0, 1, 0, -1, 0]]
    assert metrics.bin_index(np.array([0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65, 1000]), metrics.LAG_BINS).tolist() == \
        [-1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 6]
    assert metrics.bin_labels(metrics.LAG_BINS) == ["1-2", "3-4", "5-8", "9-16", "17-32", "33-64", "65+"]
    assert metrics.bin_labels(metrics.VISIT_BINS)[:2] == ["1", "2"]


# -- the command end to end --------------------------------------------------------------------------------------------

def test_cli_writes_eval_json_strip_and_lag_into_a_folder_named_after_the_data(setup):
    proc = evaluate_cli("--checkpoint", str(setup["intro"]), "--data", str(setup["heldout"]), "--baseline",
                        str(setup["none"]), "--context", "3", "--seq-len", "12", "--resamples", "100",
                        "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = setup["intro"] / "eval" / "heldout"
    assert {p.name for p in out.iterdir()} >= {"eval.json", "strip.png", "lag.png"}
    assert not (out / ".gtmm.lock").exists()  # the folder lock is released
    assert "5 windows of 12 frames (256 asked; the data has 5 episodes" in proc.stdout
    assert "open_loop_revisit_over_baseline" in proc.stdout and "| model |" in proc.stdout
    assert "| intro (introspective/pose) [T 12 > trained 8] |" in proc.stdout  # longer windows than trained: said
    result = json.loads((out / "eval.json").read_text())
    assert result["format"] == "gtmm-eval" and result["version"] == EVAL_VERSION
    assert result["seq_len"] == 12 and result["data"]["windows"] == 5 and result["data"]["name"] == "heldout"
    assert set(result["references"]) == {"copy_last", "mean_frame"}
    main, base = (next(m for m in result["models"].values() if m["role"] == r) for r in ("model", "baseline"))
    assert main["trained_seq_len"] == 8 and main["train_steps"] == 2 and main["run"] == "intro"
    ctx = main["open_loop"]["revisit_context"]
    assert ctx["mse"]["n"] == main["counts"]["revisit_of_context_steps_open_loop"] > 0
    assert ctx["mse"]["ci"][0] <= ctx["mse"]["mean"] <= ctx["mse"]["ci"][1]
    assert ctx["mse"]["mean"] == pytest.approx(main["open_loop"]["mse_revisit_context"])
    assert 0 < ctx["psnr"]["mean"] <= metrics.PSNR_CAP_DB and -1 <= ctx["ssim"]["mean"] <= 1
    # the baseline scores exactly 0 against itself; the model's score names what it is measured against
    assert base["memory_score"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert main["memory_score"]["against_memory"] == "none"
    assert main["lag"]["lag"]["bins"][0] == "1-2"
    assert sum(s["n"] for s in main["lag"]["lag"]["revisit_context"]["mse"]) == ctx["mse"]["n"]
    assert len(main["teacher_forcing"]["kl_per_step"]) == 12
    # semantic recall (MNIST map): digit agreement on digit-centred steps, for the models and copy-last
    assert result["semantic"]["applies"] and result["semantic"]["centred_steps_open_loop"] > 0
    for entry in (main, base, result["references"]["copy_last"]):
        assert set(entry["semantic"]) >= {"revisit_context", "first_visit", "prob_of_true"}
        assert 0 <= entry["semantic"]["first_visit"]["mean"] <= 1
    # retrieval on context revisits whose earlier visit memory holds (a pose address finds it from the start)
    found = main["retrieval"]
    assert base["retrieval"] is None and found["heads"] == 1 and 0 < found["steps"] <= ctx["mse"]["n"]
    assert 0 <= found["chance_mass"]["mean"] <= 1 and 0 <= found["precision_at_1"]["mean_over_heads"]["mean"] <= 1
    import imageio.v3 as iio

    strip = iio.imread(out / "strip.png")
    assert strip.ndim == 3 and strip.shape[2] == 3 and strip.shape[0] > 4 * 3 * 28
    # evaluating the same checkpoint on another data folder does not overwrite the first
    proc = evaluate_cli("--checkpoint", str(setup["intro"]), "--data", str(setup["train"]), "--context", "3",
                        "--windows", "2", "--strip-windows", "1", "--resamples", "20", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (setup["intro"] / "eval" / "train" / "eval.json").is_file() and (out / "eval.json").is_file()
    other = json.loads((setup["intro"] / "eval" / "train" / "eval.json").read_text())
    assert other["data"]["windows"] == 2 and next(iter(other["models"].values()))["memory_score"] is None


def test_report_builds_a_table_and_plots_from_two_eval_files(setup, tmp_path, capsys):
    common = dict(data=str(setup["heldout"]), baseline=str(setup["none"]), context=3, windows=5, resamples=50,
                  strip_windows=1, device="cpu")
    run(EvalConfig(checkpoint=str(setup["intro"]), out=str(tmp_path / "a"), **common))
    run(EvalConfig(checkpoint=str(setup["none"]), out=str(tmp_path / "b"), **common))
    capsys.readouterr()
    paths = (str(tmp_path / "a"), str(tmp_path / "b" / "eval.json"))
    table = report(ReportConfig(paths=paths, out=str(tmp_path / "r")))
    assert {p.name for p in (tmp_path / "r").iterdir()} >= {"results.md", "lag.png", "kl_per_step.png",
                                                            "memory_score.png"}
    assert (tmp_path / "r" / "results.md").read_text().startswith(table)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # intro, none (once: its model entry and its baseline entry are one row), copy last, mean frame
    assert len(rows) == 4, table
    assert rows[0].startswith("| intro (introspective/pose)") and rows[1].startswith("| none (none/hidden)")
    assert "copy last context frame" in rows[2] and "mean frame" in rows[3]
    assert "| 1.000 |" in rows[1]  # the none model is 1.0x itself
    import imageio.v3 as iio

    assert iio.imread(tmp_path / "r" / "lag.png").shape[0] > 100
    # a baseline that is not `none` is named in the ratio column
    result = json.loads((tmp_path / "a" / "eval.json").read_text())
    next(m for m in result["models"].values() if m["role"] == "baseline")["memory"] = "lru"
    assert "(vs lru)" in results_table([result]).splitlines()[2]
    # with two read heads, each head's P@1 beside its gate: a shut head halves the mean without reading wrong
    found = next(m for m in result["models"].values() if m["role"] == "model")["retrieval"]
    found["precision_at_1"]["per_head"] = [{"mean": 0.9}, {"mean": 0.1}]
    found["gate"]["per_head"] = [{"mean": 0.8}, {"mean": 0.02}]
    assert "; heads 0.90 / 0.10 at gate 0.80 / 0.02 |" in results_table([result]).splitlines()[2]


# -- bad input: one line, exit 2, nothing overwritten ------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_inputs(setup) -> dict[str, Path]:
    root = setup["root"]
    collect(CollectConfig(env="mnist_map", out=root / "stay", episodes=1, steps=9, progress=False,
                          env_kwargs=json.dumps({"grid": 2, "allow_stay": True})))
    payload = torch.load(setup["none"] / "ckpt.pt", map_location="cpu", weights_only=False)
    for tensor in payload["model"].values():
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
    (root / "nan").mkdir(exist_ok=True)
    torch.save(payload, root / "nan" / "ckpt.pt")
    (root / "a_file").write_text("keep me")
    return {"stay": root / "stay", "nan": root / "nan", "file": root / "a_file"}


BAD = [
    (["--windows", "0"], "--windows 0: expected >= 1"),
    (["--batch", "0"], "--batch 0: expected >= 1"),
    (["--context", "0"], "--context 0: expected >= 1"),
    (["--context", "8"], "--context 8: expected 0 < context < seq_len = 8"),
    (["--context", "4", "--seq-len", "3"], "--seq-len 3: expected more frames than --context 4"),
    (["--data", "{root}/missing"], "--data {root}/missing: no such folder"),
    (["--data", "{stay}"], "--data {stay}: frames (28, 28, 1) with 5 actions, but the model checkpoint"),
    (["--out", "{file}"], "--out {file}: is a file, expected a folder"),
    (["--checkpoint", "{nan}"], "checkpoint {nan} gives non-finite predictions: the run diverged?"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_gives_one_line_and_exit_2(setup, bad_inputs, args, message):
    where = {"root": setup["root"], **bad_inputs}
    args = [a.format(**where) for a in args]
    base = {"--checkpoint": str(setup["none"]), "--data": str(setup["heldout"]), "--context": "3"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    proc = evaluate_cli(*[x for kv in base.items() for x in kv], "--device", "cpu")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message.format(**where) in lines[0]
    assert "Traceback" not in proc.stderr
    assert bad_inputs["file"].read_text() == "keep me"


def test_report_refuses_unknown_versions_and_missing_inputs(setup, tmp_path):
    bad = tmp_path / "old" / "eval.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"models": {}, "ratios": {}}))  # evaluate's first format: no version
    for args, message in (([str(bad)], f"{bad}: eval.json version 1 (no version field), this report reads version"),
                          ([str(tmp_path / "nothing")], f"{tmp_path / 'nothing'}: no such file or folder"),
                          ([str(tmp_path)], f"{tmp_path}: no eval.json in it")):
        proc = subprocess.run([sys.executable, "-m", "worldmodel.report", *args, "--out", str(tmp_path / "r")],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_evaluation_windows_are_the_spread_episode_starts_and_only_those_episodes_are_cached(tmp_path, user_cache):
    # find_digit ends an episode when the target digit is reached: episodes of many lengths, some shorter than T
    data = tmp_path / "mixed"
    collect(CollectConfig(env="mnist_map", out=data, episodes=12, steps=20, seed=3, progress=False,
                          env_kwargs=json.dumps({"grid": 2, "task": "find_digit"})))
    from rollouts.dataset import RolloutWindows, default_cache_dir
    from worldmodel.evaluate import episode_start_windows

    full = RolloutWindows(data, 8, split="all", cache=False)
    lengths = [e["steps"] + 1 for e in full.episodes]
    assert min(lengths) < 8 <= max(lengths), f"the fixture needs short and long episodes: {lengths}"
    frame_bytes = int(np.prod(full.obs_shape))
    subsets = []
    for count in (3, 256):
        windows, index, episodes, long_enough = episode_start_windows(str(data), 8, count)
        expected = full.episode_starts(count)  # the rule over the whole folder, decoded in memory
        assert (episodes, long_enough) == (12, sum(n >= 8 for n in lengths)) and len(index) == len(expected)
        a, b = full.sample_batch(expected), windows.sample_batch(index)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        subsets.append(windows.num_frames * frame_bytes)
    # the cache holds the chosen episodes' frames (a .npy header more), never the whole folder's
    cached = sorted(p.stat().st_size for p in default_cache_dir(data, full.manifest).glob("all-*-obs.npy"))
    assert len(cached) == 2 and all(0 < size - frames <= 4096 for size, frames in zip(cached, sorted(subsets)))
    assert max(subsets) < sum(lengths) * frame_bytes
