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
| ``identity``  | str     | ()             | JSON: which episode of which collection this is (format 2)    |

``identity`` makes a file self-describing: its episode index, env and agent seeds, the collection's base seed and
``--steps``, and the manifest's ``env`` and ``agent`` entries. ``inspect --verify`` and the dataset loaders compare
it with the manifest, so a manifest entry pointing at another episode's file (with that file's sha256), or an edited
env, is caught even though every checksum matches. Format 1 folders (no ``identity``) are still read; collect keeps
resuming them in format 1 and the identity check is skipped for them.

A manifest is untrusted input: ``read_manifest`` checks every field's type, and every episode file it names must be
a plain ``episode_<index>.npz`` inside the folder (``episode_path``): no absolute paths, no ``..``, no symlink out.

Every write is atomic (a temp file in the same folder, then ``os.replace``), so a crash leaves either the old
file or the new one, never half of one. The ``.npz`` bytes are deterministic (fixed zip timestamps), so the same
episode always has the same sha256: a resumed collection and an uninterrupted one give identical checksums.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np

from gtmm.cli import UserError
from gtmm.fs import atomic_write

FORMAT_NAME = "gtmm-rollouts"
FORMAT_VERSION = 2  # 2: every episode file stores its ``identity``
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
IDENTITY_KEY = "identity"

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


# what a manifest may name: a plain episode file of the folder, nothing else (no subfolder, no "..", no absolute path)
EPISODE_FILE = re.compile(r"episode_(\d{6,})\.npz")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def episode_filename(index: int) -> str:
    """File name of episode ``index`` (zero-padded so a folder listing sorts in episode order)."""
    return f"episode_{index:06d}.npz"


def _file_name_problem(file: Any) -> str | None:
    """Why ``file`` (a manifest's ``file`` field) may not be opened, or None if it is a plain episode file name."""
    if not isinstance(file, str):
        return f"is of type {type(file).__name__}, expected a file name string"
    if file.startswith(("/", "\\")) or Path(file).is_absolute() or re.match(r"[A-Za-z]:", file):
        return "is an absolute path, expected a file inside the folder"
    if ".." in re.split(r"[/\\]", file):
        return "goes up out of the folder ('..'), expected a file inside the folder"
    if not EPISODE_FILE.fullmatch(file):
        return "is not an episode file name of the folder (expected episode_<index>.npz, e.g. episode_000003.npz)"
    return None


def episode_path(root: str | os.PathLike, record_or_file: dict[str, Any] | str) -> Path:
    """The path of a manifest entry's episode file, checked to stay inside ``root``.

    ``record_or_file`` is a manifest episode record or its ``file`` field. A UserError naming the manifest and the
    entry refuses anything but a plain ``episode_<index>.npz`` of the folder: absolute paths, ``..``, subfolders,
    other names, and symlinks that point outside the folder. Every place that opens a manifest's file goes through
    here: a manifest someone sent you must never make us read (or train on) a file elsewhere on the disk.
    """
    root = Path(root)
    if isinstance(record_or_file, dict):
        file = record_or_file.get("file")
        entry = f"episode {record_or_file.get('index')!r} file {file!r}"
    else:
        file, entry = record_or_file, f"file {record_or_file!r}"
    problem = _file_name_problem(file)
    if problem is not None:
        raise UserError(f"{root / MANIFEST_NAME}: {entry} {problem}")
    path = root / file
    if path.is_symlink():
        target, inside = path.resolve(), root.resolve()
        if not target.is_relative_to(inside):
            raise UserError(f"{root / MANIFEST_NAME}: {entry} is a symlink to {target}, outside the folder {inside}")
    if path.exists() and not path.is_file():  # a folder, a FIFO (reading one would block), a device...
        raise UserError(f"{root / MANIFEST_NAME}: {entry} is not a regular file")
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (the checksum recorded in manifests)."""
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


def save_episode(path: str | os.PathLike, episode: dict[str, np.ndarray], identity: dict[str, Any] | None = None) -> str:
    """Write one episode atomically as a deterministic compressed ``.npz``; return its sha256.

    ``identity`` (``episode_identity``) is stored as the JSON string entry ``identity`` (format 2); None writes a
    format-1 file (what a resumed format-1 folder needs to stay one format)."""
    validate_episode(episode, where=str(path))
    arrays = {key: np.ascontiguousarray(episode[key]) for key in EPISODE_KEYS}
    if identity is not None:
        # a 0-d unicode array: np.load reads it without pickle, old readers simply ignore the extra entry
        arrays[IDENTITY_KEY] = np.array(json.dumps(identity, sort_keys=True))

    def write(f: BinaryIO) -> None:
        # np.savez_compressed stamps entries with the current time; we write the same zip layout by hand with a
        # fixed timestamp so the bytes depend on the arrays only (np.load reads it like any .npz).
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:
            for key, array in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, mode="w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, array, allow_pickle=False)

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
    """Read a folder's manifest and check every field's type (``validate_manifest``): UserError naming the problem."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root} does not exist: not a rollout folder (make one with python -m rollouts.collect)")
    if not root.is_dir():
        raise UserError(f"{root} is a file, expected a rollout folder (written by python -m rollouts.collect)")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing: {root} is not a rollout folder (make one with python -m rollouts.collect)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON: {error}") from error
    validate_manifest(manifest, path)
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a count


def validate_manifest(manifest: Any, path: str | os.PathLike) -> None:
    """UserError naming ``path`` and the field if the manifest is not what ``write_manifest`` writes: a manifest may
    come from anyone, and a wrong type must be one clear line, not a KeyError or TypeError deep inside training."""

    def fail(field: str, value: Any, expected: str) -> NoReturn:
        raise UserError(f"{path}: field {field!r} is {value!r}, expected {expected}")

    if not isinstance(manifest, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_NAME:
        fail("format", manifest.get("format"), repr(FORMAT_NAME))
    if manifest.get("format_version") not in READABLE_VERSIONS:
        fail("format_version", manifest.get("format_version"),
             f"one of {list(READABLE_VERSIONS)} (the versions this code reads)")
    for part, fields in (("env", ("name", "id")), ("agent", ("name",))):
        entry = manifest.get(part)
        if not isinstance(entry, dict):
            fail(part, entry, "an object")
        for name in fields:
            if not isinstance(entry.get(name), str):
                fail(f"{part}.{name}", entry.get(name), "a string")
        if not isinstance(entry.get("kwargs"), dict):
            fail(f"{part}.kwargs", entry.get("kwargs"), "an object")
    sha = manifest["env"].get("checkpoint_sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
        fail("env.checkpoint_sha256", sha, "64 lowercase hex digits")
    for name, low in (("seed", 0), ("steps_per_episode", 1), ("episodes_requested", 0), ("num_actions", 1),
                      ("pose_dim", 0)):
        value = manifest.get(name)
        if not _is_int(value) or value < low:
            fail(name, value, f"an integer >= {low}")
    shape = manifest.get("obs_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(s) and s >= 1 for s in shape)):
        fail("obs_shape", shape, "[H, W, C], three integers >= 1")
    episodes = manifest.get("episodes")
    if not isinstance(episodes, list):
        fail("episodes", episodes, "a list")
    if "counts" in manifest and not isinstance(manifest["counts"], dict):
        fail("counts", manifest["counts"], "an object")
    indices: dict[int, int] = {}
    files: dict[str, int] = {}
    for i, record in enumerate(episodes):
        field = f"episodes[{i}]"
        if not isinstance(record, dict):
            fail(field, record, "an object")
        for name, low in (("index", 0), ("bytes", 0), ("steps", 0), ("revisit_frames", 0)):
            if not _is_int(record.get(name)) or record[name] < low:
                fail(f"{field}.{name}", record.get(name), f"an integer >= {low}")
        for name in ("env_seed", "agent_seed"):
            if name in record and (not _is_int(record[name]) or record[name] < 0):
                fail(f"{field}.{name}", record[name], "an integer >= 0")
        problem = _file_name_problem(record.get("file"))
        if problem is not None:
            raise UserError(f"{path}: field '{field}.file' {record.get('file')!r} {problem}")
        if not (isinstance(record.get("sha256"), str) and _SHA256.fullmatch(record["sha256"])):
            fail(f"{field}.sha256", record.get("sha256"), "64 lowercase hex digits")
        if not isinstance(record.get("return"), (int, float)) or isinstance(record.get("return"), bool):
            fail(f"{field}.return", record.get("return"), "a number")
        if not isinstance(record.get("terminated"), bool):
            fail(f"{field}.terminated", record.get("terminated"), "true or false")
        if record["revisit_frames"] > record["steps"] + 1:
            fail(f"{field}.revisit_frames", record["revisit_frames"], f"at most steps + 1 = {record['steps'] + 1}")
        # two entries for one episode or one file would train on it twice (or hide that an episode is missing)
        if record["index"] in indices:
            raise UserError(f"{path}: episodes[{indices[record['index']]}] and {field} both have index {record['index']}")
        if record["file"] in files:
            raise UserError(f"{path}: episodes[{files[record['file']]}] and {field} both name file {record['file']!r}")
        indices[record["index"]], files[record["file"]] = i, i


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically, episodes sorted by index (same content -> same bytes)."""
    manifest = dict(manifest)
    manifest["episodes"] = sorted(manifest.get("episodes", []), key=lambda e: e["index"])
    manifest["counts"] = manifest_counts(manifest["episodes"])
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
                 num_actions: int, pose_dim: int, episodes_requested: int,
                 checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """A manifest for an empty folder; ``write_manifest`` fills in the counts. ``checkpoint_sha256``: the world
    model a ``Dream-v0`` collection dreams with (kept beside the kwargs, which must stay constructor arguments)."""
    env: dict[str, Any] = {"name": env_name, "id": env_id, "kwargs": env_kwargs}
    if checkpoint_sha256 is not None:
        env["checkpoint_sha256"] = checkpoint_sha256
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "env": env,
        "agent": {"name": agent_name, "kwargs": agent_kwargs},
        "seed": int(seed),
        "steps_per_episode": int(steps_per_episode),
        "episodes_requested": int(episodes_requested),
        "obs_shape": [int(s) for s in obs_shape],
        "num_actions": int(num_actions),
        "pose_dim": int(pose_dim),
        "episodes": [],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Checking files against the manifest: what makes a folder trustworthy beyond its checksums


def episode_identity(manifest: dict[str, Any], index: int, env_seed: int, agent_seed: int) -> dict[str, Any]:
    """What episode ``index`` of this collection is, as stored inside its file (format 2)."""
    return {
        "episode_index": int(index),
        "env_seed": int(env_seed),
        "agent_seed": int(agent_seed),
        "seed": int(manifest["seed"]),
        "steps_per_episode": int(manifest["steps_per_episode"]),
        "env": manifest["env"],
        "agent": manifest["agent"],
    }


def manifest_counts(episodes: list[dict[str, Any]]) -> dict[str, int]:
    """The ``counts`` of a manifest, added up from its episode entries."""
    return {
        "episodes": len(episodes),
        "steps": int(sum(e["steps"] for e in episodes)),
        "frames": int(sum(e["steps"] + 1 for e in episodes)),
        "revisit_frames": int(sum(e["revisit_frames"] for e in episodes)),
        "bytes": int(sum(e["bytes"] for e in episodes)),
    }


def episode_mismatches(manifest: dict[str, Any], record: dict[str, Any], episode: dict[str, np.ndarray],
                       require_identity: bool = False) -> list[str]:
    """Every way the loaded ``episode`` disagrees with its manifest ``record`` and the folder's manifest: lengths,
    revisit count, return, termination, obs shape, pose size, action range, and the identity stored in the file
    (checked when present; ``require_identity`` also reports its absence). Empty when they agree."""
    problems = []

    def differs(field: str, recorded: Any, found: Any) -> None:
        problems.append(f"{field}: the manifest says {recorded!r}, the file has {found!r}")

    steps = int(len(episode["action"]))
    if record["steps"] != steps:
        differs("steps", record["steps"], steps)
    if record["steps"] > manifest["steps_per_episode"]:
        problems.append(f"steps: {record['steps']} is more than the folder's steps_per_episode "
                        f"{manifest['steps_per_episode']}")
    revisits = int(episode["revisit"].sum())
    if record["revisit_frames"] != revisits:
        differs("revisit_frames", record["revisit_frames"], revisits)
    total = float(episode["reward"].sum())  # computed exactly as episode_record does: equal floats, not close ones
    if not (record["return"] == total or (math.isnan(record["return"]) and math.isnan(total))):
        differs("return", record["return"], total)
    terminated = bool(episode["terminated"][-1]) if steps else False
    if record["terminated"] != terminated:
        differs("terminated", record["terminated"], terminated)
    obs_shape = list(episode["obs"].shape[1:])
    if obs_shape != list(manifest["obs_shape"]):
        differs("obs_shape", list(manifest["obs_shape"]), obs_shape)
    if episode["pose"].shape[1] != manifest["pose_dim"]:
        differs("pose_dim", manifest["pose_dim"], int(episode["pose"].shape[1]))
    actions = episode["action"]
    if steps and (actions.min() < 0 or actions.max() >= manifest["num_actions"]):
        problems.append(f"actions span [{actions.min()}, {actions.max()}], the manifest's num_actions "
                        f"{manifest['num_actions']} allows [0, {manifest['num_actions']})")
    if IDENTITY_KEY not in episode:
        if require_identity:
            problems.append(f"the file stores no {IDENTITY_KEY!r} (format {manifest['format_version']} files do): "
                            "it was not written by collect for this folder")
        return problems
    try:
        stored = json.loads(str(episode[IDENTITY_KEY]))
        if not isinstance(stored, dict):
            raise ValueError(f"a {type(stored).__name__}")
    except ValueError as error:
        return problems + [f"its {IDENTITY_KEY!r} entry is not a JSON object ({error})"]
    expected = episode_identity(manifest, record["index"], record.get("env_seed", -1), record.get("agent_seed", -1))
    if "env_seed" not in record:  # a record without seeds cannot be checked on them
        expected.pop("env_seed"), expected.pop("agent_seed")
    for key, wanted in expected.items():
        if stored.get(key) != wanted:
            name = {"episode_index": "index"}.get(key, key)
            differs(f"{name} (stored in the file)", wanted, stored.get(key))
    return problems


def check_episode_record(manifest: dict[str, Any], record: dict[str, Any], episode: dict[str, np.ndarray],
                         where: str) -> None:
    """UserError listing every ``episode_mismatches`` of a loaded episode (what training and dreams rely on)."""
    check_episode_matches(manifest, episode, where)  # the folder-wide shapes first, with their own message
    problems = episode_mismatches(manifest, record, episode)
    if problems:
        raise UserError(f"{where} does not match its manifest entry (episode {record['index']}): "
                        + "; ".join(problems) + " (python -m rollouts.inspect --verify lists every mismatch)")


def verify_folder(root: str | os.PathLike) -> dict[str, Any]:
    """Read every episode of a rollout folder and compare it with the manifest, trusting nothing the manifest says.

    Returns ``{"verified": files that matched, "mismatches": [lines], "notes": [lines]}``; every mismatch of every
    file is listed (a damaged folder should be seen whole, not one error per run). Raises only when the manifest
    itself cannot be read.
    """
    root = Path(root)
    manifest = read_manifest(root)
    version = manifest["format_version"]
    mismatches, notes = [], []
    if "counts" in manifest and manifest["counts"] != manifest_counts(manifest["episodes"]):
        mismatches.append(f"manifest counts {manifest['counts']} do not add up from its episode entries "
                          f"{manifest_counts(manifest['episodes'])}")
    if version < 2:
        notes.append(f"format version {version}: the files store no identity, so the episode index, seeds and env "
                     "inside each file were not checked (collect into a new folder to get them)")
    verified = 0
    for record in manifest["episodes"]:
        where = f"episode {record['index']} ({record['file']})"
        try:
            path = episode_path(root, record)
        except UserError as error:
            mismatches.append(f"{where}: {error}")
            continue
        if not path.is_file():
            mismatches.append(f"{where}: the file is missing")
            continue
        problems = []
        size = path.stat().st_size
        if size != record["bytes"]:
            problems.append(f"bytes: the manifest says {record['bytes']}, the file has {size}")
        sha = sha256_file(path)
        if sha != record["sha256"]:
            problems.append(f"sha256: the manifest says {record['sha256'][:16]}..., the file has {sha[:16]}...")
        try:
            episode = load_episode(path)
        except UserError as error:
            problems.append(str(error))
        else:
            problems += episode_mismatches(manifest, record, episode, require_identity=version >= 2)
        mismatches += [f"{where}: {p}" for p in problems]
        verified += not problems
    named = {record["file"] for record in manifest["episodes"]}
    stray = sorted(p.name for p in root.glob("episode_*.npz") if p.name not in named)
    if stray:
        notes.append(f"{len(stray)} episode files not in the manifest (a collect stopped midway leaves them; "
                     f"re-running it rewrites them): {', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''}")
    return {"verified": verified, "mismatches": mismatches, "notes": notes}
