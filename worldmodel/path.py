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

Without poses (`--path-target actions`) the head reads the actions taken since the first frame instead, counted per
action and centred over the actions, a target made of the model's own inputs:

    n_t     = sum_{1<=s<=t} onehot(a_s)                 a_s = the action that led to frame s (-1: none, no count)
    d'_t    = (n_t - mean_a n_{t,a} 1) / scale          centred: the part a move can depend on when the actions'
                                                        moves sum to zero (up/down, left/right)              (P2')

On a map whose moves add and are never blocked (the torus) the displacement is linear in d'_t (d_t = M d'_t, M the
moves), so (P3) on d'_t asks the controller for everything (P2) asks, without a pose label; where moves are blocked
(a clipping border, MiniWorld's walls) or turn the agent, the counts are not the displacement and say less.
A blocked move shows in the views, so `--path-target moves` counts an action only where the frame it led to differs
from the one before:

    m_s     = [x_s != x_{s-1}]                          the view changed: the move happened                  (P2'')
    n''_t   = sum_{1<=s<=t} m_s onehot(a_s),  d''_t = centred and scaled as (P2')

On the MNIST maps the view changes exactly when the pose does (every step of 512 clip and wrap walks), so under a
clipping border too d_t = M d''_t. A move onto a view equal to the last would go uncounted; a turn still breaks the
sum (MiniWorld).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

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


PATH_TARGETS = ("pose", "actions", "moves")
"""what the path head reads from h_t: the displacement from the recorded poses (P2), the centred action counts
(P2'), or the centred counts of the actions whose view changed (P2'')"""


def view_changed(obs: torch.Tensor) -> torch.Tensor:
    """(P2'') m_s: obs (B, T, ...) -> (B, T) bool, frame s differs from frame s - 1 (False at s = 0)."""
    changed = (obs[:, 1:] != obs[:, :-1]).flatten(2).any(-1)  # (B, T-1)
    return torch.cat([torch.zeros_like(changed[:, :1]), changed], dim=1)


def action_counts(prev_action: torch.Tensor, num_actions: int, happened: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """(P2') before scaling: prev_action (B, T) int64 -> the centred count of each action since frame 0 (B, T, A).
    Actions < 0 (none: an episode's first frame) count for nothing; with ``happened`` (B, T) bool (P2''), neither do
    the actions where it is False."""
    taken = torch.nn.functional.one_hot(prev_action.clamp(min=0), num_actions).float()  # (B, T, A)
    taken = taken * (prev_action >= 0).unsqueeze(-1)  # no action, no count
    if happened is not None:
        taken = taken * happened.unsqueeze(-1)  # a blocked move, no count
    taken[:, 0] = 0.0  # the move into frame 0 came before the window's first frame
    counts = taken.cumsum(1)  # (B, T, A)
    return counts - counts.mean(-1, keepdim=True)


class PathHead(nn.Module):
    """(P3): a linear read-out of the displacement (P2) or the centred action counts (P2', P2'') from h_t, and its
    loss."""

    def __init__(self, h_dim: int, pose_dim: int, period: Sequence[Optional[float]] = (),
                 target: Literal["pose", "actions", "moves"] = "pose", num_actions: int = 0) -> None:
        super().__init__()
        if target not in PATH_TARGETS:
            raise UserError(f"path target {target!r}: expected one of {PATH_TARGETS}")
        self.target, self.num_actions = target, num_actions
        self.out = nn.Linear(h_dim, pose_dim if target == "pose" else num_actions)
        self.period = list(period)

    def loss(self, h: torch.Tensor, pose: torch.Tensor, prev_action: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """h (B, T, H), pose (B, T, D), prev_action (B, T), obs (B, T, H, W, C) -> the mean squared error of the
        predicted target, in RMS moves (steps of the target)."""
        if self.target == "pose":
            target = displacement(pose.float(), self.period)  # (B, T, D)
        else:
            happened = view_changed(obs) if self.target == "moves" else None  # (B, T)
            target = action_counts(prev_action, self.num_actions, happened)  # (B, T, A)
        with torch.no_grad():
            moves = target[:, 1:] - target[:, :-1]  # (B, T-1, D or A): the target's steps (poses: wrapped)
            scale = moves.square().sum(-1).mean().sqrt().clamp(min=1e-6)  # RMS move of the batch
        return (self.out(h.float()) - target / scale).square().sum(-1).mean()
