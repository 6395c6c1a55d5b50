"""Evaluate a trained world model on held-out rollouts: does it predict a place it has seen when it comes back?

`python -m worldmodel.evaluate --checkpoint runs/intro --data data/mnist_map_test --baseline runs/none`

For each window (one per held-out episode, starting at the episode's first frame so that "revisit" means "seen
earlier in this window"; up to `--windows`, 256 by default, fewer when the data has fewer episodes, and it says so):
  - teacher forcing: per-step NLL -log p(x_t|z_t) and KL(q_t || p_t) in nats, split into revisit steps and first visits;
  - open loop: the model sees frames [0, K), then only the actions, and predicts frames [K, T) from its prior
    (prior means, mean decode); per frame MSE, BCE, PSNR and SSIM against the truth (`worldmodel.metrics`);
  - the floor: the model's own reconstruction (posterior-mean decode) of the same steps;
  - the oracle copy: the model's own reconstruction of the latest CONTEXT view of the same place (by pose), scored
    against the truth now: what a perfect recall through this decoder would give.
Open-loop steps fall in three groups: `revisit_context` (a place seen in the context: the only revisits a memory can
recall open loop), `revisit_new` (a place first met during the open-loop part) and `first_visit`. Every figure is a
pooled mean over the steps of a group with a 95% bootstrap interval over windows (see `worldmodel.metrics`).

Also reported: the memory score `(E_none - E_model) / (E_none - E_oracle)` against the `--baseline` model (should be
a `--memory none` checkpoint; another baseline is used and labelled as such), two reference predictors without a
model (`copy_last`: the last context frame for every open-loop step; `mean_frame`: the mean of the window's context
frames), recall against the lag since the place was last seen and against its visit count, memory retrieval
precision per read head (`worldmodel.retrieval`) and, on MNIST maps, semantic recall: does the predicted frame show
the right digit (`worldmodel.semantic`).

Writes, into `<run>/eval/<data folder name>` (or `--out`), under a folder lock: `eval.json` (format `gtmm-eval`,
version in `worldmodel.report.EVAL_VERSION`; `python -m worldmodel.report` tabulates many of them), `strip.png`
(per window: truth, then each model's prediction after the dimmed context; every row labelled, steps marked
context / revisit of a context place / revisit of a new place / first visit) and `lag.png`.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from gtmm import cli
from gtmm.cli import UserError
from gtmm.fs import FolderLock, atomic_write, write_bytes_atomic
from worldmodel import checkpoint, metrics, report, semantic
from worldmodel.model import GTMM, batch_to_torch
from worldmodel.retrieval import retrieval_per_step
from worldmodel.train import resolve_device

POSE_TOL = 1e-3  # two steps are at the same place when their poses differ by less than this
MNIST_MAP_ID = "MnistMap-v0"  # semantic recall needs frames that are MNIST digits


@dataclass
class EvalConfig:
    """Evaluate a GTMM checkpoint on held-out rollouts: ELBO terms and open-loop error, revisits vs first visits."""

    checkpoint: str
    """the model: a run folder or its ckpt.pt"""
    data: str
    """held-out rollouts folder (e.g. collected with --env mnist_map_test)"""
    baseline: Optional[str] = None
    """a --memory none checkpoint evaluated on the same windows: the 0 of the memory score (another memory is used
    and labelled as the baseline)"""
    out: Optional[str] = None
    """output folder for eval.json, strip.png and lag.png (default: <checkpoint run folder>/eval/<data folder name>)"""
    context: int = 8
    """K: frames seen before predicting open loop"""
    hedge: bool = False
    """open-loop forecasts of an address that keeps several likely places (the lattice filter): the expected frame
    over the places (`GTMM.imagine(hedge=True)`) instead of the frame of the mixed read; others are unchanged"""
    seq_len: int = 0
    """frames per window (0 = the checkpoint's training --seq-len; longer than trained tests recall at longer lags)"""
    windows: int = 256
    """how many held-out episodes (one window each) to evaluate"""
    batch: int = 16
    """windows per forward pass"""
    strip_windows: int = 4
    """windows drawn in strip.png"""
    resamples: int = 1000
    """bootstrap resamples of the windows for the 95% confidence intervals"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N"""
    seed: int = 0
    """seed of the latent samples of the teacher-forced ELBO and of the bootstrap resamples"""


def episode_start_windows(root: str, seq_len: int, count: int):
    """The held-out windows that start at an episode's first frame, evenly spread over the folder's episodes of at
    least `seq_len` frames (up to `count`). Returns (windows, their indices, episodes in the folder, episodes long
    enough). Only the chosen episodes are decoded and cached, not the whole folder (which may be a big one)."""
    from rollouts.dataset import RolloutWindows, split_episodes
    from rollouts.storage import read_manifest

    records = split_episodes(read_manifest(root), "all")
    long_enough = np.flatnonzero([r["steps"] + 1 >= seq_len for r in records])
    if len(long_enough) == 0:
        raise UserError(f"{root}: no episode has {seq_len} frames; collect longer episodes or pass --seq-len")
    spread = np.unique(np.linspace(0, len(long_enough) - 1, min(count, len(long_enough))).round().astype(int))
    windows = RolloutWindows(root, seq_len=seq_len, split="all", episodes=long_enough[spread])
    return windows, windows.episode_starts(), len(records), len(long_enough)


def seen_in_context(pose: np.ndarray, revisit: np.ndarray, context: int, tol: float = POSE_TOL) -> np.ndarray:
    """(N, T-K) bool: a revisit step after the context whose place was seen IN the context (pose within `tol`).

    In open loop the model never sees the frames after the context, so only these revisits can be recalled; a
    revisit of a place first seen during the open-loop part is as unpredictable as a first visit. Without a pose
    (D = 0) every revisit counts."""
    future = revisit[:, context:]
    if pose.shape[-1] == 0:
        return future.copy()
    dist = np.linalg.norm(pose[:, context:, None, :] - pose[:, None, :context, :], axis=-1)  # (N, T-K, K)
    return future & (dist.min(-1) < tol)


def split_masks(pose: np.ndarray, revisit: np.ndarray, context: int) -> dict[str, np.ndarray]:
    """The open-loop step groups, each (N, T-K) bool: revisit_context, revisit_new, first_visit, and revisit (all)."""
    future = revisit[:, context:]
    recall = seen_in_context(pose, revisit, context)
    return {"revisit_context": recall, "revisit_new": future & ~recall, "first_visit": ~future, "revisit": future}


def _masked(x: np.ndarray, mask: np.ndarray) -> float:
    return float(x[mask].mean()) if mask.any() else float("nan")


# -- one pass over the windows -----------------------------------------------------------------------------------------

def _batches(windows, index: np.ndarray, batch: int, device: torch.device):
    """Yield the batch dicts of tensors on `device` of consecutive chunks of `batch` windows."""
    for start in range(0, len(index), batch):
        yield batch_to_torch(windows.sample_batch(index[start:start + batch]), device)


def window_arrays(windows, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """revisit (N, T) bool and pose (N, T, D) of the chosen windows."""
    arrays = windows.sample_batch(index)
    return arrays["revisit"], arrays["pose"]


def diverged(path: str) -> UserError:
    """The one-line error for a checkpoint whose outputs are NaN or infinite."""
    return UserError(f"checkpoint {path} gives non-finite predictions: the run diverged? (NaN/inf in its weights or "
                     "outputs; evaluate an earlier checkpoint, or retrain with a lower --lr)")


def check_finite_weights(model: GTMM, path: str) -> None:
    """UserError when any weight of `model` is NaN or infinite (a diverged run)."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise diverged(path)


def _cat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def model_steps(model: GTMM, windows, index: np.ndarray, context: int, batch: int, device: torch.device, seed: int,
                path: str, keep: int = 0, retrieval: Optional[Callable] = None,
                agreement: Optional[Callable] = None, hedge: bool = False) -> dict[str, Any]:
    """Per-step arrays of one model on the given windows (N = len(index), S = T - K open-loop steps):

    `nll`, `kl` (N, T) teacher-forced; `open_loop`, `reconstruction`, `oracle`: {mse, bce, psnr, ssim} (N, S)
    (the oracle's values are meaningless where a step has no context view of its place: mask them);
    `retrieval`: {key: array} of `retrieval(model, obs, prev_action, pose, context)` or None;
    `semantic`: {key: array} of `agreement(pred, truth)` (N, S) or None; `strip`: the first `keep` predictions."""
    T = windows.seq_len
    if not 0 < context < T:
        raise UserError(f"--context {context}: expected 0 < context < seq_len = {T}")
    torch.manual_seed(seed)
    parts: dict[str, list] = {k: [] for k in ("tf", "open_loop", "reconstruction", "oracle", "retrieval", "semantic")}
    strip = []
    for b in _batches(windows, index, batch, device):
        elbo = model.observe(b["obs"], b["prev_action"], b["pose"], sample=True)  # ELBO terms under the posterior
        res = model.predict_open_loop(b["obs"], b["prev_action"], b["pose"], context, hedge=hedge)
        pred = res["pred"].float()  # (B, S, H, W, C)
        recon = res["recon"].float()  # (B, T, H, W, C)
        if not (torch.isfinite(pred).all() and torch.isfinite(recon).all() and torch.isfinite(elbo["kl"]).all()):
            raise diverged(path)
        truth = b["obs"].float().div(255)  # (B, T, H, W, C)
        future = truth[:, context:]  # (B, S, H, W, C)
        # the oracle copy: the reconstruction of the latest context step at this step's pose (step 0 where none)
        source = metrics.oracle_source(b["pose"].cpu().numpy(), context, POSE_TOL)  # (B, S)
        src = torch.as_tensor(np.maximum(source, 0), device=recon.device)
        oracle = recon[torch.arange(len(src), device=recon.device)[:, None], src]  # (B, S, H, W, C)
        parts["open_loop"].append(metrics.frame_metrics(pred, future))
        parts["reconstruction"].append(metrics.frame_metrics(recon[:, context:], future))
        parts["oracle"].append(metrics.frame_metrics(oracle, future))
        parts["tf"].append({"nll": elbo["nll"].float().cpu().numpy(), "kl": elbo["kl"].float().cpu().numpy()})
        if retrieval is not None:
            found = retrieval(model, b["obs"], b["prev_action"], b["pose"], context, tol=POSE_TOL)
            parts["retrieval"].append({k: np.asarray(v) for k, v in found.items() if not k.startswith("context_")})
        if agreement is not None:
            parts["semantic"].append(agreement(pred.cpu().numpy(), future.cpu().numpy()))
        if len(strip) * batch < keep:
            strip.append(pred.cpu().numpy())
    tf = _cat(parts["tf"])
    return {"nll": tf["nll"], "kl": tf["kl"], "open_loop": _cat(parts["open_loop"]),
            "reconstruction": _cat(parts["reconstruction"]), "oracle": _cat(parts["oracle"]),
            "retrieval": _cat(parts["retrieval"]) if parts["retrieval"] else None,
            "semantic": _cat(parts["semantic"]) if parts["semantic"] else None,
            "strip": np.concatenate(strip)[:keep] if strip else None}


def reference_steps(windows, index: np.ndarray, context: int, batch: int,
                    agreement: Optional[Callable] = None) -> dict[str, dict[str, Any]]:
    """Per-step arrays of the two predictors without a model, in the layout of `model_steps`:
    `copy_last` (the last context frame, for every open-loop step) and `mean_frame` (the mean of the window's
    context frames)."""
    parts: dict[str, dict[str, list]] = {name: {"open_loop": [], "semantic": []}
                                         for name in ("copy_last", "mean_frame")}
    for b in _batches(windows, index, batch, "cpu"):
        truth = b["obs"].float().div(255)  # (B, T, H, W, C)
        future = truth[:, context:]  # (B, S, H, W, C)
        guesses = {"copy_last": truth[:, context - 1:context].expand_as(future),
                   "mean_frame": truth[:, :context].mean(1, keepdim=True).expand_as(future)}
        for name, guess in guesses.items():
            parts[name]["open_loop"].append(metrics.frame_metrics(guess, future))
            if agreement is not None:
                parts[name]["semantic"].append(agreement(guess.numpy(), future.numpy()))
    return {name: {"open_loop": _cat(p["open_loop"]), "semantic": _cat(p["semantic"]) if p["semantic"] else None}
            for name, p in parts.items()}


# -- figures with confidence intervals ---------------------------------------------------------------------------------

def image_figures(values: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                  boot: metrics.Bootstrap) -> dict[str, dict[str, Any]]:
    """{group: {metric: {mean, ci, n, windows}}} of per-step image metrics (N, S) over the step groups."""
    return {group: {m: boot.mean(values[m], mask) for m in metrics.IMAGE_METRICS} for group, mask in masks.items()}


def lag_figures(errors: np.ndarray, masks: dict[str, np.ndarray], lag: np.ndarray, visits: np.ndarray,
                boot: metrics.Bootstrap, e_none: Optional[np.ndarray] = None,
                e_oracle: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Open-loop MSE (and the memory score, when `e_none` and `e_oracle` are given) per lag bin and per visit-count
    bin, for revisits of context places and of new places. All arrays (N, S)."""
    out: dict[str, Any] = {}
    for key, values, bins in (("lag", lag, metrics.LAG_BINS), ("visits", visits, metrics.VISIT_BINS)):
        which = metrics.bin_index(values, bins)
        entry: dict[str, Any] = {"bins": metrics.bin_labels(bins)}
        for group in ("revisit_context", "revisit_new"):
            in_bin = [masks[group] & (which == i) for i in range(len(bins))]
            entry[group] = {"mse": [boot.mean(errors, m) for m in in_bin]}
            if group == "revisit_context" and e_none is not None and e_oracle is not None:
                entry[group]["score"] = [boot.score(e_none, errors, e_oracle, m) for m in in_bin]
        out[key] = entry
    return out


def retrieval_figures(found: dict[str, np.ndarray], mask: np.ndarray, boot: metrics.Bootstrap) -> dict[str, Any]:
    """Retrieval on revisits of context places whose earlier visit the memory still holds (`found["target"]`):
    precision@1 of each read head's top slot, read mass on correct slots, read gate, and the chance mass."""
    target = mask & found["target"].astype(bool)  # (N, S)
    heads = found["precision_at_1"].shape[-1]
    out: dict[str, Any] = {"steps": int(target.sum()), "revisit_context_steps": int(mask.sum()),
                           "held_fraction": float(target.sum() / mask.sum()) if mask.any() else None,
                           "held_from_context_fraction": (
                               float((mask & found["target_from_context"]).sum() / mask.sum())
                               if mask.any() and "target_from_context" in found else None),
                           "heads": heads,
                           "chance_mass": boot.mean(found["chance_mass"], target)}
    for key in ("precision_at_1", "correct_mass", "gate"):
        values = np.nan_to_num(found[key].astype(np.float64))  # (N, S, R); NaN only off target
        out[key] = {"mean_over_heads": boot.mean(values.mean(-1) if heads else np.zeros(mask.shape), target),
                    "per_head": [boot.mean(values[..., r], target) for r in range(heads)]}
    return out


def semantic_figures(found: dict[str, np.ndarray], masks: dict[str, np.ndarray], centred: np.ndarray,
                     boot: metrics.Bootstrap) -> dict[str, Any]:
    """Digit agreement of predicted vs true frames (`worldmodel.semantic.digit_agreement`) on the steps centred on
    one digit, per step group; `prob_of_true`: the same for the classifier's probability of the true frame's label
    on the predicted frame (a soft agreement)."""
    groups = ("revisit_context", "revisit_new", "first_visit")
    out: dict[str, Any] = {g: boot.mean(found["agree"].astype(np.float64), masks[g] & centred) for g in groups}
    if "pred_prob_of_true" in found:
        out["prob_of_true"] = {g: boot.mean(found["pred_prob_of_true"].astype(np.float64), masks[g] & centred)
                               for g in groups}
    return out


def model_figures(steps: dict[str, Any], masks: dict[str, np.ndarray], revisit: np.ndarray, boot: metrics.Bootstrap,
                  lag: Optional[np.ndarray], visits: Optional[np.ndarray], centred: Optional[np.ndarray],
                  e_none: Optional[np.ndarray]) -> dict[str, Any]:
    """The eval.json entry of one model from its per-step arrays (see the module docstring of `worldmodel.report`)."""
    nll, kl = steps["nll"], steps["kl"]  # (N, T)
    ol, rc, oracle = steps["open_loop"], steps["reconstruction"], steps["oracle"]
    ctx, future = masks["revisit_context"], masks["revisit"]
    figures: dict[str, Any] = {
        "teacher_forcing": {
            "nll_revisit": _masked(nll, revisit), "nll_first_visit": _masked(nll, ~revisit),
            "kl_revisit": _masked(kl, revisit), "kl_first_visit": _masked(kl, ~revisit),
            "kl_per_step": kl.mean(0).tolist(), "nll_per_step": nll.mean(0).tolist(),
            "kl": {"revisit": boot.mean(kl, revisit), "first_visit": boot.mean(kl, ~revisit)},
        },
        "open_loop": {
            # flat pooled means (the figures of evaluate's first version; the same values as the groups' "mean")
            "mse_revisit": _masked(ol["mse"], future), "mse_first_visit": _masked(ol["mse"], ~future),
            "bce_revisit": _masked(ol["bce"], future), "bce_first_visit": _masked(ol["bce"], ~future),
            "mse_revisit_context": _masked(ol["mse"], ctx), "bce_revisit_context": _masked(ol["bce"], ctx),
            "mse_per_step": ol["mse"].mean(0).tolist(),
            **image_figures(ol, masks, boot),
        },
        "reconstruction": {
            "mse_revisit": _masked(rc["mse"], future), "mse_first_visit": _masked(rc["mse"], ~future),
            "bce_revisit": _masked(rc["bce"], future), "bce_first_visit": _masked(rc["bce"], ~future),
            "mse_revisit_context": _masked(rc["mse"], ctx), "bce_revisit_context": _masked(rc["bce"], ctx),
            **image_figures(rc, masks, boot),
        },
        "oracle": {"revisit_context": image_figures(oracle, {"revisit_context": ctx}, boot)["revisit_context"]},
        "memory_score": (boot.score(e_none, ol["mse"], oracle["mse"], ctx) if e_none is not None else None),
        "lag": (lag_figures(ol["mse"], masks, lag, visits, boot, e_none, oracle["mse"] if e_none is not None else None)
                if lag is not None else None),
        "retrieval": retrieval_figures(steps["retrieval"], ctx, boot) if steps.get("retrieval") is not None else None,
        "semantic": (semantic_figures(steps["semantic"], masks, centred, boot)
                     if steps.get("semantic") is not None and centred is not None else None),
        "counts": {"windows": int(len(nll)), "revisit_steps_open_loop": int(future.sum()),
                   "revisit_of_context_steps_open_loop": int(ctx.sum()),
                   "revisit_of_new_steps_open_loop": int(masks["revisit_new"].sum()),
                   "first_visit_steps_open_loop": int((~future).sum())},
    }
    return figures


def reference_figures(steps: dict[str, Any], masks: dict[str, np.ndarray], boot: metrics.Bootstrap,
                      lag: Optional[np.ndarray], visits: Optional[np.ndarray], centred: Optional[np.ndarray],
                      e_none: Optional[np.ndarray], e_oracle: Optional[np.ndarray]) -> dict[str, Any]:
    """The eval.json entry of a reference predictor (open-loop figures only; its memory score uses the evaluated
    model's oracle)."""
    ol = steps["open_loop"]
    ctx = masks["revisit_context"]
    return {
        "open_loop": {"mse_revisit_context": _masked(ol["mse"], ctx),
                      "mse_first_visit": _masked(ol["mse"], ~masks["revisit"]),
                      "mse_per_step": ol["mse"].mean(0).tolist(), **image_figures(ol, masks, boot)},
        "memory_score": boot.score(e_none, ol["mse"], e_oracle, ctx) if e_none is not None else None,
        "lag": (lag_figures(ol["mse"], masks, lag, visits, boot, e_none, e_oracle) if lag is not None else None),
        "semantic": (semantic_figures(steps["semantic"], masks, centred, boot)
                     if steps.get("semantic") is not None and centred is not None else None),
    }


# -- the strip ---------------------------------------------------------------------------------------------------------

# step marks of strip.png: (name in the legend, RGB in [0, 1])
MARKS = {"context": ("context", (0.6, 0.6, 0.6)), "revisit_context": ("revisit (seen in context)", (0.9, 0.1, 0.1)),
         "revisit_new": ("revisit (first met open loop)", (1.0, 0.6, 0.0)),
         "first_visit": ("first visit", (0.45, 0.7, 1.0))}


def _put_text(image: np.ndarray, text: str, x: int, y: int, scale: float = 0.4) -> None:
    import cv2

    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)


def draw_strip(windows, index: np.ndarray, preds: dict[str, np.ndarray], masks: dict[str, np.ndarray], context: int,
               scale: int = 2) -> np.ndarray:
    """strip.png as uint8 (H, W, 3): a legend, then per window a row of step marks, the truth, and one prediction
    row per model (the context frames dimmed truth), every row labelled on the left."""
    import cv2

    label_rows: list[tuple[Optional[str], np.ndarray]] = []
    for n, i in enumerate(index):
        truth = windows[int(i)]["obs"].numpy().astype(np.float32) / 255  # (T, H, W, C)
        T, H, W, C = truth.shape
        marks = np.full((4, T * (W + 2), 3), 1.0, np.float32)
        for t in range(T):
            if t < context:
                kind = "context"
            else:
                kind = next(k for k in ("revisit_context", "revisit_new", "first_visit") if masks[k][n, t - context])
            marks[:, t * (W + 2):t * (W + 2) + W] = MARKS[kind][1]
        label_rows.append((f"window {n + 1}", marks))
        for label, frames in [("truth", truth)] + [
                (name, np.concatenate([truth[:context] * 0.35, p[n]], axis=0)) for name, p in preds.items()]:
            row = np.ones((H + 2, T * (W + 2), 3), np.float32)
            for t in range(T):
                row[:H, t * (W + 2):t * (W + 2) + W] = frames[t] if C == 3 else np.repeat(frames[t], 3, axis=-1)
            label_rows.append((label, row))
        label_rows.append((None, np.ones((6, T * (W + 2), 3), np.float32)))
    width = max(cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0]
                for label, _ in label_rows if label is not None) + 8
    body = []
    for label, row in label_rows:
        row = (np.clip(row, 0, 1) * 255).astype(np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)
        tall = max(row.shape[0], 14 if label and label.startswith("window") else row.shape[0])
        canvas = np.full((tall, width + row.shape[1], 3), 255, np.uint8)
        canvas[:row.shape[0], width:] = row
        if label is not None:
            _put_text(canvas, label, 4, min(tall - 3, tall // 2 + 5))
        body.append(canvas)
    # the legend, above everything (the strip is widened when a short window leaves it too little room)
    items = [(name, color, cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0])
             for name, color in MARKS.values()]
    legend_width = 4 + sum(18 + w + 12 for _, _, w in items)
    total = max(legend_width, max(c.shape[1] for c in body))
    image = np.concatenate([np.pad(c, ((0, 0), (0, total - c.shape[1]), (0, 0)), constant_values=255) for c in body])
    legend = np.full((22, total, 3), 255, np.uint8)
    x = 4
    for name, color, w in items:
        legend[6:16, x:x + 14] = (np.array(color) * 255).astype(np.uint8)
        _put_text(legend, name, x + 18, 15)
        x += 18 + w + 12
    return np.concatenate([legend, image], axis=0)


# -- the command -------------------------------------------------------------------------------------------------------

def model_label(model: GTMM) -> str:
    """memory/address of a model, e.g. 'introspective/actions'."""
    return f"{model.cfg.memory}/{model.cfg.address}"


def check_config(cfg: EvalConfig) -> None:
    """One-line UserErrors for flags out of range (before anything is loaded)."""
    cli.check_range("windows", cfg.windows, 1)
    cli.check_range("batch", cfg.batch, 1)
    cli.check_range("strip_windows", cfg.strip_windows, 0)
    cli.check_range("resamples", cfg.resamples, 1)
    cli.check_range("seq_len", cfg.seq_len, 0)
    if cfg.context < 1:
        raise UserError(f"--context {cfg.context}: expected >= 1 (frames seen before the open-loop prediction)")
    if cfg.seq_len and cfg.seq_len <= cfg.context:
        raise UserError(f"--seq-len {cfg.seq_len}: expected more frames than --context {cfg.context}")
    data = Path(cfg.data)
    if not data.exists():
        raise UserError(f"--data {cfg.data}: no such folder")
    if not data.is_dir():
        raise UserError(f"--data {cfg.data}: expected a rollouts folder, got a file")


def output_folder(cfg: EvalConfig) -> Path:
    """`--out`, or `<checkpoint run folder>/eval/<data folder name>`; a UserError when it is a file."""
    if cfg.out:
        out = Path(cfg.out)
    else:
        out = _run_dir(cfg.checkpoint) / "eval" / Path(cfg.data).resolve().name
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, expected a folder (choose another --out)")
    return out


def load_models(cfg: EvalConfig, device: torch.device) -> dict[str, tuple[GTMM, Any, int]]:
    """{"model": (model, train config, step), "baseline": ...}: the checkpoints, refused when they diverged."""
    paths = {"model": cfg.checkpoint, **({"baseline": cfg.baseline} if cfg.baseline is not None else {})}
    loaded = {}
    for role, path in paths.items():
        model, train_cfg = checkpoint.load(path, device)
        check_finite_weights(model, path)
        loaded[role] = (model, train_cfg, int(checkpoint.load_raw(path)["step"]))
    return loaded


def check_data_matches(cfg: EvalConfig, windows, loaded: dict[str, tuple[GTMM, Any, int]]) -> None:
    """UserError when the data's frames, actions or poses are not what a checkpoint was trained on."""
    for role, (m, _, _) in loaded.items():
        path = cfg.checkpoint if role == "model" else cfg.baseline
        if tuple(windows.obs_shape) != tuple(m.cfg.obs_shape) or windows.num_actions != m.cfg.num_actions:
            raise UserError(f"--data {cfg.data}: frames {windows.obs_shape} with {windows.num_actions} actions, but "
                            f"the {role} checkpoint {path} was trained on {m.cfg.obs_shape} with {m.cfg.num_actions}")
        if windows.pose_dim != m.cfg.pose_dim:
            raise UserError(f"--data {cfg.data}: poses of size {windows.pose_dim}, but the {role} checkpoint {path} "
                            f"was trained on poses of size {m.cfg.pose_dim}")


def _ratio(a: Optional[float], b: Optional[float]) -> float:
    return a / b if a is not None and b and math.isfinite(a) and math.isfinite(b) else math.nan


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate, write eval.json, strip.png and lag.png, print the table; returns the eval.json dict."""
    check_config(cfg)
    out_dir = output_folder(cfg)
    device = resolve_device(cfg.device)
    loaded = load_models(cfg, device)
    paths = {"model": cfg.checkpoint, "baseline": cfg.baseline}
    trained_seq_len = int(loaded["model"][1].seq_len)
    seq_len = cfg.seq_len or trained_seq_len
    if cfg.context >= seq_len:
        raise UserError(f"--context {cfg.context}: expected 0 < context < seq_len = {seq_len} "
                        "(or pass a longer --seq-len)")
    windows, index, episodes, long_enough = episode_start_windows(cfg.data, seq_len, cfg.windows)
    check_data_matches(cfg, windows, loaded)
    note = (f"{len(index)} windows of {seq_len} frames" +
            (f" ({cfg.windows} asked; the data has {long_enough} episodes of >= {seq_len} frames"
             f"{'' if long_enough == episodes else f', of {episodes}'})" if len(index) < cfg.windows else ""))

    # the step groups, lags and (MNIST map) digit-centred steps: the same for every model
    env = windows.manifest["env"]
    is_mnist = env.get("id") == MNIST_MAP_ID and tuple(windows.obs_shape) == semantic.INPUT_SHAPE
    revisit, pose = window_arrays(windows, index)  # (N, T), (N, T, D)
    masks = split_masks(pose, revisit, cfg.context)  # each (N, S)
    has_pose = pose.shape[-1] > 0
    lag = visits = None
    if has_pose:
        lag, visits = (a[:, cfg.context:] for a in metrics.lag_and_visits(pose, POSE_TOL))  # (N, S) each
    centred = semantic.centred_on_digit(pose, env["kwargs"])[:, cfg.context:] if is_mnist else None  # (N, S)
    agreement = semantic.digit_agreement if is_mnist else None
    boot = metrics.Bootstrap.make(len(index), cfg.resamples, cfg.seed)

    with FolderLock(out_dir, "evaluate"):
        # -- per-step arrays: each model, then the references
        steps = {}
        for role, (m, _, _) in loaded.items():
            steps[role] = model_steps(m, windows, index, cfg.context, cfg.batch, device, cfg.seed, paths[role],
                                      keep=cfg.strip_windows,
                                      retrieval=retrieval_per_step if m.cfg.memory != "none" and has_pose else None,
                                      agreement=agreement, hedge=cfg.hedge)
        refs = reference_steps(windows, index, cfg.context, cfg.batch, agreement)

        # -- figures with intervals
        e_none = steps["baseline"]["open_loop"]["mse"] if "baseline" in steps else None  # (N, S)
        labels = {role: f"{role} ({model_label(m)})" for role, (m, _, _) in loaded.items()}
        models = {}
        for role, (m, train_cfg, step) in loaded.items():
            entry = model_figures(steps[role], masks, revisit, boot, lag, visits, centred, e_none)
            if entry["memory_score"] is not None:
                entry["memory_score"].update(
                    against=labels["baseline"], against_memory=loaded["baseline"][0].cfg.memory,
                    metric="open-loop MSE on revisits of context places",
                    oracle="this model's posterior-mean reconstruction of the latest context view of the place")
            models[labels[role]] = {"role": role, "checkpoint": str(checkpoint.resolve(paths[role]).resolve()),
                                    "run": _run_name(paths[role]),
                                    "memory": m.cfg.memory, "address": m.cfg.address, "train_steps": step,
                                    "trained_seq_len": int(train_cfg.seq_len), **entry}
        e_oracle = steps["model"]["oracle"]["mse"]  # (N, S)
        names = {"copy_last": "copy last context frame", "mean_frame": "mean frame (of the window's context)"}
        references = {name: {"label": names[name], "memory_score_oracle_of": labels["model"],
                             **reference_figures(refs[name], masks, boot, lag, visits, centred, e_none, e_oracle)}
                      for name in refs}
        main = models[labels["model"]]
        ol, rc = main["open_loop"], main["reconstruction"]
        ratios = {"open_loop_revisit_over_own_recon": _ratio(ol["mse_revisit"], rc["mse_revisit"]),
                  "open_loop_revisit_context_over_own_recon": _ratio(ol["mse_revisit_context"],
                                                                     rc["mse_revisit_context"])}
        if "baseline" in labels:
            base = models[labels["baseline"]]["open_loop"]
            for key in ("revisit", "revisit_context", "first_visit"):
                ratios[f"open_loop_{key}_over_baseline"] = _ratio(ol[f"mse_{key}"], base[f"mse_{key}"])
        result = report.finite_json({
            "format": report.EVAL_FORMAT, "version": report.EVAL_VERSION,
            "config": asdict(cfg), "seq_len": seq_len, "context": cfg.context, "env": windows.env_name,
            "data": {"path": str(Path(cfg.data).resolve()), "name": Path(cfg.data).resolve().name, "env_id": env.get("id"),
                     "env_kwargs": env.get("kwargs"), "episodes": episodes, "episodes_long_enough": long_enough,
                     "windows_asked": cfg.windows, "windows": int(len(index)), "note": note},
            "bootstrap": {"unit": "window", "resamples": cfg.resamples, "level": boot.level, "seed": cfg.seed,
                          "estimator": "pooled mean over steps: sum of per-window sums / sum of per-window counts "
                                       "(windows with more steps weigh more); percentile interval"},
            "groups": {"revisit_context": "revisit of a place seen in the context (recallable)",
                       "revisit_new": "revisit of a place first met during the open-loop part",
                       "first_visit": "a place not seen earlier in the window", "revisit": "all revisits"},
            "semantic": ({"applies": True, "centred_steps_open_loop": int(centred.sum())} if centred is not None else
                         {"applies": False, "why": f"env {env.get('id')} frames {tuple(windows.obs_shape)}: needs "
                                                  f"{MNIST_MAP_ID} frames of {semantic.INPUT_SHAPE}"}),
            "train_steps": {label: models[label]["train_steps"] for label in models},
            "models": models, "references": references, "ratios": ratios,
        })

        # -- files
        text = json.dumps(result, indent=1, allow_nan=False)
        atomic_write(out_dir / "eval.json", lambda f: f.write(text.encode()))
        wrote = ["eval.json"]
        if cfg.strip_windows > 0:
            import imageio.v3 as iio

            preds = {f"{role}: {_run_name(paths[role])} ({model_label(loaded[role][0])})": steps[role]["strip"]
                     for role in steps}
            strip = draw_strip(windows, index[:cfg.strip_windows], preds,
                               {k: v[:cfg.strip_windows] for k, v in masks.items()}, cfg.context)
            write_bytes_atomic(out_dir / "strip.png", iio.imwrite("<bytes>", strip, extension=".png"))
            wrote.append("strip.png")
        if has_pose:
            buffer = io.BytesIO()
            report.plot_lag(report.entries_of(result, references=True), buffer)
            write_bytes_atomic(out_dir / "lag.png", buffer.getvalue())
            wrote.append("lag.png")

    print(note + (f"; seq_len {seq_len} > trained {trained_seq_len}" if seq_len > trained_seq_len else ""))
    print(report.results_table([result]))
    print(report.teacher_forcing_lines(result))
    print("ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items() if math.isfinite(v)))
    print(f"wrote {', '.join(str(out_dir / name) for name in wrote)}")
    return result


def _run_dir(path: str) -> Path:
    """The run folder of a checkpoint: itself, the folder of a ckpt.pt, or for a shipped `pretrained:NAME` model
    `runs/pretrained_NAME` (never the installed package's folder)."""
    if path.startswith(checkpoint.PRETRAINED):
        return Path("runs") / f"pretrained_{path[len(checkpoint.PRETRAINED):]}"
    p = Path(path)
    return p if p.is_dir() else p.parent


def _run_name(path: str) -> str:
    """How tables name a checkpoint: its run folder's name, or `pretrained:NAME`."""
    if path.startswith(checkpoint.PRETRAINED):
        return path
    return _run_dir(path).resolve().name


def main(argv: list[str] | None = None) -> None:
    """``python -m worldmodel.evaluate``: parse the flags and evaluate."""
    run(cli.parse(EvalConfig, argv, prog="worldmodel.evaluate"))


if __name__ == "__main__":
    cli.run(main)
