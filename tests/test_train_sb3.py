"""agents.train_sb3's monitoring on tiny runs: SB3's TensorBoard logger, its EvalCallback, and --device errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.sb3 import load_policy
from agents.train_sb3 import TrainSB3Config, eval_dir_for, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(env="mnist_map", env_kwargs='{"max_steps": 16}', timesteps=256, num_envs=2, n_steps=64, batch_size=64,
            progress=False, device="cpu")


def test_tensorboard_events_and_eval_callback_without_changing_the_policy(tmp_path, one_thread):
    out = tmp_path / "runs" / "ppo.zip"
    train(TrainSB3Config(out=out, eval_every=128, eval_episodes=2, **TINY))
    # SB3's logger: one numbered run folder per run under <out folder>/tb, with the eval callback's scalars in it
    runs = sorted((out.parent / "tb").iterdir())
    assert [r.name for r in runs] == ["ppo_1"]
    events = list(runs[0].glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(runs[0])).Reload().Tags()["scalars"]
    assert "eval/mean_reward" in tags and "rollout/ep_rew_mean" in tags, tags
    # EvalCallback every 128 env steps (64 calls of 2 envs) of 256: two evaluations of 2 episodes each
    evaluations = np.load(eval_dir_for(out) / "evaluations.npz")
    assert evaluations["timesteps"].tolist() == [128, 256]
    assert evaluations["results"].shape == (2, 2) and evaluations["ep_lengths"].shape == (2, 2)
    assert (evaluations["ep_lengths"] == 16).all()  # whole episodes of the eval env (max_steps 16)

    # evaluation runs on its own env and acts deterministically: the same run without it trains the same policy
    plain = tmp_path / "plain" / "ppo.zip"
    train(TrainSB3Config(out=plain, tensorboard=False, **TINY))
    assert not (plain.parent / "tb").exists() and not eval_dir_for(plain).exists()
    with_eval, _ = load_policy(out)
    without, _ = load_policy(plain)
    for (name, a), b in zip(with_eval.state_dict().items(), without.state_dict().values()):
        assert torch.equal(a, b), name


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GTMM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "agents.train_sb3", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


@pytest.mark.parametrize("args, names", [
    (["--device", "tpu"], ["--device", "tpu", "expected auto, cpu, cuda or cuda:N"]),
    (["--eval-every", "-1"], ["--eval-every -1"]),
])
def test_bad_flags_are_one_error_line_and_write_nothing(tmp_path, args, names):
    proc = run_cli("--out", "p.zip", "--timesteps", "64", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert all(name in lines[0] for name in names), lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error():
    from gtmm.cli import UserError, resolve_device

    with pytest.raises(UserError, match="--device cuda: CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
