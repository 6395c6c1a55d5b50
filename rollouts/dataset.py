"""Recorded rollouts as a ``torch.utils.data.Dataset`` of fixed-length windows, in the batch contract of
``worldmodel/__init__.py`` (without the B axis):

    obs          uint8   (T, H, W, C)   frames x_t
    prev_action  int64   (T,)           a_{t-1}, the action that led to x_t; -1 for an episode's first frame
    revisit      bool    (T,)           x_t shows a place seen earlier in the episode
    pose         float32 (T, D)         the env's pose for x_t

Train/val is split BY EPISODE (windows of one episode never land on both sides), deterministically from ``seed``.
Each split is decoded once into an uncompressed cache (``.npy`` files, the frames memory-mapped), so ``__getitem__``
is a slice and DataLoader workers share the pages instead of copying them. The cache is derived data ten times the
size of the dataset, so by default it lives in the per-user cache folder (``$GTMM_CACHE``, else
``$XDG_CACHE_HOME/gtmm``, else ``~/.cache/gtmm``), under ``windows/<hash of the dataset's absolute path and
manifest>``: two datasets never share a cache, an edited manifest gets a fresh one, and the data folder stays as
collected. ``cache_dir=`` puts it elsewhere (e.g. inside the dataset folder). Deleting the cache is always safe.

Training draws whole batches: ``RolloutWindows.sample_batch(index)`` gathers B windows with one vectorised fancy
index per array (no per-window Python, no stacking), and ``Prefetcher`` makes the batches of the next steps in a
background thread (on CUDA into pinned memory, copied with ``non_blocking`` on a side stream) so that the training
loop finds each batch ready instead of waiting for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gtmm.cli import UserError
from rollouts.storage import check_episode_record, episode_path, load_episode, read_manifest

# the four arrays a window is sliced from, concatenated over the episodes of a split
_CACHE_KEYS = ("obs", "prev_action", "revisit", "pose")

CACHE_ENV = "GTMM_CACHE"  # overrides the per-user cache folder (the tests point it at a temporary folder)

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


def user_cache_root() -> Path:
    """The per-user folder of gtmm's derived files: ``$GTMM_CACHE``, else ``$XDG_CACHE_HOME/gtmm``, else
    ``~/.cache/gtmm`` (the XDG base directory convention)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # the XDG spec says a relative $XDG_CACHE_HOME is invalid and must be ignored
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "gtmm"


def default_cache_dir(root: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """``<user cache>/windows/<key>``: the key hashes the dataset's absolute path and its manifest's content, so two
    datasets (even copies of one) never share a folder and an edited manifest never reads a stale cache."""
    identity = json.dumps({"root": str(Path(root).resolve()), "manifest": manifest}, sort_keys=True, default=str)
    return user_cache_root() / "windows" / hashlib.sha256(identity.encode()).hexdigest()[:24]


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
        cache_dir: where the decoded split is cached (default ``default_cache_dir``: in the per-user cache folder,
            keyed by the dataset's absolute path and manifest; pass e.g. ``<root>/.cache`` to keep it beside the data).
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
            cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.root, self.manifest)
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
        if all(p.is_file() for p in paths.values()) and self._cache_fits(paths):
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

    def _cache_fits(self, paths: dict[str, Path]) -> bool:
        """Whether the cached files hold arrays of this split's shapes and dtypes (a truncated or foreign file in a
        shared cache folder is rebuilt instead of read). Reads only the ``.npy`` headers; never unpickles."""
        expected = self._empty_arrays(lambda name, shape, dtype: (tuple(shape), np.dtype(dtype)))
        try:
            for name, p in paths.items():
                array = np.load(p, mmap_mode="r", allow_pickle=False)
                if (array.shape, array.dtype) != expected[name]:
                    return False
        except (ValueError, OSError):  # a damaged header, or a file shorter than its header says
            return False
        return True

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

    def episode_starts(self, count: int | None = None) -> np.ndarray:
        """Indices of the windows that start at an episode's first frame (so "revisit" means "seen earlier in this
        window"); with ``count``, at most that many of them, evenly spread over the episodes."""
        first = np.flatnonzero(np.isin(self.window_starts, self.episode_offsets))
        if count is None or len(first) == 0:
            return first
        return first[np.unique(np.linspace(0, len(first) - 1, min(count, len(first))).round().astype(int))]

    def sample_batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The windows ``index`` (B,) as one batch with the B axis: obs (B, T, H, W, C) uint8, prev_action (B, T)
        int64, revisit (B, T) bool, pose (B, T, D) float32 -- the same arrays as stacking ``self[i]`` for each i,
        gathered with one fancy index per array (frames rows start + [0, T)), several times faster."""
        index = np.asarray(index)
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise UserError(f"sample_batch: expected a 1-D integer array of window indices, got {index.dtype} "
                            f"{index.shape}")
        if index.size and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"sample_batch: window index out of range [0, {len(self)})")
        rows = self.window_starts[index][:, None] + np.arange(self.seq_len)  # (B, T) frame rows
        arrays = self._get_arrays()
        return {name: np.asarray(arrays[name][rows]) for name in _CACHE_KEYS}  # fancy indexing copies: (B, T, ...)


class Prefetcher:
    """Makes the batches of steps ``start, start + 1, ...`` ahead of time in a background thread.

    ``make(step)`` returns a batch as a dict of numpy arrays (deterministic in ``step``: e.g. windows drawn with a
    generator seeded by the step, so that a resumed run prefetches the batches an uninterrupted one would use);
    ``get(step)`` returns that step's batch as tensors on ``device``, cast to ``dtypes`` where given. On CUDA the
    thread copies each batch into pinned memory and to the GPU with ``non_blocking=True`` on its own stream, and
    ``get`` makes the caller's stream wait for that copy, so neither the gather nor the transfer stalls the GPU.
    ``depth`` batches are kept ready. numpy's gather and torch's copies release the GIL, so the thread overlaps
    with the training step. An error in ``make`` is raised by the ``get`` of its step. Use as a context manager
    (or call ``close``) to stop the thread.
    """

    def __init__(self, make: Callable[[int], dict[str, np.ndarray]], device: torch.device | str, start: int = 0,
                 depth: int = 2, dtypes: dict[str, torch.dtype] | None = None):
        if depth < 1:
            raise UserError(f"prefetch depth {depth}: expected >= 1")
        self.make, self.device, self.dtypes = make, torch.device(device), dict(dtypes or {})
        self.next_step = start
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start,), name="gtmm-prefetch", daemon=True)
        self._thread.start()

    def _to_device(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], Any]:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        if not self._cuda:
            return {k: t.to(dtype=self.dtypes.get(k, t.dtype)) for k, t in tensors.items()}, None
        # this thread's current device is cuda:0 unless set: events and streams must be those of self.device
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            out = {k: t.pin_memory().to(self.device, dtype=self.dtypes.get(k, t.dtype), non_blocking=True)
                   for k, t in tensors.items()}
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return out, ready

    def _run(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item: Any = self._to_device(self.make(step))
            except BaseException as error:  # handed to the consumer, which raises it in its own thread
                item = error
            while not self._stop.is_set():
                try:
                    self._queue.put((step, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            step += 1

    def get(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of ``step``, which must be the next one (steps are consumed in order, none skipped)."""
        if step != self.next_step:
            raise ValueError(f"Prefetcher.get({step}): the next prefetched step is {self.next_step}")
        made, item = self._queue.get()
        assert made == step, f"prefetcher out of order: made {made}, asked {step}"
        self.next_step += 1
        if isinstance(item, BaseException):
            raise item
        tensors, ready = item
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for t in tensors.values():  # the side stream's memory is now used on this stream
                t.record_stream(current)
        return tensors

    def close(self) -> None:
        """Stop the thread (the batches it made are dropped)."""
        self._stop.set()
        while True:  # unblock a put in progress
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
