"""Where RolloutWindows caches decoded windows: a per-user cache folder keyed by dataset path and manifest, never
the data folder unless asked; a damaged cached file is rebuilt instead of read; the cache is read through file
descriptors (pickled copies and forked DataLoader workers read the same windows; a file cut while in use is one
clear error); a cache folder too small for the split is refused before anything is written. (Streaming and
resumable builds: tests/test_big_dataset.py.)"""

from __future__ import annotations

import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gtmm.cli import UserError
from rollouts import storage
from rollouts.collect import CollectConfig, collect
from rollouts.dataset import _CACHE_KEYS, RolloutWindows, default_cache_dir, user_cache_root


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
    assert folder.parent == user_cache / "windows" and len(list(folder.glob("all-*.npy"))) == len(_CACHE_KEYS)
    plain = RolloutWindows(dataset, 5, split="all", cache=False)
    assert same_windows(windows, plain)

    # a copy elsewhere gets its own cache folder (same content, other path), and reads the same windows
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns(".gtmm.lock"))
    copied = RolloutWindows(copy, 5, split="all")
    assert default_cache_dir(copy, copied.manifest) != folder and same_windows(copied, plain)
    # cache_dir= overrides it, e.g. the dataset folder itself
    inside = RolloutWindows(copy, 5, split="all", cache_dir=copy / ".cache")
    assert len(list((copy / ".cache").glob("all-*.npy"))) == len(_CACHE_KEYS) and same_windows(inside, plain)
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


def test_pickled_copies_and_forked_workers_read_the_same_windows(dataset, tmp_path):
    windows = RolloutWindows(dataset, 4, split="all", cache_dir=tmp_path / "cache")
    copy = pickle.loads(pickle.dumps(windows))  # what a spawned DataLoader worker gets: it opens the files itself
    assert same_windows(copy, windows)
    # a forked worker shares the descriptors (pread keeps no file position, so sharing is safe)
    loader = DataLoader(windows, batch_size=len(windows), num_workers=1)
    batch = next(iter(loader))
    expected = windows.sample_batch(np.arange(len(windows)))
    assert all(torch.equal(batch[k], torch.from_numpy(expected[k])) for k in expected)


def test_a_cache_file_cut_while_in_use_is_one_clear_error(dataset, tmp_path):
    cache = tmp_path / "cache"
    windows = RolloutWindows(dataset, 4, split="all", cache_dir=cache)
    obs_file = next(cache.glob("all-*-obs.npy"))
    with open(obs_file, "r+b") as f:
        f.truncate(obs_file.stat().st_size // 2)
    with pytest.raises(UserError, match=rf"cache file {obs_file}: read \d+ of \d+ bytes .* shrank while in use"):
        windows.sample_batch(np.array([len(windows) - 1]))
    windows.close()
    # the next run finds the file damaged and rebuilds it
    assert same_windows(RolloutWindows(dataset, 4, split="all", cache_dir=cache),
                        RolloutWindows(dataset, 4, split="all", cache=False))


def test_a_cache_folder_too_small_for_the_split_is_refused_before_writing(dataset, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        cache = mount / "cache"
        with pytest.raises(UserError, match=rf"cache {cache}: the 'all' split of .* decodes to 31.4 kB more, "
                                            r"[0-9.]+ kB are free there; .*\(\$GTMM_CACHE, or cache_dir=\)"):
            RolloutWindows(dataset, 4, split="all", cache_dir=cache)
        assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # nothing written
        subprocess.run(["mount", "-o", "remount,size=4m", str(mount)], check=True)
        assert same_windows(RolloutWindows(dataset, 4, split="all", cache_dir=cache),
                            RolloutWindows(dataset, 4, split="all", cache=False))
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_dataset_without_pose_caches_and_reads(tmp_path):
    """pose_dim 0 (an env that reports no pose): zero-width rows are cached and read like any other."""
    root = tmp_path / "posefree"
    root.mkdir()
    manifest = storage.new_manifest(env_name="synthetic", env_id="synthetic", env_kwargs={}, agent_name="random",
                                    agent_kwargs={}, seed=0, steps_per_episode=5, obs_shape=(4, 4, 1),
                                    num_actions=2, pose_dim=0, episodes_requested=2)
    rng = np.random.default_rng(0)
    for index in range(2):
        episode = {"obs": rng.integers(0, 256, (6, 4, 4, 1), dtype=np.uint8), "action": rng.integers(0, 2, 5),
                   "reward": np.zeros(5, np.float32), "terminated": np.zeros(5, bool),
                   "truncated": np.zeros(5, bool), "pose": np.zeros((6, 0), np.float32),
                   "revisit": rng.random(6) < 0.5, "visit_count": np.zeros(6, np.int32)}
        file = storage.episode_filename(index)
        sha = storage.save_episode(root / file, episode, storage.episode_identity(manifest, index, index, index))
        manifest["episodes"].append(storage.episode_record(index, file, sha, (root / file).stat().st_size, episode,
                                                           env_seed=index, agent_seed=index))
    storage.write_manifest(root, manifest)
    cached = RolloutWindows(root, 3, split="all", cache_dir=tmp_path / "cache")
    assert cached.sample_batch(np.arange(len(cached)))["pose"].shape == (len(cached), 3, 0)
    assert same_windows(cached, RolloutWindows(root, 3, split="all", cache=False))


def test_a_subset_of_episodes_reads_and_caches_only_those(dataset, user_cache):
    full = RolloutWindows(dataset, 5, split="all", cache=False)
    subset = RolloutWindows(dataset, 5, split="all", episodes=[0, 2])
    assert [e["file"] for e in subset.episodes] == [full.episodes[0]["file"], full.episodes[2]["file"]]
    per_episode = len(full) // 3  # equal lengths: the same windows per episode
    index = np.r_[0:per_episode, 2 * per_episode:3 * per_episode]
    a, b = full.sample_batch(index), subset.sample_batch(np.arange(len(subset)))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # its cache is its own (named by its episodes) and two thirds the size of the whole folder's
    folder = default_cache_dir(dataset, full.manifest)
    RolloutWindows(dataset, 5, split="all")
    sizes = {p.name: p.stat().st_size for p in folder.glob("all-*obs.npy")}
    assert len(sizes) == 2 and sorted(sizes.values())[0] < 0.7 * sorted(sizes.values())[1]
    for bad in ([], [2, 0], [0, 3], [1, 1]):
        with pytest.raises(UserError, match=r"split 'all': episodes .*: expected"):
            RolloutWindows(dataset, 5, split="all", episodes=bad)
