"""The batched agent interface and the hand-written collector policies: ``random``, ``loop``, ``explore``.

Every agent drives ``N`` envs at once and keeps one random generator per env, re-seeded at every new episode
(``reset_envs(mask, seeds)``), so an episode's actions depend only on its own seed and observations -- not on how
many envs run beside it. That is what makes a collection reproducible for any ``--workers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np

from gtmm.cli import UserError


class Agent:
    """A policy over a batch of ``num_envs`` envs with a ``Discrete`` action space.

    Call ``reset(num_envs, seed)`` once, ``reset_envs(mask, seeds)`` whenever the envs in ``mask`` start new
    episodes (including the first ones), then ``act(obs, info)`` each step.
    """

    def __init__(self, action_space: gym.Space, inverse_actions: Sequence[int] | None = None,
                 actions: Sequence[int] | None = None):
        if not isinstance(action_space, gym.spaces.Discrete):
            raise UserError(f"{type(self).__name__} needs a Discrete action space, got {action_space}")
        self.num_actions = int(action_space.n)
        self.actions = np.arange(self.num_actions) if actions is None else np.asarray(actions, dtype=np.int64)
        if len(self.actions) == 0 or self.actions.min() < 0 or self.actions.max() >= self.num_actions:
            raise UserError(f"actions {list(self.actions)}: expected a non-empty subset of [0, {self.num_actions})")
        self.inverse_actions = None if inverse_actions is None else tuple(int(a) for a in inverse_actions)
        if self.inverse_actions is not None and len(self.inverse_actions) != self.num_actions:
            raise UserError(f"inverse_actions has {len(self.inverse_actions)} entries, expected {self.num_actions}")
        self.num_envs = 0
        self.rngs: list[np.random.Generator] = []

    def reset(self, num_envs: int, seed: int | None = None) -> None:
        """Start driving ``num_envs`` envs; per-env generators come from ``seed`` until ``reset_envs`` re-seeds them."""
        self.num_envs = num_envs
        self.rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(num_envs)]
        self.reset_envs(np.ones(num_envs, dtype=bool))

    def reset_envs(self, mask: np.ndarray, seeds: Sequence[int] | None = None) -> None:
        """The envs where ``mask`` is True start new episodes; ``seeds`` (one per True entry) re-seed their generators."""
        indices = np.flatnonzero(mask)
        if seeds is not None:
            if len(seeds) != len(indices):
                raise UserError(f"reset_envs: {len(seeds)} seeds for {len(indices)} envs")
            for i, s in zip(indices, seeds):
                self.rngs[i] = np.random.default_rng(s)
        for i in indices:
            self._reset_env(int(i))

    def act(self, obs: np.ndarray, info: dict[str, np.ndarray]) -> np.ndarray:
        """Actions (N,) int64 for observations (N, H, W, C) and the vector env's info (arrays with a leading N axis)."""
        return np.array([self._act_env(i, obs[i], _env_info(info, i)) for i in range(self.num_envs)], dtype=np.int64)

    # subclasses implement these two (per-env state lives in lists indexed by env)
    def _reset_env(self, i: int) -> None:
        raise NotImplementedError

    def _act_env(self, i: int, obs: np.ndarray, info: dict[str, np.ndarray]) -> int:
        raise NotImplementedError


def _env_info(info: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Env ``i``'s entries of a vector env's info (keys starting with "_" are gymnasium's presence masks)."""
    return {k: v[i] for k, v in info.items() if not k.startswith("_") and isinstance(v, np.ndarray) and v.ndim > 0 and len(v) > i}


class RandomAgent(Agent):
    """Uniform random actions, each held for a random number of steps in ``[1, max_repeat]`` (smoother paths)."""

    def __init__(self, action_space: gym.Space, inverse_actions: Sequence[int] | None = None,
                 actions: Sequence[int] | None = None, max_repeat: int = 1):
        super().__init__(action_space, inverse_actions, actions)
        if max_repeat < 1:
            raise UserError(f"max_repeat {max_repeat}: expected >= 1")
        self.max_repeat = max_repeat
        self.current: list[int] = []
        self.left: list[int] = []

    def reset(self, num_envs: int, seed: int | None = None) -> None:
        """Start ``num_envs`` episodes: no action held yet, then reseed the per-env generators."""
        self.current, self.left = [0] * num_envs, [0] * num_envs
        super().reset(num_envs, seed)

    def _reset_env(self, i: int) -> None:
        self.left[i] = 0

    def _act_env(self, i: int, obs: np.ndarray, info: dict[str, np.ndarray]) -> int:
        if self.left[i] == 0:
            self.current[i] = int(self.rngs[i].choice(self.actions))
            self.left[i] = int(self.rngs[i].integers(1, self.max_repeat + 1))
        self.left[i] -= 1
        return self.current[i]


class _RetraceAgent(Agent):
    """Goes out for a while, then walks its path back with ``inverse_actions``, then goes out again.

    Only actions that changed the pose are retraced: a move into a wall or the map's edge does nothing, and undoing
    it would step somewhere new. Every step of the way back shows a place of the way out, so about half of all steps
    are revisits by construction (plus whatever the way out crosses itself).
    """

    def __init__(self, action_space: gym.Space, inverse_actions: Sequence[int] | None = None,
                 actions: Sequence[int] | None = None):
        super().__init__(action_space, inverse_actions, actions)
        if self.inverse_actions is None:
            raise UserError(f"{type(self).__name__} retraces its path and needs the env's inverse_actions "
                             "(env.unwrapped.inverse_actions); this env has none")
        self.path: list[list[int]] = []  # effective actions of the current way out
        self.going_out: list[bool] = []
        self.out_steps: list[int] = []   # actions issued on the current way out
        self.out_length: list[int] = []
        self.last_action: list[int | None] = []
        self.last_pose: list[np.ndarray | None] = []

    def reset(self, num_envs: int, seed: int | None = None) -> None:
        self.path, self.going_out = [[] for _ in range(num_envs)], [True] * num_envs
        self.out_steps, self.out_length = [0] * num_envs, [0] * num_envs
        self.last_action, self.last_pose = [None] * num_envs, [None] * num_envs
        super().reset(num_envs, seed)

    def _reset_env(self, i: int) -> None:
        self.path[i], self.last_action[i], self.last_pose[i] = [], None, None
        self._start_out(i)

    def _start_out(self, i: int) -> None:
        self.going_out[i], self.out_steps[i] = True, 0
        self.out_length[i] = self._new_out_length(i)

    def _act_env(self, i: int, obs: np.ndarray, info: dict[str, np.ndarray]) -> int:
        pose = info.get("pose")
        moved = self.last_pose[i] is None or pose is None or not np.array_equal(pose, self.last_pose[i])
        if self.going_out[i] and self.last_action[i] is not None and moved:
            self.path[i].append(self.last_action[i])
        self.last_pose[i] = None if pose is None else np.array(pose)
        if self.going_out[i] and self.out_steps[i] >= self.out_length[i] and self.path[i]:
            self.going_out[i] = False
        if not self.going_out[i] and not self.path[i]:
            self._start_out(i)
        if self.going_out[i]:
            action = self._out_action(i, info, moved)
            self.out_steps[i] += 1
        else:
            action = self.inverse_actions[self.path[i].pop()]
        self.last_action[i] = action
        return action

    def _new_out_length(self, i: int) -> int:
        raise NotImplementedError

    def _out_action(self, i: int, info: dict[str, np.ndarray], moved: bool) -> int:
        raise NotImplementedError


class LoopAgent(_RetraceAgent):
    """Short loops: a random walk of ``min_out..max_out`` steps (actions held ``1..max_repeat`` steps), then back.

    Revisits come soon after the first visit: the short-range memory case.
    """

    def __init__(self, action_space: gym.Space, inverse_actions: Sequence[int] | None = None,
                 actions: Sequence[int] | None = None, min_out: int = 4, max_out: int = 16, max_repeat: int = 3):
        super().__init__(action_space, inverse_actions, actions)
        if not 1 <= min_out <= max_out:
            raise UserError(f"min_out={min_out}, max_out={max_out}: expected 1 <= min_out <= max_out")
        if max_repeat < 1:
            raise UserError(f"max_repeat {max_repeat}: expected >= 1")
        self.min_out, self.max_out, self.max_repeat = min_out, max_out, max_repeat
        self.current: list[int] = []
        self.left: list[int] = []

    def reset(self, num_envs: int, seed: int | None = None) -> None:
        """Start ``num_envs`` episodes with no action held yet, then reseed the per-env generators."""
        self.current, self.left = [0] * num_envs, [0] * num_envs
        super().reset(num_envs, seed)

    def _new_out_length(self, i: int) -> int:
        self.left[i] = 0
        return int(self.rngs[i].integers(self.min_out, self.max_out + 1))

    def _out_action(self, i: int, info: dict[str, np.ndarray], moved: bool) -> int:
        if self.left[i] == 0:
            self.current[i] = int(self.rngs[i].choice(self.actions))
            self.left[i] = int(self.rngs[i].integers(1, self.max_repeat + 1))
        self.left[i] -= 1
        return self.current[i]


class ExploreAgent(_RetraceAgent):
    """Coverage then recall: ``explore_steps`` of novelty-seeking walk, then the whole way back to where it started.

    The walk keeps its heading while each step lands on a new place (``info["visit_count"] == 0``) and picks
    another action when it lands on a visited place or does not move (a wall); it never picks the action that
    would undo its last one. The way back then revisits places first seen up to ``2 * explore_steps`` steps
    earlier: the long-range memory case.
    """

    def __init__(self, action_space: gym.Space, inverse_actions: Sequence[int] | None = None,
                 actions: Sequence[int] | None = None, explore_steps: int = 48):
        super().__init__(action_space, inverse_actions, actions)
        if explore_steps < 1:
            raise UserError(f"explore_steps {explore_steps}: expected >= 1")
        self.explore_steps = explore_steps
        self.current: list[int | None] = []

    def reset(self, num_envs: int, seed: int | None = None) -> None:
        """Start ``num_envs`` episodes with no novelty-walk action chosen yet, then reseed the generators."""
        self.current = [None] * num_envs
        super().reset(num_envs, seed)

    def _new_out_length(self, i: int) -> int:
        self.current[i] = None
        return self.explore_steps

    def _out_action(self, i: int, info: dict[str, np.ndarray], moved: bool) -> int:
        seen_before = int(info.get("visit_count", 0)) > 0
        if self.current[i] is None or seen_before or not moved:
            last = self.current[i]
            back = None if last is None else self.inverse_actions[last]
            choices = [a for a in self.actions if a != back and a != last] if last is not None else list(self.actions)
            self.current[i] = int(self.rngs[i].choice(choices if choices else self.actions))
        return self.current[i]
