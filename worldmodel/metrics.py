"""The numbers of `worldmodel.evaluate`: per-frame image metrics, where a step's place was seen before, bootstrap
confidence intervals over windows, and the normalised memory score.

Image metrics (per frame, pixels in [0, 1]): MSE, BCE (pixel intensities as Bernoulli targets, the model's own
likelihood on MNIST), PSNR and SSIM from torchmetrics (data range 1, SSIM with its default 11x11 Gaussian window of
sigma 1.5, as in Wang et al. 2004). PSNR is capped at `PSNR_CAP_DB`, the PSNR of a frame off by half a grey level
everywhere (20 log10(2 * 255) = 54.2 dB): our frames are 8-bit, so a smaller error is below their quantisation, and a
frame predicted exactly (copy-last on a step that stays put) would otherwise have an infinite PSNR and make every
mean infinite (or, with the 100 dB cap some code uses, dominate it).

Confidence intervals: the unit of resampling is the window (one per held-out episode), because steps of one
episode are not independent. A statistic over the steps selected by a mask is the pooled mean
`sum over windows of per-window sums / sum over windows of per-window counts`, so a window with more revisit steps
weighs more (each step counts once, as in the point estimate). Its 95% interval is the percentile interval of the
same ratio over `resamples` bootstrap resamples of the windows, drawn with replacement from a seeded generator, the
same resamples for every statistic of one evaluation (a paired bootstrap: differences between models keep their
sign across resamples).

Memory score (on revisits of places seen in the context, E = open-loop MSE):
    score = (E_none - E_model) / (E_none - E_oracle)
0 = no better than the no-memory baseline, 1 = as good as the oracle copy (the model's own reconstruction of the true
earlier view of the place, i.e. a perfect recall through this decoder). The ratio is of window sums, bootstrapped
like the means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PSNR_CAP_DB = 20 * math.log10(2 * 255)  # 54.15 dB: an error of half an 8-bit grey level on every pixel
BCE_EPS = 1e-6  # predictions are clamped to [eps, 1 - eps] before the log, as the old evaluate did
IMAGE_METRICS = ("mse", "bce", "psnr", "ssim")

# lag = steps since the place was last seen; bins (low, high) inclusive, None = no upper end
LAG_BINS: tuple[tuple[int, Optional[int]], ...] = ((1, 2), (3, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, None))
# earlier visits of the place in the window (1 = the second time here)
VISIT_BINS: tuple[tuple[int, Optional[int]], ...] = ((1, 1), (2, 2), (3, 4), (5, 8), (9, None))


# -- image metrics -----------------------------------------------------------------------------------------------------

def frame_metrics(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-frame MSE, BCE, PSNR (dB) and SSIM of `pred` against `truth`, both float (B, T, H, W, C) in [0, 1].

    Returns each as a float64 numpy array (B, T). MSE and BCE are per-pixel means."""
    assert pred.shape == truth.shape, f"pred {tuple(pred.shape)} vs truth {tuple(truth.shape)}"
    B, T, H, W, C = pred.shape
    p = pred.float().clamp(0.0, 1.0).reshape(B * T, H, W, C).permute(0, 3, 1, 2)  # (B*T, C, H, W)
    t = truth.float().reshape(B * T, H, W, C).permute(0, 3, 1, 2)  # (B*T, C, H, W)
    mse = ((p - t) ** 2).flatten(1).mean(-1)  # (B*T,)
    bce = F.binary_cross_entropy(p.clamp(BCE_EPS, 1 - BCE_EPS), t, reduction="none").flatten(1).mean(-1)
    psnr = peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = psnr.double().clamp(max=PSNR_CAP_DB)  # in float64, so a capped frame is exactly PSNR_CAP_DB
    # the Gaussian window may not be wider than the frame (reflection padding needs pad < size)
    kernel = min(11, min(H, W) - (1 - min(H, W) % 2))
    ssim = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none", kernel_size=kernel)
    out = {"mse": mse, "bce": bce, "psnr": psnr, "ssim": ssim}
    return {k: v.double().reshape(B, T).cpu().numpy() for k, v in out.items()}


# -- where a step's place was seen before ------------------------------------------------------------------------------

def same_place(pose: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """(N, T, T) bool: [n, t, s] is True when steps t and s of window n are at the same pose (within `tol`)."""
    dist = np.linalg.norm(pose[:, :, None, :] - pose[:, None, :, :], axis=-1)  # (N, T, T)
    return dist < tol


def lag_and_visits(pose: np.ndarray, tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """For every step: `lag` (N, T) steps since the place was last seen in the window (0 = never seen before) and
    `visits` (N, T) how many earlier steps of the window were at this place (0 on a first visit).

    Needs a pose (D > 0): the place of a step is its pose."""
    N, T, D = pose.shape
    if D == 0:
        raise ValueError("lag_and_visits needs a pose (D > 0)")
    earlier = same_place(pose, tol) & np.tril(np.ones((T, T), bool), k=-1)[None]  # (N, T, T) s < t at t's place
    visits = earlier.sum(-1)  # (N, T)
    steps = np.arange(T)
    last = np.where(earlier, steps[None, None, :], -1).max(-1)  # (N, T) latest earlier step, -1 = none
    lag = np.where(last >= 0, steps[None, :] - last, 0)
    return lag.astype(np.int64), visits.astype(np.int64)


def oracle_source(pose: np.ndarray, context: int, tol: float = 1e-3) -> np.ndarray:
    """(N, T-K) int: for every open-loop step, the most recent CONTEXT step (< K) at the same pose, -1 if none.

    The oracle copy predicts that step's view (through the model's own reconstruction) for the open-loop step."""
    N, T, D = pose.shape
    if D == 0:
        return np.full((N, T - context), -1, np.int64)
    match = same_place(pose, tol)[:, context:, :context]  # (N, T-K, K)
    last = np.where(match, np.arange(context)[None, None, :], -1).max(-1)
    return last.astype(np.int64)


def bin_index(values: np.ndarray, bins: tuple[tuple[int, Optional[int]], ...]) -> np.ndarray:
    """The bin of every value (same shape, int), -1 for values in no bin."""
    out = np.full(values.shape, -1, np.int64)
    for i, (low, high) in enumerate(bins):
        inside = (values >= low) if high is None else ((values >= low) & (values <= high))
        out[inside] = i
    return out


def bin_labels(bins: tuple[tuple[int, Optional[int]], ...]) -> list[str]:
    """Human labels of bins: '1-2', '3-4', ..., '65+' (a one-value bin is its value)."""
    return [f"{low}+" if high is None else (str(low) if low == high else f"{low}-{high}") for low, high in bins]


# -- bootstrap over windows --------------------------------------------------------------------------------------------

def _finite(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


@dataclass
class Bootstrap:
    """Seeded resamples of the windows, shared by every statistic of one evaluation (a paired bootstrap)."""

    idx: np.ndarray  # (R, N) window indices drawn with replacement
    level: float = 0.95

    @classmethod
    def make(cls, windows: int, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> "Bootstrap":
        """``resamples`` seeded draws of ``windows`` window indices with replacement."""
        rng = np.random.default_rng(seed)
        return cls(idx=rng.integers(0, windows, size=(resamples, windows)), level=level)

    @property
    def resamples(self) -> int:
        """Number of bootstrap resamples (R)."""
        return int(self.idx.shape[0])

    def ratio(self, num: np.ndarray, den: np.ndarray) -> dict[str, Any]:
        """`sum(num) / sum(den)` of per-window sums num, den (N,), with its percentile interval over the resamples.

        Returns {"mean", "ci": [low, high]} with None for an undefined value (no steps, or a zero denominator)."""
        num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
        total = den.sum()
        mean = num.sum() / total if total != 0 else math.nan
        rs_num, rs_den = num[self.idx].sum(1), den[self.idx].sum(1)  # (R,)
        with np.errstate(divide="ignore", invalid="ignore"):
            rs = np.where(rs_den != 0, rs_num / np.where(rs_den != 0, rs_den, 1.0), np.nan)
        rs = rs[np.isfinite(rs)]
        alpha = (1 - self.level) / 2
        if len(rs) and math.isfinite(mean):
            low, high = np.quantile(rs, [alpha, 1 - alpha])
            ci = [_finite(low), _finite(high)]
        else:
            ci = [None, None]
        return {"mean": _finite(mean), "ci": ci}

    def mean(self, values: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        """Pooled mean of `values` (N, S) over the True steps of `mask` (N, S), with its interval, the number of
        steps `n` and of windows that have any. Values outside the mask are ignored (may be NaN)."""
        mask = np.asarray(mask, bool)
        per_window = np.where(mask, values, 0.0).sum(1)  # (N,)
        counts = mask.sum(1).astype(np.float64)  # (N,)
        out = self.ratio(per_window, counts)
        out.update(n=int(mask.sum()), windows=int((counts > 0).sum()))
        return out

    def score(self, e_none: np.ndarray, e_model: np.ndarray, e_oracle: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        """The memory score `(E_none - E_model) / (E_none - E_oracle)` over the True steps of `mask`, all (N, S).

        None when undefined: no steps, or the oracle is no better than `none` on them (a zero or negative
        denominator makes the ratio meaningless)."""
        mask = np.asarray(mask, bool)
        num = np.where(mask, e_none - e_model, 0.0).sum(1)  # (N,)
        den = np.where(mask, e_none - e_oracle, 0.0).sum(1)  # (N,)
        out = self.ratio(num, den) if den.sum() > 0 else {"mean": None, "ci": [None, None]}
        out.update(n=int(mask.sum()), windows=int(mask.any(1).sum()))
        return out


def memory_score(e_none: np.ndarray, e_model: np.ndarray, e_oracle: np.ndarray, mask: np.ndarray) -> float:
    """The point estimate of the memory score (see `Bootstrap.score`); NaN when undefined."""
    mask = np.asarray(mask, bool)
    den = float(np.where(mask, e_none - e_oracle, 0.0).sum())
    if not mask.any() or den <= 0:
        return math.nan
    return float(np.where(mask, e_none - e_model, 0.0).sum()) / den
