"""Retrieval accuracy: when the model comes back to a place, does its memory read land on what it wrote there?

Open-loop error on a revisit mixes two failures: the memory read did not find the earlier visit, or it found it
and the model decoded it badly. This module tells them apart. It runs the model as `GTMM.predict_open_loop` does
(posterior means on the context frames [0, K), then prior means driven by the actions) and, for every step t, asks
where the read of step t (which reads M_{t-1}) put its attention:

    correct_n   = sum_{s < t, pose_s = pose_t} share_{t-1}[s, n]      how much of slot n this place wrote
    target      = sum_n correct_n >= held                             memory still holds a write of this place
    precision@1 = [correct_{argmax_n w_r,n} >= held]                  the top slot of head r holds this place
    correct mass = sum_n w_r,n correct_n                              read mass on this place's content
    chance      = sum_n o_n correct_n / sum_n o_n,  o_n = sum_s share[s, n]    a uniform read over filled slots

where share_t[s, n] is the share of slot n's content after the write of step t that step s wrote
(`Memory.attribute`, `worldmodel.memory.base.slot_shares`: exact 0/1 for the FIFO, the write mass times what
later erasures kept for NTM/LRU/DNC). Places are matched by pose (every coordinate within `tol`). The read weights
come from the model's own step (`GTMMCell.forward`'s `read_weights`), not from a second attend call.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from gtmm.cli import UserError
from worldmodel.memory.base import Memory, slot_shares

# the names of the per-step arrays, in the order a report lists them
METRICS = ("target", "precision_at_1", "correct_mass", "gate", "chance_mass")


def attribution_per_step(memory: Memory, records: dict[str, Tensor], batch: int, steps: int,
                         device: torch.device | str = "cpu") -> Iterator[Tensor]:
    """The shares of slot content held by M_{t-1} (what the read of step t sees), for t in [0, steps).

    records: the cell's write record of each step, each (B, >= steps - 1, N) (empty for the FIFO and `none`).
    Yields `steps` tensors, the t-th (B, t, N): share[s, n] of slot n's content that the write of step s < t put
    there. A generator, so that only one step's (B, t, N) lives at a time.
    """
    N = memory.slots
    coefficients = torch.zeros(batch, 0, N, device=device)  # (B, 0, N) nothing written yet
    yield slot_shares(coefficients)
    for t in range(steps - 1):
        coefficients = memory.attribute(coefficients, {k: v[:, t].float() for k, v in records.items()})
        yield slot_shares(coefficients)  # (B, t + 1, N)


def same_place_earlier(pose: Tensor, tol: float) -> Tensor:
    """(B, T, T) bool, [b, t, s]: step s < t was at the pose of step t (every coordinate within `tol`)."""
    B, T, D = pose.shape
    same = (pose.unsqueeze(2) - pose.unsqueeze(1)).abs().amax(-1) <= tol  # (B, T, T)
    earlier = torch.ones(T, T, dtype=torch.bool, device=pose.device).tril(-1)  # s < t
    return same & earlier


def retrieval_from_steps(memory: Memory, read_weights: Tensor, read_gate: Tensor, records: dict[str, Tensor],
                         pose: Tensor, tol: float = 1e-3, held: float = 0.5,
                         sources: Tensor | None = None) -> dict[str, Tensor]:
    """The retrieval figures of every step from a run's per-step diagnostics (see the module docstring).

    read_weights (B, T, R, N) and read_gate (B, T, R) of the reads, records {key: (B, T, N)} the write records
    (`Memory.write_record`), pose (B, T, D). `sources` (T,) bool, optional: also report `target_from_sources`,
    whether memory holds (>= held) a write of this place made at one of those steps. Returns tensors over all T
    steps: target (B, T) bool, precision_at_1 / correct_mass (B, T, R) (NaN where not target), gate (B, T, R),
    chance_mass (B, T) (NaN where not target).
    """
    B, T, R, N = read_weights.shape
    same = same_place_earlier(pose.float(), tol)  # (B, T, T)
    correct = torch.zeros(B, T, N, device=read_weights.device)  # same-place share of every slot of M_{t-1}
    occupancy = torch.zeros(B, T, N, device=read_weights.device)  # how full every slot of M_{t-1} is
    from_sources = torch.zeros(B, T, device=read_weights.device)
    for t, shares in enumerate(attribution_per_step(memory, records, B, T, read_weights.device)):  # (B, t, N)
        mask = same[:, t, :t].unsqueeze(-1).float()  # (B, t, 1)
        correct[:, t] = (mask * shares).sum(1)  # (B, N)
        occupancy[:, t] = shares.sum(1)  # (B, N)
        if sources is not None:
            from_sources[:, t] = (mask * sources[:t].view(1, t, 1) * shares).sum((1, 2))  # (B,)
    nan = torch.tensor(float("nan"), device=read_weights.device)
    target = correct.sum(-1) >= held  # (B, T)
    weights = read_weights.float()
    top = weights.argmax(-1)  # (B, T, R) the slot each head attends most
    top_correct = correct.gather(-1, top)  # (B, T, R)
    precision = torch.where(target.unsqueeze(-1), (top_correct >= held).float(), nan)  # (B, T, R)
    correct_mass = torch.where(target.unsqueeze(-1), (weights * correct.unsqueeze(2)).sum(-1), nan)  # (B, T, R)
    chance = (occupancy * correct).sum(-1) / occupancy.sum(-1).clamp_min(1e-12)  # (B, T)
    out = {
        "target": target,
        "precision_at_1": precision,
        "correct_mass": correct_mass.clamp(0.0, 1.0),  # NaN stays NaN; rounding can pass 1 by an ulp
        "gate": read_gate.float(),
        "chance_mass": torch.where(target, chance, nan),
    }
    if sources is not None:
        out["target_from_sources"] = from_sources >= held
    return out


def _no_memory(B: int, T: int, R: int) -> dict[str, Tensor]:
    """The `none` memory: nothing is ever held, no read reaches the model."""
    nan = torch.full((B, T, R), float("nan"))
    return {"target": torch.zeros(B, T, dtype=torch.bool), "precision_at_1": nan, "correct_mass": nan.clone(),
            "gate": torch.zeros(B, T, R), "chance_mass": torch.full((B, T), float("nan")),
            "target_from_sources": torch.zeros(B, T, dtype=torch.bool)}


@torch.no_grad()
def retrieval_per_step(model: Any, obs: Any, prev_action: Any, pose: Any, context: int, tol: float = 1e-3,
                       held: float = 0.5) -> dict[str, np.ndarray]:
    """Retrieval accuracy of `model` (a `GTMM`) on windows obs uint8 (B, T, H, W, C), prev_action int64 (B, T),
    pose (B, T, D) (tensors or arrays), with the context K = `context` frames, as `GTMM.predict_open_loop` runs it.

    Returns numpy arrays over the open-loop steps t in [K, T) (R = read heads):
      target               (B, T-K) bool   memory M_{t-1} holds (share >= `held`) a write made at an earlier step at
                                           this step's pose (within `tol`): a read *can* find this place
      target_from_context  (B, T-K) bool   the same, counting only writes made during the context frames [0, K)
      precision_at_1       (B, T-K, R)     1.0 if head r's most-attended slot holds this place (share >= `held`),
                                           else 0.0; NaN where not target
      correct_mass         (B, T-K, R)     read mass of head r on this place's share of the slots, in [0, 1];
                                           NaN where not target
      gate                 (B, T-K, R)     head r's read gate in [0, 1]: how much of its read reached the model
      chance_mass          (B, T-K)        the correct mass of a uniform read over the filled slots (occupancy-
                                           weighted for soft writes); NaN where not target
    and the same five figures for the teacher-forced context steps [0, K) under `context_<name>` ((B, K), (B, K, R)).
    The `none` memory: target all False, precision/mass/chance all NaN, gate 0, with R = the config's heads.
    """
    device = model.device
    obs = torch.as_tensor(obs, device=device)
    prev_action = torch.as_tensor(prev_action, device=device, dtype=torch.int64)
    pose = torch.as_tensor(pose, device=device, dtype=torch.float32)
    B, T = prev_action.shape
    if not 0 < context < T:
        raise UserError(f"retrieval context {context}: expected 0 < context < T = {T}")
    if pose.dim() != 3 or pose.shape[:2] != (B, T) or pose.shape[2] < 1:
        raise UserError(f"retrieval: pose must be (B, T, D) = ({B}, {T}, D >= 1) to match places, got {tuple(pose.shape)}")
    K = context

    ctx = model.observe(obs[:, :K], prev_action[:, :K], pose[:, :K], sample=False)
    dream = model.imagine(ctx["state"], prev_action[:, K:], pose[:, K:], sample=False)
    memory = model.cell.memory
    if memory.slots == 0:
        figures = _no_memory(B, T, model.cfg.heads)
    else:
        joined = lambda key: torch.cat([ctx[key], dream[key]], dim=1)  # noqa: E731  (B, T, ...)
        records = {k: joined(k) for k in ctx if k.startswith("write_")}  # (B, T, N) each
        sources = torch.arange(T, device=device) < K  # (T,) the context steps
        figures = retrieval_from_steps(memory, joined("read_weights"), joined("read_gate"), records, pose, tol=tol,
                                       held=held, sources=sources)
    result = {}
    for name in METRICS:
        result[name] = figures[name][:, K:].cpu().numpy()
        result[f"context_{name}"] = figures[name][:, :K].cpu().numpy()
    result["target_from_context"] = figures["target_from_sources"][:, K:].cpu().numpy()
    return result
