"""The reward and termination heads (issue 15): they learn a constructed reward, and a dream reads them."""

from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import torch

from gtmm.cli import UserError
from worldmodel.config import preset
from worldmodel.model import GTMM, batch_to_torch


def tiny_model(reward_head: bool = True) -> GTMM:
    train_cfg = dataclasses.replace(preset("debug"), address="hidden", reward_head=reward_head)
    return GTMM(train_cfg.model_config((12, 12, 1), num_actions=4, pose_dim=2))


def constructed_batch(rng: np.random.Generator, B: int = 8, T: int = 10) -> dict[str, torch.Tensor]:
    """Frames whose brightness says the reward: reward 1 and termination on bright frames, else 0."""
    bright = rng.random((B, T)) < 0.3
    obs = np.where(bright[..., None, None, None], 220, 20).astype(np.uint8) * np.ones((B, T, 12, 12, 1), np.uint8)
    return batch_to_torch({"obs": obs, "prev_action": rng.integers(0, 4, (B, T)), "revisit": np.zeros((B, T), bool),
                           "pose": np.zeros((B, T, 2), np.float32), "reward": bright.astype(np.float32),
                           "terminated": bright}, "cpu")


def test_the_reward_head_learns_a_constructed_reward(one_thread):
    torch.manual_seed(0)
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    history = []
    for _ in range(80):
        out = model(constructed_batch(rng))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append((float(out["reward_mse"]), float(out["done_bce"])))
    first, last = np.mean(history[:5], axis=0), np.mean(history[-5:], axis=0)
    assert last[0] < 0.25 * first[0] and last[1] < 0.5 * first[1], (first, last)
    # the dream side: after observing a bright frame the head says "reward", after a dark one it does not
    batch = constructed_batch(np.random.default_rng(1), B=16)
    with torch.no_grad():
        state = model.observe(batch["obs"], batch["prev_action"], batch["pose"], sample=False)["state"]
        reward, done = model.reward(state)
    bright = batch["reward"][:, -1] > 0.5
    assert bool((reward[bright] > 0.5).all()) and bool((reward[~bright] < 0.5).all())
    assert bool((done[bright] > 0.5).all()) and bool((done[~bright] < 0.5).all())


def test_a_model_without_the_head_says_so():
    model = tiny_model(reward_head=False)
    out = model(constructed_batch(np.random.default_rng(0)))
    assert "reward_loss" not in out
    with pytest.raises(UserError, match="no reward head"):
        model.reward(model.init_state(2))


@pytest.mark.slow
def test_a_dream_of_a_model_trained_on_a_coverage_task_predicts_its_rewards(tmp_path, one_thread):
    """The whole path: collect with task coverage, train with --reward-head on the recorded per-frame rewards,
    dream: each step's reward is the head's prediction, and the dream says so."""
    import json

    from rollouts.collect import CollectConfig, collect
    from rollouts.dataset import RolloutWindows
    from worldmodel import checkpoint
    from worldmodel.dream import DreamEnv
    from worldmodel.train import train

    data = tmp_path / "data"
    collect(CollectConfig(env="mnist_map", agent="loop", episodes=24, steps=20, out=data, seed=0,
                          env_kwargs=json.dumps({"task": "coverage", "border": "wrap"}), progress=False))
    windows = RolloutWindows(data, 8, split="all", cache=False)
    frame_reward = windows.sample_batch(windows.episode_starts())["reward"]
    assert set(np.unique(frame_reward)) == {0.0, 1.0} and frame_reward[:, 0].max() == 0.0  # step 0: nothing led to it
    cfg = dataclasses.replace(preset("debug"), data=str(data), out=str(tmp_path / "run"), steps=20, seq_len=12,
                              batch=8, val_every=0, reward_head=True, lr=3e-3, progress=False)
    result = train(cfg)
    assert result["config"].reward_head and checkpoint.load_raw(tmp_path / "run")["model_config"]["reward_head"]
    # the recorded rewards reach the head: its loss is computed on the windows' rewards (learning itself: above)
    model, _ = checkpoint.load(tmp_path / "run")
    batch = batch_to_torch(windows.sample_batch(np.arange(0, len(windows), 3)), "cpu")
    with torch.no_grad():
        out = model(batch)
    assert float(out["reward_mse"]) == pytest.approx(float(((out["reward_pred"] - batch["reward"]) ** 2).mean()), rel=1e-5)
    # in a dream: the step's reward is the head's prediction from the dream's state, and info says so
    env = DreamEnv(checkpoint=str(tmp_path / "run"), data=str(data), context=4, threads=1)
    env.reset(seed=0)
    for action in [3, 3, 2, 2]:
        _, reward, terminated, _, info = env.step(action)
        with torch.no_grad():
            expected, done = model.reward(env.unwrapped.dreams.state)
        assert info["reward_predicted"] is True and reward == pytest.approx(float(expected[0]), abs=1e-5)
        assert terminated == bool(done[0] > 0.5)
    env.close()


def test_reward_head_on_data_without_rewards_is_refused(tmp_path):
    from rollouts.collect import CollectConfig, collect
    from worldmodel.train import train

    data = tmp_path / "data"
    collect(CollectConfig(env="mnist_map", agent="random", episodes=2, steps=12, out=data, seed=0, progress=False))
    cfg = dataclasses.replace(preset("debug"), data=str(data), out=str(tmp_path / "run"), steps=1, reward_head=True)
    with pytest.raises(UserError, match="--reward-head: every episode of .* has return 0"):
        train(cfg)
    assert not (tmp_path / "run").exists()
