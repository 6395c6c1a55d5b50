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


def test_episode_of_another_shape_is_named(tmp_path):
    root = tmp_path / "d"
    write_synthetic(root, [6, 6])
    manifest = storage.read_manifest(root)
    episode = synthetic_episode(np.random.default_rng(5), 6)
    episode["obs"] = np.zeros((7, H + 2, W, C), np.uint8)  # a frame size the folder does not hold
    file = storage.episode_filename(1)
    manifest["episodes"][1]["sha256"] = storage.save_episode(root / file, episode)
    storage.write_manifest(root, manifest)
    with pytest.raises(ValueError, match=r"episode_000001\.npz: obs shape \(10, 8, 1\) differs"):
        RolloutWindows(root, 3, split="all", cache=False)


# ---------------------------------------------------------------------------------------------------------------------
# Collection on the real envs

import os
import signal
import subprocess
import sys
import time

import envs
from envs.mnist_map import ACTION_DELTAS
from rollouts.collect import CollectConfig, collect

REPO = Path(__file__).resolve().parents[1]


def checksums(root: Path) -> dict[str, str]:
    return {p.name: storage.sha256_file(p) for p in sorted(root.glob("*.npz"))} | {
        "manifest": storage.sha256_file(root / "manifest.json")}


def replay_matches(root: Path, env_name: str, env_kwargs: dict) -> None:
    """Every recorded episode is what a fresh env does under the recorded actions, bit for bit."""
    for record, episode in iter_episodes(root):
        env = envs.make(env_name, **env_kwargs)
        obs, info = env.reset(seed=record["env_seed"])
        assert np.array_equal(obs, episode["obs"][0]) and np.array_equal(info["pose"], episode["pose"][0])
        for t, action in enumerate(episode["action"]):
            obs, reward, terminated, truncated, info = env.step(int(action))
            assert np.array_equal(obs, episode["obs"][t + 1]), f"{record['file']} step {t}"
            assert np.array_equal(info["pose"], episode["pose"][t + 1])
            assert info["revisit"] == episode["revisit"][t + 1] and info["visit_count"] == episode["visit_count"][t + 1]
        env.close()


@pytest.mark.parametrize("agent", ["random", "loop", "explore"])
def test_collect_mnist_map_bit_exact(tmp_path, agent):
    steps = 24
    summary = collect(CollectConfig(env="mnist_map", agent=agent, episodes=3, steps=steps, out=tmp_path / "d",
                                    workers=2, progress=False, env_kwargs='{"grid": 4}'))
    assert summary["episodes"] == 3 and summary["steps"] == 3 * steps
    manifest = storage.read_manifest(tmp_path / "d")
    assert manifest["env"] == {"name": "mnist_map", "id": "MnistMap-v0", "kwargs": {"grid": 4, "max_steps": steps},
                               "inverse_actions": [1, 0, 3, 2],
                               "action_effects": {"kind": "translate", "moves": [[-14, 0], [14, 0], [0, -14], [0, 14]],
                                                  "exact": False, "extent": [84, 84]}}  # grid 4: 112 - 28
    assert manifest["obs_shape"] == [28, 28, 1] and manifest["num_actions"] == 4 and manifest["pose_dim"] == 2
    for record, episode in iter_episodes(tmp_path / "d"):
        assert episode["obs"].shape == (steps + 1, 28, 28, 1) and episode["truncated"][-1]
        # obs[t] is the crop of the episode's map at pose[t], and pose[t+1] follows action[t] (14 px per move)
        env = envs.make("mnist_map", grid=4, max_steps=steps)
        env.reset(seed=record["env_seed"])
        digit_map = env.unwrapped.map
        for t in range(steps + 1):
            r, c = episode["pose"][t].astype(int)
            assert np.array_equal(episode["obs"][t, :, :, 0], digit_map[r:r + 28, c:c + 28])
        moved = episode["pose"][:-1] + 14 * ACTION_DELTAS[episode["action"]]
        expected = np.clip(moved, 0, digit_map.shape[0] - 28)
        assert np.array_equal(episode["pose"][1:], expected)
    replay_matches(tmp_path / "d", "mnist_map", {"grid": 4, "max_steps": steps})
    # the same command with another worker count writes the same bytes
    collect(CollectConfig(env="mnist_map", agent=agent, episodes=3, steps=steps, out=tmp_path / "e", workers=1,
                          progress=False, env_kwargs='{"grid": 4}'))
    assert checksums(tmp_path / "d") == checksums(tmp_path / "e")


def test_collect_miniworld_processes_match_one_process(tmp_path):
    kwargs = '{"obs_size": 16}'
    for name, workers in (("one", 1), ("two", 2)):
        collect(CollectConfig(env="miniworld", agent="explore", episodes=3, steps=10, out=tmp_path / name,
                              workers=workers, progress=False, env_kwargs=kwargs,
                              agent_kwargs='{"explore_steps": 4}'))
    assert checksums(tmp_path / "one") == checksums(tmp_path / "two")
    manifest = storage.read_manifest(tmp_path / "one")
    assert manifest["obs_shape"] == [16, 16, 3] and manifest["pose_dim"] == 3
    replay_matches(tmp_path / "one", "miniworld", manifest["env"]["kwargs"])
    windows = RolloutWindows(tmp_path / "one", 5, split="all", cache=False)
    assert windows[0]["obs"].shape == (5, 16, 16, 3) and windows[0]["pose"].shape == (5, 3)


def collect_cmd(out: Path, episodes: int) -> list[str]:
    return [sys.executable, "-m", "rollouts.collect", "--env", "mnist_map", "--agent", "loop", "--episodes",
            str(episodes), "--steps", "64", "--seed", "7", "--out", str(out), "--no-progress"]


def test_sigkill_midway_then_resume_gives_the_same_dataset(tmp_path):
    episodes = 150
    full, killed = tmp_path / "full", tmp_path / "killed"
    collect(CollectConfig(env="mnist_map", agent="loop", episodes=episodes, steps=64, seed=7, out=full, progress=False))

    process = subprocess.Popen(collect_cmd(killed, episodes), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(killed.glob("episode_*.npz"))) < 5:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = len(list(killed.glob("episode_*.npz")))
    assert 5 <= written < episodes, f"the kill should land midway, found {written} episodes"
    partial = storage.read_manifest(killed)  # the manifest is always whole (atomic), possibly some waves behind
    assert len(partial["episodes"]) <= written

    result = subprocess.run(collect_cmd(killed, episodes), cwd=REPO, check=True, capture_output=True, text=True)
    assert f"{episodes} episodes" in result.stdout
    assert checksums(killed) == checksums(full)
    assert not list(killed.glob(".*.tmp"))


def test_corrupt_file_and_foreign_folder_are_refused(tmp_path):
    out = tmp_path / "d"
    config = CollectConfig(env="mnist_map", agent="random", episodes=3, steps=8, out=out, progress=False)
    collect(config)
    before = checksums(out)
    # another env (or env kwargs, agent, seed) into the same folder: refused, nothing touched
    for change in (dict(env="miniworld"), dict(env_kwargs='{"grid": 4}'), dict(agent="loop"), dict(seed=1)):
        with pytest.raises(ValueError, match="collect into another --out"):
            collect(CollectConfig(**{**config.__dict__, **change}))
    assert checksums(out) == before
    # a damaged episode: collect (resume) and the dataset both name it; the file is left as it is
    target = out / storage.episode_filename(2)
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    damaged = storage.sha256_file(target)
    with pytest.raises(ValueError, match=r"episode_000002\.npz is corrupt"):
        collect(config)
    with pytest.raises(ValueError, match=r"episode_000002\.npz is corrupt"):
        RolloutWindows(out, 4, cache_dir=tmp_path / "cache")
    assert storage.sha256_file(target) == damaged
    # deleting it and re-running rewrites it identically
    target.unlink()
    collect(config)
    assert checksums(out) == before
    # a folder with other files and no manifest is not written into
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        collect(CollectConfig(**{**config.__dict__, "out": tmp_path / "other"}))
    with pytest.raises(ValueError, match="--env-kwargs"):
        collect(CollectConfig(**{**config.__dict__, "env_kwargs": "{grid: 4"}))


def test_inspect_prints_stats_and_writes_marked_gif(tmp_path, capsys):
    import imageio.v2 as imageio

    from rollouts.inspect import InspectConfig, inspect, mark_frames

    collect(CollectConfig(env="mnist_map", agent="loop", episodes=2, steps=20, out=tmp_path / "d", progress=False))
    stats = inspect(InspectConfig(root=tmp_path / "d", episode=1, gif=tmp_path / "ep.gif", scale=2))
    printed = capsys.readouterr().out
    assert "episodes 2 (of 2 requested), steps 40" in printed and "revisit share" in printed
    assert stats["verified"] == 2 and stats["bytes"] > 0
    frames = imageio.mimread(tmp_path / "ep.gif")
    assert frames[0].shape[:2] == (28 * 2 + 4, 28 * 2 + 4)
    _, episode = list(iter_episodes(tmp_path / "d"))[1]
    marked = mark_frames(episode["obs"], episode["revisit"], 2)
    assert np.array_equal(marked[episode["revisit"], 0, 0], np.tile([230, 30, 30], (episode["revisit"].sum(), 1)))
    assert not np.array_equal(marked[~episode["revisit"], 0, 0][:1], [[230, 30, 30]])
    with pytest.raises(ValueError, match="--episode 5"):
        inspect(InspectConfig(root=tmp_path / "d", episode=5, verify=False))


def test_minari_export_is_lossless(tmp_path, monkeypatch):
    minari = pytest.importorskip("minari")
    from rollouts.export import export_minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "unused"))
    collect(CollectConfig(env="mnist_map", agent="explore", episodes=3, steps=12, out=tmp_path / "d", progress=False,
                          env_kwargs='{"window": 32, "grid": 4}'))  # 32x32: Minari would JPEG these by default
    dataset = export_minari(tmp_path / "d", tmp_path / "minari", "test/mnist-explore-v0")
    assert (tmp_path / "minari" / "test" / "mnist-explore-v0").is_dir() and not (tmp_path / "unused").exists()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    loaded = minari.load_dataset("test/mnist-explore-v0")
    assert loaded.total_episodes == dataset.total_episodes == 3
    for exported, (record, episode) in zip(loaded.iterate_episodes(), iter_episodes(tmp_path / "d")):
        assert np.array_equal(exported.observations, episode["obs"])  # bit-exact: no JPEG
        assert np.array_equal(exported.actions, episode["action"])
        assert np.array_equal(exported.infos["revisit"], episode["revisit"])
        assert np.array_equal(exported.infos["pose"], episode["pose"])
    with pytest.raises(ValueError, match="already exists"):
        export_minari(tmp_path / "d", tmp_path / "minari", "test/mnist-explore-v0")
    with pytest.raises(ValueError, match="--dataset-id"):
        export_minari(tmp_path / "d", tmp_path / "minari", "no version")
