"""Reproducible dreams (issue #15 item 4): dream i's randomness depends on its own seed only, not on the batch.

`DreamBatch` seeds every dream's context choice and its prior noise (its own numpy generator) from that dream's
reset seed. What is NOT bit-exact is the batched float32 arithmetic itself: CPU GEMM kernels (MKL here) round a row
differently for different batch sizes (measured: a state differs by ~1e-6 between batch 1 and 2 from the first
context step on, so a decoded pixel can land one grey level apart). So these tests require everything random to be
identical (same context episodes, same actions, the same real context frames) and the dreamed frames to agree within
one grey level -- the old batch-wide noise made them differ by up to 254 from the first dreamed frame. `collect --env
dream` steps each dream as its own 1-dream env, so its files are byte-identical for any `--workers`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import envs  # noqa: F401  (registers Dream-v0)
from rollouts.collect import CollectConfig, collect
from rollouts.storage import load_episode, read_manifest
from worldmodel.dream import DreamVectorEnv

CHECKPOINT = "pretrained:mnist_map"  # shipped model: no training in these tests
STEPS = 16  # dreamed steps per episode
TOLERANCE = 1  # grey levels: float rounding of batch-size-dependent GEMM kernels, see the module docstring

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A tiny wrap-border MNIST-map folder of 48-frame episodes (the shipped model's 8 context frames fit)."""
    out = tmp_path_factory.mktemp("dream_repro") / "maps"
    collect(CollectConfig(env="mnist_map", agent="loop", episodes=4, steps=47, out=out,
                          env_kwargs='{"border": "wrap"}', progress=False))
    return out


def dream_frames(data: Path, seeds: list[int], temperature: float) -> tuple[np.ndarray, int]:
    """Dream 0's frames (T+1, H, W, C) in a batch of len(seeds) dreams, all taking the same actions; its episode."""
    vec = DreamVectorEnv(CHECKPOINT, len(seeds), data=str(data), max_steps=STEPS, temperature=temperature,
                         device="cpu")
    obs, _ = vec.reset(seed=seeds)
    frames = [obs[0].copy()]
    rng = np.random.default_rng(0)
    for _ in range(STEPS - 1):
        obs, *_ = vec.step(np.full(len(seeds), rng.integers(4)))
        frames.append(obs[0].copy())
    episode = vec.dreams.tracks[0].episode_index
    vec.close()
    return np.stack(frames), episode


def assert_close(a: np.ndarray, b: np.ndarray, what: str) -> None:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= TOLERANCE, f"{what}: frames differ by up to {diff.max()} grey levels"


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_a_dream_does_not_depend_on_its_batch(data, temperature):
    """Dream 0 reset with s0 dreams the same in a batch of 1, of 2 ([s0, s1]) and of 3 with other neighbours."""
    alone, episode = dream_frames(data, [11], temperature)
    for seeds in ([11, 12], [11, 5, 3]):
        batched, batched_episode = dream_frames(data, seeds, temperature)
        assert batched_episode == episode
        np.testing.assert_array_equal(batched[0], alone[0])  # the last real context frame
        assert_close(batched, alone, f"seeds {seeds} vs [11], temperature {temperature}")
    # and the noise is really the dream's own: another seed picks other samples (or another episode)
    other, _ = dream_frames(data, [12], temperature)
    assert np.abs(other.astype(np.int16) - alone.astype(np.int16)).max() > 10


def test_collect_dreams_same_for_1_and_2_workers(data, tmp_path):
    """`collect --env dream` with --workers 1 and 2: byte-identical episode files, as for the real envs."""
    env_kwargs = json.dumps({"checkpoint": CHECKPOINT, "data": str(data), "device": "cpu", "max_steps": STEPS})
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        collect(CollectConfig(env="dream", env_kwargs=env_kwargs, agent="loop", episodes=4, steps=STEPS,
                              workers=workers, out=out, progress=False))
        runs[workers] = out
    m1, m2 = read_manifest(runs[1]), read_manifest(runs[2])
    same_sha = 0
    for r1, r2 in zip(m1["episodes"], m2["episodes"]):
        assert (r1["index"], r1["env_seed"], r1["agent_seed"]) == (r2["index"], r2["env_seed"], r2["agent_seed"])
        e1, e2 = load_episode(runs[1] / r1["file"]), load_episode(runs[2] / r2["file"])
        np.testing.assert_array_equal(e1["action"], e2["action"])
        np.testing.assert_array_equal(e1["obs"][0], e2["obs"][0])  # the real context frame: same episode picked
        np.testing.assert_array_equal(e1["obs"], e2["obs"])
        same_sha += r1["sha256"] == r2["sha256"]
    # collect steps each dream as its own 1-dream env (rollouts.collect.make_collector_env), so no batch rounding
    assert same_sha == len(m1["episodes"]) == 4


def test_normal_noise_is_standard_normal_and_per_row():
    """The dreams' counter-based noise: standard normal in distribution, a row depends on its key and counter only
    (not on the other rows), and successive counters give fresh draws."""
    from scipy import stats

    from worldmodel.dream import normal_noise

    keys = np.random.default_rng(0).integers(0, 2**63, 256).astype(np.uint64)
    counts = np.zeros(256, dtype=np.uint64)
    draws = normal_noise(keys, counts + np.uint64(3), 400)  # (256, 400)
    assert draws.dtype == np.float32 and draws.shape == (256, 400) and np.isfinite(draws).all()
    assert stats.kstest(draws.ravel(), "norm").pvalue > 1e-3
    assert abs(draws.mean()) < 0.01 and abs(draws.std() - 1) < 0.01
    alone = normal_noise(keys[7:8], counts[7:8] + np.uint64(3), 400)
    np.testing.assert_array_equal(alone[0], draws[7])  # its own key and counter, whatever the batch
    first, second = normal_noise(keys, counts, 16), normal_noise(keys, counts + np.uint64(1), 16)
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.05 and not np.array_equal(first, second)
