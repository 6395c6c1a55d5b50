"""Where RolloutWindows caches decoded windows: a per-user cache folder keyed by dataset path and manifest, never
the data folder unless asked; a damaged cached file is rebuilt instead of read."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rollouts import storage
from rollouts.collect import CollectConfig, collect
from rollouts.dataset import RolloutWindows, default_cache_dir, user_cache_root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "mnist_map"
    collect(CollectConfig(env="mnist_map", agent="random", episodes=3, steps=12, out=root, progress=False))
    return root


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def same_windows(a: RolloutWindows, b: RolloutWindows) -> bool:
    index = np.arange(len(a))
    batch_a, batch_b = a.sample_batch(index), b.sample_batch(index)
    return len(a) == len(b) and all(np.array_equal(batch_a[k], batch_b[k]) for k in batch_a)


def test_default_cache_is_per_user_and_keyed_by_path_and_manifest(dataset, tmp_path, user_cache):
    before = listing(dataset)
    windows = RolloutWindows(dataset, 5, split="all")
    assert listing(dataset) == before, "the data folder is left as collected"
    folder = default_cache_dir(dataset, windows.manifest)
    assert folder.parent == user_cache / "windows" and len(list(folder.glob("all-*.npy"))) == 4
    plain = RolloutWindows(dataset, 5, split="all", cache=False)
    assert same_windows(windows, plain)

    # a copy elsewhere gets its own cache folder (same content, other path), and reads the same windows
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns(".gtmm.lock"))
    copied = RolloutWindows(copy, 5, split="all")
    assert default_cache_dir(copy, copied.manifest) != folder and same_windows(copied, plain)
    # cache_dir= overrides it, e.g. the dataset folder itself
    inside = RolloutWindows(copy, 5, split="all", cache_dir=copy / ".cache")
    assert len(list((copy / ".cache").glob("all-*.npy"))) == 4 and same_windows(inside, plain)
    # an edited manifest (here: the recorded seed) keys a fresh cache folder
    manifest = storage.read_manifest(copy)
    manifest["seed"] = int(manifest["seed"]) + 1
    storage.write_manifest(copy, manifest)
    assert default_cache_dir(copy, storage.read_manifest(copy)) != default_cache_dir(copy, copied.manifest)


def test_damaged_cached_file_is_rebuilt_not_read(dataset, tmp_path):
    cache = tmp_path / "cache"
    first = RolloutWindows(dataset, 4, split="all", cache_dir=cache)
    obs_file = next(cache.glob("all-*-obs.npy"))
    del first
    data = obs_file.read_bytes()
    obs_file.write_bytes(data[: len(data) // 2])  # truncated: a crash of another tool, or a foreign file
    again = RolloutWindows(dataset, 4, split="all", cache_dir=cache)
    assert obs_file.stat().st_size == len(data)
    assert same_windows(again, RolloutWindows(dataset, 4, split="all", cache=False))
    assert torch.equal(again[0]["obs"], torch.from_numpy(again.sample_batch(np.array([0]))["obs"][0]))


def test_user_cache_root_follows_gtmm_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("GTMM_CACHE", str(tmp_path / "mine"))
    assert user_cache_root() == tmp_path / "mine"
    monkeypatch.delenv("GTMM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_root() == tmp_path / "xdg" / "gtmm"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid per the XDG spec: ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_root() == tmp_path / "home" / ".cache" / "gtmm"
