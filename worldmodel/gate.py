"""The blocked-move gate: did the action a_{t-1} really move the agent? Learned from what the model sees.

A path integrator over actions (``worldmodel.address``) assumes every move happens. In the MNIST map's ``clip``
border and in MiniWorld's walls a move can be blocked: the pose stays, the integrator steps on, and every address
after that is off by one move, so memory reads of later revisits miss (the README's "use border wrap" advice).
The gate scales each integration step by m_t in [0, 1], the probability that a_{t-1} took effect:

    s_t = s_{t-1} + m_t * move(a_{t-1})                        (additive; se2 turns and steps alike)

m_t comes from two heads, because the model sometimes sees frame x_t and sometimes only imagines it:

    (G1) observed   m_t = sigmoid(f([e_{t-1}, e_t, log(mean |x_t - x_{t-1}|), onehot(a_{t-1})]))   teacher forcing
    (G2) predicted  m_t = sigmoid(g([z_{t-1}, onehot(a_{t-1}), walls_{t-1}]))                open loop, dreams

G1 reads the frame change: a blocked move shows the same frame again (both envs render without noise), a move
almost always a different one, so the pixel-change feature makes it nearly a threshold (the embeddings cover views
that barely change, e.g. blank map, or a wall that fills the view both before and after). G2 has no x_t: it guesses
from what the model knows of the place it stands in (z_{t-1}: a wall right ahead blocks a step forward) and, with
``gate_walls`` (the MNIST map's borders, which no frame shows), from where its own walk has met walls before
(``ActionAddress.gate_features``).

Both are trained end to end through the address (the ELBO's gradient reaches m_t through the memory reads) and, on
data with a pose, by an auxiliary binary cross-entropy against "the pose changed" (``targets``): the pose is only a
label here, never an input, so a trained model detects blocked moves from frames alone. Without a pose G2 learns to
match G1 (``loss``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from worldmodel.address import action_onehot

PIXEL_CHANGE_FLOOR = 1e-3  # log(mean |dx| + floor): an unchanged frame is log(1e-3) = -6.9, any visible change > -5


class MoveGate(nn.Module):
    """Heads G1 (``observed``) and G2 (``predicted``) of the module docstring, and their training signal."""

    def __init__(self, *, embed_dim: int, z_dim: int, num_actions: int, hidden: int = 64, extra_dim: int = 0):
        super().__init__()
        self.num_actions, self.extra_dim = num_actions, extra_dim
        self.observed_net = nn.Sequential(nn.Linear(2 * embed_dim + 1 + num_actions, hidden), nn.GELU(),
                                          nn.Linear(hidden, 1))
        self.predicted_net = nn.Sequential(nn.Linear(z_dim + num_actions + extra_dim, hidden), nn.GELU(),
                                           nn.Linear(hidden, 1))
        # start open (m ~ 0.88): an untrained gate behaves like the plain integrator, the right prior for most steps
        nn.init.constant_(self.observed_net[2].bias, 2.0)
        nn.init.constant_(self.predicted_net[2].bias, 2.0)

    def observed_logits(self, frames: Tensor, embed: Tensor, prev_action: Tensor) -> Tensor:
        """(G1) for every step of a window: frames (B, T, C, H, W) in [0, 1], embed (B, T, E), prev_action (B, T)
        -> logits (B, T). Step 0 has no earlier frame in the window: its logit is +inf-like (the move is assumed,
        which only shifts the whole window's addresses by one constant move)."""
        B, T = prev_action.shape
        change = (frames[:, 1:] - frames[:, :-1]).abs().flatten(2).mean(-1)  # (B, T-1)
        features = torch.cat([embed[:, :-1], embed[:, 1:], torch.log(change + PIXEL_CHANGE_FLOOR).unsqueeze(-1),
                              action_onehot(prev_action[:, 1:], self.num_actions, embed.dtype)], dim=-1)  # (B, T-1, F)
        logits = self.observed_net(features).squeeze(-1)  # (B, T-1)
        first = logits.new_full((B, 1), 20.0)  # sigmoid(20) = 1 - 2e-9
        return torch.cat([first, logits], dim=1)  # (B, T)

    def predicted_logits(self, z_prev: Tensor, prev_action: Tensor, extra: Tensor | None = None) -> Tensor:
        """(G2): z_{t-1} (..., Z), a_{t-1} (...,) and the address's own evidence (..., extra_dim) (the walls its
        walk met, ``ActionAddress.gate_features``; None = none) -> logits (...,)."""
        parts = [z_prev, action_onehot(prev_action, self.num_actions, z_prev.dtype)]
        if self.extra_dim:
            parts.append(extra.to(z_prev.dtype))
        features = torch.cat(parts, dim=-1)
        return self.predicted_net(features).squeeze(-1)


def targets(pose: Tensor, prev_action: Tensor) -> tuple[Tensor, Tensor]:
    """The label "a_{t-1} moved the agent" from the recorded pose: pose (B, T, D), prev_action (B, T) ->
    (moved (B, T) float 0/1, valid (B, T) bool). Valid where step t has an earlier step in the window, an action,
    and a finite pose (a dream's unknown pose or pose-free data give no label)."""
    moved = (pose[:, 1:] != pose[:, :-1]).any(-1)  # (B, T-1)
    finite = torch.isfinite(pose).all(-1)  # (B, T)
    valid = (prev_action[:, 1:] >= 0) & finite[:, 1:] & finite[:, :-1]  # (B, T-1)
    pad = torch.zeros_like(prev_action[:, :1], dtype=torch.bool)
    return torch.cat([pad, moved], dim=1).float(), torch.cat([pad, valid], dim=1)


def loss(observed_logits: Tensor, predicted_logits: Tensor, pose: Tensor, prev_action: Tensor,
         has_pose: bool) -> dict[str, Tensor]:
    """The gate's auxiliary loss (mean BCE per labelled step) and its accuracy. With a pose (``has_pose``): both
    heads against the pose's label. Without: G2 against G1's belief (detached), G1 left to the ELBO alone."""
    label, valid = targets(pose, prev_action)  # (B, T) each
    if not has_pose:
        label = torch.sigmoid(observed_logits).detach()
        valid = torch.zeros_like(valid)
        valid[:, 1:] = prev_action[:, 1:] >= 0
    weight = valid.float()
    count = weight.sum().clamp(min=1.0)
    bce = lambda logits: (F.binary_cross_entropy_with_logits(logits.float(), label, reduction="none") * weight).sum() / count  # noqa: E731
    out = {"gate_loss": bce(predicted_logits) + (bce(observed_logits) if has_pose else 0.0)}
    with torch.no_grad():
        out["gate_acc_observed"] = (((observed_logits > 0).float() == label).float() * weight).sum() / count
        out["gate_acc_predicted"] = (((predicted_logits > 0).float() == label).float() * weight).sum() / count
    return out
