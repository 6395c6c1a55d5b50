"""Does a world model's controller state know where the agent is? `python benchmarks/position_probe.py --checkpoint RUN
--data TRAIN_ROLLOUTS --test-data HELD_OUT_ROLLOUTS`.

A memory read by keys from the controller state h_t (the paper's `--address hidden`) can find a place again in open
loop only if h_t knows where the agent is. This probe asks it directly: a small MLP is fit on the teacher-forced
h_t of training windows to the agent's position relative to the window's first frame (`worldmodel.path`, on a
torus as sin/cos of each wrapping axis), then read on held-out windows, teacher-forced and in open loop after
`--context` seen frames. It prints the mean position error (pose units; on a torus the shortest way round) per
open-loop horizon, beside chance (answering another held-out window's position at that step) and a control (the
probe fit on the true displacement, one-hot per value: ~0 when the probe can read what is there).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from gtmm import cli  # noqa: E402
from gtmm.cli import UserError  # noqa: E402
from worldmodel import checkpoint  # noqa: E402
from worldmodel.model import batch_to_torch  # noqa: E402
from worldmodel.path import check_period, declared_period, displacement, parse_period  # noqa: E402
from worldmodel.train import RolloutSource  # noqa: E402


@dataclass
class Args:
    """Probe a checkpoint's controller state for the agent's position."""

    checkpoint: str
    """the run folder or checkpoint file"""
    data: str
    """rollouts the probe is fit on (the model's training data)"""
    test_data: str
    """held-out rollouts the probe is read on"""
    windows: int = 1024
    """training windows (the held-out side uses a quarter)"""
    seq_len: int = 48
    """frames per window"""
    context: int = 8
    """frames seen before the open loop"""
    period: str = ""
    """the pose's period per axis, JSON (null: no wrap); empty = the data's declared period, else the model's"""
    fit_steps: int = 1500
    """Adam steps of the probe"""
    seed: int = 0


HORIZONS = ((1, 1), (2, 4), (5, 10), (11, 20), (21, 40))


def resolve_period(args: Args, model_period: list, pose_dim: int) -> list[Optional[float]]:
    """--period, else the data's declared `action_effects.period`, else the model's path head's, else none."""
    if args.period.strip():
        return parse_period(args.period, pose_dim, "--period")
    return check_period(declared_period(args.data) or model_period or [None] * pose_dim, pose_dim, "the period")


def targets(pose: torch.Tensor, period: list[Optional[float]]) -> torch.Tensor:
    """pose (B, T, D) -> what the probe predicts (B, T, F): the displacement since the window's first frame as
    sin/cos of each wrapping axis, the other axes as they are."""
    return features(displacement(pose.double(), period), period)


def features(d: torch.Tensor, period: list[Optional[float]]) -> torch.Tensor:
    """Displacements (B, T, D) -> probe targets (B, T, F)."""
    cols = []
    for axis, p in enumerate(period):
        if p is None:
            cols.append(d[..., axis : axis + 1])
        else:
            angle = 2 * math.pi * d[..., axis : axis + 1] / p
            cols += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(cols, dim=-1)


def position_error(pred: torch.Tensor, d: torch.Tensor, period: list[Optional[float]]) -> float:
    """Mean distance between the probe's answer `pred` (B, S, F) and the true displacement `d` (B, S, D) (pose units;
    around a torus the short way)."""
    col, err = 0, torch.zeros_like(d[..., 0])
    for axis, p in enumerate(period):
        if p is None:
            gap = (pred[..., col] - d[..., axis]).abs()
            col += 1
        else:
            where = torch.atan2(pred[..., col], pred[..., col + 1]) * p / (2 * math.pi)
            gap = (where - d[..., axis]).remainder(p)
            gap = torch.minimum(gap, p - gap)
            col += 2
        err = err + gap**2
    return float(err.sqrt().mean())


def fit(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int):
    """A 2-layer MLP probe x (N, H) -> y (N, F), standardised inputs; returns its predict function."""
    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    probe = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, y.shape[1]))
    probe = probe.double()
    opt = torch.optim.Adam(probe.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (1024,))
        loss = (probe((x[idx] - mu) / sd) - y[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda h: probe((h.double() - mu) / sd).detach()


def main(args: Args) -> None:
    torch.set_num_threads(1)
    model, _ = checkpoint.load(args.checkpoint, "cpu")
    model.eval()
    if model.cfg.pose_dim == 0:
        raise UserError(f"--checkpoint {args.checkpoint}: the model was trained on data without poses")
    K, T = args.context, args.seq_len
    if not 0 < K < T - 1:
        raise UserError(f"--context {K}: expected 0 < context < --seq-len - 1 = {T - 1}")
    period = resolve_period(args, model.cfg.path_period, model.cfg.pose_dim)

    def windows(data: str, n: int, seed: int) -> dict[str, torch.Tensor]:
        source = RolloutSource(data, seq_len=T, val_fraction=0.0, seed=seed)
        return batch_to_torch(source.sample(n, np.random.default_rng(seed)), "cpu")

    @torch.no_grad()
    def states(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        forced = model.observe(b["obs"], b["prev_action"], b["pose"], sample=False, diagnostics=False)
        seen = model.observe(b["obs"][:, :K], b["prev_action"][:, :K], b["pose"][:, :K], sample=False,
                             diagnostics=False)
        dream = model.imagine(seen["state"], b["prev_action"][:, K:], b["pose"][:, K:], sample=False,
                              diagnostics=False)
        return forced["h"], dream["h"]  # (B, T, H), (B, T-K, H)

    train, test = windows(args.data, args.windows, args.seed), windows(args.test_data, args.windows // 4, args.seed + 1)
    h_train, _ = states(train)
    h_forced, h_open = states(test)
    y = targets(train["pose"], period)
    probe = fit(h_train.flatten(0, 1).double(), y.flatten(0, 1), args.fit_steps, args.seed)
    # the control: the same probe on the true displacement, one-hot per value each axis takes in the training windows
    d_train, d_test = displacement(train["pose"].double(), period), displacement(test["pose"].double(), period)
    values = [torch.unique(d_train[..., a].round(decimals=3)) for a in range(len(period))]

    def onehot(d: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.nn.functional.one_hot(
            torch.searchsorted(v, d[..., a].round(decimals=3).contiguous()).clamp(max=len(v) - 1), len(v))
            for a, v in enumerate(values)], dim=-1).double()

    control = fit(onehot(d_train).flatten(0, 1), y.flatten(0, 1), args.fit_steps, args.seed)
    shuffled = torch.randperm(d_test.shape[0], generator=torch.Generator().manual_seed(args.seed))
    chance = features(d_test[shuffled], period)  # chance: the position of another held-out window at that step

    print(f"{args.checkpoint} ({model.cfg.memory}/{model.cfg.address}): probe fit on {args.windows} windows of "
          f"{args.data}, read on {args.windows // 4} of {args.test_data}; period {period}, context {K}")
    print(f"{'steps after the context':<24} {'open loop':>9} {'teacher-forced':>14} {'chance':>7} {'control':>7}")
    for lo, hi in HORIZONS:
        if K + lo > T:
            break
        span = slice(K + lo - 1, min(K + hi, T))  # window steps; the open loop's states start at step K
        d = d_test[:, span]
        row = [position_error(probe(h_open[:, span.start - K : span.stop - K]), d, period),
               position_error(probe(h_forced[:, span]), d, period),
               position_error(chance[:, span], d, period),
               position_error(control(onehot(d)), d, period)]
        print(f"{f'{lo}-{hi}':<24} {row[0]:9.2f} {row[1]:14.2f} {row[2]:7.2f} {row[3]:7.2f}")


if __name__ == "__main__":
    cli.run(lambda argv: main(cli.parse(Args, argv, prog="benchmarks/position_probe.py")))
