"""Evaluate a trained world model on held-out rollouts: does it predict a place it has seen when it comes back?

`python -m worldmodel.evaluate --checkpoint runs/intro --data data/mnist_map_test --baseline runs/none`

For each window (one per held-out episode, starting at the episode's first frame so that "revisit" means "seen
earlier in this window"):
  - teacher forcing: per-step NLL -log p(x_t|z_t) and KL(q_t || p_t) in nats, split into revisit steps and first visits;
  - open loop: the model sees frames [0, K), then only the actions, and predicts frames [K, T) from its prior
    (prior means, mean decode); per-pixel MSE (pixels in [0, 1]) and BCE against the truth, revisit vs first visit;
  - the floor: the model's own reconstruction (posterior-mean decode) error on the same steps.
Revisits are split further: `revisit_context` are revisits of a place seen in the context (matched by pose), the
only revisits a memory can recall open loop; the others revisit a place first met during the open-loop part.
Writes `eval.json` (all figures, per-step curves) and `strip.png` (per window: truth, then the prediction with the
context frames dimmed; a red bar above a frame marks a revisit, a grey one the context).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from gtmm import cli
from gtmm.cli import UserError
from worldmodel import checkpoint
from worldmodel.model import GTMM, batch_to_torch
from worldmodel.train import resolve_device


@dataclass
class EvalConfig:
    """Evaluate a GTMM checkpoint on held-out rollouts: ELBO terms and open-loop error, revisits vs first visits."""

    checkpoint: str
    """the model: a run folder or its ckpt.pt"""
    data: str
    """held-out rollouts folder (e.g. collected with --env mnist_map_test)"""
    baseline: Optional[str] = None
    """a second checkpoint (usually --memory none) evaluated on the same windows, in the same table"""
    out: Optional[str] = None
    """output folder for eval.json and strip.png (default: <checkpoint run folder>/eval)"""
    context: int = 8
    """K: frames seen before predicting open loop"""
    seq_len: int = 0
    """frames per window (0 = the checkpoint's training --seq-len)"""
    windows: int = 64
    """how many held-out episodes (one window each) to evaluate"""
    batch: int = 16
    """windows per forward pass"""
    strip_windows: int = 4
    """windows drawn in strip.png"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N"""
    seed: int = 0
    """seed of the latent samples of the teacher-forced ELBO"""


def episode_start_windows(root: str, seq_len: int, count: int):
    """The held-out windows that start at an episode's first frame, evenly spread over the folder (up to `count`)."""
    from rollouts.dataset import RolloutWindows

    windows = RolloutWindows(root, seq_len=seq_len, split="all")
    first = np.flatnonzero(np.isin(windows.window_starts, windows.episode_offsets))
    if len(first) == 0:
        raise UserError(f"{root}: no episode has {seq_len} frames; collect longer episodes or pass --seq-len")
    pick = first[np.unique(np.linspace(0, len(first) - 1, min(count, len(first))).round().astype(int))]
    return windows, pick


def seen_in_context(pose: np.ndarray, revisit: np.ndarray, context: int, tol: float = 1e-3) -> np.ndarray:
    """(N, T-K) bool: a revisit step after the context whose place was seen IN the context (pose within `tol`).

    In open loop the model never sees the frames after the context, so only these revisits can be recalled; a
    revisit of a place first seen during the open-loop part is as unpredictable as a first visit. Without a pose
    (D = 0) every revisit counts."""
    future = revisit[:, context:]
    if pose.shape[-1] == 0:
        return future.copy()
    dist = np.linalg.norm(pose[:, context:, None, :] - pose[:, None, :context, :], axis=-1)  # (N, T-K, K)
    return future & (dist.min(-1) < tol)


def _masked(x: np.ndarray, mask: np.ndarray) -> float:
    return float(x[mask].mean()) if mask.any() else float("nan")


@torch.no_grad()
def evaluate_model(model: GTMM, windows, index: np.ndarray, context: int, batch: int, device: torch.device,
                   seed: int) -> dict[str, Any]:
    """All figures of one model on the given windows; also returns the predictions for the strip."""
    T = windows.seq_len
    if not 0 < context < T:
        raise UserError(f"--context {context}: expected 0 < context < seq_len = {T}")
    torch.manual_seed(seed)
    nll, kl, revisit, pose, pred_mse, pred_bce, rec_mse, rec_bce, preds = [], [], [], [], [], [], [], [], []
    for start in range(0, len(index), batch):
        items = [windows[int(i)] for i in index[start:start + batch]]
        b = batch_to_torch({k: np.stack([it[k].numpy() for it in items]) for k in items[0]}, device)
        elbo = model.observe(b["obs"], b["prev_action"], b["pose"], sample=True)  # ELBO terms under the posterior
        res = model.predict_open_loop(b["obs"], b["prev_action"], b["pose"], context)
        truth = b["obs"].float().div(255)  # (B, T, H, W, C)
        pred = res["pred"].float().clamp(1e-6, 1 - 1e-6)  # (B, T-K, H, W, C)
        recon = res["recon"].float().clamp(1e-6, 1 - 1e-6)[:, context:]  # (B, T-K, H, W, C)
        future = truth[:, context:]
        per_frame = lambda x: x.flatten(2).mean(-1).cpu().numpy()  # (B, T-K) per-pixel mean  # noqa: E731
        pred_mse.append(per_frame((pred - future) ** 2))
        pred_bce.append(per_frame(F.binary_cross_entropy(pred, future, reduction="none")))
        rec_mse.append(per_frame((recon - future) ** 2))
        rec_bce.append(per_frame(F.binary_cross_entropy(recon, future, reduction="none")))
        nll.append(elbo["nll"].float().cpu().numpy())
        kl.append(elbo["kl"].float().cpu().numpy())
        revisit.append(b["revisit"].cpu().numpy())
        pose.append(b["pose"].cpu().numpy())
        preds.append(res["pred"].float().cpu().numpy())
    nll, kl, revisit = np.concatenate(nll), np.concatenate(kl), np.concatenate(revisit)  # (N, T)
    pred_mse, pred_bce = np.concatenate(pred_mse), np.concatenate(pred_bce)  # (N, T-K)
    rec_mse, rec_bce = np.concatenate(rec_mse), np.concatenate(rec_bce)
    future_revisit = revisit[:, context:]
    recall = seen_in_context(np.concatenate(pose), revisit, context)  # (N, T-K)
    figures = {
        "teacher_forcing": {
            "nll_revisit": _masked(nll, revisit), "nll_first_visit": _masked(nll, ~revisit),
            "kl_revisit": _masked(kl, revisit), "kl_first_visit": _masked(kl, ~revisit),
            "kl_per_step": kl.mean(0).tolist(), "nll_per_step": nll.mean(0).tolist(),
        },
        "open_loop": {
            "mse_revisit": _masked(pred_mse, future_revisit), "mse_first_visit": _masked(pred_mse, ~future_revisit),
            "bce_revisit": _masked(pred_bce, future_revisit), "bce_first_visit": _masked(pred_bce, ~future_revisit),
            "mse_revisit_context": _masked(pred_mse, recall), "bce_revisit_context": _masked(pred_bce, recall),
            "mse_per_step": pred_mse.mean(0).tolist(),
        },
        "reconstruction": {
            "mse_revisit": _masked(rec_mse, future_revisit), "mse_first_visit": _masked(rec_mse, ~future_revisit),
            "bce_revisit": _masked(rec_bce, future_revisit), "bce_first_visit": _masked(rec_bce, ~future_revisit),
            "mse_revisit_context": _masked(rec_mse, recall), "bce_revisit_context": _masked(rec_bce, recall),
        },
        "counts": {"windows": int(len(index)), "revisit_steps_open_loop": int(future_revisit.sum()),
                   "revisit_of_context_steps_open_loop": int(recall.sum()),
                   "first_visit_steps_open_loop": int((~future_revisit).sum())},
    }
    return {"figures": figures, "pred": np.concatenate(preds), "revisit": revisit}


def draw_strip(windows, index: np.ndarray, preds: dict[str, np.ndarray], revisit: np.ndarray, context: int,
               scale: int = 2) -> np.ndarray:
    """Per window: the truth row, then one prediction row per model (context frames dimmed truth).
    A red bar over a frame marks a revisit step, a grey bar a context step."""
    rows = []
    for n, i in enumerate(index):
        truth = windows[int(i)]["obs"].numpy().astype(np.float32) / 255  # (T, H, W, C)
        T, H, W, C = truth.shape
        marks = np.full((4, T * (W + 2), 3), 1.0, np.float32)
        for t in range(T):
            color = (0.6, 0.6, 0.6) if t < context else ((0.9, 0.1, 0.1) if revisit[n, t] else (1.0, 1.0, 1.0))
            marks[:, t * (W + 2):t * (W + 2) + W] = color
        rows.append(marks)
        for frames in [truth] + [np.concatenate([truth[:context] * 0.35, p[n]], axis=0) for p in preds.values()]:
            row = np.ones((H + 2, T * (W + 2), 3), np.float32)
            for t in range(T):
                row[:H, t * (W + 2):t * (W + 2) + W] = frames[t] if C == 3 else np.repeat(frames[t], 3, axis=-1)
            rows.append(row)
        rows.append(np.ones((6, T * (W + 2), 3), np.float32))
    image = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
    return image.repeat(scale, axis=0).repeat(scale, axis=1)


def model_label(model: GTMM) -> str:
    return f"{model.cfg.memory}/{model.cfg.address}"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    head = (f"{'model':<34} {'KL rev':>7} {'KL new':>7} {'NLL rev':>8} {'NLL new':>8} "
            f"{'OL ctx-rev':>10} {'OL rev':>8} {'OL new':>8} {'rec ctx-rev':>11} {'rec rev':>8} {'rec new':>8}")
    lines = ["per-frame means; KL/NLL in nats (teacher forcing), OL = open-loop MSE per pixel, rec = own reconstruction "
             "MSE; ctx-rev = revisits of places seen in the context, rev = all revisits, new = first visits",
             head, "-" * len(head)]
    for name, f in results.items():
        tf, ol, rc = f["teacher_forcing"], f["open_loop"], f["reconstruction"]
        lines.append(f"{name:<34} {tf['kl_revisit']:7.2f} {tf['kl_first_visit']:7.2f} {tf['nll_revisit']:8.1f} "
                     f"{tf['nll_first_visit']:8.1f} {ol['mse_revisit_context']:10.4f} {ol['mse_revisit']:8.4f} "
                     f"{ol['mse_first_visit']:8.4f} {rc['mse_revisit_context']:11.4f} {rc['mse_revisit']:8.4f} "
                     f"{rc['mse_first_visit']:8.4f}")
    return "\n".join(lines)


def run(cfg: EvalConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    model, train_cfg = checkpoint.load(cfg.checkpoint, device)
    models = {"model": model}
    if cfg.baseline is not None:
        models["baseline"] = checkpoint.load(cfg.baseline, device)[0]
    seq_len = cfg.seq_len or train_cfg.seq_len
    windows, index = episode_start_windows(cfg.data, seq_len, cfg.windows)
    for name, m in models.items():
        if tuple(windows.obs_shape) != tuple(m.cfg.obs_shape) or windows.num_actions != m.cfg.num_actions:
            raise UserError(f"--data {cfg.data}: frames {windows.obs_shape} with {windows.num_actions} actions, but "
                             f"the {name} checkpoint was trained on {m.cfg.obs_shape} with {m.cfg.num_actions}")

    results, preds, revisit = {}, {}, None
    for name, m in models.items():
        res = evaluate_model(m, windows, index, cfg.context, cfg.batch, device, cfg.seed)
        label = f"{name} ({model_label(m)})"
        results[label] = res["figures"]
        preds[label] = res["pred"][:cfg.strip_windows]
        revisit = res["revisit"]

    main = results[next(iter(results))]
    ratios = {"open_loop_revisit_over_own_recon":
              main["open_loop"]["mse_revisit"] / main["reconstruction"]["mse_revisit"],
              "open_loop_revisit_context_over_own_recon":
              main["open_loop"]["mse_revisit_context"] / main["reconstruction"]["mse_revisit_context"]}
    if cfg.baseline is not None:
        base = list(results.values())[1]
        ratios["open_loop_revisit_over_baseline"] = main["open_loop"]["mse_revisit"] / base["open_loop"]["mse_revisit"]
        ratios["open_loop_revisit_context_over_baseline"] = (main["open_loop"]["mse_revisit_context"]
                                                             / base["open_loop"]["mse_revisit_context"])
        ratios["open_loop_first_visit_over_baseline"] = (main["open_loop"]["mse_first_visit"]
                                                         / base["open_loop"]["mse_first_visit"])
    out_dir = Path(cfg.out) if cfg.out else (Path(cfg.checkpoint) if Path(cfg.checkpoint).is_dir()
                                             else Path(cfg.checkpoint).parent) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"config": asdict(cfg), "seq_len": seq_len, "env": windows.env_name,
              "train_steps": {name: None for name in results}, "models": results, "ratios": ratios}
    report["train_steps"] = {label: int(checkpoint.load_raw(path)["step"]) for label, path in
                             zip(results, [cfg.checkpoint] + ([cfg.baseline] if cfg.baseline else []))}
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1, allow_nan=True))
    import imageio.v3 as iio

    iio.imwrite(out_dir / "strip.png", draw_strip(windows, index[:cfg.strip_windows], preds, revisit, cfg.context))
    table = format_table(results)
    print(table)
    print("ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items() if not math.isnan(v)))
    print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'strip.png'}")
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m worldmodel.evaluate``: parse the flags and evaluate."""
    run(cli.parse(EvalConfig, argv, prog="worldmodel.evaluate"))


if __name__ == "__main__":
    cli.run(main)
