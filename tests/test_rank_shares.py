"""Under torchrun each rank samples only its own share of the training episodes (`worldmodel.train.RolloutSource`):
one rank draws exactly what the unsharded sampler drew, two ranks draw disjoint episodes that together cover the
split, and `torchrun --nproc_per_node 2` trains on the CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gtmm.cli import UserError
from rollouts import storage
from worldmodel.train import RolloutSource, batch_rng

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 4


def write_episodes(root: Path, lengths: list[int]) -> Path:
    """A rollout folder of numpy-made episodes whose pose[:, 0] is the episode's index (so a drawn window names its
    episode)."""
    rng = np.random.default_rng(0)
    manifest = storage.new_manifest(env_name="synthetic", env_id="synthetic", env_kwargs={}, agent_name="random",
                                    agent_kwargs={}, seed=0, steps_per_episode=max(lengths), obs_shape=(4, 4, 1),
                                    num_actions=4, pose_dim=2, episodes_requested=len(lengths))
    root.mkdir(parents=True)
    for index, steps in enumerate(lengths):
        pose = np.stack([np.full(steps + 1, index), rng.normal(size=steps + 1)], axis=1).astype(np.float32)
        episode = {"obs": rng.integers(0, 256, (steps + 1, 4, 4, 1), dtype=np.uint8),
                   "action": rng.integers(0, 4, steps).astype(np.int64), "reward": np.zeros(steps, np.float32),
                   "terminated": np.zeros(steps, bool), "truncated": np.zeros(steps, bool), "pose": pose,
                   "revisit": rng.random(steps + 1) < 0.5, "visit_count": np.zeros(steps + 1, np.int32)}
        file = storage.episode_filename(index)
        sha = storage.save_episode(root / file, episode, storage.episode_identity(manifest, index, index, index))
        manifest["episodes"].append(storage.episode_record(index, file, sha, (root / file).stat().st_size, episode,
                                                           env_seed=index, agent_seed=index))
    storage.write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> RolloutSource:
    """7 episodes of different lengths, 1 held out for validation: 6 training episodes."""
    root = write_episodes(tmp_path_factory.mktemp("shares") / "data", [9, 5, 12, 3, 7, 10, 6])
    return RolloutSource(str(root), seq_len=SEQ_LEN, val_fraction=0.1, seed=0)


def test_one_rank_draws_exactly_what_the_unsharded_sampler_drew(source):
    # the sampler before shares: rng.integers(len(windows)) then one gather; runs and checkpoints resume unchanged
    for step in range(50):
        got = source.sample(5, batch_rng(3, 0, step), rank=0, world=1)
        before = source.windows.sample_batch(batch_rng(3, 0, step).integers(len(source.windows), size=5))
        assert got.keys() == before.keys()
        for key in got:
            assert got[key].dtype == before[key].dtype and got[key].tobytes() == before[key].tobytes(), key
        default = source.sample(5, batch_rng(3, 0, step))  # rank 0 of 1 is the default
        assert all(default[k].tobytes() == got[k].tobytes() for k in got)


def test_two_ranks_draw_disjoint_episodes_that_cover_the_split(source):
    train_episodes = {int(e["index"]) for e in source.windows.episodes}
    assert len(train_episodes) == 6
    seen = []
    for rank in range(2):
        episodes: set[int] = set()
        for step in range(200):
            batch = source.sample(4, batch_rng(0, rank, step), rank=rank, world=2)
            episodes |= set(np.unique(batch["pose"][..., 0]).astype(int).tolist())
            # a pure function of (seed, rank, step): drawing it again gives the same bytes (exact resume)
            if step % 50 == 0:
                again = source.sample(4, batch_rng(0, rank, step), rank=rank, world=2)
                assert all(again[k].tobytes() == batch[k].tobytes() for k in batch)
        seen.append(episodes)
    assert seen[0] and seen[1] and not seen[0] & seen[1], seen
    assert seen[0] | seen[1] == train_episodes  # 200 batches reach every episode of each share
    # the shares partition the windows
    shares = [source.share(r, 3) for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(len(source.windows)))


def test_a_rank_without_episodes_is_a_user_error(source):
    with pytest.raises(UserError, match=r"--data .*6 training episode\(s\) for 7 ranks: rank 6 gets no episode"):
        source.share(6, 7)
    with pytest.raises(ValueError, match="rank 2 of world 2"):
        source.share(2, 2)


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_train(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "rollouts.collect", "--env", "mnist_map", "--out", str(data),
                    "--episodes", "6", "--steps", "9", "--seed", "0", "--env-kwargs", json.dumps({"grid": 2}),
                    "--no-progress"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=240)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "worldmodel.train", "--preset", "debug", "--data", str(data),
                           "--out", str(tmp_path / "ddp"), "--steps", "5", "--threads", "1", "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 5 and result["skipped"] == 0
    assert "x2" in proc.stdout  # rank 0's banner: the device times the world size
