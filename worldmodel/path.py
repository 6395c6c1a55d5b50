"""Path integration as an auxiliary loss: the controller state learns where the agent is (issue 14).

The paper's Introspective GTMM reads memory with keys computed from the controller state h_t (`--address hidden`).
Under teacher forcing h_t need not know where the agent is: the last frame is in it, and a read can find a slot by
what the slot shows. In open loop there is no frame, and a controller that never integrated the actions cannot
find the place again. A probe says that is what happens: from the h_t of the 12,000-step `hidden` model a small
MLP decodes the displacement since the window's first frame no better than chance on held-out maps (28 px mean
error on a 84-px torus; chance ~30; README, the paper's address). This head asks for it, from the recorded poses:

    delta_s = wrap(pose_s - pose_{s-1})                 a step's move; on an axis that wraps with period p (a torus
                                                        map, a heading), the change in [-p/2, p/2)           (P1)
    d_t     = (sum_{s<=t} delta_s) / scale              displacement since the window's first frame, in units of
                                                        the batch's RMS move (no gradient)                   (P2)
    L_path  = mean_{b,t} || W h_t + c - d_t ||^2        a linear read-out of h_t                             (P3)

Linear on purpose: the keys are linear in h_t (k_t = P h_t), so what W can read, P can use to address.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from gtmm.cli import UserError, parse_json


def check_period(period: Sequence[Optional[float]], pose_dim: int, where: str) -> list[Optional[float]]:
    """The per-axis periods as floats (None = the axis does not wrap); UserError naming ``where`` when the list has
    the wrong length or a period is not a positive number."""
    if len(period) != pose_dim:
        raise UserError(f"{where}: expected one period per pose axis ({pose_dim}; null for an axis that does not "
                        f"wrap), got {list(period)}")
    checked: list[Optional[float]] = []
    for p in period:
        if p is None:
            checked.append(None)
            continue
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p < math.inf):
            raise UserError(f"{where}: a period must be a positive number or null, got {p!r}")
        checked.append(float(p))
    return checked


def parse_period(text: str, pose_dim: int, flag: str) -> list[Optional[float]]:
    """A period flag's JSON text (e.g. '[84, 84]'; empty = no axis wraps) as `check_period`'s list; UserError naming
    ``flag`` when it is not JSON, not a list or not a period."""
    if not text.strip():
        return []
    period = parse_json(text, flag, list, "a JSON list, one period per pose axis, e.g. '[84, 84]'")
    return check_period(period, pose_dim, flag)


def declared_period(data: str) -> Optional[list]:
    """The pose's period that the env of rollout folder ``data`` declares (its manifest's ``action_effects.period``,
    unchecked), or None (not declared, or an older manifest)."""
    from rollouts.storage import read_manifest

    return (read_manifest(data)["env"].get("action_effects") or {}).get("period")


def displacement(pose: torch.Tensor, period: Sequence[Optional[float]] = ()) -> torch.Tensor:
    """(P1), (P2) before scaling: pose (B, T, D) -> the displacement since frame 0 (B, T, D), in pose units. An
    empty ``period`` means no axis wraps."""
    step = pose[:, 1:] - pose[:, :-1]  # (B, T-1, D)
    if any(p is not None for p in period):
        wraps = torch.tensor([p is not None for p in period], device=pose.device)  # (D,)
        p = torch.tensor([1.0 if q is None else q for q in period], dtype=pose.dtype, device=pose.device)  # (D,)
        step = torch.where(wraps, torch.remainder(step + p / 2, p) - p / 2, step)
    return torch.cat([torch.zeros_like(pose[:, :1]), step.cumsum(1)], dim=1)  # (B, T, D)


class PathHead(nn.Module):
    """(P3): a linear read-out of the displacement from h_t, and its loss."""

    def __init__(self, h_dim: int, pose_dim: int, period: Sequence[Optional[float]] = ()) -> None:
        super().__init__()
        self.out = nn.Linear(h_dim, pose_dim)
        self.period = list(period)

    def loss(self, h: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """h (B, T, H), pose (B, T, D) -> the mean squared error of the predicted displacement, in RMS moves."""
        target = displacement(pose.float(), self.period)  # (B, T, D)
        with torch.no_grad():
            moves = target[:, 1:] - target[:, :-1]  # (B, T-1, D): the wrapped steps
            scale = moves.square().sum(-1).mean().sqrt().clamp(min=1e-6)  # RMS move of the batch
        return (self.out(h.float()) - target / scale).square().sum(-1).mean()
