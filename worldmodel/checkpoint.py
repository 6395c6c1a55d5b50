"""Checkpoints: one `ckpt.pt` per run folder, written atomically, holding everything to resume or to rebuild the model.

Anything that takes a checkpoint (`load`, `load_raw`, `resolve`, `sha256_of`, so `evaluate`, `dream`, the `dream`
env) also takes `pretrained:NAME`, a model shipped in the package (`worldmodel.pretrained`: the same format without
optimizer and RNG state, float16 weights that loading casts back into the float32 model, and a `made_by` record).

Contents (a plain dict of tensors and plain values, see the trust model below):
    model          state_dict of the GTMM
    model_config   ModelConfig as a dict (rebuilds the model without the data)
    config         TrainConfig as a dict (the resolved command line)
    optimizer      Adam state_dict (or None)
    step           optimizer updates done
    rng            python / numpy / torch (/ cuda) RNG states as lists, ints, floats and tensors
    version        format version (FORMAT_VERSION)

Trust model: loading a checkpoint never executes code from it, so a `ckpt.pt` someone sent you is safe to pass to
`evaluate`, `dream`, `train --resume` or a `dream` env. A checkpoint is a torch zip archive whose pickle may build
only tensors, dicts, lists, tuples, strings, numbers, booleans and None: it is read with
`torch.load(weights_only=True)`, whose unpickler refuses every other object before building it. A file whose pickle
needs anything else (a crafted `__reduce__` that runs a command, a checkpoint of format 1 that pickled numpy RNG
state, any arbitrary pickle) is refused with `not loadable safely: ...` naming the file; a file that is no torch
archive at all (empty, text, random bytes, another zip) is refused with `not a gtmm checkpoint (...)`. Nothing in a
checkpoint is ever imported, called or evaluated; only its weights are copied into a model built from our own code.

Writes go through `gtmm.fs.write_bytes_atomic`: the archive is built in memory, then written to a temp file that is
fsynced and renamed over `ckpt.pt`, so a crash or a full disk leaves the previous checkpoint intact and no temp file.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gtmm.cli import UserError
from gtmm.fs import write_bytes_atomic
from worldmodel.config import ModelConfig, TrainConfig

# 2: RNG states as lists/tensors instead of numpy arrays and tuples, so the whole file loads with weights_only=True
FORMAT_VERSION = 2
NAME = "ckpt.pt"
PRETRAINED = "pretrained:"  # `pretrained:NAME` names a model shipped in the package (worldmodel.pretrained)

# what may appear in a checkpoint: exactly what torch's weights-only unpickler builds without help. Scalars by exact
# type: a subclass pickles as itself (torch.__version__ is a TorchVersion, a numpy float64 is a float) and is refused
_PLAIN = (str, int, float, bool, type(None))


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint file of `path`: a ckpt.pt file itself, `<run folder>/ckpt.pt`, or for `pretrained:NAME` the
    shipped model's file (`worldmodel.pretrained`); UserError if there is none."""
    if isinstance(path, str) and path.startswith(PRETRAINED):
        from worldmodel import pretrained  # the registry imports this module: import it only when asked

        return pretrained.path(path)
    path = Path(path)
    file = path / NAME if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"checkpoint {file}: no such file (expected a {NAME} or a run folder holding one)")
    return file


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of the checkpoint file of `path` (a ckpt.pt or a run folder): which model a dataset was dreamed by."""
    from rollouts.storage import sha256_file  # the project's one file hash (rollouts needs no torch)

    return sha256_file(resolve(path))


# -- RNG states as plain values ------------------------------------------------------------------------------------------
# random.getstate() is a tuple holding a tuple of 625 ints and np.random.get_state() a tuple holding a uint32 array:
# neither is what a weights-only load builds (tuples are, but the numpy array is not), so both become lists/tensors
# here and are turned back, bit for bit, in set_rng_state (exact resume is tested in tests/test_train.py).

def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and cuda) global RNG states as plain values and tensors."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNGs from `rng_state()`'s dict exactly."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_rng(state: Any) -> str | None:
    """What is wrong with a loaded `rng` entry, or None (set_rng_state would otherwise fail with a bare TypeError)."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        return "expected a dict with python, numpy and torch states"
    py, npy = state["python"], state["numpy"]
    if not (isinstance(py, dict) and isinstance(py.get("state"), list) and isinstance(py.get("version"), int)):
        return "python state: expected {version, state, gauss_next}"
    if not (isinstance(npy, dict) and isinstance(npy.get("keys"), torch.Tensor) and npy["keys"].shape == (624,)):
        return "numpy state: expected {bit_generator, keys (624,), pos, has_gauss, cached_gaussian}"
    if not isinstance(state["torch"], torch.Tensor) or state["torch"].dtype != torch.uint8:
        return "torch state: expected a uint8 tensor"
    return None


def check_plain(value: Any, where: str) -> None:
    """Fail loudly at save time if the payload holds anything a weights-only load would refuse."""
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"checkpoint payload: key {key!r} at {where} is a {type(key).__name__}")
            check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
    elif type(value) not in _PLAIN and not isinstance(value, torch.Tensor):
        raise TypeError(f"checkpoint payload: {where} is a {type(value).__name__}; store tensors and plain values "
                        "only, or the checkpoint will not load with weights_only=True")


def write_plain(path: str | os.PathLike, payload: dict[str, Any], what: str = "checkpoint") -> int:
    """Check that `payload` loads weights-only (`check_plain`), serialise it in memory and write it to `path` in one
    atomic write; returns its size in bytes. torch.save straight to a file on a full disk raises an opaque
    "[enforce fail at inline_container.cc] unexpected pos" and leaves its temp file behind; this raises
    `UserError("no space left on device while writing <path> ...")` and leaves the old file and no temp."""
    check_plain(payload, what)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getbuffer())
    return buffer.getbuffer().nbytes


# -- save and load ---------------------------------------------------------------------------------------------------------

def save(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         config: TrainConfig, step: int, extra: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint to `path` atomically and return `path`. A crash never leaves a torn file; a full disk
    raises `UserError("no space left on device while writing <path> ...")` and leaves the old file and no temp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": FORMAT_VERSION,
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.cfg),
        "config": dataclasses.asdict(config),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "rng": rng_state(),
        **(extra or {}),
    }
    write_plain(path, payload, "checkpoint")
    return path


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _unsafe_reason(error: pickle.UnpicklingError) -> str:
    """One short line from torch's multi-paragraph weights-only refusal: which global the pickle asked for."""
    text = str(error)
    found = _GLOBAL.search(text)
    if found:
        name = found.group(1)
        hint = (" (a gtmm checkpoint of format 1 pickled numpy RNG state: retrain it with this version)"
                if name.startswith("numpy") else "")
        return f"its pickle needs {name}, which a checkpoint of tensors and plain values never does{hint}"
    operand = re.search(r"Unsupported operand[^\n]*", text)
    return operand.group(0).strip() if operand else " ".join(text.split())[:200]


def _read(file: Path, device: torch.device | str) -> Any:
    """`torch.load(weights_only=True)` of `file`, every failure a UserError naming it. The bytes are read once and
    loaded from memory, so what was checked is what is used."""
    data = file.read_bytes()
    if not data:
        raise UserError(f"checkpoint {file}: not a gtmm checkpoint (the file is empty)")
    buffer = io.BytesIO(data)
    if not zipfile.is_zipfile(buffer):
        # torch's legacy (non-zip) format is never written by gtmm: refuse it before any unpickling
        raise UserError(f"checkpoint {file}: not a gtmm checkpoint (not a torch zip archive; {len(data)} bytes "
                        f"starting {data[:8]!r})")
    with zipfile.ZipFile(buffer) as archive:
        if not any(name.endswith("/data.pkl") for name in archive.namelist()):
            raise UserError(f"checkpoint {file}: not a gtmm checkpoint (a zip archive without data.pkl)")
    buffer.seek(0)
    try:
        return torch.load(buffer, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"checkpoint {file}: not loadable safely: {_unsafe_reason(error)}; refused without "
                        "running any of it") from error
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError/EOFError/KeyError... on a damaged archive
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"checkpoint {file}: not a gtmm checkpoint ({type(error).__name__}: {reason})") from error


def load_raw(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The checkpoint dict, validated. `path` may be a ckpt.pt file or a run folder holding one. Never executes code
    from the file (weights-only load); any other content is a UserError naming the file."""
    file = resolve(path)
    payload = _read(file, device)
    if not isinstance(payload, dict) or "version" not in payload:
        raise UserError(f"checkpoint {file}: not a gtmm checkpoint (expected a dict with a version, "
                        f"got {type(payload).__name__})")
    if payload["version"] != FORMAT_VERSION:
        raise UserError(f"checkpoint {file}: format version {payload['version']!r}, this gtmm reads version "
                        f"{FORMAT_VERSION} (retrain it, or use the gtmm version that wrote it)")
    expected = {"model": dict, "model_config": dict, "config": dict, "step": int}
    for key, kind in expected.items():
        if key not in payload:
            raise UserError(f"checkpoint {file}: missing field {key!r}")
        if not isinstance(payload[key], kind) or isinstance(payload[key], bool):
            raise UserError(f"checkpoint {file}: field {key!r} is a {type(payload[key]).__name__}, "
                            f"expected a {kind.__name__}")
    if not all(isinstance(v, torch.Tensor) for v in payload["model"].values()):
        raise UserError(f"checkpoint {file}: field 'model' is not a state dict of tensors")
    if "rng" in payload and (problem := _check_rng(payload["rng"])) is not None:
        raise UserError(f"checkpoint {file}: field 'rng': {problem}")
    return payload


def load(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Rebuild the trained model from a checkpoint: returns `(model, config)`, the model in eval mode on `device`
    and `config` the run's TrainConfig (the model's own sizes are `model.cfg`, a ModelConfig)."""
    from worldmodel.model import GTMM  # here, so that reading configs does not import the memories

    payload = load_raw(path, device="cpu")
    try:
        model = GTMM(ModelConfig.from_dict(payload["model_config"]))
        model.load_state_dict(payload["model"])
        config = TrainConfig.from_dict(payload["config"])
    except (TypeError, ValueError, RuntimeError, KeyError) as error:  # bad config fields, weights of other sizes
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"checkpoint {resolve(path)}: its weights and configs do not fit together ({reason})") from error
    model.to(device).eval()
    return model, config


def optimizer_state_for(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved_model: dict[str, Any],
                        saved_optimizer: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The saved optimizer state laid out for `optimizer`, when `model` has parameters that the checkpoint's model
    (`saved_model`, its state_dict) did not have: a parameter added in a later version of a module (e.g. the lattice
    filter's evidence weight). Adam's state is keyed by each parameter's position over all groups, so every later
    parameter would shift and the load would fail; here each kept parameter keeps its moments and the new ones start
    fresh. Returns (state dict to load, the new parameters' names); the saved state as it is when nothing is new."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    new = [name for group in groups for name in group if name not in saved_model]
    if not new:
        return saved_optimizer, []
    if len(saved_optimizer["param_groups"]) != len(groups):
        raise UserError(f"checkpoint: its optimizer has {len(saved_optimizer['param_groups'])} parameter groups, "
                        f"this model {len(groups)}: not a run of this model")
    old_index, new_index, i = {}, {}, 0  # name -> position in the saved / the new optimizer
    for group in groups:
        for name in group:
            if name not in new:
                old_index[name] = len(old_index)
            new_index[name] = i
            i += 1
    for saved_group, group in zip(saved_optimizer["param_groups"], groups):
        if len(saved_group["params"]) != len([n for n in group if n not in new]):
            raise UserError("checkpoint: its optimizer's parameters do not match this model's: not a run of this model")
    state = {new_index[name]: saved_optimizer["state"][old_index[name]] for name in old_index
             if old_index[name] in saved_optimizer["state"]}
    param_groups = [{**saved_group, "params": [new_index[name] for name in group]}
                    for saved_group, group in zip(saved_optimizer["param_groups"], groups)]
    return {"state": state, "param_groups": param_groups}, new
