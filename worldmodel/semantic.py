"""Semantic recall on MNIST maps: does the predicted frame show the right digit?

Pixel errors (MSE, PSNR) punish a model that recalls *which* digit was at a place but draws it blurred or a pixel
off, and barely separate it from one that draws a plausible wrong digit. Issue 11, item 5 asks the question a
person would ask instead: a small CNN digit classifier, trained on the embedded MNIST *train* digits, reads the
true and the predicted frame of every window centred on a digit; the prediction agrees when both get the same
label. The classifier's label of the true frame is the reference, so no map bookkeeping is needed (on held-out
maps it equals the digit actually placed there 97.2% of the time, see ``digit_agreement``).

- ``DigitClassifier``: 3 conv layers, ~29k parameters, 28x28x1 frames in [0, 1] -> 10 logits.
- ``python -m worldmodel.semantic --out worldmodel/assets/digit_classifier.pt`` trains it (deterministic, one CPU
  thread, ~25 s of CPU) and writes the shipped weights file: a plain dict that ``torch.load(weights_only=True)`` reads
  without executing any code from the file.
- ``load_classifier``: the shipped (or a given) weights file, cached per process.
- ``digit_at`` / ``centred_on_digit``: which windows of an MNIST-map episode are centred on one digit, from poses.
- ``digit_agreement``: per-frame labels of predicted vs true frames.

The frames of the MNIST map are the digits' own pixels (uint8 / 255), so the classifier sees at evaluation exactly
the kind of image it was trained on; training adds small shifts, rotations, blur and dimming because a model's
predicted frames are often a little off-centre, blurred or faint, and we want to score the digit, not the drawing.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gtmm import cli
from gtmm.cli import UserError

FORMAT = "gtmm-digit-classifier"
FORMAT_VERSION = 1
INPUT_SHAPE = (28, 28, 1)  # (H, W, C) of the frames the classifier reads: one MNIST-map window
NUM_CLASSES = 10
DEFAULT_PATH = Path(__file__).resolve().parent / "assets" / "digit_classifier.pt"
REBUILD = "python -m worldmodel.semantic --out {path}"


# --------------------------------------------------------------------------------------------------------------------
# The classifier


class DigitClassifier(nn.Module):
    """A small CNN: (B, 1, 28, 28) frames in [0, 1] -> (B, 10) logits.

    Three 3x3 conv blocks (28 -> 14 -> 7 -> 3 pixels) and one linear layer: ~29k parameters, ~115 KB of float32,
    small enough to ship in the package and fast enough to read every frame of an evaluation on a CPU.
    ``header`` holds the plain-dict header of the file it was loaded from (empty for a fresh model).
    """

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, w, 14, 14)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 2w, 7, 7)
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 4w, 3, 3)
        )
        self.head = nn.Linear(4 * width * 3 * 3, NUM_CLASSES)
        self.header: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 10) of frames (B, 1, 28, 28)."""
        B = x.shape[0]
        assert x.shape[1:] == (1, 28, 28), f"DigitClassifier expects (B, 1, 28, 28) frames, got {tuple(x.shape)}"
        return self.head(self.features(x).reshape(B, -1))  # (B, 10)


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalars of ``model``."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def classify(classifier: DigitClassifier, frames: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Frames (M, 28, 28, 1) float in [0, 1] (or uint8) -> labels (M,) int64 and softmax probabilities (M, 10)."""
    device = next(classifier.parameters()).device
    labels, probs = [], []
    for start in range(0, len(frames), batch):
        x = torch.tensor(np.asarray(frames[start:start + batch]))  # a copy: frames may be read-only
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        x = x.to(device).clamp(0, 1).permute(0, 3, 1, 2)  # (b, 1, 28, 28)
        p = classifier(x).softmax(-1)  # (b, 10)
        labels.append(p.argmax(-1).cpu().numpy())
        probs.append(p.cpu().numpy())
    if not labels:
        return np.zeros(0, np.int64), np.zeros((0, NUM_CLASSES), np.float32)
    return np.concatenate(labels).astype(np.int64), np.concatenate(probs)


def accuracy(classifier: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``images`` (M, 28, 28) uint8 that ``classifier`` labels right."""
    predicted, _ = classify(classifier, images[..., None])
    return float((predicted == labels).mean())


# --------------------------------------------------------------------------------------------------------------------
# Training: deterministic, one thread, seconds


@dataclass
class SemanticConfig:
    """Train the digit classifier of semantic recall on the embedded MNIST train digits and write its weights file."""

    out: str
    """weights file to write (the shipped one is worldmodel/assets/digit_classifier.pt)"""
    epochs: int = 20
    """passes over the 4,000 train digits"""
    steps: int = 0
    """stop after this many updates (0 = all epochs); for quick runs and tests"""
    batch: int = 64
    """digits per update"""
    lr: float = 3e-3
    """peak Adam learning rate (one-cycle schedule)"""
    width: int = 16
    """channels of the first conv layer (doubled twice)"""
    shift: float = 2.5
    """largest random shift in pixels per axis (predicted windows may be slightly off-centre)"""
    rotate: float = 10.0
    """largest random rotation in degrees"""
    blur: float = 1.5
    """largest Gaussian blur sigma in pixels, applied to half the digits (predictions are often blurred)"""
    dim: float = 0.5
    """darkest random brightness scale (predicted ink is often faint): pixels are multiplied by U(dim, 1)"""
    seed: int = 0
    """seed of the initial weights, the shuffling and the augmentation"""


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each image (B, 1, H, W) with its own sigma (B,) (sigma 0 leaves it unchanged)."""
    B = x.shape[0]
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)  # (7,)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))  # (B, 7)
    kernel = kernel / kernel.sum(-1, keepdim=True)
    # separable: one grouped conv per axis, each image its own group so each gets its own kernel
    x = x.reshape(1, B, *x.shape[2:])  # (1, B, H, W)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0)), kernel[:, None, None, :], groups=B)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius)), kernel[:, None, :, None], groups=B)
    return x.reshape(B, 1, *x.shape[2:])


def augment(x: torch.Tensor, cfg: SemanticConfig, gen: torch.Generator) -> torch.Tensor:
    """Random shift, rotation, blur and dimming of a batch (B, 1, 28, 28) in [0, 1], drawn from ``gen``."""
    B, _, H, W = x.shape
    angle = (torch.rand(B, generator=gen) * 2 - 1) * math.radians(cfg.rotate)  # (B,)
    shift = (torch.rand(B, 2, generator=gen) * 2 - 1) * cfg.shift  # (B, 2) pixels
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0] * 2 / W], -1),
                         torch.stack([sin, cos, shift[:, 1] * 2 / H], -1)], 1)  # (B, 2, 3) in [-1, 1] units
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")  # (B, 1, 28, 28)
    sigma = torch.rand(B, generator=gen) * cfg.blur * (torch.rand(B, generator=gen) < 0.5)  # (B,) half stay sharp
    x = _blur(x, sigma)
    scale = cfg.dim + (1 - cfg.dim) * torch.rand(B, 1, 1, 1, generator=gen)
    return (x * scale).clamp(0, 1)


def train_classifier(cfg: SemanticConfig, log: bool = False) -> tuple[DigitClassifier, dict[str, Any]]:
    """Train on ``load_digits("train")`` and measure on ``load_digits("test")``: returns the model (eval mode) and
    its header (accuracies, seconds, parameters, the config). Runs on one CPU thread so that the same config gives
    the same weights on the same machine (the thread count changes the order of float sums)."""
    from envs.digits import load_digits

    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, start_cpu = time.perf_counter(), time.process_time()
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model = DigitClassifier(cfg.width)
        x_all = torch.from_numpy(np.array(train_x)).float().div(255)[:, None]  # (4000, 1, 28, 28)
        y_all = torch.from_numpy(np.array(train_y))  # (4000,)
        per_epoch = math.ceil(len(x_all) / cfg.batch)
        total = cfg.steps if cfg.steps > 0 else cfg.epochs * per_epoch
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
        model.train()
        step = 0
        while step < total:
            order = torch.randperm(len(x_all), generator=gen)
            for i in range(0, len(order), cfg.batch):
                if step >= total:
                    break
                idx = order[i:i + cfg.batch]
                logits = model(augment(x_all[idx], cfg, gen))  # (b, 10)
                loss = F.cross_entropy(logits, y_all[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                if log and step % per_epoch == 0:
                    print(f"epoch {step // per_epoch}: loss {loss.item():.3f}", flush=True)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        model.eval()
        blurred = _blur(torch.from_numpy(np.array(test_x)).float().div(255)[:, None], torch.ones(len(test_x)))
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "input_shape": list(INPUT_SHAPE),
            "num_classes": NUM_CLASSES,
            "width": cfg.width,
            "parameters": num_parameters(model),
            "test_accuracy": accuracy(model, test_x, test_y),
            "test_accuracy_blur1": accuracy(model, (blurred[:, 0] * 255).round().byte().numpy(), test_y),
            "train_accuracy": accuracy(model, train_x, train_y),
            "updates": step,
            "train_seconds": round(seconds, 2),  # wall clock: longer on a busy machine
            "train_cpu_seconds": round(cpu_seconds, 2),  # one thread, so this is the work itself
            "data": "envs.digits.load_digits('train') (embedded MNIST 5k: 4,000 train digits); accuracy on the 1,000 'test' digits",
            "made_by": "python -m worldmodel.semantic --out <file> " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if k != "out"),
            "config": asdict(cfg),
            "torch": str(torch.__version__),  # plain str: TorchVersion is no weights-only type
        }
    finally:
        torch.set_num_threads(threads)
    model.header = header
    return model, header


def save_classifier(path: str | Path, model: DigitClassifier, header: dict[str, Any]) -> int:
    """Write ``{"header": ..., "state_dict": ...}`` atomically to ``path``; returns its size in bytes."""
    from worldmodel import checkpoint  # the one weights-only writer of the project

    return checkpoint.write_plain(path, {"header": header, "state_dict": model.state_dict()}, "digit classifier")


# --------------------------------------------------------------------------------------------------------------------
# Loading: weights only, cached


_CACHE: dict[tuple[str, int, int, str], DigitClassifier] = {}


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitClassifier:
    """The classifier of the weights file ``path`` (default: the shipped ``worldmodel/assets/digit_classifier.pt``),
    in eval mode on ``device``, cached per process (per file version and device).

    Read with ``torch.load(weights_only=True)``: a file holding anything but tensors and plain containers is
    refused and never executes code. A missing or bad file is a UserError saying how to rebuild it."""
    path = Path(DEFAULT_PATH if path is None else path)
    rebuild = f"rebuild it with `{REBUILD.format(path=path)}`"
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise UserError(f"digit classifier {path}: no such file; {rebuild}") from None
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(device))
    if key in _CACHE:
        return _CACHE[key]
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read the file is a bad file: say how to rebuild it
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"digit classifier {path}: not a weights-only torch file ({type(error).__name__}: {reason}); "
                        f"{rebuild}") from error
    header = payload.get("header") if isinstance(payload, dict) else None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        got = {k: header.get(k) for k in ("format", "version")} if isinstance(header, dict) else type(payload).__name__
        raise UserError(f"digit classifier {path}: expected a {FORMAT} file of version {FORMAT_VERSION}, got {got}; "
                        f"{rebuild}")
    model = DigitClassifier(int(header.get("width", 16)))
    try:
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, TypeError, AttributeError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"digit classifier {path}: weights do not fit the classifier ({reason}); {rebuild}") from error
    model.header = header
    model.requires_grad_(False)
    _CACHE[key] = model.to(device).eval()
    return _CACHE[key]


# --------------------------------------------------------------------------------------------------------------------
# Which windows are centred on a digit


def map_geometry(env_kwargs: dict[str, Any]):
    """The ``envs.mnist_map.MapGeometry`` of MnistMap-v0 made with ``env_kwargs``; missing kwargs take the env's
    own defaults (read from ``MnistMapEnv.__init__``), the digit cell size comes from the digit set itself."""
    from envs.digits import load_digits
    from envs.mnist_map import MapGeometry, MnistMapEnv

    params = inspect.signature(MnistMapEnv.__init__).parameters
    defaults = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    unknown = sorted(set(env_kwargs) - set(defaults))
    if unknown:
        raise UserError(f"env kwargs {unknown}: not arguments of MnistMap-v0 (semantic recall is MNIST-map only; "
                        f"expected some of {sorted(defaults)})")
    kw = {**defaults, **env_kwargs}
    digits, _ = load_digits(kw["split"], kw["source"])
    geometry = MapGeometry(kw["grid"], tuple(digits.shape[1:]), kw["window"], kw["step"], kw["border"])
    geometry.validate(len(digits))
    return geometry


def digit_at(pose: np.ndarray, env_kwargs: dict[str, Any]) -> np.ndarray:
    """Poses (..., 2) of MNIST-map windows -> (...) int64: the cell ``row * grid + col`` of the digit the window is
    centred on, -1 where it is centred on none.

    ``pose`` is ``info["pose"]``: the (row, col) of the window's top-left pixel in map pixels, origin at the map's
    top-left. The map is ``grid`` x ``grid`` digit cells of ``h`` x ``w`` pixels (28 x 28), row-major, so the window
    of side ``s`` is centred on cell (i, j) when ``2 * pose + s == (2 * (i, j) + 1) * (h, w)``, exactly (compared in
    integer half-pixels; under ``border="wrap"`` modulo the map size, as the window shows the torus). With the
    default ``window`` = 28 a centred window shows exactly that digit's tile. A pose off the pixel grid (by more
    than 1e-3) is centred on nothing."""
    geometry = map_geometry(env_kwargs)
    pose = np.asarray(pose, dtype=np.float64)
    if pose.ndim < 1 or pose.shape[-1] != 2:
        raise UserError(f"pose of shape {pose.shape}: expected (..., 2) MNIST-map (row, col) poses "
                        "(semantic recall is MNIST-map only)")
    pixel = np.rint(pose).astype(np.int64)  # (..., 2)
    on_pixel = (np.abs(pose - pixel) < 1e-3).all(-1)
    cell = np.asarray(geometry.digit_shape, dtype=np.int64)  # (2,) digit height, width
    twice_centre = 2 * pixel + geometry.window  # (..., 2) the window's centre in half pixels
    if geometry.border == "wrap":
        twice_centre %= 2 * np.asarray(geometry.map_shape, dtype=np.int64)
    else:  # a clip window never leaves the map: a pose outside it is no window of this env
        inside = ((pixel >= 0) & (pixel <= np.asarray(geometry.map_shape) - geometry.window)).all(-1)
        on_pixel &= inside
    index, rest = np.divmod(twice_centre - cell, 2 * cell)  # (..., 2) cell (row, col) and the off-centre remainder
    centred = on_pixel & (rest == 0).all(-1) & ((index >= 0) & (index < geometry.grid)).all(-1)
    return np.where(centred, index[..., 0] * geometry.grid + index[..., 1], -1)


def centred_on_digit(pose: np.ndarray, env_kwargs: dict[str, Any]) -> np.ndarray:
    """Poses (N, T, 2) of MNIST-map windows -> (N, T) bool: the window is centred on one digit of the map (see
    ``digit_at`` for the geometry). ``env_kwargs`` are the episode's MnistMap-v0 kwargs (the rollout manifest's
    ``env_kwargs``); missing ones take the env's defaults."""
    return digit_at(pose, env_kwargs) >= 0


# --------------------------------------------------------------------------------------------------------------------
# Agreement of predicted and true frames


def digit_agreement(pred: np.ndarray, truth: np.ndarray, classifier: DigitClassifier | None = None,
                    batch: int = 1024) -> dict[str, np.ndarray]:
    """Does each predicted frame show the digit of its true frame?

    Args:
        pred, truth: (N, T, 28, 28, 1) float frames in [0, 1] (uint8 frames are divided by 255); usually only the
            windows where ``centred_on_digit`` is True are meaningful.
        classifier: default ``load_classifier()`` (the shipped weights).
        batch: frames per forward pass.

    Returns a dict of (N, T) arrays: ``pred_label`` and ``true_label`` (int64, the classifier's labels of the two
    frames), ``agree`` (bool, equal labels), ``true_confidence`` (float32, the classifier's probability of its own
    label on the truth: low values flag truth frames it finds ambiguous) and ``pred_prob_of_true`` (float32, the
    probability the predicted frame gives to the true label: a soft agreement).

    The reference is the classifier's label of the true frame, not the digit placed on the map. Measured on
    held-out maps (``split="test"``, default geometry, 300 random-walk episodes of 129 frames per border, seeds
    1000..1299): that label equals the placed digit on 97.1% of 13,808 centred frames under ``clip`` and 97.4% of
    9,733 under ``wrap`` (97.2% of the 2,300 / 2,512 distinct digits seen), in line with the classifier's 97.6% on
    the 1,000 test digits: a centred window is exactly one test digit.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise UserError(f"digit_agreement: predicted frames {pred.shape} and true frames {truth.shape} differ in shape")
    if pred.ndim != 5 or pred.shape[2:] != INPUT_SHAPE:
        raise UserError(f"digit_agreement: frames of shape {pred.shape}: expected (N, T, 28, 28, 1) MNIST-map windows "
                        "(semantic recall is MNIST-map only: its classifier reads 28x28 grey digits)")
    for name, frames in (("predicted", pred), ("true", truth)):
        if frames.dtype != np.uint8 and frames.size and (frames.min() < -0.01 or frames.max() > 1.01):
            raise UserError(f"digit_agreement: {name} frames span [{frames.min():.3g}, {frames.max():.3g}]: "
                            "expected floats in [0, 1] (or uint8)")
    classifier = load_classifier() if classifier is None else classifier
    N, T = pred.shape[:2]
    pred_label, pred_prob = classify(classifier, pred.reshape(N * T, *INPUT_SHAPE), batch)  # (N*T,), (N*T, 10)
    true_label, true_prob = classify(classifier, truth.reshape(N * T, *INPUT_SHAPE), batch)
    rows = np.arange(N * T)
    return {
        "pred_label": pred_label.reshape(N, T),
        "true_label": true_label.reshape(N, T),
        "agree": (pred_label == true_label).reshape(N, T),
        "true_confidence": true_prob[rows, true_label].reshape(N, T).astype(np.float32),
        "pred_prob_of_true": pred_prob[rows, true_label].reshape(N, T).astype(np.float32),
    }


# --------------------------------------------------------------------------------------------------------------------
# Command line


def run(cfg: SemanticConfig) -> dict[str, Any]:
    """Train the classifier of ``cfg``, write it to ``cfg.out``, print what was measured; returns the header."""
    for flag, value, low in (("epochs", cfg.epochs, 1), ("steps", cfg.steps, 0), ("batch", cfg.batch, 1),
                             ("width", cfg.width, 1), ("shift", cfg.shift, 0), ("rotate", cfg.rotate, 0),
                             ("blur", cfg.blur, 0)):
        cli.check_range(flag, value, low)
    cli.check_range("dim", cfg.dim, 0, 1)
    if not cfg.lr > 0:
        raise UserError(f"--lr {cfg.lr}: expected > 0")
    out = Path(cfg.out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder, expected a file path such as {out / 'digit_classifier.pt'}")
    model, header = train_classifier(cfg, log=True)
    size = save_classifier(out, model, header)
    print(f"test accuracy {header['test_accuracy']:.4f} (blurred sigma 1: {header['test_accuracy_blur1']:.4f}), "
          f"train {header['train_accuracy']:.4f}; {header['updates']} updates in {header['train_seconds']:.1f} s "
          f"({header['train_cpu_seconds']:.1f} s of CPU); "
          f"{header['parameters']} parameters")
    print(f"wrote {out} ({size / 1024:.1f} KB)")
    return header


def main(argv: list[str] | None = None) -> None:
    """``python -m worldmodel.semantic``: parse the flags, train and write the weights."""
    run(cli.parse(SemanticConfig, argv, prog="worldmodel.semantic"))


if __name__ == "__main__":
    cli.run(main)
