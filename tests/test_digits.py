"""The digit loader: the embedded MNIST 5k split and IDX folders, including the errors on malformed files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from envs import digits
from envs.digits import load_digits, read_idx, split_indices_5k, write_idx


def test_mnist5k_split_is_balanced_and_disjoint():
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    assert train_x.shape == (4000, 28, 28) and train_x.dtype == np.uint8
    assert test_x.shape == (1000, 28, 28) and test_x.dtype == np.uint8
    assert train_y.dtype == np.int64 and test_y.dtype == np.int64
    assert np.bincount(train_y, minlength=10).tolist() == [400] * 10
    assert np.bincount(test_y, minlength=10).tolist() == [100] * 10
    # Disjoint by index, and really different images (no test digit is a copy of a train digit).
    _, all_labels = digits._mnist5k()
    train_idx, test_idx = split_indices_5k(all_labels, "train"), split_indices_5k(all_labels, "test")
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    assert len(set(train_idx.tolist()) | set(test_idx.tolist())) == 5000
    train_bytes = {image.tobytes() for image in train_x}
    assert not any(image.tobytes() in train_bytes for image in test_x)
    # Real digits: ink on a black background, labels matching the class means roughly (a 1 has less ink than a 0).
    assert train_x.max() == 255 and np.median(train_x) == 0
    ink = [train_x[train_y == d].mean() for d in range(10)]
    assert ink[1] < ink[0] and ink[1] == min(ink)


def test_arrays_are_cached_and_read_only():
    a, _ = load_digits("train")
    b, _ = load_digits("train", "mnist5k")
    assert a is b
    with pytest.raises(ValueError):
        a[0, 0, 0] = 1  # a write into the shared cache must fail


def _write_folder(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, size: int = 28) -> tuple:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_round_trip(tmp_path, gz):
    arrays = _write_folder(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = load_digits(split, tmp_path)
        np.testing.assert_array_equal(images, arrays[prefix][0])
        np.testing.assert_array_equal(labels, arrays[prefix][1])
        assert images.dtype == np.uint8 and labels.dtype == np.int64


def test_idx_header_is_standard(tmp_path):
    """Bytes as the original MNIST files have them: magic 0x00000803, then big-endian uint32 dimensions."""
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x-idx3-ubyte", images)
    raw = (tmp_path / "x-idx3-ubyte").read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 3])
    assert raw[4:16] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    assert raw[16:] == images.tobytes()
    floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)
    write_idx(tmp_path / "f.idx.gz", floats)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx.gz"), floats)


def test_fashion_source_reads_the_debian_folder(tmp_path, monkeypatch):
    arrays = _write_folder(tmp_path)
    monkeypatch.setattr(digits, "FASHION_DIR", tmp_path)
    digits._load_cached.cache_clear()
    try:
        images, _ = load_digits("test", "fashion")
        np.testing.assert_array_equal(images, arrays["t10k"][0])
        monkeypatch.setattr(digits, "FASHION_DIR", tmp_path / "absent")
        digits._load_cached.cache_clear()
        with pytest.raises(ValueError, match="dataset-fashion-mnist"):
            load_digits("train", "fashion")
    finally:
        digits._load_cached.cache_clear()


def _corrupt(path: Path, new_bytes: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(new_bytes)


def _raw(path: Path) -> bytes:
    with gzip.open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: b"\x00\x00\x07\x03" + raw[4:], "bad IDX magic"),
        (lambda raw: b"\x01\x02\x08\x03" + raw[4:], "bad IDX magic"),
        (lambda raw: raw[:-10], "truncated"),
        (lambda raw: raw[:10], "truncated IDX header"),
        (lambda raw: raw + b"\x00" * 3, "trailing bytes"),
        (lambda raw: b"\x00\x00", "shorter than the 4-byte magic"),
    ],
)
def test_malformed_idx_names_the_file(tmp_path, damage, message):
    _write_folder(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _corrupt(path, damage(_raw(path)))
    with pytest.raises(ValueError, match=message) as error:
        load_digits("train", tmp_path)
    assert str(path) in str(error.value)


def test_idx_errors_on_folder_level_problems(tmp_path):
    _write_folder(tmp_path)
    # Images and labels disagree on the count.
    labels_path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(labels_path, np.zeros(7, dtype=np.uint8))
    with pytest.raises(ValueError, match="12 images but .*7 labels"):
        load_digits("train", tmp_path)
    # Labels stored as images (wrong number of dimensions).
    write_idx(labels_path, np.zeros((12, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: expected labels of shape \(N,\)"):
        load_digits("train", tmp_path)
    # A gzip name on a file that is not gzip.
    labels_path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: cannot read file"):
        load_digits("train", tmp_path)
    # A missing file names what was looked for.
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        load_digits("test", tmp_path)


def test_unknown_split_and_source():
    with pytest.raises(ValueError, match="unknown digit split 'val'"):
        load_digits("val")
    with pytest.raises(ValueError, match="not a folder"):
        load_digits("train", "/nonexistent/mnist")


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip_every_type(tmp_path, dtype):
    array = (np.arange(24) - 7).astype(dtype).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", array)
    back = read_idx(tmp_path / "a.idx")
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    with pytest.raises(ValueError, match="a.idx: IDX cannot store dtype int64"):
        write_idx(tmp_path / "a.idx", array.astype(np.int64))
