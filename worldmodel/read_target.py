"""Supervised reads: a revisit's read is asked to land on the slot its place was written to (issue 14).

The path loss (`worldmodel.path`, P3) makes the controller know where the agent is; it does not make the paper's
keys (k_r = W_r addr_t, addr_t = P h_t) find the slot of that place. Over four 6,000-step MNIST-map runs with it the
top read held the place 46-86% of the time (precision@1; chance 10%), and the open-loop error on revisits followed
(0.35-0.50x `none`). This loss asks it of the reads directly, from the recorded poses, as the path loss asks for the
displacement:

    held_{t,n} = [slot n of M_{t-1} holds a write of a step s < t at the pose of step t]    (pose within tol) (P4)
    L_read     = mean_{b, t, r : any_n held_{t,n}}  -log(sum_n w_{r,t,n} held_{t,n} + eps)                  (P5)

w_{r,t,n} is head r's read weight at step t (the read of M_{t-1}). Steps without an earlier visit of their place
in memory (first visits) add nothing: whether to read at all is the gate's, which the ELBO trains. The labels are
the same recorded poses as the path loss's and are used in training only: evaluation and dreams run the paper's
model unchanged.

(P4) needs to know which step wrote each slot. The FIFO (`introspective`) says so by its order: a training window
starts with an empty memory, and after the write of step t-1 slot n holds step t - N + n (none while negative).
NTM/LRU/DNC write softly to slots of their choosing; for them this loss is not defined.
"""

from __future__ import annotations

import torch
from torch import Tensor

from worldmodel.retrieval import same_place_earlier


def fifo_read_targets(pose: Tensor, slots: int, tol: float = 1e-3) -> Tensor:
    """(P4): pose (B, T, D) -> held (B, T, N) bool: slot n of the FIFO that the read of step t sees (M_{t-1}, from
    an empty memory at step 0) holds a write made at step t's pose."""
    B, T, _ = pose.shape
    same = same_place_earlier(pose.float(), tol)  # (B, T, T): [b, t, s] step s < t was at step t's pose
    # column j of `padded` is step s = j - N (the first N columns: slots not yet written)
    padded = torch.cat([same.new_zeros(B, T, slots), same], dim=-1)  # (B, T, N+T)
    t = torch.arange(T, device=pose.device).unsqueeze(1)  # (T, 1)
    n = torch.arange(slots, device=pose.device).unsqueeze(0)  # (1, N)
    column = (t + n).expand(B, T, slots)  # (B, T, N): slot n at step t holds s = t - N + n, column t + n
    return torch.gather(padded, 2, column)  # (B, T, N)


def read_loss(weights: Tensor, held: Tensor, eps: float = 1e-6) -> Tensor:
    """(P5): weights (B, T, R, N) the read weights, held (B, T, N) from `fifo_read_targets` -> the mean negative
    log read mass on the place's slots over the steps whose place memory holds (0 when no step has one)."""
    mass = (weights.float() * held.unsqueeze(2)).sum(-1)  # (B, T, R)
    revisit = held.any(-1).unsqueeze(-1).expand_as(mass).float()  # (B, T, R)
    # a masked mean, not a boolean index: no host sync, and a batch without revisits gives 0 with a graph
    return -(torch.log(mass + eps) * revisit).sum() / revisit.sum().clamp(min=1.0)
