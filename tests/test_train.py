"""Training and evaluation end to end at tiny sizes: CLI, exact resume, NaN guard, evaluate's JSON + PNG."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel import checkpoint
from worldmodel.config import preset
from worldmodel.model import GTMM
from worldmodel.train import curriculum_len, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> dict[str, Path]:
    """A tiny collected MNIST-map dataset (train digits) and a held-out one (test digits), via the real collector."""
    root = tmp_path_factory.mktemp("data")
    env_kwargs = json.dumps({"grid": 2})
    for name, env, episodes, seed in (("train", "mnist_map", 6, 0), ("test", "mnist_map_test", 3, 1)):
        run_cli("-m", "rollouts.collect", "--env", env, "--out", str(root / name), "--episodes", str(episodes),
                "--steps", "9", "--seed", str(seed), "--env-kwargs", env_kwargs, "--no-progress")
    return {"train": root / "train", "test": root / "test"}


def debug_config(tmp_path: Path, data: Path, **kw):
    cfg = preset("debug")
    return dataclasses.replace(cfg, data=str(data), out=str(tmp_path / "run"), progress=False, threads=1,
                               val_fraction=0.0, **kw)


def test_resume_gives_the_same_next_losses_as_an_uninterrupted_run(tmp_path, rollouts):
    full = train(debug_config(tmp_path / "a", rollouts["train"], steps=6, ckpt_every=100, memory="introspective",
                              address="actions"))
    first = train(debug_config(tmp_path / "b", rollouts["train"], steps=3, ckpt_every=100, memory="introspective",
                               address="actions"))
    assert checkpoint.load_raw(tmp_path / "b" / "run")["step"] == 3  # the final checkpoint is always written
    resumed = train(dataclasses.replace(debug_config(tmp_path / "b", rollouts["train"], steps=6), resume=True))
    assert [s for s, _ in resumed["losses"]] == [4, 5, 6]
    np.testing.assert_allclose([l for _, l in first["losses"] + resumed["losses"]], [l for _, l in full["losses"]],
                               rtol=1e-6)
    # a fresh run refuses to overwrite a run folder that has a checkpoint
    with pytest.raises(ValueError, match="--resume"):
        train(debug_config(tmp_path / "b", rollouts["train"], steps=6))


def test_nan_guard_skips_the_step_and_keeps_the_weights(tmp_path, rollouts, monkeypatch):
    calls = {"n": 0}
    original = GTMM.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(GTMM, "forward", poisoned)
    result = train(debug_config(tmp_path, rollouts["train"], steps=3, ckpt_every=100))
    assert result["skipped"] == 1
    model, _ = checkpoint.load(tmp_path / "run", "cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_train_and_evaluate_cli_on_collected_rollouts(tmp_path, rollouts):
    for name, memory in (("none", "none"), ("intro", "introspective")):
        proc = run_cli("-m", "worldmodel.train", "--preset", "debug", "--data", str(rollouts["train"]),
                       "--memory", memory, "--address", "actions", "--steps", "4", "--out", str(tmp_path / name),
                       "--threads", "1", "--no-progress", "--val-fraction", "0")
        assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 4
        run_dir = tmp_path / name
        assert json.loads((run_dir / "config.json").read_text())["memory"] == memory
        assert (run_dir / "ckpt.pt").is_file() and list((run_dir / "tb").glob("events.out.tfevents.*"))

    proc = run_cli("-m", "worldmodel.evaluate", "--checkpoint", str(tmp_path / "intro"), "--data",
                   str(rollouts["test"]), "--baseline", str(tmp_path / "none"), "--context", "3",
                   "--out", str(tmp_path / "eval"), "--device", "cpu")
    assert "open_loop_revisit_over_baseline" in proc.stdout
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert len(report["models"]) == 2 and report["seq_len"] == 8
    figures = next(iter(report["models"].values()))
    assert len(figures["teacher_forcing"]["kl_per_step"]) == 8
    assert figures["counts"]["windows"] == 3  # one window per held-out episode
    assert 0.0 <= figures["open_loop"]["mse_first_visit"] <= 1.0
    import imageio.v3 as iio

    strip = iio.imread(tmp_path / "eval" / "strip.png")
    assert strip.ndim == 3 and strip.shape[2] == 3 and strip.shape[0] > 28


def test_train_on_a_sequence_task(tmp_path):
    from envs.sequences import TASKS

    assert "perfect_recall" in TASKS
    cfg = dataclasses.replace(preset("debug"), task="perfect_recall", out=str(tmp_path / "run"), steps=3,
                              progress=False, threads=1)
    result = train(cfg)
    assert result["step"] == 3 and all(np.isfinite(l) for _, l in result["losses"])
    assert result["config"].seq_len == 8  # --seq-len 8 of the debug preset: k = 4 images, then the same 4 again


def test_cli_presets_flags_and_bad_input():
    cfg = parse_args(["--preset", "debug", "--task", "perfect_recall", "--z-dim", "5"])
    assert cfg.preset == "debug" and cfg.z_dim == 5 and cfg.h_dim == preset("debug").h_dim
    with pytest.raises(ValueError, match="exactly one of --data"):
        train(dataclasses.replace(preset("debug"), progress=False))
    with pytest.raises(ValueError, match="--memory 'tape'"):
        train(dataclasses.replace(preset("debug"), task="perfect_recall", memory="tape"))
    with pytest.raises(ValueError, match="--augment-shift 9: expected 0 to 4 pixels"):
        train(dataclasses.replace(preset("debug"), task="perfect_recall", augment_shift=9))
    with pytest.raises(ValueError, match="--augment-shift 2: moves the images of a --task"):
        train(dataclasses.replace(preset("debug"), data="some/rollouts", augment_shift=2))
    with pytest.raises(ValueError, match="--prior-outlier 1.0: expected a probability in"):
        train(dataclasses.replace(preset("debug"), task="perfect_recall", prior_outlier=1.0))
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    cfg = dataclasses.replace(preset("debug"), curriculum_start=4, curriculum_steps=10)
    assert [curriculum_len(cfg, s, 12) for s in (0, 5, 10, 50)] == [4, 8, 12, 12]


def test_write_latent_flag_reaches_the_model_and_its_checkpoint(tmp_path):
    from worldmodel import checkpoint

    cfg = parse_args(["--preset", "debug", "--task", "perfect_recall", "--write-latent", "mean"])
    assert cfg.write_latent == "mean" and preset("debug").write_latent == "sample"
    cfg = dataclasses.replace(cfg, out=str(tmp_path / "run"), steps=2, progress=False, threads=1)
    train(cfg)
    model, _ = checkpoint.load(tmp_path / "run", "cpu")
    assert model.cfg.write_latent == "mean" and model.cell.write_mean


def test_seen_in_context_matches_revisits_by_pose():
    from worldmodel.evaluate import seen_in_context

    pose = np.array([[[0, 0], [0, 14], [14, 14], [0, 14], [28, 28], [28, 28], [0, 0]]], np.float32)  # (1, 7, 2)
    revisit = np.array([[False, False, False, True, False, True, True]])
    # context K = 3: step 3 revisits (0, 14) seen in the context, step 5 revisits (28, 28) first met open loop,
    # step 6 revisits the start
    assert seen_in_context(pose, revisit, 3).tolist() == [[True, False, False, True]]
    assert seen_in_context(pose[:, :, :0], revisit, 3).tolist() == [[True, False, True, True]]


def test_precision_bf16_trains_on_the_cpu_and_changes_only_the_rounding(tmp_path):
    """`--precision bf16` autocasts the training step on any device, so a GPU run's arithmetic can be reproduced on
    a CPU; `bf16-convs` (`auto` on a CPU with bf16 in hardware) only the encoder and decoder. Both train: losses
    finite, and different from fp32's by rounding only."""
    cfg = parse_args(["--preset", "debug", "--task", "perfect_recall", "--precision", "bf16"])
    assert cfg.precision == "bf16" and preset("debug").precision == "auto"
    assert parse_args(["--preset", "debug", "--precision", "bf16-convs"]).precision == "bf16-convs"
    losses = {}
    for precision in ("fp32", "bf16", "bf16-convs"):
        run = dataclasses.replace(cfg, precision=precision, out=str(tmp_path / precision), steps=3, progress=False,
                                  threads=1)
        losses[precision] = np.array([loss for _, loss in train(run)["losses"]])
    for precision in ("bf16", "bf16-convs"):
        assert np.isfinite(losses[precision]).all() and len(losses[precision]) == len(losses["fp32"]) > 0
        assert not np.array_equal(losses[precision], losses["fp32"])  # the autocast region really ran in bf16
        np.testing.assert_allclose(losses[precision], losses["fp32"], rtol=0.02)  # the same run, rounded differently


def test_open_loop_loss_is_the_nll_of_frames_predicted_without_frames(tmp_path, rollouts):
    """`--open-loop-weight`: the loss adds the NLL of the frames after K seen ones, decoded from the prior's mean
    alone (what evaluation scores), computed as `observe` then `imagine` would; training lowers it."""
    from worldmodel.model import batch_to_torch, frames_to_float
    from worldmodel.train import RolloutSource, batch_rng

    cfg = debug_config(tmp_path, rollouts["train"], memory="introspective", address="hidden", steps=12,
                       open_loop_weight=1.0, open_loop_context=3, log_every=1)
    source = RolloutSource(cfg.data, cfg.seq_len, 0.0, 0)
    torch.manual_seed(0)
    model = GTMM(cfg.model_config(source.obs_shape, source.num_actions, source.pose_dim))
    batch = batch_to_torch(source.sample(4, batch_rng(0, 0, 0)), "cpu")
    torch.manual_seed(1)
    out = model(batch, open_loop_weight=1.0, open_loop_context=3)
    torch.manual_seed(1)
    plain = model(batch)
    torch.randn(batch["obs"].shape[1], 4, cfg.z_dim)  # the full window's noise, drawn first by forward
    seen = model.observe(batch["obs"][:, :3], batch["prev_action"][:, :3], batch["pose"][:, :3], diagnostics=True)
    dream = model.imagine(seen["state"], batch["prev_action"][:, 3:], batch["pose"][:, 3:], diagnostics=True)
    expected = model.frame_nll(dream["logits"], frames_to_float(batch["obs"][:, 3:])).mean()
    torch.testing.assert_close(out["open_loop_nll"], expected, rtol=2e-4, atol=1e-3)  # fast vs step-by-step path
    torch.testing.assert_close(out["loss"], plain["loss"] + expected, rtol=2e-4, atol=1e-2)
    # a short run with it lowers the open-loop NLL; the flag is checked
    with pytest.raises(ValueError, match="--open-loop-context 9: expected 1 <= K < --seq-len"):
        train(dataclasses.replace(cfg, open_loop_context=9, seq_len=9))
    with pytest.raises(ValueError, match="--open-loop-weight -1.0: expected a number >= 0"):
        train(dataclasses.replace(cfg, open_loop_weight=-1.0))
    train(cfg)
    trained, _ = checkpoint.load(tmp_path / "run", "cpu")
    torch.manual_seed(1)
    after = trained(batch, open_loop_weight=1.0, open_loop_context=3)
    before_nll, after_nll = float(out["open_loop_nll"].detach()), float(after["open_loop_nll"].detach())
    assert after_nll < before_nll - 1.0, (after_nll, expected)


def test_auto_precision_is_bf16_on_cuda_and_bf16_convs_on_a_bf16_cpu_for_rollout_models(monkeypatch):
    """`--precision auto`: bf16 autocast on CUDA for world models of rollouts, bf16 encoder/decoder on a CPU that
    multiplies bf16 in hardware (fp32 on other CPUs); fp32 for the paper's sequence tasks (where the compiled bf16
    step kept reads from being learnt on an H100); explicit values win. `benchmarks/train_throughput.py` applies
    the same rule (it imports the config, not the trainer)."""
    from worldmodel import nets

    cuda, cpu = "cuda", "cpu"
    rollouts = dataclasses.replace(preset("debug"), data="d")
    task = dataclasses.replace(preset("debug"), task="similarity_cued_recall")
    for native_bf16 in (True, False):  # this machine's CPU answers one of the two: both rules are checked
        monkeypatch.setattr(nets, "cpu_has_native_bf16", lambda: native_bf16)
        assert rollouts.resolved_precision(cuda) == "bf16" and rollouts.uses_bf16(cuda)
        assert rollouts.resolved_precision(cpu) == ("bf16-convs" if native_bf16 else "fp32")
        assert not rollouts.uses_bf16(cpu)
        assert task.resolved_precision(cuda) == task.resolved_precision(cpu) == "fp32"
        assert dataclasses.replace(task, precision="bf16").uses_bf16(cuda)
        assert dataclasses.replace(rollouts, precision="bf16").uses_bf16(cpu)
        assert dataclasses.replace(rollouts, precision="fp32").resolved_precision(cuda) == "fp32"
        assert dataclasses.replace(task, precision="bf16-convs").resolved_precision(cuda) == "bf16-convs"


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path, rollouts, capsys):
    # --init-from: a new run (step 0, fresh optimizer, its own loss) from a trained model's weights: fine-tuning
    from gtmm.cli import UserError

    kw = dict(memory="introspective", address="actions", ckpt_every=100)
    train(debug_config(tmp_path / "src", rollouts["train"], steps=3, **kw))
    source = checkpoint.load_raw(tmp_path / "src" / "run")["model"]
    tuned = train(debug_config(tmp_path / "ft", rollouts["train"], steps=2, open_loop_weight=1.0, open_loop_context=4,
                               init_from=str(tmp_path / "src" / "run"), **kw))
    assert [s for s, _ in tuned["losses"]] == [1, 2] and "init: model weights from" in capsys.readouterr().out
    saved = checkpoint.load_raw(tmp_path / "ft" / "run")
    assert saved["step"] == 2 and json.loads((tmp_path / "ft" / "run" / "config.json").read_text())["init_from"]
    # two Adam steps of lr 1e-3 from the source's weights: close to them, far from a fresh init's
    fresh = GTMM(checkpoint.load(tmp_path / "ft" / "run")[0].cfg).state_dict()
    name = "cell.lstm.weight_hh" if "cell.lstm.weight_hh" in source else next(k for k, v in source.items() if v.ndim == 2)
    assert (saved["model"][name] - source[name]).abs().max() < 3e-3 < (fresh[name] - source[name]).abs().max()
    # flags that build another model: one line naming the parameter shapes that differ
    with pytest.raises(UserError, match=r"--init-from .*does not fit this run's flags \(shape of"):
        train(debug_config(tmp_path / "bad", rollouts["train"], steps=1, h_dim=24, init_from=str(tmp_path / "src" / "run"),
                           **kw))
    with pytest.raises(UserError, match="no such file"):
        train(debug_config(tmp_path / "none", rollouts["train"], steps=1, init_from=str(tmp_path / "nowhere")))
