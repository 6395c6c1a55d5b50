"""Export a rollout folder to other formats; for now a Minari dataset (HDF5), for interop with offline-RL tools.

    python -m rollouts.export --minari --data data/mnist_map --out minari_datasets
    python -m rollouts.export --minari --data data/mnist_map --out minari_datasets --dataset-id gtmm/mnist_map/loop-v0

``--out`` is the Minari datasets folder (what ``MINARI_DATASETS_PATH`` names; the export sets it for itself), the
dataset lands in ``<out>/<dataset id>``; read it back with
``MINARI_DATASETS_PATH=<out> python -c "import minari; minari.load_dataset('<dataset id>')"``.

Lossless: Minari 0.5 JPEG-encodes image observations of 32x32 and larger by default, which would change the
frames; we pass ``jpeg_encoding=False`` so observations are stored as raw uint8 arrays (uncompressed HDF5, so the
export is larger than our compressed ``.npz`` files). ``pose``, ``revisit`` and ``visit_count`` go into the episode
``infos`` (T+1 entries, like the observations); each episode keeps its env seed. The dataset's ``env_spec`` and
``eval_env_spec`` are the registered env with the recorded kwargs, so ``dataset.recover_environment()`` (and
``recover_environment(eval_env=True)``) makes the env the episodes came from; a folder of an unregistered env (a
stock MiniWorld env wrapped by ``miniworld:<Id>``) gets no spec.

Safe: ``--out`` is locked while exporting (``gtmm.fs.FolderLock``), every episode is checked against the manifest
first, and the dataset is built in a hidden staging folder of ``--out`` and renamed into place only when complete, so
a crash or a full disk never leaves half a dataset. An existing dataset is never replaced unless ``--overwrite`` is
given (and then only once the new one is complete).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from gtmm import cli
from gtmm.cli import UserError
from gtmm.fs import FolderLock
import envs  # noqa: F401  (registers our env ids, so the exported dataset can name its env spec)
from rollouts import storage

# Minari's own dataset id pattern (minari.dataset.minari_dataset.DATASET_ID_RE) with the version required: checked
# here so a bad id is one line before anything is read or written
_DATASET_ID = re.compile(r"^(?:[-_\w][-_\w/]*[-_\w]+/)?[-_\w]+-v\d+$")


@dataclass
class ExportConfig:
    """Export a rollout folder to other formats; for now a Minari dataset (HDF5)."""
    data: Path
    """rollout folder to export (written by python -m rollouts.collect)"""
    out: Path
    """Minari datasets folder (becomes MINARI_DATASETS_PATH for the export)"""
    minari: bool = False
    """export to Minari (the only format so far; required)"""
    dataset_id: str | None = None
    """Minari dataset id, '(namespace/)name-v<N>' (default gtmm/<env>-<agent>-v0)"""
    overwrite: bool = False
    """replace an existing dataset of that id (the old one is removed only once the new one is complete)"""


def default_dataset_id(manifest: dict[str, Any]) -> str:
    """The Minari id of a rollout folder, ``gtmm/<env>-<agent>-v0``, from its manifest."""
    env = re.sub(r"[^A-Za-z0-9_-]+", "_", manifest["env"]["name"])
    return f"gtmm/{env}-{manifest['agent']['name']}-v0"


def _env_spec(manifest: dict[str, Any]) -> gym.envs.registration.EnvSpec | None:
    """The registered env with the recorded kwargs, so ``recover_environment`` rebuilds it; None if unregistered."""
    env_id = manifest["env"]["id"]
    if env_id not in gym.registry:
        return None
    spec, kwargs = gym.spec(env_id), dict(manifest["env"]["kwargs"])
    limit = spec.max_episode_steps
    if limit is not None and isinstance(kwargs.get("max_steps"), int):
        limit = kwargs["max_steps"]  # the TimeLimit where the env's own limit is (what envs.make does)
    return dataclasses.replace(spec, kwargs=kwargs, max_episode_steps=limit)


class _SpecCarrier(gym.Env):
    """What Minari reads off an env object (``spec``, the two spaces) without building the env: given a ``gym.Env``,
    ``create_dataset_from_buffers`` records ``env.spec`` as the dataset's ``env_spec`` (what
    ``dataset.recover_environment()`` makes) and uses the spaces we pass; given a spec or an id it would ``gym.make``
    one just to read its spaces (a GL context for MiniWorld, a checkpoint and data folder for a dream).
    Never stepped."""

    def __init__(self, spec: gym.envs.registration.EnvSpec, observation_space: gym.Space, action_space: gym.Space):
        self.spec, self.observation_space, self.action_space = spec, observation_space, action_space


def export_minari(data: Path, out: Path, dataset_id: str | None = None, overwrite: bool = False):
    """Write the folder's episodes (checked against the manifest) as a lossless Minari dataset; returns the
    MinariDataset. ``out`` is locked meanwhile; the dataset appears at ``out/<dataset_id>`` only once complete."""
    data, out = Path(data), Path(out)
    manifest = storage.read_manifest(data)
    dataset_id = dataset_id or default_dataset_id(manifest)
    if not _DATASET_ID.match(dataset_id) or "//" in dataset_id:
        raise UserError(f"--dataset-id {dataset_id!r}: expected '(namespace/)name-v<N>', e.g. 'gtmm/mnist_map-loop-v0'")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, expected a folder (the Minari datasets folder)")
    try:
        import minari
        from minari.data_collector import EpisodeBuffer
        from minari.dataset.minari_dataset import MinariDataset
    except ImportError as error:
        raise ImportError('Minari export needs minari and h5py: pip install "gtmm-worlds[minari]"') from error
    with FolderLock(out, "export"):
        target = out / dataset_id
        if target.exists() and not overwrite:
            raise UserError(f"{target} already exists: pass --overwrite to replace it, or pick another --dataset-id "
                             "(nothing was written)")
        for stale in list(out.glob(".export.*.tmp")) + list(target.parent.glob(f".{target.name}.old.*.tmp")):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed export: we hold the lock, nobody uses them
        stage = out / f".export.{os.getpid()}.tmp"
        try:
            _build(minari, EpisodeBuffer, manifest, data, stage, dataset_id)
            _publish(stage, target, dataset_id)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return MinariDataset(str(target / "data"))


def _episodes(data: Path, manifest: dict[str, Any]):
    """``(record, episode)`` in index order, each file checked against its manifest entry (what
    ``rollouts.dataset.iter_episodes`` does, without importing torch for it)."""
    for record in sorted(manifest["episodes"], key=lambda e: e["index"]):
        path = storage.episode_path(data, record)
        episode = storage.load_episode(path, sha256=record["sha256"])
        storage.check_episode_record(manifest, record, episode, str(path))
        yield record, episode


def _build(minari, EpisodeBuffer, manifest: dict[str, Any], data: Path, stage: Path, dataset_id: str) -> None:
    """Create the Minari dataset ``dataset_id`` under the datasets folder ``stage``."""
    H, W, C = manifest["obs_shape"]
    observation_space = gym.spaces.Box(0, 255, (H, W, C), dtype=np.uint8)
    action_space = gym.spaces.Discrete(manifest["num_actions"])
    buffers = []
    for record, episode in _episodes(data, manifest):
        buffers.append(EpisodeBuffer(
            id=len(buffers),
            seed=record.get("env_seed"),
            observations=episode["obs"],
            actions=episode["action"],
            rewards=episode["reward"],
            terminations=episode["terminated"],
            truncations=episode["truncated"],
            infos={"pose": episode["pose"], "revisit": episode["revisit"], "visit_count": episode["visit_count"]},
        ))
    spec = _env_spec(manifest)
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(stage.resolve())  # minari reads it whenever it builds a dataset path
    try:
        with warnings.catch_warnings():  # Minari asks for author contacts: noise for a local export
            warnings.filterwarnings("ignore", message=".*(author|code_permalink).*", category=UserWarning)
            minari.create_dataset_from_buffers(
                dataset_id=dataset_id,
                buffer=buffers,
                # env_spec (recover_environment) and eval_env_spec: the registered env with the recorded kwargs
                env=_SpecCarrier(spec, observation_space, action_space) if spec is not None else None,
                observation_space=observation_space,
                action_space=action_space,
                algorithm_name=f"gtmm-worlds {manifest['agent']['name']} agent",
                description=(f"{manifest['env']['name']} ({manifest['env']['id']}, kwargs {manifest['env']['kwargs']}), "
                             f"agent {manifest['agent']['name']} {manifest['agent']['kwargs']}, seed {manifest['seed']}; "
                             "infos: pose, revisit, visit_count. Exported losslessly from a gtmm-worlds rollout folder."),
                jpeg_encoding=False,  # Minari's default JPEG would alter the frames; raw uint8 keeps them bit-exact
                **({"eval_env": spec} if spec is not None else {}),
            )
    finally:
        if previous is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous


def _publish(stage: Path, target: Path, dataset_id: str) -> None:
    """Move the complete dataset from the staging folder to ``target`` (one rename); an old one is set aside first
    and removed after. Minari's namespace files (``namespace_metadata.json``) are copied where missing."""
    out = stage.parent
    for meta in stage.rglob("namespace_metadata.json"):
        dest = out / meta.relative_to(stage)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(meta, dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}.tmp")
        os.replace(target, old)
    os.replace(stage / dataset_id, target)
    if old is not None:
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> None:
    """``python -m rollouts.export``: parse the flags and export the folder."""
    config = cli.parse(ExportConfig, argv, prog="rollouts.export")
    if not config.minari:
        raise UserError("choose a format: --minari (the only one so far)")
    dataset = export_minari(config.data, config.out, config.dataset_id, overwrite=config.overwrite)
    print(f"wrote Minari dataset {dataset.spec.dataset_id} to {config.out}: {dataset.total_episodes} episodes, "
          f"{dataset.total_steps} steps. Frames are stored raw (jpeg_encoding=False): lossless, not JPEG. "
          f"Load with MINARI_DATASETS_PATH={config.out} and minari.load_dataset({dataset.spec.dataset_id!r})")


if __name__ == "__main__":
    cli.run(main)
