"""Recorded rollouts as a ``torch.utils.data.Dataset`` of fixed-length windows, in the batch contract of
``worldmodel/__init__.py`` (without the B axis):

    obs          uint8   (T, H, W, C)   frames x_t
    prev_action  int64   (T,)           a_{t-1}, the action that led to x_t; -1 for an episode's first frame
    revisit      bool    (T,)           x_t shows a place seen earlier in the episode
    pose         float32 (T, D)         the env's pose for x_t

Train/val is split BY EPISODE (windows of one episode never land on both sides), deterministically from ``seed``.
Each split is decoded once into an uncompressed cache (``<root>/.cache`` by default, ``.npy`` files, the frames
memory-mapped), so ``__getitem__`` is a slice and DataLoader workers share the pages instead of copying them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gtmm.cli import UserError
from rollouts.storage import check_episode_record, episode_path, load_episode, read_manifest

# the four arrays a window is sliced from, concatenated over the episodes of a split
_CACHE_KEYS = ("obs", "prev_action", "revisit", "pose")

VAL_FRACTION = 0.05  # share of episodes held out for validation: the one default of training, evaluation and loaders


def split_episodes(manifest: dict[str, Any], split: str, val_fraction: float = VAL_FRACTION,
                   seed: int = 0) -> list[dict[str, Any]]:
    """The manifest's episode records that belong to ``split`` ("train", "val" or "all"), in index order.

    Each episode gets a rank from a hash of (seed, file name); the lowest ``round(val_fraction * n)`` ranks (at
    least one when there are two or more episodes and ``val_fraction > 0``) are validation. Hashing instead of
    shuffling keeps most assignments stable when a folder grows.
    """
    if split not in ("train", "val", "all"):
        raise UserError(f"split {split!r}: expected 'train', 'val' or 'all'")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction {val_fraction}: expected a number in [0, 1)")
    records = sorted(manifest["episodes"], key=lambda e: e["index"])
    if split == "all":
        return records
    num_val = int(round(val_fraction * len(records)))
    if val_fraction > 0 and len(records) >= 2:
        num_val = max(num_val, 1)
    num_val = min(num_val, len(records) - 1) if records else 0

    def rank(record: dict[str, Any]) -> str:
        return hashlib.sha256(f"{seed}:{record['file']}".encode()).hexdigest()

    val_files = {r["file"] for r in sorted(records, key=rank)[:num_val]}
    return [r for r in records if (r["file"] in val_files) == (split == "val")]


def iter_episodes(root: str | os.PathLike, split: str = "all", val_fraction: float = VAL_FRACTION,
                  seed: int = 0) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """Yield ``(manifest record, episode arrays)`` for whole episodes, checksums verified and each file checked
    against its manifest entry (``storage.check_episode_record``), for evaluation."""
    root = Path(root)
    manifest = read_manifest(root)
    for record in split_episodes(manifest, split, val_fraction, seed):
        path = episode_path(root, record)
        episode = load_episode(path, sha256=record["sha256"])
        check_episode_record(manifest, record, episode, str(path))
        yield record, episode


def episode_prev_action(action: np.ndarray) -> np.ndarray:
    """(T,) actions -> (T+1,) previous actions: -1 before the first frame, then action[t-1] for frame t."""
    return np.concatenate([np.full(1, -1, dtype=np.int64), action.astype(np.int64)])


class RolloutWindows(Dataset):
    """Windows of ``seq_len`` consecutive frames inside recorded episodes.

    Args:
        root: a folder written by ``python -m rollouts.collect``.
        seq_len: frames per window (T); episodes with fewer than ``seq_len`` frames give no window.
        split: "train", "val" or "all".
        val_fraction: share of episodes held out for "val".
        seed: seed of the train/val assignment.
        stride: distance between window starts inside an episode (1 = every start).
        cache_dir: where the decoded split is cached (default ``<root>/.cache``); ``None`` keeps it in memory only
            when ``cache`` is False.
        cache: decode into memory-mapped ``.npy`` files once, reused by later runs and DataLoader workers.
    """

    def __init__(self, root: str | os.PathLike, seq_len: int, split: str = "train", val_fraction: float = VAL_FRACTION,
                 seed: int = 0, stride: int = 1, cache_dir: str | os.PathLike | None = None, cache: bool = True):
        if seq_len < 1:
            raise UserError(f"seq_len {seq_len}: expected >= 1")
        if stride < 1:
            raise UserError(f"stride {stride}: expected >= 1")
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.seq_len, self.split, self.stride = seq_len, split, stride
        self.obs_shape: tuple[int, int, int] = tuple(self.manifest["obs_shape"])  # (H, W, C)
        self.num_actions: int = int(self.manifest["num_actions"])
        self.pose_dim: int = int(self.manifest["pose_dim"])
        self.env_name: str = self.manifest["env"]["name"]
        self.episodes = split_episodes(self.manifest, split, val_fraction, seed)
        if not self.episodes:
            raise UserError(f"{self.root}: split {split!r} has no episodes "
                             f"({len(self.manifest['episodes'])} in the folder, val_fraction={val_fraction})")

        # where each episode's frames start in the concatenated arrays
        frames = np.array([e["steps"] + 1 for e in self.episodes], dtype=np.int64)
        self.episode_offsets = np.concatenate([[0], np.cumsum(frames)[:-1]]).astype(np.int64)
        self.num_frames = int(frames.sum())
        starts = [offset + np.arange(0, n - seq_len + 1, stride) for offset, n in zip(self.episode_offsets, frames)]
        self.window_starts = np.concatenate(starts).astype(np.int64)
        if len(self.window_starts) == 0:
            raise UserError(f"{self.root}: no {split!r} episode has seq_len={seq_len} frames "
                             f"(longest has {int(frames.max())})")

        self._cache_paths: dict[str, Path] | None = None
        self._arrays: dict[str, np.ndarray] | None = None
        if cache:
            cache_dir = Path(cache_dir) if cache_dir is not None else self.root / ".cache"
            self._cache_paths = self._build_cache(cache_dir)
        else:
            self._arrays = self._decode()

    # -- decoding and caching --------------------------------------------------------------------------------------

    def _decode(self) -> dict[str, np.ndarray]:
        """Load every episode of the split (checksums and manifest entries verified) into concatenated arrays."""
        arrays = self._empty_arrays(lambda key, shape, dtype: np.empty(shape, dtype))
        self._fill(arrays)
        return arrays

    def _empty_arrays(self, allocate) -> dict[str, np.ndarray]:
        n = self.num_frames
        return {
            "obs": allocate("obs", (n, *self.obs_shape), np.uint8),
            "prev_action": allocate("prev_action", (n,), np.int64),
            "revisit": allocate("revisit", (n,), np.bool_),
            "pose": allocate("pose", (n, self.pose_dim), np.float32),
        }

    def _fill(self, arrays: dict[str, np.ndarray]) -> None:
        for record, offset in zip(self.episodes, self.episode_offsets):
            path = episode_path(self.root, record)
            episode = load_episode(path, sha256=record["sha256"])
            # steps must agree before the copy below (the offsets come from the manifest); identity catches a swap
            check_episode_record(self.manifest, record, episode, str(path))
            end = offset + record["steps"] + 1
            arrays["obs"][offset:end] = episode["obs"]
            arrays["prev_action"][offset:end] = episode_prev_action(episode["action"])
            arrays["revisit"][offset:end] = episode["revisit"]
            arrays["pose"][offset:end] = episode["pose"]

    def _build_cache(self, cache_dir: Path) -> dict[str, Path]:
        """Decode the split once into ``.npy`` files named by a hash of its episodes' checksums."""
        key = hashlib.sha256("".join(f"{e['file']}:{e['sha256']};" for e in self.episodes).encode()).hexdigest()[:16]
        paths = {name: cache_dir / f"{self.split}-{key}-{name}.npy" for name in _CACHE_KEYS}
        if all(p.is_file() for p in paths.values()):
            return paths
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = {name: p.with_name(f".{p.name}.{os.getpid()}.tmp") for name, p in paths.items()}
        try:
            arrays = self._empty_arrays(
                lambda name, shape, dtype: np.lib.format.open_memmap(tmp[name], mode="w+", dtype=dtype, shape=shape))
            self._fill(arrays)
            for array in arrays.values():
                array.flush()
            del arrays
            for name in _CACHE_KEYS:  # a crash before this leaves only temp files, which are never read
                os.replace(tmp[name], paths[name])
        finally:
            for p in tmp.values():
                if p.exists():
                    p.unlink()
        return paths

    def _get_arrays(self) -> dict[str, np.ndarray]:
        # opened lazily so each DataLoader worker maps the files itself instead of unpickling a copy
        if self._arrays is None:
            assert self._cache_paths is not None
            self._arrays = {name: np.load(p, mmap_mode="r") for name, p in self._cache_paths.items()}
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._cache_paths is not None:
            state["_arrays"] = None
        return state

    # -- Dataset ---------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.window_starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.window_starts[index])
        window = slice(start, start + self.seq_len)
        arrays = self._get_arrays()
        return {name: torch.from_numpy(np.array(arrays[name][window])) for name in _CACHE_KEYS}
