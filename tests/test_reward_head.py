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
