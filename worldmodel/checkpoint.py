"""Checkpoints: one `ckpt.pt` per run folder, written atomically, holding everything to resume or to rebuild the model.

Contents (a plain dict, `torch.load(..., weights_only=False)`):
    model          state_dict of the GTMM
    model_config   ModelConfig as a dict (rebuilds the model without the data)
    config         TrainConfig as a dict (the resolved command line)
    optimizer      Adam state_dict
    step           optimizer updates done
    rng            python / numpy / torch (/ cuda) RNG states
    version        format version
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gtmm.cli import UserError
from worldmodel.config import ModelConfig, TrainConfig

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         config: TrainConfig, step: int, extra: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint to a temporary file, then rename it over `path`: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": FORMAT_VERSION,
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.cfg),
        "config": dataclasses.asdict(config),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "rng": rng_state(),
        **(extra or {}),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_raw(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The checkpoint dict, validated. `path` may be a ckpt.pt file or a run folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {path}: no such file (expected a ckpt.pt or a run folder holding one)")
    payload = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(payload, dict) or payload.get("version") != FORMAT_VERSION:
        got = payload.get("version") if isinstance(payload, dict) else type(payload).__name__
        raise UserError(f"checkpoint {path}: expected format version {FORMAT_VERSION}, got {got!r}")
    for key in ("model", "model_config", "config", "step"):
        if key not in payload:
            raise UserError(f"checkpoint {path}: missing field {key!r}")
    return payload


def load(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Rebuild the trained model from a checkpoint: returns `(model, config)`, the model in eval mode on `device`
    and `config` the run's TrainConfig (the model's own sizes are `model.cfg`, a ModelConfig)."""
    from worldmodel.model import GTMM  # here, so that reading configs does not import the memories

    payload = load_raw(path, device="cpu")
    model = GTMM(ModelConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    return model, TrainConfig.from_dict(payload["config"])
