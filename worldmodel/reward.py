"""Reward and termination heads: what a dream says an agent earned (issue 15).

An agent trained in dreams needs the env's reward, and the reward of a memory task depends on memory: the MNIST
map's and MiniWorld's ``coverage`` task pays for entering a place not visited this episode, which only a model that
remembers where it has been can predict. So both heads read the step's whole state, the memory read included:

    (R1) r_hat_t       = MLP_r([h_t, r_t, z_t])           the reward received on arriving at x_t
    (R2) p(done_t)     = sigmoid(MLP_d([h_t, r_t, z_t]))    the episode terminates at x_t

trained from the recorded rewards (mean squared error) and terminations (binary cross-entropy) next to the ELBO.
A dream calls ``GTMM.reward(state)`` after each dreamed step (the state holds h_t, r_t and z_t).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class RewardHead(nn.Module):
    """(R1) and (R2) of the module docstring: features (..., F) -> reward (...), termination logit (...)."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, 2))
        nn.init.constant_(self.net[-1].bias, 0.0)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features (..., F) -> (reward (...), termination logit (...))."""
        reward, done_logit = self.net(features).unbind(-1)
        return reward, done_logit


def loss(reward_pred: Tensor, done_logit: Tensor, reward: Tensor, terminated: Tensor) -> dict[str, Tensor]:
    """Mean squared reward error and termination cross-entropy per step, all (B, T); plus their sum `reward_loss`."""
    mse = F.mse_loss(reward_pred.float(), reward.float())
    bce = F.binary_cross_entropy_with_logits(done_logit.float(), terminated.float())
    return {"reward_loss": mse + bce, "reward_mse": mse.detach(), "done_bce": bce.detach()}
