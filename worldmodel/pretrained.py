"""Pretrained world models shipped inside the package: `pretrained:NAME` works wherever a checkpoint is taken.

    python -m worldmodel.pretrained list
    python -m worldmodel.evaluate --checkpoint pretrained:mnist_map --data data/mnist_map_test \
        --baseline pretrained:mnist_map_none
    python -m worldmodel.dream --checkpoint pretrained:mnist_map --data data/mnist_map_test --out dream.gif
    python -m worldmodel.pretrained export runs/intro --name mnist_map --eval runs/intro/eval/test/eval.json

The registry is the folder `worldmodel/assets/pretrained/`: each model is `<name>.pt`, a checkpoint that
`worldmodel.checkpoint` loads like any other (`torch.load(weights_only=True)`: tensors and plain values only), and
`<name>.json`, the same `made_by` record for people to read beside it. Both are written by `export` from a run folder:

- the model's weights, its `model_config` and the run's `config` (TrainConfig), its `step`; no optimizer state and
  no RNG state (they only serve resuming, and the optimizer's two Adam moments would triple the size);
- floating-point parameters stored as float16 (`--dtype`, default float16): half the bytes, and
  `load_state_dict` casts them back into the float32 model. Buffers keep their dtype: the Fourier frequencies of the
  `actions`/`pose` addresses are not learned, and rounding them would move every address;
- `made_by`: the commands that made it (given with `--command`, else rebuilt from the run's config and its data's
  manifest), the data (env, kwargs, agent, episode count, the checksum of its episode list), the steps, and the
  figures of every `eval.json` given with `--eval` that evaluated this run (open-loop error on revisits of context
  places, its interval, the memory score and ratios against the baseline), plus torch and gtmm-worlds versions.

Writes go through `gtmm.fs.write_bytes_atomic`; an existing name is replaced only with `--overwrite`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from tyro.conf import Positional

from gtmm import cli
from gtmm.cli import UserError
from gtmm.fs import write_bytes_atomic

PREFIX = "pretrained:"
ASSETS = Path(__file__).resolve().parent / "assets" / "pretrained"
_NAME = re.compile(r"[a-z0-9][a-z0-9_]*")


# -- the registry -----------------------------------------------------------------------------------------------------

def names() -> list[str]:
    """The shipped models' names, sorted."""
    return sorted(p.stem for p in ASSETS.glob("*.pt")) if ASSETS.is_dir() else []


def path(name: str) -> Path:
    """The checkpoint file of the shipped model `name` (`pretrained:` prefix allowed); UserError listing the names."""
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    file = ASSETS / f"{name}.pt"
    if not _NAME.fullmatch(name) or not file.is_file():
        shipped = ", ".join(f"{PREFIX}{n}" for n in names()) or "none (this install ships no pretrained models)"
        raise UserError(f"checkpoint {PREFIX}{name}: no such pretrained model; shipped: {shipped}")
    return file


def is_pretrained(checkpoint: Any) -> bool:
    """Whether a `--checkpoint` value names a shipped model (`pretrained:NAME`)."""
    return isinstance(checkpoint, str) and checkpoint.startswith(PREFIX)


def info(name: str) -> dict[str, Any]:
    """The `made_by` record of a shipped model (read from `<name>.json`, no torch needed)."""
    record = path(name).with_suffix(".json")
    if not record.is_file():
        return {}
    return json.loads(record.read_text())


# -- export -----------------------------------------------------------------------------------------------------------

@dataclass
class ExportConfig:
    """Make a shipped pretrained model from a run folder (weights, configs and how it was made; no optimizer)."""

    run: Positional[str]
    """the run folder (or a ckpt.pt / best.pt in it)"""
    name: str
    """registry name: lowercase letters, digits, underscores (used as --checkpoint pretrained:NAME)"""
    eval: tuple[str, ...] = ()
    """eval.json files (python -m worldmodel.evaluate) whose figures for this run go into made_by (default: every
    <run>/eval/*/eval.json)"""
    command: tuple[str, ...] = ()
    """the exact commands that made the run, in order (default: rebuilt from the run's config and data manifest)"""
    note: tuple[str, ...] = ()
    """free-text lines recorded in made_by (e.g. what was checked by hand)"""
    data: Optional[str] = None
    """the run's training data folder, if not at the path its config records (read for the collect command)"""
    dtype: Literal["float16", "float32"] = "float16"
    """storage type of the floating-point parameters (float16 halves the file; buffers keep their type)"""
    out: Optional[str] = None
    """registry folder to write to (default: the package's worldmodel/assets/pretrained)"""
    overwrite: bool = False
    """replace an existing model of that name"""


def _quote(value: Any) -> str:
    return shlex.quote(value if isinstance(value, str) else json.dumps(value))


def train_command(config: dict[str, Any]) -> str:
    """`python -m worldmodel.train ...` that makes a run of this saved config: the preset, then every flag whose
    value differs from the preset's (bookkeeping flags that do not change the model are left out)."""
    from worldmodel.config import TrainConfig, preset

    cfg = TrainConfig.from_dict(config)
    base = preset(cfg.preset)
    skip = {"preset", "resume", "progress", "device", "data", "task", "out", "steps"}
    args = ["python -m worldmodel.train"]
    args += [f"--data {_quote(cfg.data)}"] if cfg.data is not None else [f"--task {_quote(cfg.task)}"]
    args += [f"--preset {cfg.preset}", f"--steps {cfg.steps}"]
    for field in dataclasses.fields(TrainConfig):
        value = getattr(cfg, field.name)
        if field.name in skip or value == getattr(base, field.name):
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{field.name.replace('_', '-')}")
        else:
            args.append(f"{flag} {_quote(str(value))}")
    return " ".join(args + [f"--out {_quote(cfg.out)}"])


def collect_command(manifest: dict[str, Any], out: str) -> str:
    """`python -m rollouts.collect ...` that writes the same episodes as this manifest's folder (any --workers)."""
    env, agent = manifest["env"], manifest["agent"]
    kwargs = {k: v for k, v in env["kwargs"].items()}
    if kwargs.get("max_steps") == manifest["steps_per_episode"]:
        kwargs.pop("max_steps")  # collect sets it from --steps
    from envs import SHORT_NAMES

    defaults = SHORT_NAMES.get(env["name"], ("", {}))[1]
    kwargs = {k: v for k, v in kwargs.items() if defaults.get(k, object()) != v}  # mnist_map_test's split
    args = [f"python -m rollouts.collect --env {_quote(env['name'])} --agent {agent['name']}",
            f"--episodes {len(manifest['episodes'])} --steps {manifest['steps_per_episode']} --seed {manifest['seed']}"]
    if kwargs:
        args.append(f"--env-kwargs {_quote(json.dumps(kwargs))}")
    if agent["kwargs"]:
        args.append(f"--agent-kwargs {_quote(json.dumps(agent['kwargs']))}")
    return " ".join(args + [f"--out {_quote(out)}"])


def _matches(entry: dict[str, Any], run_dir: Path, file: Path, eval_json: Path) -> bool:
    """Whether an eval.json model entry evaluated this run (its checkpoint path, absolute or relative to where
    evaluate ran)."""
    if not entry.get("checkpoint"):
        return False
    recorded = Path(entry["checkpoint"])
    # older eval.json files record the path as given: relative to wherever evaluate ran, some folder above the file
    above = [folder / recorded for folder in eval_json.resolve().parents]
    candidates = [recorded] if recorded.is_absolute() else [recorded, *above]
    targets = {run_dir.resolve(), file.resolve()}
    return any(c.resolve() in targets for c in candidates)


def eval_figures(eval_json: Path, run_dir: Path, file: Path) -> Optional[dict[str, Any]]:
    """The figures of this run in one eval.json (None if it did not evaluate this run)."""
    result = json.loads(eval_json.read_text())
    entry = next((e for e in result.get("models", {}).values() if _matches(e, run_dir, file, eval_json)), None)
    if entry is None:
        return None
    ol, rc = entry["open_loop"], entry["reconstruction"]
    others = [label for label, e in result["models"].items() if e is not entry]
    figures = {
        "data": {k: result["data"].get(k) for k in ("name", "env_id", "env_kwargs", "episodes", "windows")},
        "context": result["context"], "seq_len": result["seq_len"], "role": entry["role"],
        "evaluated_beside": others,
        "open_loop_mse_revisit_context": {k: ol["revisit_context"]["mse"][k] for k in ("mean", "ci", "n")},
        "open_loop_mse_revisit": ol["mse_revisit"], "open_loop_mse_first_visit": ol["mse_first_visit"],
        "own_reconstruction_mse_revisit_context": rc["mse_revisit_context"],
        "kl_per_step_revisit": entry["teacher_forcing"]["kl_revisit"],
        "kl_per_step_first_visit": entry["teacher_forcing"]["kl_first_visit"],
    }
    if entry.get("memory_score"):
        figures["memory_score"] = {k: entry["memory_score"][k] for k in ("mean", "ci", "against")}
    if entry["role"] == "model":
        figures["ratios"] = result.get("ratios", {})
    figures["command"] = evaluate_command(result.get("config", {}))
    return figures


def evaluate_command(config: dict[str, Any]) -> str:
    """`python -m worldmodel.evaluate ...` of an eval.json's recorded config (defaults left out)."""
    from worldmodel.evaluate import EvalConfig

    defaults = EvalConfig(checkpoint="", data="")
    args = ["python -m worldmodel.evaluate"]
    for field in dataclasses.fields(EvalConfig):
        value = config.get(field.name, getattr(defaults, field.name))
        if field.name in ("out", "device"):  # where it wrote and ran: not what it measured
            continue
        if field.name in ("checkpoint", "data") or value != getattr(defaults, field.name):
            args.append(f"--{field.name.replace('_', '-')} {_quote(str(value))}")
    return " ".join(args)


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def export(cfg: ExportConfig) -> Path:
    """Write `<out>/<name>.pt` and `<name>.json` from the run `cfg.run`; returns the .pt path."""
    import torch

    from rollouts.storage import read_manifest
    from worldmodel import checkpoint

    if not _NAME.fullmatch(cfg.name):
        raise UserError(f"--name {cfg.name!r}: expected lowercase letters, digits and underscores, e.g. mnist_map")
    out = Path(cfg.out) if cfg.out else ASSETS
    target, record = out / f"{cfg.name}.pt", out / f"{cfg.name}.json"
    if target.exists() and not cfg.overwrite:
        raise UserError(f"{target} exists: pass --overwrite to replace it, or choose another --name")
    file = checkpoint.resolve(cfg.run)
    run_dir = file.parent
    payload = checkpoint.load_raw(file)
    model, _ = checkpoint.load(file)  # rebuilds it: the weights fit the configs (and no non-finite ones below)
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise UserError(f"checkpoint {file}: non-finite weights in {', '.join(bad[:3])}: not worth shipping")

    # -- weights: parameters in --dtype, buffers as they are (see the module docstring)
    dtype = getattr(torch, cfg.dtype)
    params = {n for n, _ in model.named_parameters()}
    weights = {n: (t.to(dtype) if n in params and t.is_floating_point() else t).clone()
               for n, t in model.state_dict().items()}

    # -- how it was made
    config = payload["config"]
    data = cfg.data or config.get("data")
    manifest = None
    if data is not None and Path(data, "manifest.json").is_file():
        manifest = read_manifest(data)
        if payload.get("data_fingerprint") is not None:
            from worldmodel.train import dataset_fingerprint

            if dataset_fingerprint(data) != payload["data_fingerprint"]:
                raise UserError(f"--data {data}: not the dataset the run was trained on (the episode checksums "
                                "differ from the checkpoint's); pass the run's own data folder")
    commands = list(cfg.command)
    if not commands:
        if manifest is not None:
            commands.append(collect_command(manifest, config.get("data") or str(data)))
        commands.append(train_command(config))
    evals = [Path(e) for e in cfg.eval] or sorted(run_dir.glob("eval/*/eval.json"))
    figures = []
    for eval_json in evals:
        if not eval_json.is_file():
            raise UserError(f"--eval {eval_json}: no such file")
        found = eval_figures(eval_json, run_dir, file)
        if found is None and cfg.eval:
            raise UserError(f"--eval {eval_json}: none of its models is the run {run_dir}")
        if found is not None:
            figures.append(found)
    made_by = {
        "name": cfg.name,
        "commands": commands,
        "data": {
            **({"env": manifest["env"]["name"], "env_id": manifest["env"]["id"],
                "env_kwargs": manifest["env"]["kwargs"], "agent": manifest["agent"]["name"],
                "agent_kwargs": manifest["agent"]["kwargs"],
                "steps_per_episode": manifest["steps_per_episode"], "seed": manifest["seed"]}
               if manifest is not None else {}),
            "folder": config.get("data"), "task": config.get("task"),
            "fingerprint": payload.get("data_fingerprint"),
        },
        "steps": int(payload["step"]),
        "memory": model.cfg.memory, "address": model.cfg.address, "address_kwargs": model.cfg.address_kwargs,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "weights_dtype": cfg.dtype,
        "eval": figures,
        "notes": list(cfg.note),
        "versions": {"torch": str(torch.__version__), "gtmm-worlds": _version("gtmm-worlds"),
                     "python": ".".join(map(str, sys.version_info[:3]))},
    }
    shipped = {"version": payload["version"], "model": weights, "model_config": payload["model_config"],
               "config": config, "step": int(payload["step"]), "made_by": made_by}
    if payload.get("data_fingerprint") is not None:
        shipped["data_fingerprint"] = payload["data_fingerprint"]
    checkpoint.write_plain(target, shipped, "pretrained")  # loadable with weights_only=True, or fail here
    write_bytes_atomic(record, (json.dumps(made_by, indent=1) + "\n").encode())
    return target


# -- the command line -------------------------------------------------------------------------------------------------

def describe(name: str) -> str:
    """Lines about one shipped model for `list`: size, model, steps, data, figures, commands."""
    made_by = info(name)
    size = path(name).stat().st_size
    lines = [f"{PREFIX}{name}  ({size / 1e6:.2f} MB, {made_by.get('weights_dtype', '?')} weights)"]
    if made_by:
        data = made_by.get("data", {})
        lines.append(f"  {made_by.get('memory')} memory, {made_by.get('address')} address "
                     f"{json.dumps(made_by.get('address_kwargs', {}))}, {made_by.get('parameters', 0) / 1e6:.2f}M "
                     f"parameters, {made_by.get('steps')} steps on {data.get('env', data.get('task'))} "
                     f"{json.dumps(data.get('env_kwargs', {}))}")
        for fig in made_by.get("eval", []):
            ol = fig["open_loop_mse_revisit_context"]
            text = (f"  eval on {fig['data']['name']} ({fig['data']['windows']} windows, K {fig['context']}): "
                    f"open-loop MSE on revisits of context places {ol['mean']:.4f} "
                    f"[{ol['ci'][0]:.4f}, {ol['ci'][1]:.4f}], "
                    f"own reconstruction {fig['own_reconstruction_mse_revisit_context']:.4f}")
            ratio = fig.get("ratios", {}).get("open_loop_revisit_context_over_baseline")
            if ratio is not None:
                text += f", {ratio:.3f}x {fig['evaluated_beside'][0] if fig['evaluated_beside'] else 'baseline'}"
            lines.append(text)
        lines += [f"  $ {command}" for command in made_by.get("commands", [])]
        lines += [f"  note: {note}" for note in made_by.get("notes", [])]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m worldmodel.pretrained list | export RUN --name NAME [...]`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = "expected a command: list, or export RUN --name NAME (python -m worldmodel.pretrained export --help)"
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m worldmodel.pretrained {{list,export}} ...\n\n{__doc__}")
        if not argv:
            raise UserError(usage)
        return
    command, rest = argv[0], argv[1:]
    if command == "list":
        if rest:
            raise UserError(f"list takes no arguments, got {' '.join(rest)}")
        shipped = names()
        print("\n".join(describe(n) for n in shipped) if shipped else f"no pretrained models in {ASSETS}")
    elif command == "export":
        cfg = cli.parse(ExportConfig, rest, prog="worldmodel.pretrained export")
        target = export(cfg)
        print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB) and {target.with_suffix('.json')}; "
              f"use it as --checkpoint {PREFIX}{cfg.name}" + ("" if cfg.out is None else
                                                             f" once it is in {ASSETS}"))
    else:
        raise UserError(f"unknown command {command!r}: {usage}")


if __name__ == "__main__":
    cli.run(main)
