"""Collector agents: policies that drive our envs while rollouts are recorded.

All agents share one batched interface (``agents.base.Agent``): ``reset(num_envs, seed)``,
``reset_envs(mask, seeds)``, ``act(obs (N, H, W, C), info) -> (N,) int64``.

| name      | what it does                                                                                    |
|-----------|-------------------------------------------------------------------------------------------------|
| random    | uniform random actions, each held 1..``max_repeat`` steps                                       |
| loop      | short random walks out (``min_out..max_out`` steps), then retraces them back: ~half the steps revisit |
| explore   | ``explore_steps`` of novelty-seeking walk, then the whole way back: long-range revisits           |
| sb3       | a saved Stable-Baselines3 policy (``policy=path.zip``); train one with ``python -m agents.train_sb3`` |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym

from gtmm.cli import UserError
from agents.base import Agent, ExploreAgent, LoopAgent, RandomAgent

AGENTS = ("random", "loop", "explore", "sb3")


def make_agent(name: str, action_space: gym.Space, inverse_actions: Sequence[int] | None = None, **kwargs: Any) -> Agent:
    """Build the agent called ``name``; ``kwargs`` are its options (e.g. ``max_repeat=3``, ``policy="p.zip"``)."""
    if name == "sb3":
        from agents.sb3 import SB3Agent  # imports stable-baselines3 only when asked for

        cls: type[Agent] = SB3Agent
    elif name in ("random", "loop", "explore"):
        cls = {"random": RandomAgent, "loop": LoopAgent, "explore": ExploreAgent}[name]
    else:
        raise UserError(f"unknown agent {name!r}: expected one of {AGENTS}")
    try:
        return cls(action_space, inverse_actions, **kwargs)
    except TypeError as error:  # an option this agent does not have
        raise UserError(f"agent {name!r}: bad options {kwargs}: {error}") from error


__all__ = ["AGENTS", "Agent", "ExploreAgent", "LoopAgent", "RandomAgent", "make_agent"]
