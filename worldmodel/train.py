"""Train a GTMM world model: `python -m worldmodel.train --data data/mnist_map --memory introspective --address actions`.

One readable loop with labelled sections: setup, resume, data, model, then per step: batch, forward, loss, update
(with a NaN/inf guard), validate, log, checkpoint, stop. Multi-GPU with the same command under
`torchrun --nproc_per_node N` (DistributedDataParallel; only rank 0 locks the run folder, validates, logs and saves;
a stop request on any rank stops every rank after the same step).

Reproducibility and exact resume: step k's batch is drawn with `np.random.default_rng([seed, rank, k])` and the
latent noise with torch seeded from (seed, rank, k), so the data position *is* the step, and a run resumed from a
checkpoint draws exactly what an uninterrupted run would. RNG states are saved in the checkpoint all the same.
Validation and image logging run under a forked RNG, so they never change what training draws.

What `--resume` guarantees: the run finishes as it was configured. The checkpoint's config is the run's definition;
a flag given on the command line that differs from it is an error naming both values, except the ones in
`config.RESUME_MAY_CHANGE` (`--steps`, which may extend the run but not end it before the step reached, `--threads`,
`--device`, `--progress` and the `--*-every` intervals), which are applied and recorded in config.json. Without
`--steps` the run goes to its saved step count. `--data` may name a moved copy of the run's dataset: its manifest
must list the same episodes (same sha256s, same order); the data at the saved path is checked the same way.

Signals: under the CLI, SIGINT or SIGTERM (Ctrl-C, `kill`, a SLURM preemption) lets the current step finish, saves
ckpt.pt at that step and exits 130 / 143 with one line saying how to resume; a second signal stops at once without
saving. `train()` called as a library installs no handlers (pass a `StopSignal` to get the same behaviour).

Validation: every `--val-every` steps rank 0 evaluates a fixed set of `--val-windows` held-out windows (episode
starts of the dataset's `val` split, or a fixed batch of a sequence task's test images): teacher-forced NLL and KL
per step and open-loop MSE on revisits of places seen in the first `--open-loop-context` frames, logged under
`val/`, appended to val.jsonl, and `best.pt` (same format as ckpt.pt, the figures in its `val` entry) is rewritten
whenever the validation loss (NLL + KL per step) improves. Off a terminal (or with `--no-progress`) a plain line is
printed every `--log-every` steps instead of a progress bar, so cluster log files stay readable.

What helped the memory get used (mnist_map, 3x3 maps, wrap border, 48-step random walks, CPU preset
`mnist_cpu`, ~2,000 steps): an address that does not depend on what was seen. `--address actions` with
`--address-kwargs '{"integrator": "additive", "inverse_actions": [1, 0, 3, 2]}'` matched the `pose` ceiling
(open-loop error on revisits of context places 0.22x the `none` baseline's, within 1.04x of its own
reconstruction); the default GRU integrator was still learning at 1,950 steps (0.69x). All runs used
`--address-lr-scale 3`, `--kl-balance 0.8`, `--free-nats 1` (not ablated). That choice is the default now:
`--address auto` reads what the env declared in the data's manifest (`action_effects`, `inverse_actions`) and picks
the additive integrator for translations, the GRU one otherwise, `hidden` for action-free tasks
(`config.auto_address`); config.json and the checkpoints record the address it chose. `--address hidden` gives the
paper's.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gtmm import cli
from gtmm.cli import UserError, parse_json_object, resolve_device  # evaluate, dream import resolve_device from here
from gtmm.fs import FolderLock, write_bytes_atomic
from rollouts.dataset import Prefetcher
from worldmodel import checkpoint
from worldmodel.config import AUTO, RESUME_MAY_CHANGE, TrainConfig, preset
from worldmodel.model import BATCH_DTYPES, GTMM, OPTIONAL_DTYPES, batch_to_torch, param_groups
from worldmodel.path import PATH_TARGETS
from worldmodel.read_target import READ_TARGETS

# the rng streams of the image-grid batch and of the task validation batch: apart from every rank's training stream
VIS_STREAM, VAL_STREAM = 10**6, 10**6 + 1


# -- data sources -----------------------------------------------------------------------------------------------------

def dataset_fingerprint(root: str | os.PathLike) -> dict[str, Any]:
    """What makes a rollout folder *this* dataset: its episodes' checksums in index order (not where it lives)."""
    from rollouts.storage import read_manifest

    manifest = read_manifest(root)
    records = sorted(manifest["episodes"], key=lambda e: e["index"])
    digest = hashlib.sha256("\n".join(str(r["sha256"]) for r in records).encode()).hexdigest()
    return {"episodes": len(records), "sha256": digest, "env": str(manifest["env"]["name"])}


class _CacheProgress:
    """One line per ~10% of a data-cache build, once it has taken more than a few seconds (a multi-GB split takes a
    while and said nothing; a small one stays silent, so a bad flag found after it is still the only line)."""

    def __init__(self, quiet_s: float = 5.0) -> None:
        self.start, self.quiet_s = time.perf_counter(), quiet_s

    def __call__(self, done: int, total: int) -> None:
        step = max(1, total // 10)
        if time.perf_counter() - self.start > self.quiet_s and (done == total or done % step == 0):
            print(f"[train] decoding the data cache: {done}/{total} episodes", file=sys.stderr, flush=True)


class RolloutSource:
    """Random windows of recorded rollouts (`rollouts.dataset.RolloutWindows`), drawn with a given numpy rng.

    Under `torchrun` each rank draws only from its own share of the training episodes: rank r of W takes the
    episodes at positions p of the train split (in index order) with p % W == r, so the ranks see disjoint episodes
    and together all of them. With W = 1 the share is every window and the draws are those of an unsharded run."""

    def __init__(self, root: str, seq_len: int, val_fraction: float, seed: int) -> None:
        from rollouts.dataset import RolloutWindows, split_episodes
        from rollouts.storage import read_manifest

        path = Path(root)
        if not path.is_dir():
            raise UserError(f"--data {root}: {'not a folder' if path.exists() else 'no such folder'} "
                            "(expected a rollout folder made by python -m rollouts.collect)")
        manifest = read_manifest(path)
        episodes = split_episodes(manifest, "train", val_fraction, seed)
        longest = max((int(e["steps"]) + 1 for e in episodes), default=0)
        if 0 < longest < seq_len:
            raise UserError(f"--seq-len {seq_len}: the longest training episode in {root} has {longest} frames; "
                            f"pass --seq-len {longest} or less, or collect longer episodes")
        self.windows = RolloutWindows(root, seq_len=seq_len, split="train", val_fraction=val_fraction, seed=seed,
                                      progress=_CacheProgress())
        self.obs_shape = tuple(self.windows.obs_shape)
        self.num_actions, self.pose_dim = self.windows.num_actions, self.windows.pose_dim
        self.name = f"rollouts:{self.windows.env_name}"
        self.seq_len = seq_len
        self.fingerprint = dataset_fingerprint(root)
        # the train-split position of each window's episode: (N,)
        self.window_episode = np.searchsorted(self.windows.episode_offsets, self.windows.window_starts,
                                              side="right") - 1
        self._shares: dict[tuple[int, int], np.ndarray] = {}

    def share(self, rank: int, world: int) -> np.ndarray:
        """The window indices (ascending) that rank ``rank`` of ``world`` draws from: those of the training episodes
        at split positions p with p % world == rank. UserError when that share has no window."""
        if not (world >= 1 and 0 <= rank < world):
            raise ValueError(f"rank {rank} of world {world}: expected 0 <= rank < world")
        key = (rank, world)
        if key not in self._shares:
            windows = np.flatnonzero(self.window_episode % world == rank)
            if len(windows) == 0:
                raise UserError(f"--data {self.windows.root}: {len(self.windows.episodes)} training episode(s) for "
                                f"{world} ranks: rank {rank} gets no episode with a {self.seq_len}-frame window "
                                "(each rank samples only its own episodes); collect more episodes or use fewer ranks")
            self._shares[key] = windows
        return self._shares[key]

    def sample(self, batch_size: int, rng: np.random.Generator, rank: int = 0, world: int = 1
               ) -> dict[str, np.ndarray]:
        """``batch_size`` windows drawn uniformly with ``rng`` from the share of rank ``rank`` of ``world``, as one
        batch of arrays (B, T, ...)."""
        share = self.share(rank, world)
        # share[i] == i when world == 1: exactly the draws of the unsharded sampler (runs and checkpoints resume)
        index = share[rng.integers(len(share), size=batch_size)]
        return self.windows.sample_batch(index)  # one gather per array: the same arrays as stacking the windows


class TaskSource:
    """An action-free sequence task of the paper (`envs.sequences`), sampled fresh every step, its kwargs chosen to
    fill `seq_len` frames (`envs.sequences.kwargs_for_length`)."""

    def __init__(self, task: str, seq_len: int, shift: int = 0, train_kwargs: Optional[dict[str, Any]] = None) -> None:
        from envs import sequences

        if task not in sequences.TASKS:
            raise UserError(f"--task {task!r}: expected one of {sequences.TASKS}")
        self.task, self._sample, self.shift = task, sequences.sample_batch, shift
        self.task_kwargs = sequences.kwargs_for_length(task, seq_len)
        # the training batches' own fields (a curriculum; check_config holds them to the task's length)
        self.train_kwargs = {**self.task_kwargs, **(train_kwargs or {})}
        probe = self._sample(task, 1, np.random.default_rng(0), **self.task_kwargs)
        self.obs_shape = tuple(probe["obs"].shape[2:])
        self.num_actions, self.pose_dim = 0, probe["pose"].shape[-1]
        self.seq_len = probe["obs"].shape[1]  # may be shorter than asked (e.g. an odd length for recall tasks)
        extra = {k: v for k, v in self.train_kwargs.items() if self.task_kwargs.get(k, object()) != v}
        self.name = f"task:{task}{self.task_kwargs}" + (f" trained on {extra}" if extra else "")
        self.fingerprint = None

    def sample(self, batch_size: int, rng: np.random.Generator, split: str = "train", step: int = 0
               ) -> dict[str, np.ndarray]:
        """A fresh batch of the task from ``rng`` on the images of ``split``, as arrays (B, T, ...); training batches
        with the training fields (--task-kwargs; ``step``, the training step, for a curriculum that grows with it) and
        moved by up to ``shift`` pixels (augmentation), never the test split's."""
        if split == "train":
            return self._sample(self.task, batch_size, rng, split=split, shift=self.shift, step=step,
                                **self.train_kwargs)
        return self._sample(self.task, batch_size, rng, split=split, **self.task_kwargs)


def make_source(cfg: TrainConfig):
    """The training data of `cfg`: a `RolloutSource` (--data) or a `TaskSource` (--task)."""
    if (cfg.data is None) == (cfg.task is None):
        raise UserError(f"give exactly one of --data (rollout folder) or --task (sequence task); got data={cfg.data!r}, task={cfg.task!r}")
    if cfg.data is not None:
        return RolloutSource(cfg.data, cfg.seq_len, cfg.val_fraction, cfg.seed)
    return TaskSource(cfg.task, cfg.seq_len, cfg.augment_shift, parse_json_object(cfg.task_kwargs, "task_kwargs"))


def resolve_auto_address(cfg: TrainConfig, source) -> tuple[TrainConfig, str]:
    """`--address auto` made concrete from what the data's env declares (`config.auto_address`: the manifest's
    `env.action_effects` and `env.inverse_actions`), checked like an explicit one; `(cfg, why)`."""
    env = None
    if cfg.data is not None:
        from rollouts.storage import read_manifest

        env = read_manifest(cfg.data)["env"]
    resolved, why = cfg.resolve_address(env, source.num_actions)
    if resolved is not cfg:
        check_config(resolved)  # the chosen address with the user's --address-kwargs merged in
    return resolved, why


def check_pose_losses(cfg: TrainConfig, pose_dim: int) -> None:
    """UserError when `--path-weight` or `--read-weight` is on and the data records no pose to learn from."""
    if cfg.path_weight > 0 and cfg.path_target == "pose" and pose_dim == 0:
        raise UserError(f"--path-weight {cfg.path_weight}: the data has no pose (pose_dim 0) to learn a path from; "
                        "--path-target actions or moves learns it from the actions")
    if cfg.read_weight > 0 and cfg.read_target == "pose" and pose_dim == 0:
        raise UserError(f"--read-weight {cfg.read_weight}: the data has no pose (pose_dim 0) to find places by; "
                        "--read-target frame finds them by their views")


def resolve_path_period(cfg: TrainConfig, pose_dim: int) -> TrainConfig:
    """`--path-weight` on with an empty `--path-period`: the period the data's env declares (`action_effects.period`:
    a torus map), recorded in the config; else the config unchanged. The period is checked against the pose."""
    if cfg.path_weight > 0 and cfg.path_target == "pose" and not cfg.path_period.strip() and cfg.data is not None:
        from worldmodel.path import declared_period

        period = declared_period(cfg.data)
        if period:
            cfg = dataclasses.replace(cfg, path_period=json.dumps(period))
    cfg.parsed_path_period(pose_dim)
    return cfg


def batch_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The data rng of one step: the data position is the step itself (exact resume, independent ranks)."""
    return np.random.default_rng([seed, rank, step])


def curriculum_len(cfg: TrainConfig, step: int, full_len: int) -> int:
    """Sequence-length curriculum: grow linearly from `curriculum_start` to the full length over `curriculum_steps`."""
    if cfg.curriculum_start <= 0 or cfg.curriculum_start >= full_len:
        return full_len
    frac = min(1.0, step / max(1, cfg.curriculum_steps))
    return int(round(cfg.curriculum_start + frac * (full_len - cfg.curriculum_start)))


# -- helpers ----------------------------------------------------------------------------------------------------------

def init_weights_from(model: GTMM, source: str) -> str:
    """Load the model weights of checkpoint ``source`` (`--init-from`) into ``model``, a new run's: returns the
    file and its step, for the log. UserError naming the parameters that differ when the run's flags build another
    model (missing, extra or of another shape)."""
    file = checkpoint.resolve(source)
    payload = checkpoint.load_raw(file)
    saved, own = payload["model"], model.state_dict()
    try:
        model.load_state_dict(saved)
    except RuntimeError:
        differ = {"shape of": [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                               if k in saved and saved[k].shape != v.shape],
                  "missing": sorted(set(own) - set(saved)), "extra": sorted(set(saved) - set(own))}
        problems = [f"{what} {', '.join(names[:3])}" for what, names in differ.items() if names]
        raise UserError(f"--init-from {file}: its model does not fit this run's flags ({'; '.join(problems)}); "
                        f"give the flags it was trained with (its config.json: memory, address, sizes)") from None
    return f"{file} (step {payload['step']})"


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over the True entries of mask (nan when there are none)."""
    n = mask.sum()
    return float((x * mask).sum() / n) if n > 0 else float("nan")


def frame_grid(rows: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Stack rows of frames (each (T, H, W, C) in [0, 1]) into one (rows*H, T*W, 3) uint8 image with gaps."""
    T, H, W, C = rows[0].shape
    out = np.full((len(rows) * (H + gap), T * (W + gap), 3), 255, np.uint8)
    for r, frames in enumerate(rows):
        for t in range(frames.shape[0]):
            tile = (np.clip(frames[t], 0, 1) * 255).astype(np.uint8)
            out[r * (H + gap):r * (H + gap) + H, t * (W + gap):t * (W + gap) + W] = tile if C == 3 else tile[..., :1]
    return out


# -- checking the flags -----------------------------------------------------------------------------------------------

# the arguments the model passes to a memory / address class itself: not for --memory-kwargs / --address-kwargs
_MEMORY_TAKES = {"z_dim", "h_dim", "addr_dim", "slots", "heads"}
_ADDRESS_TAKES = {"h_dim", "num_actions", "pose_dim", "addr_dim", "embed_dim", "z_dim"}


def _component_classes() -> tuple[dict[str, Optional[type]], dict[str, type]]:
    """Memory and address classes by name (None: the `none` memory takes no arguments)."""
    from worldmodel import address, memory

    memories = {"none": None, "introspective": memory.IntrospectiveMemory, "ntm": memory.NTMMemory,
                "lru": memory.LRUMemory, "dnc": memory.DNCMemory}
    addresses = {"hidden": address.HiddenAddress, "actions": address.ActionAddress, "pose": address.PoseAddress}
    return memories, addresses


def _check_kwargs(flag: str, what: str, cls: Optional[type], kwargs: dict[str, Any], taken: set[str]) -> None:
    """UserError listing the accepted names when `kwargs` has a name the class's constructor does not take (a
    TypeError deep inside the model otherwise)."""
    if cls is None:
        accepted: list[str] = []
    else:
        params = inspect.signature(cls.__init__).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return
        accepted = sorted(p.name for p in params if p.name != "self" and p.name not in taken
                          and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UserError(f"{flag}: unknown argument(s) {unknown} for {what}; accepted: "
                        f"{', '.join(accepted) if accepted else 'none (it takes no arguments)'}")
    # a value of another kind than a plain number or flag argument takes would fail deep inside the model
    kinds = {} if cls is None else {p.name: str(p.annotation) for p in params}  # "float", "bool", ... (annotations
    for name, value in kwargs.items():                                          # are strings in these modules)
        kind = kinds.get(name)
        if kind in ("bool", "<class 'bool'>") and not isinstance(value, bool):
            raise UserError(f"{flag}: {name}={value!r} for {what}: expected true or false")
        if (kind in ("int", "float", "<class 'int'>", "<class 'float'>")
                and (isinstance(value, bool) or not isinstance(value, (int, float)))):
            raise UserError(f"{flag}: {name}={value!r} for {what}: expected a number")


def check_config(cfg: TrainConfig) -> None:
    """Reject bad flag values before anything is read or written: one UserError naming the flag."""
    from worldmodel.address import ADDRESSES
    from worldmodel.memory import MEMORIES

    if cfg.memory not in MEMORIES:
        raise UserError(f"--memory {cfg.memory!r}: expected one of {MEMORIES}")
    if cfg.address not in ADDRESSES and cfg.address != AUTO:
        raise UserError(f"--address {cfg.address!r}: expected {AUTO} or one of {ADDRESSES}")
    for name in ("steps", "batch", "seq_len", "log_every", "image_every", "ckpt_every", "val_windows", "z_dim",
                 "h_dim", "addr_dim", "heads", "embed_dim", "channels", "hidden_dim", "open_loop_context",
                 "curriculum_steps"):
        cli.check_range(name, getattr(cfg, name), low=1)
    for name in ("threads", "slots", "val_every", "curriculum_start"):
        cli.check_range(name, getattr(cfg, name), low=0)
    for name in ("lr", "grad_clip", "address_lr_scale"):
        value = getattr(cfg, name)
        if not (value > 0 and math.isfinite(value)):  # also rejects nan
            raise UserError(f"--{name.replace('_', '-')} {value}: expected a number > 0")
    if not (0.0 <= cfg.free_nats < math.inf):
        raise UserError(f"--free-nats {cfg.free_nats}: expected a number >= 0")
    if cfg.init_from is not None:
        checkpoint.resolve(cfg.init_from)  # UserError naming the missing file
    if not 0.0 <= cfg.kl_balance <= 1.0:
        raise UserError(f"--kl-balance {cfg.kl_balance}: expected in [0, 1]")
    if not (0.0 <= cfg.gate_aux < math.inf):
        raise UserError(f"--gate-aux {cfg.gate_aux}: expected a number >= 0")
    if not (0.0 <= cfg.reward_weight < math.inf):
        raise UserError(f"--reward-weight {cfg.reward_weight}: expected a number >= 0")
    if not (0.0 <= cfg.open_loop_weight < math.inf):
        raise UserError(f"--open-loop-weight {cfg.open_loop_weight}: expected a number >= 0")
    if not (0.0 <= cfg.path_weight < math.inf):
        raise UserError(f"--path-weight {cfg.path_weight}: expected a number >= 0")
    if cfg.path_target not in PATH_TARGETS:
        raise UserError(f"--path-target {cfg.path_target!r}: expected one of {', '.join(PATH_TARGETS)}")
    if cfg.path_target != "pose" and cfg.path_period.strip():
        raise UserError(f"--path-period {cfg.path_period}: the action counts of --path-target {cfg.path_target} do "
                        "not wrap; the period is for --path-target pose")
    if cfg.path_weight > 0 and cfg.task is not None:
        raise UserError(f"--path-weight: the sequence task {cfg.task!r} has no poses and no actions; it needs --data "
                        "rollouts")
    if not (0.0 <= cfg.read_weight < math.inf):
        raise UserError(f"--read-weight {cfg.read_weight}: expected a number >= 0")
    if cfg.read_open_loop and not (cfg.read_weight > 0 and cfg.open_loop_weight > 0):
        raise UserError(f"--read-open-loop asks the read loss of the open-loop reads: expected --read-weight > 0 and "
                        f"--open-loop-weight > 0, got {cfg.read_weight} and {cfg.open_loop_weight}")
    if cfg.read_target not in READ_TARGETS:
        raise UserError(f"--read-target {cfg.read_target!r}: expected 'pose' or 'frame'")
    if cfg.read_weight > 0 and cfg.read_target == "pose" and cfg.task is not None:
        raise UserError(f"--read-weight: the sequence task {cfg.task!r} has no poses; it needs --data rollouts or "
                        "--read-target frame")
    if cfg.read_weight > 0 and cfg.memory != "introspective":
        raise UserError(f"--read-weight: expected --memory introspective (the FIFO, whose slot order says which step "
                        f"wrote a slot), got --memory {cfg.memory}")
    if cfg.open_loop_weight > 0 and not 1 <= cfg.open_loop_context < cfg.seq_len:
        raise UserError(f"--open-loop-context {cfg.open_loop_context}: expected 1 <= K < --seq-len {cfg.seq_len} "
                        "(frames seen before the open-loop part of a window)")
    if cfg.reward_head and cfg.task is not None:
        raise UserError(f"--reward-head: the sequence task {cfg.task!r} has no rewards; it needs --data rollouts")
    if cfg.augment_shift and cfg.task is None:
        raise UserError(f"--augment-shift {cfg.augment_shift}: moves the images of a --task; rollouts (--data) are "
                        "frames of places, which a move would change")
    task_kwargs = parse_json_object(cfg.task_kwargs, "task_kwargs")
    if task_kwargs and cfg.task is None:
        raise UserError(f"--task-kwargs {cfg.task_kwargs}: fields of a --task's training batches; rollouts (--data) "
                        "have none")
    if task_kwargs and cfg.task is not None:
        from envs.sequences import TASKS, kwargs_for_length, make_task

        if cfg.task in TASKS:  # an unknown task is reported below
            fitted = kwargs_for_length(cfg.task, cfg.seq_len)
            try:
                trained = make_task(cfg.task, **{**fitted, **task_kwargs}).length()
            except UserError as error:
                raise UserError(f"--task-kwargs {cfg.task_kwargs}: {error}") from None
            length = make_task(cfg.task, **fitted).length()
            if trained != length:
                raise UserError(f"--task-kwargs {cfg.task_kwargs}: training sequences of {trained} frames, expected "
                                f"the task's {length} (leave the length fields to --seq-len)")
    if not 0.0 <= cfg.prior_outlier < 1.0:
        raise UserError(f"--prior-outlier {cfg.prior_outlier}: expected a probability in [0, 1)")
    if not 0 <= cfg.augment_shift <= 4:
        raise UserError(f"--augment-shift {cfg.augment_shift}: expected 0 to 4 pixels")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(f"--val-fraction {cfg.val_fraction}: expected in [0, 1)")
    if cfg.task is not None and cfg.data is not None:
        raise UserError(f"give exactly one of --data (rollout folder) or --task (sequence task); got both "
                        f"--data {cfg.data} and --task {cfg.task}")
    if cfg.task is not None:
        from envs.sequences import TASKS

        if cfg.task not in TASKS:
            raise UserError(f"--task {cfg.task!r}: expected one of {', '.join(TASKS)}")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out}: is a file, expected a run folder")
    memories, addresses = _component_classes()
    memory_kwargs = parse_json_object(cfg.memory_kwargs, "memory_kwargs")
    address_kwargs = parse_json_object(cfg.address_kwargs, "address_kwargs")
    if cfg.memory in memories:
        _check_kwargs("--memory-kwargs", f"memory {cfg.memory!r}", memories[cfg.memory], memory_kwargs, _MEMORY_TAKES)
    if cfg.address in addresses:  # auto: checked once resolved from the data (resolve_auto_address)
        _check_kwargs("--address-kwargs", f"address {cfg.address!r}", addresses[cfg.address], address_kwargs,
                      _ADDRESS_TAKES)


# -- resume: which flags may change -----------------------------------------------------------------------------------

def explicit_fields(argv: list[str]) -> set[str]:
    """The TrainConfig fields named on the command line: `--seq-len 8`, `--seq-len=8`, `--seq_len 8`, and
    `--no-progress` for a boolean (so resume can tell a flag the user gave from a preset's default)."""
    fields = dataclasses.fields(TrainConfig)
    names = {f.name for f in fields}
    booleans = {f.name for f in fields if f.type in (bool, "bool")}
    found = set()
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if name in names:
            found.add(name)
        elif name.startswith("no_") and name[3:] in booleans:
            found.add(name[3:])
    return found


def _same(name: str, a: Any, b: Any) -> bool:
    if name in ("memory_kwargs", "address_kwargs", "task_kwargs"):  # '{"a": 1}' and '{"a":1}' are the same
        try:
            return parse_json_object(a, name) == parse_json_object(b, name)
        except UserError:
            return a == b
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def _show(value: Any) -> str:
    return "(none)" if value is None else str(value)


def resume_config(given: TrainConfig, saved: TrainConfig, explicit: Optional[set[str]], step: int,
                  saved_fingerprint: Optional[dict[str, Any]]) -> TrainConfig:
    """The config a resumed run continues with: `saved`, plus the flags in `explicit` that a resume may change.

    `explicit` holds the fields the user gave (`explicit_fields(argv)`); None (a library call) takes only the
    `RESUME_MAY_CHANGE` fields and `data` from `given`, the rest from `saved`. A given value that differs from the
    saved one in a field outside `RESUME_MAY_CHANGE` is a UserError naming both values; `--data` may only name the
    same dataset moved."""
    run_dir = Path(given.out)
    if explicit is None:
        explicit = {*RESUME_MAY_CHANGE, *(["data"] if given.data is not None else [])}
    conflicts, changes = [], {}
    if given.address == AUTO:  # the saved address is what auto chose from this run's data: nothing to compare
        explicit = explicit - {"address", "address_kwargs"}
    for name in sorted(explicit - {"resume", "out"}):
        ours, theirs = getattr(given, name), getattr(saved, name)
        if _same(name, ours, theirs):
            continue
        if name in RESUME_MAY_CHANGE:
            changes[name] = ours
        elif name == "data" and ours is not None and theirs is not None:
            changes["data"] = ours  # checked against the saved dataset's checksums below
        else:
            conflicts.append(f"--{name.replace('_', '-')} {_show(ours)} conflicts with the run's saved {name} "
                             f"{_show(theirs)}")
    if conflicts:
        may = ", ".join("--" + n.replace("_", "-") for n in RESUME_MAY_CHANGE)
        raise UserError(f"{', '.join(conflicts)} ({run_dir / 'config.json'}); to resume the run leave "
                        f"{'that flag' if len(conflicts) == 1 else 'those flags'} out, or start a new run in "
                        f"another --out (a resume may change only {may} and --data for a moved copy of the same "
                        "dataset)")
    if changes.get("steps", saved.steps) < step:
        raise UserError(f"--steps {changes['steps']}: the run in {run_dir} has already done {step} steps; "
                        f"expected >= {step} (--steps can extend a run, not undo steps)")
    cfg = dataclasses.replace(saved, **changes, resume=True, out=given.out)
    if cfg.data is not None:
        check_same_dataset(cfg.data, saved.data, saved_fingerprint, moved="data" in changes)
    return cfg


def check_same_dataset(data: str, saved_data: str, saved_fingerprint: Optional[dict[str, Any]], moved: bool) -> None:
    """UserError unless the rollout folder `data` holds the episodes the run was trained on (by checksum)."""
    if not Path(data).is_dir():
        if moved:
            raise UserError(f"--data {data}: no such folder")
        raise UserError(f"the run's data folder {data} is missing: if it moved, pass its new place with --data")
    if saved_fingerprint is None:
        if moved:  # nothing to compare the new folder with: refuse rather than train on something else
            raise UserError(f"--data {data}: the checkpoint does not record its dataset's checksums, so a moved "
                            f"folder cannot be checked; resume with the run's own data {saved_data}")
        return
    here = dataset_fingerprint(data)
    if here != saved_fingerprint:
        what = f"{here['env']}, {here['episodes']} episodes"
        was = f"{saved_fingerprint['env']}, {saved_fingerprint['episodes']} episodes"
        if moved:
            raise UserError(f"--data {data} ({what}) is not the dataset of this run ({saved_data}: {was}; the episode "
                            f"checksums differ); pass the run's own data, or start a new run in another --out")
        raise UserError(f"the run's data folder {data} changed since the run started (now {what}, was {was}; the "
                        "episode checksums differ); restore it, or start a new run in another --out")


# -- validation -------------------------------------------------------------------------------------------------------

class Validation:
    """A fixed set of held-out windows, evaluated every `--val-every` steps (see the module docstring).

    Build it with `Validation.make(cfg, source)`, which returns `(None, why)` when there is nothing to validate on."""

    def __init__(self, batches: list[dict[str, np.ndarray]], cfg: TrainConfig, what: str) -> None:
        self.batches, self.cfg, self.what = batches, cfg, what
        self.windows = sum(len(b["obs"]) for b in batches)

    @classmethod
    def make(cls, cfg: TrainConfig, source) -> tuple[Optional["Validation"], Optional[str]]:
        """The fixed held-out batches of this run, or (None, why validation is off)."""
        if cfg.val_every == 0:
            return None, None
        if isinstance(source, TaskSource):
            try:
                arrays = source.sample(cfg.val_windows, np.random.default_rng([cfg.seed, VAL_STREAM]), split="test")
            except UserError as error:
                return None, f"validation off: no test batch for task {cfg.task} ({error})"
            what = f"{cfg.val_windows} sequences of {cfg.task} on test images"
        else:
            from rollouts.dataset import RolloutWindows

            if cfg.val_fraction == 0:
                return None, "validation off: --val-fraction 0 holds out no episodes"
            try:
                windows = RolloutWindows(cfg.data, seq_len=cfg.seq_len, split="val", val_fraction=cfg.val_fraction,
                                         seed=cfg.seed)
            except UserError as error:  # too few episodes for a split, or none long enough
                return None, f"validation off: {error}"
            pick = windows.episode_starts(cfg.val_windows)  # episode-start windows, evenly over the episodes
            arrays = windows.sample_batch(pick)
            what = f"{len(pick)} windows of {len(windows.episodes)} held-out episodes"
        batches = [{k: v[i:i + cfg.batch] for k, v in arrays.items()} for i in range(0, len(arrays["obs"]), cfg.batch)]
        return cls(batches, cfg, what), None

    @torch.no_grad()
    def __call__(self, model: GTMM, device: torch.device, autocast) -> dict[str, float]:
        """Teacher-forced NLL / KL per step and open-loop MSE (pixels in [0, 1]) on the fixed windows.

        Eval mode, and a forked RNG seeded with --seed: every validation draws the same latent samples (figures
        comparable across steps) and training's RNG is untouched (exact resume)."""
        from worldmodel.evaluate import seen_in_context

        sums = {k: 0.0 for k in ("nll", "kl", "nll_revisit", "kl_revisit", "mse", "mse_ctx", "recon_ctx")}
        counts = {"steps": 0, "revisit": 0, "open_loop": 0, "ctx": 0}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed)
            model.eval()
            try:
                for arrays in self.batches:
                    b = batch_to_torch(arrays, device)
                    T = b["obs"].shape[1]
                    with autocast:
                        seq = model.observe(b["obs"], b["prev_action"], b["pose"], sample=True)
                    nll, kl, revisit = seq["nll"].float(), seq["kl"].float(), b["revisit"]  # (B, T)
                    sums["nll"] += float(nll.sum())
                    sums["kl"] += float(kl.sum())
                    sums["nll_revisit"] += float(nll[revisit].sum())
                    sums["kl_revisit"] += float(kl[revisit].sum())
                    counts["steps"] += nll.numel()
                    counts["revisit"] += int(revisit.sum())
                    if T < 2:
                        continue  # no frame left to predict open loop
                    K = min(max(1, self.cfg.open_loop_context), T - 1)
                    with autocast:
                        res = model.predict_open_loop(b["obs"], b["prev_action"], b["pose"], K)
                    future = b["obs"][:, K:].float().div(255)  # (B, T-K, H, W, C)
                    mse = (res["pred"].float() - future).pow(2).flatten(2).mean(-1)  # (B, T-K)
                    recon = (res["recon"][:, K:].float() - future).pow(2).flatten(2).mean(-1)  # (B, T-K)
                    ctx = torch.as_tensor(seen_in_context(b["pose"].cpu().numpy(), revisit.cpu().numpy(), K),
                                          device=mse.device)  # (B, T-K) revisits of places seen in the context
                    sums["mse"] += float(mse.sum())
                    sums["mse_ctx"] += float(mse[ctx].sum())
                    sums["recon_ctx"] += float(recon[ctx].sum())
                    counts["open_loop"] += mse.numel()
                    counts["ctx"] += int(ctx.sum())
            finally:
                model.train()
        mean = lambda s, n: s / n if n else float("nan")  # noqa: E731
        nll, kl = mean(sums["nll"], counts["steps"]), mean(sums["kl"], counts["steps"])
        return {
            "loss": nll + kl, "nll": nll, "kl": kl,
            "nll_revisit": mean(sums["nll_revisit"], counts["revisit"]),
            "kl_revisit": mean(sums["kl_revisit"], counts["revisit"]),
            "mse_open_loop": mean(sums["mse"], counts["open_loop"]),
            "mse_revisit_context": mean(sums["mse_ctx"], counts["ctx"]),
            "recon_mse_revisit_context": mean(sums["recon_ctx"], counts["ctx"]),
            "windows": float(self.windows), "revisit_context_steps": float(counts["ctx"]),
        }


def _json_line(record: dict[str, Any]) -> str:
    # strict JSON: a nan (no revisit steps) becomes null
    return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()})


def trim_val_log(path: Path, step: int) -> None:
    """Drop val.jsonl lines after `step` (a resumed run recomputes them), like TensorBoard's purge_step."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line of a killed run
    write_bytes_atomic(path, "".join(line + "\n" for line in keep).encode())


# -- stopping on a signal ---------------------------------------------------------------------------------------------

class StopSignal:
    """SIGINT / SIGTERM as a request to stop after the current step, as a context manager that installs the handlers
    and restores the previous ones on exit (only the CLI uses it: a library caller keeps its own handlers).

    The handler only records the signal (printing from a handler can re-enter a half-written stream); the training
    loop sees it after the step, saves and returns. A second signal raises KeyboardInterrupt: stop now, no save."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def name(self) -> str:
        """The received signal's name (e.g. SIGTERM), or "" when none came."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _stop_requested(stop: Optional[StopSignal], world: int, device: torch.device) -> bool:
    """Whether to stop now; under DDP every rank gets the answer of all (a signal may reach the ranks a step apart,
    and a rank that stopped alone would leave the others waiting in the next all-reduce)."""
    if stop is None:
        return False
    if world == 1:
        return stop.signum is not None
    flag = torch.tensor([0.0 if stop.signum is None else 1.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


# -- the training run -------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, explicit: Optional[set[str]] = None, stop: Optional[StopSignal] = None) -> dict[str, Any]:
    """Run (or resume) training; returns {"losses": [(step, loss), ...], "skipped": n, "step": final step,
    "config": the resolved TrainConfig, "stopped": signal name or None, "ckpt": path of the last checkpoint}.

    `explicit`: the fields given on the command line (`explicit_fields(argv)`); with `cfg.resume`, these are
    compared with the run's saved config (None: a resume takes only `cfg`'s `RESUME_MAY_CHANGE` fields and its
    `data`, everything else from the checkpoint). `stop`: a `StopSignal` whose signal ends the
    run after the current step with a checkpoint (None: signals keep their usual effect)."""
    check_config(cfg)

    # -- setup: processes; the run folder is locked by rank 0 for the whole run ----------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    is_main = rank == 0
    out_dir = Path(cfg.out)
    ckpt_path, best_path, val_log = out_dir / "ckpt.pt", out_dir / "best.pt", out_dir / "val.jsonl"
    created = not out_dir.exists()
    lock = FolderLock(out_dir, "train").acquire() if is_main else None
    if lock is not None:  # ours alone now: temp files of a killed save (any version) are debris, never a checkpoint
        for debris in out_dir.glob(".*.pt.*.tmp"):
            debris.unlink()
    try:
        return _train_locked(cfg, explicit, stop, world, rank, local_rank, ckpt_path, best_path, val_log)
    except BaseException:
        if lock is not None:
            lock.release()
            lock = None
            if created and out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()  # bad input leaves no empty run folder behind
        raise
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg: TrainConfig, explicit: Optional[set[str]], stop: Optional[StopSignal], world: int, rank: int,
                  local_rank: int, ckpt_path: Path, best_path: Path, val_log: Path) -> dict[str, Any]:
    is_main = rank == 0
    out_dir = ckpt_path.parent

    # -- resume: the saved config is the run; only RESUME_MAY_CHANGE fields and a moved --data may differ -------------
    payload = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise UserError(f"--resume: no checkpoint {ckpt_path} to resume (run without --resume to start this run)")
        payload = checkpoint.load_raw(ckpt_path)
        saved = TrainConfig.from_dict(payload["config"])
        cfg = resume_config(cfg, saved, explicit, int(payload["step"]), payload.get("data_fingerprint"))
        check_config(cfg)
    else:
        for path in (ckpt_path, best_path):
            if path.exists():
                raise UserError(f"{path} exists: pass --resume to continue that run, or choose another --out")

    # -- device and threads (after resume: a run keeps its saved --device / --threads unless they are given) ----------
    device = resolve_device(cfg.device, local_rank)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    # -- data ----------------------------------------------------------------------------------------------------------
    source = make_source(cfg)
    if cfg.task is not None and cfg.seq_len != source.seq_len:
        cfg = dataclasses.replace(cfg, seq_len=source.seq_len)  # what the task could fit
    cfg, auto_why = resolve_auto_address(cfg, source)  # recorded resolved: config.json and checkpoints
    check_pose_losses(cfg, source.pose_dim)
    cfg = resolve_path_period(cfg, source.pose_dim)  # the same
    if cfg.address == "pose" and source.pose_dim == 0:
        raise UserError(f"--address pose: the data ({source.name}) has no pose (pose_dim 0)")
    if cfg.reward_head and cfg.data is not None:
        from rollouts.storage import read_manifest

        records = read_manifest(cfg.data)["episodes"]
        if not any(float(r.get("return", 0.0)) != 0.0 or r.get("terminated") for r in records):
            raise UserError(f"--reward-head: every episode of {cfg.data} has return 0 and none terminates: nothing to "
                            "learn; collect with a reward task, e.g. --env-kwargs '{\"task\": \"coverage\"}'")
    if isinstance(source, RolloutSource):
        source.share(rank, world)  # a rank without episodes fails here, before any rank waits on another
    validation, val_note = Validation.make(cfg, source) if is_main else (None, None)

    # -- processes (after every input check: a bad flag fails before any rank waits on another) ------------------------
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    # -- model and optimizer -------------------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config(source.obs_shape, source.num_actions, source.pose_dim)
    try:
        model = GTMM(model_cfg).to(device)
    except TypeError as error:  # a kwargs name check_config could not see (a memory it does not know); else a bug
        if "unexpected keyword argument" not in str(error):
            raise
        raise UserError(f"--memory-kwargs {cfg.memory_kwargs} / --address-kwargs {cfg.address_kwargs}: "
                        f"{error}") from error
    optimizer = torch.optim.Adam(param_groups(model, cfg.lr, cfg.address_lr_scale), lr=cfg.lr)
    step, best_val = 0, math.inf
    if payload is not None:
        model.load_state_dict(payload["model"])
        saved_optimizer, added = checkpoint.optimizer_state_for(model, optimizer, payload["model"],
                                                                payload["optimizer"])
        if added and is_main:
            print(f"[train] resume: {', '.join(added)} did not exist when this run was saved (an older version): "
                  f"they start at their initial values, with fresh optimizer state", flush=True)
        optimizer.load_state_dict(saved_optimizer)
        checkpoint.set_rng_state(payload["rng"])
        step = int(payload["step"])
        saved_best = payload.get("best_val_loss")  # so that a resumed run's best.pt only improves
        best_val = math.inf if saved_best is None else float(saved_best)
    elif cfg.init_from is not None:
        source_ckpt = init_weights_from(model, cfg.init_from)
        if is_main:
            print(f"[train] init: model weights from {source_ckpt}, fresh optimizer, step 0", flush=True)
    train_model = model
    if world > 1:
        # with no memory the address path feeds nothing, so its parameters get no gradient: tell DDP to expect that
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.memory == "none")
    precision = cfg.resolved_precision(device.type)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    model.set_conv_bf16(precision == "bf16-convs")
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):
        # on a GPU the step is launch-bound: CUDA graphs replay it as one launch (issue 12)
        # the open-loop loss runs three scans per step before the backward: each would start a new CUDA-graph pass
        # and free the outputs the backward still needs, so it compiles without graphs
        graphs = device.type == "cuda" and cfg.cuda_graphs and cfg.open_loop_weight == 0
        model.compile_step("reduce-overhead" if graphs else None)
        if is_main:
            print("[train] compiling the recurrent step (torch.compile): the first steps are slow while it compiles "
                  "(tens of seconds; less from a warm cache); --compile off turns it off", flush=True)

    def save(path: Path, extra: Optional[dict[str, Any]] = None) -> None:
        checkpoint.save(path, model=model, optimizer=optimizer, config=cfg, step=step,
                        extra={"data_fingerprint": source.fingerprint,
                               "best_val_loss": best_val if math.isfinite(best_val) else None, **(extra or {})})

    # -- logging (rank 0 only): TensorBoard, and a progress bar on a terminal or plain lines off one -------------------
    writer, bar = None, None
    if is_main:
        write_bytes_atomic(out_dir / "config.json", cfg.to_json().encode())
        trim_val_log(val_log, step)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"), purge_step=step if step > 0 else None)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[train] {source.name} obs {source.obs_shape} A={source.num_actions} D={source.pose_dim} | "
              f"memory={cfg.memory} address={cfg.address} | {n_params / 1e6:.2f}M params | {device} x{world} {precision} | "
              f"from step {step} to {cfg.steps} -> {out_dir}", flush=True)
        if auto_why:
            print(f"[train] --address auto -> {cfg.address} {cfg.address_kwargs}: {auto_why}", flush=True)
        if validation is not None:
            print(f"[train] validation every {cfg.val_every} steps on {validation.what}", flush=True)
        elif val_note is not None:
            print(f"[train] {val_note}", flush=True)
        if step >= cfg.steps:
            print(f"[train] the run in {out_dir} has reached step {step} of {cfg.steps}: nothing to do "
                  "(pass a larger --steps to extend it)", flush=True)
        # a bar redraws its line with carriage returns: only where someone watches it, never into a log file
        if cfg.progress and sys.stdout.isatty() and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=step, dynamic_ncols=True, unit="step")
    vis_batch = batch_to_torch(source.sample(min(4, cfg.batch), batch_rng(cfg.seed, VIS_STREAM, 0)), device)

    def say(line: str) -> None:
        """One log line that does not tear the progress bar."""
        if bar is not None:
            bar.write(line)
        else:
            print(line, flush=True)

    losses: list[tuple[int, float]] = []
    pending_losses: list[tuple[int, torch.Tensor]] = []  # this run's losses not yet read back: (step, 0-d tensor)

    def flush_losses() -> None:
        """Read the pending losses back to the host in one transfer (not one sync per step)."""
        if pending_losses:
            values = torch.stack([v for _, v in pending_losses]).tolist()
            losses.extend(zip([s for s, _ in pending_losses], values))
            pending_losses.clear()

    skipped, stopped, saved_at = 0, None, step if payload is not None else None
    tick, tick_step = time.perf_counter(), step
    # batches of the next steps are made in a background thread (on CUDA: pinned, copied ahead); each is a function
    # of its step alone, so a resumed run gets the batches an uninterrupted one would have
    # (under torchrun each rank draws from its own episodes: RolloutSource.share)
    if isinstance(source, RolloutSource):
        def make_batch(s: int) -> dict[str, np.ndarray]:
            return source.sample(cfg.batch, batch_rng(cfg.seed, rank, s), rank=rank, world=world)
    else:
        def make_batch(s: int) -> dict[str, np.ndarray]:
            return source.sample(cfg.batch, batch_rng(cfg.seed, rank, s), step=s)
    prefetcher = Prefetcher(make_batch, device, start=step, dtypes={**BATCH_DTYPES, **OPTIONAL_DTYPES})
    try:
        while step < cfg.steps:
            # -- batch -------------------------------------------------------------------------------------------------
            seq_len = curriculum_len(cfg, step, source.seq_len)
            batch = prefetcher.get(step)
            batch = {k: v[:, :seq_len] for k, v in batch.items()}  # (B, T', ...)
            torch.manual_seed(int(batch_rng(cfg.seed, rank, step).integers(2**62)) + 1)  # latent noise of this step

            # -- forward and loss --------------------------------------------------------------------------------------
            model.train()
            with autocast:
                out = train_model(batch, free_nats=cfg.free_nats, kl_balance=cfg.kl_balance, gate_aux=cfg.gate_aux,
                                  reward_weight=cfg.reward_weight, open_loop_weight=cfg.open_loop_weight,
                                  path_weight=cfg.path_weight, read_weight=cfg.read_weight,
                                  read_target=cfg.read_target, read_open_loop=cfg.read_open_loop,
                                  open_loop_context=cfg.open_loop_context)
            loss = out["loss"]

            # -- update, with a NaN/inf guard --------------------------------------------------------------------------
            # Backward runs even on a bad loss so every DDP rank joins the all-reduce; the (synchronised) gradient
            # norm then says, identically on every rank, whether to skip.
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            step += 1
            # one host read per step (the skip must be decided before optimizer.step: Adam's step count and moments
            # live partly on the host, so a device-side mask could not skip it exactly)
            if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                if is_main:
                    say(f"[train] step {step}: non-finite loss {loss.item()} / grad norm {grad_norm.item()}; "
                        f"skipped ({skipped} so far)")
                    writer.add_scalar("perf/skipped_steps", skipped, step)
            else:
                optimizer.step()
            # the loss stays on the device (a copy: the next step's buffers may be reused) until a log step or the end
            pending_losses.append((step, loss.detach().float().clone()))
            last = step == cfg.steps
            if step % cfg.log_every == 0 or last:
                flush_losses()

            # -- validate (rank 0; the others go on to the next step's all-reduce and wait there) ----------------------
            val, improved = None, False
            if validation is not None and (step % cfg.val_every == 0 or last):
                val = validation(model, device, autocast)
                improved = math.isfinite(val["loss"]) and val["loss"] < best_val
                for name, value in val.items():
                    if not math.isnan(value):
                        writer.add_scalar(f"val/{name}", value, step)
                if improved:
                    best_val = val["loss"]
                    save(best_path, extra={"val": val})
                with open(val_log, "a") as f:
                    f.write(_json_line({"step": step, **val, "best": improved}) + "\n")

            # -- log ---------------------------------------------------------------------------------------------------
            if is_main and (step % cfg.log_every == 0 or last):
                now = time.perf_counter()
                steps_per_s = (step - tick_step) / max(now - tick, 1e-9)
                frames_per_s = steps_per_s * cfg.batch * seq_len * world
                tick, tick_step = now, step
                nll, kl, revisit = out["nll"].detach().float(), out["kl"].detach().float(), batch["revisit"]
                scalars = {
                    "loss/total": loss.item(), "loss/nll": float(nll.mean()), "loss/kl": float(kl.mean()),
                    "loss/elbo_per_step": float(-(nll + kl).mean()),
                    "revisit/nll": masked_mean(nll, revisit), "revisit/kl": masked_mean(kl, revisit),
                    "novel/nll": masked_mean(nll, ~revisit), "novel/kl": masked_mean(kl, ~revisit),
                    "revisit/fraction": float(revisit.float().mean()),
                    "perf/steps_per_s": steps_per_s, "perf/frames_per_s": frames_per_s,
                    "perf/grad_norm": float(grad_norm), "perf/seq_len": seq_len, "perf/skipped_steps": skipped,
                }
                for name in ("gate_loss", "gate_acc_observed", "gate_acc_predicted"):  # a gated action address
                    if name in out:
                        scalars[f"gate/{name.removeprefix('gate_')}"] = float(out[name].detach())
                for name in ("place_loss", "start_loss"):  # the lattice filter's place evidence, and its weight
                    if name in out:
                        scalars[f"gate/{name}"] = float(out[name].detach())
                if "start_loss" in out:
                    scalars["gate/place_evidence_weight"] = float(model.cell.address.place_log_temperature.detach().exp())
                for name in ("reward_mse", "done_bce"):  # the reward heads
                    if name in out:
                        scalars[f"reward/{name}"] = float(out[name])
                if "open_loop_nll" in out:  # --open-loop-weight: NLL per frame predicted without frames
                    scalars["loss/open_loop_nll"] = float(out["open_loop_nll"].detach())
                if "path_loss" in out:  # --path-weight: the displacement read from h_t, in RMS moves squared
                    scalars["loss/path"] = float(out["path_loss"].detach())
                if "read_loss" in out:  # --read-weight: -log read mass on the revisited place's slots
                    scalars["loss/read"] = float(out["read_loss"].detach())
                if "read_loss_open_loop" in out:  # --read-open-loop: the same for the reads made without frames
                    scalars["loss/read_open_loop"] = float(out["read_loss_open_loop"].detach())
                for name, value in scalars.items():
                    if not math.isnan(value):
                        writer.add_scalar(name, value, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss.item():.1f}", kl=f"{scalars['loss/kl']:.2f}",
                                    steps_s=f"{steps_per_s:.2f}", frames_s=f"{frames_per_s:.0f}",
                                    **({"val": f"{val['loss']:.1f}"} if val is not None else {}))
                else:
                    gate = f" gate acc {scalars['gate/acc_observed']:.3f}" if "gate/acc_observed" in scalars else ""
                    if "gate/place_evidence_weight" in scalars:
                        gate += f" evidence weight {scalars['gate/place_evidence_weight']:.3f}"
                    if "loss/open_loop_nll" in scalars:
                        gate += f" open-loop nll {scalars['loss/open_loop_nll']:.2f}"
                    if "loss/path" in scalars:
                        gate += f" path {scalars['loss/path']:.3f}"
                    if "loss/read" in scalars:
                        gate += f" read {scalars['loss/read']:.3f}"
                    if "loss/read_open_loop" in scalars:
                        gate += f" open-loop read {scalars['loss/read_open_loop']:.3f}"
                    say(f"[train] step {step}/{cfg.steps} | loss {loss.item():.2f} nll {scalars['loss/nll']:.2f} "
                        f"kl {scalars['loss/kl']:.3f}{gate} | {frames_per_s:.0f} frames/s{val_text(val, improved)}")
            elif val is not None:
                say(f"[train] step {step}/{cfg.steps}{val_text(val, improved)}")
            if is_main and (step % cfg.image_every == 0 or last):
                log_images(writer, model, vis_batch, cfg, step, device)
            if bar is not None:
                bar.update(1)

            # -- checkpoint --------------------------------------------------------------------------------------------
            if is_main and (step % cfg.ckpt_every == 0 or last):
                save(ckpt_path)
                saved_at = step

            # -- stop on a signal: the step is done; save it and let the caller exit -----------------------------------
            if not last and _stop_requested(stop, world, device):
                stopped = stop.name or "a signal on another rank"
                if is_main and saved_at != step:
                    save(ckpt_path)
                    saved_at = step
                break
    finally:
        prefetcher.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    flush_losses()  # a stop between log steps
    return {"losses": losses, "skipped": skipped, "step": step, "config": cfg, "stopped": stopped,
            "ckpt": str(ckpt_path) if saved_at is not None else None}


def val_text(val: Optional[dict[str, float]], improved: bool) -> str:
    """The validation part of a log line ('' when there was none this step)."""
    if val is None:
        return ""
    text = f" | val loss {val['loss']:.2f} nll {val['nll']:.2f} kl {val['kl']:.3f}"
    if not math.isnan(val["mse_revisit_context"]):
        text += f" mse_revisit_ctx {val['mse_revisit_context']:.4f} (recon {val['recon_mse_revisit_context']:.4f})"
    return text + (" (best)" if improved else "")


@torch.no_grad()
def log_images(writer, model: GTMM, vis: dict[str, torch.Tensor], cfg: TrainConfig, step: int,
               device: torch.device) -> None:
    """Per-step KL curve and a grid: real | posterior reconstruction | open loop after K context frames.

    Runs under a forked RNG so that logging never changes what training draws next (exact resume)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.eval()
        T = vis["obs"].shape[1]
        K = min(max(1, cfg.open_loop_context), T - 1)
        res = model.predict_open_loop(vis["obs"], vis["prev_action"], vis["pose"], K)
        for t, value in enumerate(res["kl"].float().mean(0).tolist()):
            writer.add_scalar(f"kl/step_{t:03d}", value, step)
        real = vis["obs"].float().div(255).cpu().numpy()  # (B, T, H, W, C)
        recon = res["recon"].float().cpu().numpy()
        pred = np.concatenate([recon[:, :K] * 0.3, res["pred"].float().cpu().numpy()], axis=1)  # context dimmed
        rows = []
        for b in range(real.shape[0]):
            rows += [real[b], recon[b], pred[b]]
        writer.add_image("images/real_recon_openloop", frame_grid(rows), step, dataformats="HWC")
        model.train()


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """`--preset NAME` picks the defaults, every other flag overrides them."""
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=TrainConfig.preset)
    known, _ = pre.parse_known_args(argv)
    return cli.parse(TrainConfig, argv, prog="worldmodel.train", default=preset(known.preset))


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m worldmodel.train`: parse the flags, train with SIGINT/SIGTERM saving the step they interrupt."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    with StopSignal() as stop:
        result = train(cfg, explicit=explicit_fields(argv), stop=stop)
    if int(os.environ.get("RANK", "0")) != 0:
        if result["stopped"]:
            raise SystemExit(128 + (stop.signum or signal.SIGTERM))
        return
    if result["stopped"]:
        print(f"[train] stopped by {result['stopped']} at step {result['step']}: saved {result['ckpt']}; continue with "
              f"python -m worldmodel.train --out {cfg.out} --resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    last = result["losses"][-1][1] if result["losses"] else None
    print(json.dumps({"step": result["step"], "last_loss": last, "skipped": result["skipped"], "out": cfg.out}),
          flush=True)


if __name__ == "__main__":
    cli.run(main)
