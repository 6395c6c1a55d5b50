"""Episodes on disk: one lossless compressed ``.npz`` per episode plus one ``manifest.json`` per folder.

The layout follows DreamerV3 / Memory Maze (observations have T+1 entries: ``obs[0]`` is seen before the first
action, ``action[t]`` is taken on ``obs[t]`` and leads to ``obs[t+1]``):

| key           | dtype   | shape          | meaning                                                       |
|---------------|---------|----------------|---------------------------------------------------------------|
| ``obs``       | uint8   | (T+1, H, W, C) | frames                                                        |
| ``action``    | int64   | (T,)           | action taken on ``obs[t]``                                    |
| ``reward``    | float32 | (T,)           | reward for ``action[t]``                                      |
| ``terminated``| bool    | (T,)           | the env ended the episode after ``action[t]``                 |
| ``truncated`` | bool    | (T,)           | the episode was cut (time limit) after ``action[t]``          |
| ``pose``      | float32 | (T+1, D)       | ``info["pose"]`` for ``obs[t]``                               |
| ``revisit``   | bool    | (T+1,)         | ``obs[t]`` shows a place seen earlier in the episode          |
| ``visit_count``| int32  | (T+1,)         | earlier steps of the episode at the place of ``obs[t]``       |

Every write is atomic (a temp file in the same folder, then ``os.replace``), so a crash leaves either the old
file or the new one, never half of one. The ``.npz`` bytes are deterministic (fixed zip timestamps), so the same
episode always has the same sha256: a resumed collection and an uninterrupted one give identical checksums.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gtmm.cli import UserError
from gtmm.fs import atomic_write

FORMAT_NAME = "gtmm-rollouts"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# key -> (dtype, leading length relative to T: 1 means T+1 entries, 0 means T entries)
EPISODE_KEYS: dict[str, tuple[np.dtype, int]] = {
    "obs": (np.dtype(np.uint8), 1),
    "action": (np.dtype(np.int64), 0),
    "reward": (np.dtype(np.float32), 0),
    "terminated": (np.dtype(np.bool_), 0),
    "truncated": (np.dtype(np.bool_), 0),
    "pose": (np.dtype(np.float32), 1),
    "revisit": (np.dtype(np.bool_), 1),
    "visit_count": (np.dtype(np.int32), 1),
}

# zip entries get this timestamp instead of "now", so equal episodes give equal bytes (and sha256)
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def episode_filename(index: int) -> str:
    """File name of episode ``index`` (zero-padded so a folder listing sorts in episode order)."""
    return f"episode_{index:06d}.npz"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate_episode(episode: dict[str, np.ndarray], where: str = "episode") -> int:
    """Check keys, dtypes and aligned lengths; return the number of transitions T."""
    missing = [k for k in EPISODE_KEYS if k not in episode]
    if missing:
        raise UserError(f"{where}: missing keys {missing}; expected {list(EPISODE_KEYS)}")
    num_steps = len(episode["action"])
    for key, (dtype, extra) in EPISODE_KEYS.items():
        array = episode[key]
        if array.dtype != dtype:
            raise UserError(f"{where}: {key!r} has dtype {array.dtype}, expected {dtype}")
        if len(array) != num_steps + extra:
            raise UserError(f"{where}: {key!r} has {len(array)} entries, expected {num_steps + extra} (T={num_steps})")
    if episode["obs"].ndim != 4:
        raise UserError(f"{where}: 'obs' has shape {episode['obs'].shape}, expected (T+1, H, W, C)")
    if episode["pose"].ndim != 2:
        raise UserError(f"{where}: 'pose' has shape {episode['pose'].shape}, expected (T+1, D)")
    return num_steps


def save_episode(path: str | os.PathLike, episode: dict[str, np.ndarray]) -> str:
    """Write one episode atomically as a deterministic compressed ``.npz``; return its sha256."""
    validate_episode(episode, where=str(path))

    def write(f: BinaryIO) -> None:
        # np.savez_compressed stamps entries with the current time; we write the same zip layout by hand with a
        # fixed timestamp so the bytes depend on the arrays only (np.load reads it like any .npz).
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:
            for key in EPISODE_KEYS:
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, mode="w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.ascontiguousarray(episode[key]), allow_pickle=False)

    atomic_write(path, write)
    return sha256_file(path)


def check_sha256(path: str | os.PathLike, expected: str) -> None:
    """ValueError naming ``path`` if its sha256 is not ``expected`` (the manifest's)."""
    actual = sha256_file(path)
    if actual != expected:
        raise UserError(f"episode file {path} is corrupt: sha256 {actual[:16]}... does not match the manifest's "
                         f"{expected[:16]}...; delete it and re-run the same collect command to rewrite it")


def load_episode(path: str | os.PathLike, sha256: str | None = None) -> dict[str, np.ndarray]:
    """Read one episode; with ``sha256`` the file is checked against it first. Raises ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"episode file {path} is missing")
    if sha256 is not None:
        check_sha256(path, sha256)
    try:
        # zf.read checks each entry's CRC (np.load alone may stop reading before the check and miss damage)
        with zipfile.ZipFile(path) as zf:
            episode = {name.removesuffix(".npy"): np.lib.format.read_array(io.BytesIO(zf.read(name)), allow_pickle=False)
                       for name in zf.namelist()}
    except Exception as error:  # zipfile.BadZipFile, zlib.error, EOFError, ValueError... all mean "unreadable"
        raise UserError(f"episode file {path} is unreadable ({type(error).__name__}: {error})") from error
    validate_episode(episode, where=str(path))
    return episode


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read and check a folder's manifest (format name and version)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing: {root} is not a rollout folder (make one with python -m rollouts.collect)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{path}: field 'format' is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                         f"expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: field 'format_version' is {manifest.get('format_version')!r}, this code reads "
                         f"version {FORMAT_VERSION}")
    return manifest


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically, episodes sorted by index (same content -> same bytes)."""
    manifest = dict(manifest)
    manifest["episodes"] = sorted(manifest.get("episodes", []), key=lambda e: e["index"])
    episodes = manifest["episodes"]
    manifest["counts"] = {
        "episodes": len(episodes),
        "steps": int(sum(e["steps"] for e in episodes)),
        "frames": int(sum(e["steps"] + 1 for e in episodes)),
        "revisit_frames": int(sum(e["revisit_frames"] for e in episodes)),
        "bytes": int(sum(e["bytes"] for e in episodes)),
    }
    text = json.dumps(manifest, indent=1, sort_keys=False) + "\n"
    atomic_write(Path(root) / MANIFEST_NAME, lambda f: f.write(text.encode()))


def episode_record(index: int, file: str, sha256: str, nbytes: int, episode: dict[str, np.ndarray],
                   **seeds: int) -> dict[str, Any]:
    """The manifest entry of one written episode."""
    return {
        "index": int(index),
        "file": file,
        "sha256": sha256,
        "bytes": int(nbytes),
        "steps": int(len(episode["action"])),
        "revisit_frames": int(episode["revisit"].sum()),
        "return": float(episode["reward"].sum()),
        "terminated": bool(episode["terminated"][-1]) if len(episode["terminated"]) else False,
        **{k: int(v) for k, v in seeds.items()},
    }


def check_episode_matches(manifest: dict[str, Any], episode: dict[str, np.ndarray], where: str) -> None:
    """The episode's obs shape, pose size and actions agree with the folder's manifest."""
    obs_shape = list(episode["obs"].shape[1:])
    if obs_shape != list(manifest["obs_shape"]):
        raise UserError(f"{where}: obs shape {tuple(obs_shape)} differs from the manifest's {tuple(manifest['obs_shape'])}")
    if episode["pose"].shape[1] != manifest["pose_dim"]:
        raise UserError(f"{where}: pose size {episode['pose'].shape[1]} differs from the manifest's {manifest['pose_dim']}")
    actions = episode["action"]
    if len(actions) and (actions.min() < 0 or actions.max() >= manifest["num_actions"]):
        raise UserError(f"{where}: actions span [{actions.min()}, {actions.max()}], expected [0, {manifest['num_actions']})")


def new_manifest(*, env_name: str, env_id: str, env_kwargs: dict[str, Any], agent_name: str,
                 agent_kwargs: dict[str, Any], seed: int, steps_per_episode: int, obs_shape: tuple[int, ...],
                 num_actions: int, pose_dim: int, episodes_requested: int) -> dict[str, Any]:
    """A manifest for an empty folder; ``write_manifest`` fills in the counts."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "env": {"name": env_name, "id": env_id, "kwargs": env_kwargs},
        "agent": {"name": agent_name, "kwargs": agent_kwargs},
        "seed": int(seed),
        "steps_per_episode": int(steps_per_episode),
        "episodes_requested": int(episodes_requested),
        "obs_shape": [int(s) for s in obs_shape],
        "num_actions": int(num_actions),
        "pose_dim": int(pose_dim),
        "episodes": [],
    }
