"""Recorded rollouts as a ``torch.utils.data.Dataset`` of fixed-length windows, in the batch contract of
``worldmodel/__init__.py`` (without the B axis):

    obs          uint8   (T, H, W, C)   frames x_t
    prev_action  int64   (T,)           a_{t-1}, the action that led to x_t; -1 for an episode's first frame
    revisit      bool    (T,)           x_t shows a place seen earlier in the episode
    pose         float32 (T, D)         the env's pose for x_t
    reward       float32 (T,)           r_{t-1}, the reward received on arriving at x_t; 0 for an episode's first frame
    terminated   bool    (T,)           the episode terminated at x_t (reward heads, ``worldmodel.reward``)

Train/val is split BY EPISODE (windows of one episode never land on both sides), deterministically from ``seed``.
Each split is decoded once into an uncompressed cache (one ``.npy`` file per array), so a window is a contiguous run of
rows of each file. The cache is derived data ten times the size of the dataset, so by default it lives in the
per-user cache folder (``$GTMM_CACHE``, else ``$XDG_CACHE_HOME/gtmm``, else ``~/.cache/gtmm``), under
``windows/<hash of the dataset's absolute path and manifest>``: two datasets never share a cache, an edited manifest
gets a fresh one, and the data folder stays as collected. ``cache_dir=`` puts it elsewhere (e.g. inside the dataset
folder). Deleting the cache is always safe.

Datasets bigger than memory (issue 12): nothing here ever holds or maps a whole split.

- The cache is built streaming, one episode at a time, appended with plain writes to hidden ``.partial`` files
  (written pages go to the kernel's page cache, not to this process's resident memory as pages of a writable
  memory map would). After every ``PROGRESS_EVERY_BYTES`` the files are fsynced and a progress record (episodes
  done) is replaced atomically, so a build killed at any point (SIGKILL, power loss) resumes from its last record:
  the bytes after it are truncated away and the remaining episodes appended, giving the same bytes as an
  uninterrupted build. Only a finished file is renamed to its final name, and only complete final files are ever
  read: a torn cache is never served. A blocking ``flock`` per split makes a second process (another torchrun rank,
  a second run on the same data) wait for the build and then reuse it instead of building it twice.
- Windows are read with ``pread`` (one call per window and array), not through a memory map: the rows a run reads
  are copied out of the page cache, so the resident memory of training is the model plus a few batches whatever
  the dataset's size (a memory-mapped cache counts every page ever touched as the reader's resident memory, up to
  the whole file: nanoGPT re-creates its ``np.memmap`` every batch for that reason). Start-up reads only the
  ``.npy`` headers; nothing scans the frames.

Training draws whole batches: ``RolloutWindows.sample_batch(index)`` gathers B windows at once (no per-window
tensors, no stacking), and ``Prefetcher`` makes the batches of the next steps in a background thread (on CUDA into
pinned memory, copied with ``non_blocking`` on a side stream) so that the training loop finds each batch ready
instead of waiting for it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import queue
import shutil
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gtmm.cli import UserError
from gtmm.fs import write_bytes_atomic
from rollouts.storage import check_episode_record, episode_path, load_episode, read_manifest

# the arrays a window is sliced from, concatenated over the episodes of a split
_CACHE_KEYS = ("obs", "prev_action", "revisit", "pose", "reward", "terminated")

CACHE_ENV = "GTMM_CACHE"  # overrides the per-user cache folder (the tests point it at a temporary folder)

VAL_FRACTION = 0.05  # share of episodes held out for validation: the one default of training, evaluation and loaders

# a cache build fsyncs its files and records its progress after at least this many bytes (and at the end): a killed
# build redoes at most this much, and the fsyncs keep the dirty pages of a multi-GB build from piling up
PROGRESS_EVERY_BYTES = 64 << 20


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


def select_episodes(records: list[dict[str, Any]], positions: Sequence[int], what: str) -> list[dict[str, Any]]:
    """``records[p]`` for each position p of ``positions`` (strictly ascending, in range, at least one)."""
    chosen = np.asarray(positions)
    if chosen.ndim != 1 or chosen.size == 0 or not np.issubdtype(chosen.dtype, np.integer):
        raise UserError(f"{what}: episodes {positions!r}: expected a non-empty list of episode positions")
    if chosen.min() < 0 or chosen.max() >= len(records) or np.any(np.diff(chosen) <= 0):
        raise UserError(f"{what}: episodes {chosen.tolist()[:8]}{'...' if chosen.size > 8 else ''}: expected "
                        f"ascending positions in [0, {len(records)})")
    return [records[int(p)] for p in chosen]


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


def episode_frame_reward(reward: np.ndarray, terminated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T,) per-step rewards and terminations -> (T+1,) per frame: what arriving at frame t brought (step t-1's),
    0 and False for the first frame (nothing led to it)."""
    return (np.concatenate([np.zeros(1, np.float32), reward.astype(np.float32)]),
            np.concatenate([np.zeros(1, bool), terminated.astype(bool)]))




def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The ``.npy`` header of a C-ordered array (what ``np.save`` writes before the data)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


class CachedArray:
    """A C-ordered ``.npy`` file read by rows with ``pread``, never memory-mapped (see the module docstring).

    ``open`` returns None when the file is missing, damaged (a bad header, a size that is not the header's plus
    the array's) or of another shape or dtype: a cache file that does not fit is rebuilt, never read. Only the
    header is parsed (no pickle). ``pread`` keeps no file position, so the descriptor is shared safely by threads
    and by forked DataLoader workers.
    """

    def __init__(self, path: Path, fd: int, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.fd, self.offset, self.shape, self.dtype = path, fd, offset, shape, dtype
        self.row_shape = shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize
        # closes the descriptor exactly once: on close() or when the array is garbage collected
        self._close = weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> "CachedArray | None":
        """The array in ``path`` if it is a complete ``.npy`` of ``shape`` and ``dtype``, else None."""
        try:
            f = open(path, "rb", buffering=0)
        except OSError:
            return None
        with f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                found_shape, fortran, found_dtype = read_header(f)
                offset, size = f.tell(), os.fstat(f.fileno()).st_size
            except (ValueError, OSError, EOFError):  # not a .npy, or a header cut short
                return None
            want = np.dtype(dtype)
            if (tuple(found_shape), found_dtype, fortran) != (tuple(shape), want, False):
                return None
            if size != offset + int(np.prod(shape, dtype=np.int64)) * want.itemsize:  # truncated, or grown
                return None
            return cls(path, os.dup(f.fileno()), offset, tuple(shape), want)

    def read(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows ``starts[i] + [0, length)`` of the array for each i: (B, length, *row_shape), one ``pread`` per
        window straight into the result (the rows of a window are contiguous in the file)."""
        out = np.empty((len(starts), length, *self.row_shape), self.dtype)  # (B, T, ...)
        nbytes = length * self.row_bytes
        flat = memoryview(out.reshape(-1).view(np.uint8))  # window i is bytes [i * nbytes, (i + 1) * nbytes)
        for i, start in enumerate(starts.tolist()):
            where = self.offset + start * self.row_bytes
            got = _pread_into(self.fd, flat[i * nbytes:(i + 1) * nbytes], where)
            if got != nbytes:
                raise UserError(f"cache file {self.path}: read {got} of {nbytes} bytes at row {start}: the file "
                                "shrank while in use; delete it and run again (it is rebuilt)")
        return out

    def close(self) -> None:
        """Close the file (reading afterwards fails); also done when the object is garbage collected."""
        self._close()


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill the bytes ``view`` from ``fd`` at ``offset`` without a file position; returns the bytes read."""
    if not _HAVE_PREADV:
        data = os.pread(fd, len(view), offset)
        view[:len(data)] = data
        return len(data)
    got = os.preadv(fd, [view], offset)  # Linux, BSD, macOS >= 11: no intermediate bytes object
    while 0 < got < len(view):  # a regular file returns short only at its end, but POSIX allows it anywhere
        more = os.preadv(fd, [view[got:]], offset + got)
        if more == 0:
            break
        got += more
    return got


_HAVE_PREADV = hasattr(os, "preadv")


@contextlib.contextmanager
def _build_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for a cache build, WAITING for another holder (a second torchrun
    rank, or a second run on the same data, that is building the same split) rather than failing as
    ``gtmm.fs.FolderLock`` does: once it finishes, the waiter finds the cache built. The kernel drops the lock of
    a killed holder, so a dead build never blocks anyone. The lock file stays (unlinking it would race)."""
    import fcntl  # here, as in gtmm.fs: POSIX only, and only a build needs it

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[dataset] another process is building {what}: waiting for it to finish", file=sys.stderr,
                  flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


def _size(nbytes: int) -> str:
    """A byte count for people: 31.2 kB, 12.6 MB, 4.01 GB."""
    for unit, scale, digits in (("GB", 1e9, 2), ("MB", 1e6, 1), ("kB", 1e3, 1)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{digits}f} {unit}"
    return f"{nbytes} bytes"


def _fsync_dir(folder: Path) -> None:
    """Make the renames inside ``folder`` durable (a crash after a rename keeps it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        cache: decode into ``.npy`` files once (streaming, resumable), reused by later runs and DataLoader workers;
            False decodes the split into memory instead.
        progress: called as ``progress(episodes_done, episodes_total)`` after each episode a cache build writes
            (e.g. to show how far a multi-GB build is); not called when the cache is already built.
        episodes: positions in the split (ascending) of the only episodes to keep (default: all). The cache of a
            subset holds only its episodes (its name hashes their checksums), so reading a few episodes of a big
            folder, as evaluation does, decodes and stores those alone.
    """

    def __init__(self, root: str | os.PathLike, seq_len: int, split: str = "train", val_fraction: float = VAL_FRACTION,
                 seed: int = 0, stride: int = 1, cache_dir: str | os.PathLike | None = None, cache: bool = True,
                 progress: Callable[[int, int], None] | None = None, episodes: Sequence[int] | None = None):
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
        if episodes is not None:
            self.episodes = select_episodes(self.episodes, episodes, f"{self.root}: split {split!r}")

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
        self._files: dict[str, CachedArray] | None = None  # the cache, read with pread
        self._arrays: dict[str, np.ndarray] | None = None  # or the split decoded into memory (cache=False)
        if cache:
            cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.root, self.manifest)
            self._cache_paths, self._files = self._build_cache(cache_dir, progress)
        else:
            self._arrays = self._decode()

    # -- decoding ---------------------------------------------------------------------------------------------------

    def _layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of each concatenated array of the split."""
        n = self.num_frames
        return {"obs": ((n, *self.obs_shape), np.dtype(np.uint8)), "prev_action": ((n,), np.dtype(np.int64)),
                "revisit": ((n,), np.dtype(np.bool_)), "pose": ((n, self.pose_dim), np.dtype(np.float32)),
                "reward": ((n,), np.dtype(np.float32)), "terminated": ((n,), np.dtype(np.bool_))}

    def _episode_rows(self, first: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The arrays of each episode of the split from position ``first`` on, ONE EPISODE AT A TIME (what
        keeps a build's memory at one episode), checksums and manifest entries verified."""
        for record in self.episodes[first:]:
            path = episode_path(self.root, record)
            episode = load_episode(path, sha256=record["sha256"])
            # steps must agree before the rows are placed (the offsets come from the manifest); identity catches a swap
            check_episode_record(self.manifest, record, episode, str(path))
            reward, terminated = episode_frame_reward(episode["reward"], episode["terminated"])
            yield {"obs": episode["obs"], "prev_action": episode_prev_action(episode["action"]),
                   "revisit": episode["revisit"], "pose": episode["pose"], "reward": reward, "terminated": terminated}
            del episode  # not alive while the next episode is decoded

    def _decode(self) -> dict[str, np.ndarray]:
        """The whole split in memory (``cache=False``: small datasets, tests)."""
        arrays = {name: np.empty(shape, dtype) for name, (shape, dtype) in self._layout().items()}
        for rows, offset in zip(self._episode_rows(), self.episode_offsets):
            for name in _CACHE_KEYS:
                arrays[name][offset:offset + len(rows[name])] = rows[name]
        return arrays

    # -- the cache: built streaming and resumably, read with pread ----------------------------------------------------

    def _open_cache(self, paths: dict[str, Path]) -> dict[str, CachedArray] | None:
        """All cached arrays if each is complete and of this split's shape and dtype, else None (then it is
        rebuilt: a truncated or foreign file in a shared cache folder is never read). Reads only the headers."""
        files: dict[str, CachedArray] = {}
        for name, (shape, dtype) in self._layout().items():
            array = CachedArray.open(paths[name], shape, dtype)
            if array is None:
                for opened in files.values():
                    opened.close()
                return None
            files[name] = array
        return files

    def _build_cache(self, cache_dir: Path, progress: Callable[[int, int], None] | None
                     ) -> tuple[dict[str, Path], dict[str, CachedArray]]:
        """The split's cache files (named by a hash of its episodes' checksums), built first if needed, opened."""
        key = hashlib.sha256("".join(f"{e['file']}:{e['sha256']};" for e in self.episodes).encode()).hexdigest()[:16]
        stem = f"{self.split}-{key}"
        paths = {name: cache_dir / f"{stem}-{name}.npy" for name in _CACHE_KEYS}
        files = self._open_cache(paths)
        if files is not None:  # the usual start-up: the headers read, nothing else
            return paths, files
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(cache_dir / f".{stem}.lock", f"the {self.split!r} cache of {self.root} in {cache_dir}"):
            files = self._open_cache(paths)  # built by the process we waited for
            if files is None:
                self._write_cache(cache_dir, stem, paths, progress)
                files = self._open_cache(paths)
        if files is None:  # only if the files changed under us right after the build
            raise UserError(f"cache {cache_dir}: the {self.split!r} files were changed by another process right "
                            "after they were built; run again")
        return paths, files

    def _write_cache(self, cache_dir: Path, stem: str, paths: dict[str, Path],
                     progress: Callable[[int, int], None] | None) -> None:
        """Decode the split into ``paths`` episode by episode, resuming an interrupted build (module docstring).

        Files: ``.<final name>.partial`` (header, then the rows written so far) and ``.<stem>.progress.json``
        (``{"episodes": done, ...}``, replaced atomically after the partial files are fsynced). Run under the
        split's build lock."""
        layout = self._layout()
        partial = {name: cache_dir / f".{paths[name].name}.partial" for name in _CACHE_KEYS}
        record_path = cache_dir / f".{stem}.progress.json"
        headers = {name: _npy_header(shape, dtype) for name, (shape, dtype) in layout.items()}
        row_bytes = {name: int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                     for name, (shape, dtype) in layout.items()}

        def sizes(done: int) -> dict[str, int]:
            """Bytes of each partial file once ``done`` episodes are written."""
            frames = int(self.episode_offsets[done]) if done < len(self.episodes) else self.num_frames
            return {name: len(headers[name]) + frames * row_bytes[name] for name in _CACHE_KEYS}

        done = self._resume_point(record_path, partial, headers, sizes)
        start = sizes(done)
        needed = sum(sizes(len(self.episodes)).values()) - sum(start.values())
        free = shutil.disk_usage(cache_dir).free
        if needed > free:
            raise UserError(f"cache {cache_dir}: the {self.split!r} split of {self.root} decodes to "
                            f"{_size(needed)} more, {_size(free)} are free there; free some space, or put the cache "
                            f"on another disk (${CACHE_ENV}, or cache_dir=)")
        files: dict[str, Any] = {}
        try:
            if done < len(self.episodes):  # (all done: only renames were left when the last build was killed)
                for name in _CACHE_KEYS:
                    if done == 0:  # a fresh build: the header, then rows appended
                        files[name] = open(partial[name], "wb")
                        files[name].write(headers[name])
                    else:  # a resumed one: drop whatever was written after the last progress record
                        files[name] = open(partial[name], "r+b")
                        files[name].truncate(start[name])
                        files[name].seek(start[name])
                if done == 0:
                    record_path.unlink(missing_ok=True)
                unsynced = 0
                for index, rows in enumerate(self._episode_rows(done), start=done):
                    for name in _CACHE_KEYS:
                        files[name].write(np.ascontiguousarray(rows[name]))  # its buffer: no bytes copy
                    unsynced += sum(rows[name].nbytes for name in _CACHE_KEYS)
                    del rows  # the episode's arrays go before the next one is decoded
                    if unsynced >= PROGRESS_EVERY_BYTES or index + 1 == len(self.episodes):
                        self._record_progress(files, record_path, stem, index + 1)
                        unsynced = 0
                    if progress is not None:
                        progress(index + 1, len(self.episodes))
                for f in files.values():
                    f.close()
                files.clear()
            # the final names appear only now, each over a complete file: readers never see a torn cache (a kill
            # between two renames leaves a complete record, and the next build only does the renames left)
            for name in ("prev_action", "revisit", "pose", "reward", "terminated", "obs"):
                if partial[name].exists():
                    os.replace(partial[name], paths[name])
            _fsync_dir(cache_dir)
            record_path.unlink(missing_ok=True)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"no space left on device while building the cache in {cache_dir} (the partial "
                                "files stay: free some space and run again to continue the build, or delete the "
                                "folder)") from error
            raise
        finally:
            for f in files.values():
                f.close()

    def _record_progress(self, files: dict[str, Any], record_path: Path, stem: str, done: int) -> None:
        """fsync the partial files, then record atomically that ``done`` episodes are in them."""
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
        record = {"stem": stem, "episodes": done, "of": len(self.episodes), "frames": self.num_frames,
                  "obs_shape": list(self.obs_shape), "pose_dim": self.pose_dim,
                  "bytes": {name: f.tell() for name, f in files.items()}}
        write_bytes_atomic(record_path, (json.dumps(record) + "\n").encode())

    def _resume_point(self, record_path: Path, partial: dict[str, Path], headers: dict[str, bytes],
                      sizes: Callable[[int], dict[str, int]]) -> int:
        """Episodes an interrupted build has safely written (0: start afresh). The record must describe this
        split's build, and every partial file must hold the right header and at least the recorded bytes."""
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):  # none (a fresh build or a finished one) or unreadable: start afresh
            return 0
        done = record.get("episodes") if isinstance(record, dict) else None
        if not (isinstance(done, int) and 0 < done <= len(self.episodes)):
            return 0
        expected = {"stem": record_path.name[1:].removesuffix(".progress.json"), "of": len(self.episodes),
                    "frames": self.num_frames, "obs_shape": list(self.obs_shape), "pose_dim": self.pose_dim,
                    "bytes": sizes(done)}
        if any(record.get(k) != v for k, v in expected.items()):
            return 0
        layout = self._layout()
        for name, path in partial.items():
            try:
                with open(path, "rb") as f:
                    if f.read(len(headers[name])) != headers[name] or os.fstat(f.fileno()).st_size < sizes(done)[name]:
                        return 0
            except FileNotFoundError:
                # all episodes written and this file already renamed (killed between the renames): fine if whole
                renamed = CachedArray.open(path.parent / path.name[1:].removesuffix(".partial"), *layout[name])
                if done < len(self.episodes) or renamed is None:
                    return 0
                renamed.close()
            except OSError:
                return 0
        return done

    def _gather(self, starts: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``starts[i] + [0, T)`` of every array: (B, T, ...) each."""
        if self._files is not None:
            return {name: self._files[name].read(starts, self.seq_len) for name in _CACHE_KEYS}
        assert self._arrays is not None
        rows = starts[:, None] + np.arange(self.seq_len)  # (B, T) frame rows
        return {name: self._arrays[name][rows] for name in _CACHE_KEYS}  # fancy indexing copies: (B, T, ...)

    def close(self) -> None:
        """Close the cache files (also done when the object is garbage collected)."""
        for array in (self._files or {}).values():
            array.close()

    def __getstate__(self) -> dict[str, Any]:
        # descriptors do not pickle: a spawned DataLoader worker opens the files itself (a forked one shares them)
        state = self.__dict__.copy()
        state["_files"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._cache_paths is not None:
            self._files = self._open_cache(self._cache_paths)
            if self._files is None:
                raise UserError(f"cache {next(iter(self._cache_paths.values())).parent}: the {self.split!r} files "
                                "are gone or damaged (deleted while in use?); run again to rebuild them")

    # -- Dataset ---------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.window_starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = self.window_starts[index]
        return {name: torch.from_numpy(rows[0]) for name, rows in self._gather(np.array([start])).items()}

    def episode_starts(self, count: int | None = None) -> np.ndarray:
        """Indices of the windows that start at an episode's first frame (so "revisit" means "seen earlier in this
        window"); with ``count``, at most that many of them, evenly spread over the episodes."""
        first = np.flatnonzero(np.isin(self.window_starts, self.episode_offsets))
        if count is None or len(first) == 0:
            return first
        return first[np.unique(np.linspace(0, len(first) - 1, min(count, len(first))).round().astype(int))]

    def sample_batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The windows ``index`` (B,) as one batch with the B axis: obs (B, T, H, W, C) uint8, prev_action (B, T)
        int64, revisit (B, T) bool, pose (B, T, D) float32, reward (B, T) float32, terminated (B, T) bool -- the
        same arrays as stacking ``self[i]`` for each i, read in one pass per array (no per-window tensors, no
        stacking), several times faster."""
        index = np.asarray(index)
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise UserError(f"sample_batch: expected a 1-D integer array of window indices, got {index.dtype} "
                            f"{index.shape}")
        if index.size and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"sample_batch: window index out of range [0, {len(self)})")
        return self._gather(self.window_starts[index])


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
