"""Frames per second of headless MiniWorld on the CPU (Mesa llvmpipe through EGL): raw vs our wrapper vs our env.

Three figures, one process, one env at a time, obs rendered at ``--obs-size`` squared:
- raw:     ``gym.make(<stock id>, obs_width=S, obs_height=S)``, MiniWorld as users get it;
- wrapper: ``envs.miniworld.make_stock(<stock id>)``, the same world with our pose/revisit ``info``;
- ours:    ``MiniWorldRevisit-v0``.
raw and wrapper replay the same seeded random actions (turn left/right, forward: the stock action space) in the same
worlds with the same step sizes, so they render the very same frames and the difference is our per-step overhead.
Resets (episode ends) are inside the timing. Other processes share the machine, so each figure is the best of
``--repeats`` runs. Rendering threads: Mesa's llvmpipe uses all cores unless ``LP_NUM_THREADS`` says otherwise.

    .venv/bin/python benchmarks/miniworld_throughput.py
    .venv/bin/python benchmarks/miniworld_throughput.py --stock-id MiniWorld-Maze-v0 --steps 1000
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import envs  # noqa: E402  (registers MiniWorldRevisit-v0)
from envs.miniworld import import_miniworld, make_stock  # noqa: E402


@dataclass
class Args:
    stock_id: str = "MiniWorld-OneRoom-v0"
    """stock MiniWorld env timed raw and through our wrapper"""
    obs_size: int = 64
    """observation side in pixels"""
    steps: int = 3000
    """steps timed per run"""
    repeats: int = 5
    """runs per figure; the best is printed"""
    seed: int = 0
    """seed of the actions and of the worlds"""


def time_run(env: gym.Env, actions: list[int], seed: int) -> float:
    """Seconds to play ``actions`` from ``reset(seed)``, resetting at episode ends."""
    env.reset(seed=seed)
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    return time.perf_counter() - start


def main(args: Args) -> None:
    import_miniworld()  # headless; registers the stock ids
    rng = np.random.default_rng(args.seed)
    stock_actions = rng.integers(0, 3, args.steps).tolist()  # turn left, turn right, forward: valid for every stock env
    all_actions = rng.integers(0, 4, args.steps).tolist()

    raw = gym.make(args.stock_id, obs_width=args.obs_size, obs_height=args.obs_size)
    wrapped = make_stock(args.stock_id, obs_size=args.obs_size)
    ours = gym.make("MiniWorldRevisit-v0", obs_size=args.obs_size)
    for env in (raw, wrapped, ours):  # first textures/meshes load outside the timing
        env.reset(seed=args.seed)
        env.step(2)

    # Interleaved repeats: a burst of load from another process then hits all three alike, not one figure.
    best = {"raw": float("inf"), "wrapped": float("inf"), "ours": float("inf")}
    for _ in range(args.repeats):
        best["raw"] = min(best["raw"], time_run(raw, stock_actions, args.seed))
        best["wrapped"] = min(best["wrapped"], time_run(wrapped, stock_actions, args.seed))
        best["ours"] = min(best["ours"], time_run(ours, all_actions, args.seed))
    raw_fps, wrapped_fps, ours_fps = (args.steps / best[k] for k in ("raw", "wrapped", "ours"))

    print(f"obs {args.obs_size}x{args.obs_size}, {args.steps} random steps, best of {args.repeats}, one process")
    print(f"raw miniworld  {args.stock_id:<28s} {raw_fps:8.0f} frames/s")
    print(f"our wrapper    {args.stock_id:<28s} {wrapped_fps:8.0f} frames/s  ({wrapped_fps / raw_fps:.0%} of raw)")
    print(f"our env        {'MiniWorldRevisit-v0':<28s} {ours_fps:8.0f} frames/s")


if __name__ == "__main__":
    main(tyro.cli(Args))
