"""Storage and dataset on synthetic episodes, then collect/inspect/export end to end on the real envs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rollouts import storage
from rollouts.dataset import RolloutWindows, iter_episodes, split_episodes

H, W, C, D, A = 8, 8, 1, 2, 4


def synthetic_episode(rng: np.random.Generator, steps: int) -> dict[str, np.ndarray]:
    """Frames whose first pixel encodes the frame index, so windows can be checked against their source."""
    obs = rng.integers(0, 256, size=(steps + 1, H, W, C), dtype=np.uint8)
    return {
        "obs": obs,
        "action": rng.integers(0, A, size=steps).astype(np.int64),
        "reward": rng.normal(size=steps).astype(np.float32),
        "terminated": np.zeros(steps, bool),
        "truncated": np.arange(steps) == steps - 1,
        "pose": rng.normal(size=(steps + 1, D)).astype(np.float32),
        "revisit": rng.random(steps + 1) < 0.3,
        "visit_count": rng.integers(0, 3, size=steps + 1).astype(np.int32),
    }


def write_synthetic(root: Path, lengths: list[int], seed: int = 0) -> list[dict[str, np.ndarray]]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = storage.new_manifest(env_name="synthetic", env_id="Synthetic-v0", env_kwargs={}, agent_name="random",
                                    agent_kwargs={}, seed=seed, steps_per_episode=max(lengths), obs_shape=(H, W, C),
                                    num_actions=A, pose_dim=D, episodes_requested=len(lengths))
    episodes = []
    for index, steps in enumerate(lengths):
        episode = synthetic_episode(rng, steps)
        file = storage.episode_filename(index)
        sha = storage.save_episode(root / file, episode)
        manifest["episodes"].append(storage.episode_record(index, file, sha, (root / file).stat().st_size, episode))
        episodes.append(episode)
    storage.write_manifest(root, manifest)
    return episodes


def test_save_load_roundtrip_is_bit_exact_and_deterministic(tmp_path):
    episode = synthetic_episode(np.random.default_rng(1), 20)
    sha_a = storage.save_episode(tmp_path / "a.npz", episode)
    sha_b = storage.save_episode(tmp_path / "b.npz", episode)
    assert sha_a == sha_b, "same arrays must give the same bytes (fixed zip timestamps)"
    loaded = storage.load_episode(tmp_path / "a.npz", sha256=sha_a)
    for key, array in episode.items():
        assert loaded[key].dtype == array.dtype and np.array_equal(loaded[key], array), key
    assert not list(tmp_path.glob("*.tmp")), "atomic writes leave no temp files"


def test_save_rejects_misaligned_episode(tmp_path):
    episode = synthetic_episode(np.random.default_rng(1), 5)
    episode["pose"] = episode["pose"][:-1]
    with pytest.raises(ValueError, match="'pose' has 5 entries, expected 6"):
        storage.save_episode(tmp_path / "bad.npz", episode)
    assert not (tmp_path / "bad.npz").exists()


def test_windows_shapes_alignment_and_split(tmp_path):
    lengths = [15, 9, 30, 3, 12, 20, 15, 15, 15, 15]
    episodes = write_synthetic(tmp_path / "data", lengths)
    seq_len = 6
    train = RolloutWindows(tmp_path / "data", seq_len, split="train", val_fraction=0.2, seed=3)
    val = RolloutWindows(tmp_path / "data", seq_len, split="val", val_fraction=0.2, seed=3)
    train_files = {e["file"] for e in train.episodes}
    val_files = {e["file"] for e in val.episodes}
    assert len(val_files) == 2 and len(train_files) == 8 and not (train_files & val_files)
    assert (train.obs_shape, train.num_actions, train.pose_dim, train.env_name) == ((H, W, C), A, D, "synthetic")
    # the same seed gives the same split, another seed (almost surely) another one
    again = RolloutWindows(tmp_path / "data", seq_len, split="val", val_fraction=0.2, seed=3)
    assert {e["file"] for e in again.episodes} == val_files

    expected_windows = sum(max(0, n + 1 - seq_len + 1) for e, n in zip(range(10), lengths)
                           if storage.episode_filename(e) in train_files)
    assert len(train) == expected_windows
    for dataset in (train, val):
        for i in range(len(dataset)):
            item = dataset[i]
            assert item["obs"].shape == (seq_len, H, W, C) and item["obs"].dtype == torch.uint8
            assert item["prev_action"].shape == (seq_len,) and item["prev_action"].dtype == torch.int64
            assert item["revisit"].dtype == torch.bool and item["pose"].shape == (seq_len, D)
            assert item["pose"].dtype == torch.float32
    # every window equals the source episode's slice, prev_action[t] = action[t-1] and -1 at the episode start
    offsets = dict(zip((e["index"] for e in train.episodes), train.episode_offsets))
    for i, start in enumerate(train.window_starts):
        index = max(k for k, off in offsets.items() if off <= start)
        t0 = int(start - offsets[index])
        episode, item = episodes[index], train[i]
        assert np.array_equal(item["obs"].numpy(), episode["obs"][t0:t0 + seq_len])
        assert np.array_equal(item["revisit"].numpy(), episode["revisit"][t0:t0 + seq_len])
        assert np.array_equal(item["pose"].numpy(), episode["pose"][t0:t0 + seq_len])
        prev = np.concatenate([[-1], episode["action"]])[t0:t0 + seq_len]
        assert np.array_equal(item["prev_action"].numpy(), prev)
        if t0 == 0:
            assert item["prev_action"][0] == -1
    # the memory-mapped cache and the in-memory path agree, and the dataset survives pickling (DataLoader workers)
    plain = RolloutWindows(tmp_path / "data", seq_len, split="train", val_fraction=0.2, seed=3, cache=False)
    import pickle
    clone = pickle.loads(pickle.dumps(train))
    for i in (0, len(train) // 2, len(train) - 1):
        for key in ("obs", "prev_action", "revisit", "pose"):
            assert torch.equal(plain[i][key], train[i][key]) and torch.equal(clone[i][key], train[i][key])
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4, shuffle=True)))
    assert batch["obs"].shape == (4, seq_len, H, W, C)


def test_split_never_empty_and_all(tmp_path):
    write_synthetic(tmp_path / "d", [5, 5, 5])
    manifest = storage.read_manifest(tmp_path / "d")
    assert len(split_episodes(manifest, "val", 0.1)) == 1
    assert len(split_episodes(manifest, "train", 0.1)) == 2
    assert len(split_episodes(manifest, "all")) == 3
    assert len(list(iter_episodes(tmp_path / "d"))) == 3
    with pytest.raises(ValueError, match="split 'test'"):
        split_episodes(manifest, "test")


def test_corrupt_missing_and_wrong_version_give_clear_errors(tmp_path):
    root = tmp_path / "d"
    write_synthetic(root, [6, 6, 6])
    target = root / storage.episode_filename(1)
    data = bytearray(target.read_bytes())
    data[200] ^= 0xFF  # inside the compressed frames of the first zip entry
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"episode_000001\.npz is corrupt"):
        RolloutWindows(root, 4, split="all", cache=False)
    with pytest.raises(ValueError, match="unreadable"):
        storage.load_episode(target)  # without a checksum, the damaged zip itself is reported
    target.unlink()
    with pytest.raises(ValueError, match=r"episode_000001\.npz is missing"):
        list(iter_episodes(root))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format_version"] = 99
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format_version"):
        RolloutWindows(root, 4)
    with pytest.raises(ValueError, match="not a rollout folder"):
        RolloutWindows(tmp_path / "nowhere", 4)
