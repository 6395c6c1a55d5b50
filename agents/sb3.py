"""Stable-Baselines3 policies as collector agents, and what training one needs (a small CNN, a novelty reward).

``SB3Agent`` samples from the saved policy's action distribution with the agent's per-env generators, so
collections stay reproducible and independent of the number of envs (``model.predict`` would draw from torch's
global generator instead).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from gtmm.cli import UserError
from agents.base import Agent

ALGORITHMS = {"ppo": PPO, "a2c": A2C, "dqn": DQN}


class SmallCNN(BaseFeaturesExtractor):
    """Three stride-2 3x3 convolutions (32, 64, 64 channels) and a linear layer to ``features_dim``.

    SB3's NatureCNN needs images of at least 36x36 (an 8x8 stride-4 kernel first); the MNIST map window is smaller.
    """

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 128):
        super().__init__(observation_space, features_dim)
        channels = observation_space.shape[0]  # SB3 hands image spaces over channels-first
        self.cnn = nn.Sequential(
            nn.Conv2d(channels, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            num_flat = self.cnn(torch.zeros(1, *observation_space.shape)).shape[1]
        self.linear = nn.Sequential(nn.Linear(num_flat, features_dim), nn.ReLU())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0, 1] -> (B, features_dim)
        return self.linear(self.cnn(observations))


class NoveltyReward(gym.Wrapper):
    """Reward 1 for each step that reaches a place not seen before in the episode (``info["visit_count"] == 0``),
    else 0; the env's own reward is dropped. Our envs have no task reward: this one teaches a policy to cover the
    map, which makes it a useful collector (and a different one from the hand-written agents)."""

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        return obs, float(int(info["visit_count"]) == 0), terminated, truncated, info


class SB3Agent(Agent):
    """A saved SB3 policy (``.zip``). Actions are sampled from its distribution (``deterministic=False``) with the
    per-env generators, or its most likely action (``deterministic=True``)."""

    def __init__(self, action_space: gym.Space, inverse_actions: Sequence[int] | None = None,
                 policy: str | os.PathLike | None = None, algo: str = "ppo", deterministic: bool = False):
        super().__init__(action_space, inverse_actions)
        if policy is None:
            raise UserError("agent 'sb3' needs a policy file: --policy path/to/policy.zip")
        if not os.path.isfile(policy):
            raise UserError(f"SB3 policy file {policy} does not exist (train one with python -m agents.train_sb3)")
        if algo not in ALGORITHMS:
            raise UserError(f"algo {algo!r}: expected one of {sorted(ALGORITHMS)}")
        self.model = ALGORITHMS[algo].load(policy, device="cpu")
        if self.model.action_space != action_space:
            raise UserError(f"SB3 policy {policy} acts in {self.model.action_space}, the env in {action_space}")
        self.deterministic = deterministic

    def _reset_env(self, i: int) -> None:
        pass  # the policies are feed-forward: nothing to forget between episodes

    def act(self, obs: np.ndarray, info: dict[str, np.ndarray]) -> np.ndarray:
        policy = self.model.policy
        if self.deterministic or not hasattr(policy, "get_distribution"):  # DQN has no distribution
            actions, _ = self.model.predict(obs, deterministic=True)
            return np.asarray(actions, dtype=np.int64)
        with torch.no_grad():
            obs_tensor, _ = policy.obs_to_tensor(obs)  # transposes HWC images and moves to the policy's device
            probs = policy.get_distribution(obs_tensor).distribution.probs.double().cpu().numpy()  # (N, A)
        probs /= probs.sum(axis=1, keepdims=True)
        return np.array([rng.choice(self.num_actions, p=p) for rng, p in zip(self.rngs, probs)], dtype=np.int64)


def policy_kwargs_for() -> dict[str, Any]:
    """PPO policy kwargs for our image envs: the SmallCNN features (fits any image size)."""
    return {"features_extractor_class": SmallCNN, "features_extractor_kwargs": {"features_dim": 128}}
