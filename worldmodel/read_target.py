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

A place needs no pose label to be recognised: the frame shows it. `--read-target frame` replaces (P4)'s pose test by
the views' (P4'): slot n's step showed the same view as step t (mean squared pixel difference <= tol). On the MNIST
map a view is its place (on the training walks the two tests mark the same pairs), so the loss then needs nothing
but the observations the ELBO trains on; on MiniWorld it also marks a look-alike view from another pose (a wall
seen from a step aside), which for predicting the frame is as good a read.

Under teacher forcing a key can find the place from the last frame seen. Predicting without frames (open loop, as
evaluation and dreams do) it cannot: only the actions since the last frame say where the agent is. `--read-open-loop`
asks (P5) of the reads of the open-loop branch too (the branch of `--open-loop-weight`, `GTMM.forward`):

    L_read_ol = (P5) over the imagined steps t >= K, with the same held_{t,n}                                   (P6)

(the dream writes its own latents, but slot n still holds step t - N + n, so the place's slots are the same), which
asks the controller to integrate the actions as the path loss does, from the frames instead of the poses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gtmm.cli import UserError
from worldmodel.retrieval import same_place_earlier

READ_TARGETS = ("pose", "frame")
"""what marks a slot as the place's: (P4) the recorded pose, (P4') the view"""

FRAME_TOL = 1e-4
"""(P4') views are the same when their mean squared difference (pixels in [0, 1]) is at most this (an RMS error of
~2.5 grey levels): renders of one pose are equal up to the distance's float rounding (<= 7e-7 measured on both
envs' walks), and on the MNIST map's walks two views of different places differ by 0.015 or more"""


def fifo_slots(same: Tensor, slots: int) -> Tensor:
    """same (B, T, T) bool, [b, t, s]: step s < t is a visit of step t's place -> held (B, T, N) bool: slot n of the
    FIFO that the read of step t sees (M_{t-1}, from an empty memory at step 0) holds such a step's write."""
    B, T, _ = same.shape
    # column j of `padded` is step s = j - N (the first N columns: slots not yet written)
    padded = torch.cat([same.new_zeros(B, T, slots), same], dim=-1)  # (B, T, N+T)
    t = torch.arange(T, device=same.device).unsqueeze(1)  # (T, 1)
    n = torch.arange(slots, device=same.device).unsqueeze(0)  # (1, N)
    column = (t + n).expand(B, T, slots)  # (B, T, N): slot n at step t holds s = t - N + n, column t + n
    return torch.gather(padded, 2, column)  # (B, T, N)


def fifo_read_targets(pose: Tensor, slots: int, tol: float = 1e-3) -> Tensor:
    """(P4): pose (B, T, D) -> held (B, T, N) bool: slot n of M_{t-1} holds a write made at step t's pose."""
    return fifo_slots(same_place_earlier(pose.float(), tol), slots)


def same_view_earlier(obs: Tensor, tol: float = FRAME_TOL) -> Tensor:
    """obs (B, T, H, W, C) uint8 -> (B, T, T) bool, [b, t, s]: step s < t showed step t's view (MSE <= tol)."""
    B, T = obs.shape[:2]
    frames = obs.reshape(B, T, -1).float().div(255.0)  # (B, T, D)
    mse = torch.cdist(frames, frames).square() / frames.shape[-1]  # (B, T, T)
    earlier = torch.ones(T, T, dtype=torch.bool, device=obs.device).tril(-1)  # s < t
    return (mse <= tol) & earlier


def fifo_frame_targets(obs: Tensor, slots: int, tol: float = FRAME_TOL) -> Tensor:
    """(P4'): obs (B, T, H, W, C) -> held (B, T, N) bool: slot n of M_{t-1} holds a write of a step that showed
    step t's view; no pose needed."""
    return fifo_slots(same_view_earlier(obs, tol), slots)


def fifo_targets(batch: dict[str, Tensor], slots: int, target: str) -> Tensor:
    """held (B, T, N) of a training batch by `target` (one of READ_TARGETS): (P4) from its `pose`, (P4') from its
    `obs`; an unknown target is a UserError."""
    if target not in READ_TARGETS:
        raise UserError(f"read_target {target!r}: expected 'pose' or 'frame'")
    return fifo_frame_targets(batch["obs"], slots) if target == "frame" else fifo_read_targets(batch["pose"], slots)


def read_loss(weights: Tensor, held: Tensor, eps: float = 1e-6) -> Tensor:
    """(P5): weights (B, T, R, N) the read weights, held (B, T, N) from `fifo_read_targets` -> the mean negative
    log read mass on the place's slots over the steps whose place memory holds (0 when no step has one)."""
    mass = (weights.float() * held.unsqueeze(2)).sum(-1)  # (B, T, R)
    revisit = held.any(-1).unsqueeze(-1).expand_as(mass).float()  # (B, T, R)
    # a masked mean, not a boolean index: no host sync, and a batch without revisits gives 0 with a graph
    return -(torch.log(mass + eps) * revisit).sum() / revisit.sum().clamp(min=1.0)
