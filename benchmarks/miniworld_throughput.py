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
import envs  # noqa: E402, F401  (registers MiniWorldRevisit-v0)
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


def time_run(env: gym.Env, actions: list[int], seed: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to play ``actions`` from ``reset(seed)``, resetting at episode ends.

    CPU time includes llvmpipe's rendering threads and hardly moves when other processes load the machine, so it is
    the fairer figure for comparing two envs on a shared box; wall time is what a collector sees.
    """
    env.reset(seed=seed)
    wall, cpu = time.perf_counter(), time.process_time()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    return time.perf_counter() - wall, time.process_time() - cpu


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
    runs = {"raw": (raw, stock_actions), "wrapper": (wrapped, stock_actions), "ours": (ours, all_actions)}
    best = {name: [float("inf"), float("inf")] for name in runs}
    for _ in range(args.repeats):
        for name, (env, actions) in runs.items():
            wall, cpu = time_run(env, actions, args.seed)
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
    fps = {name: args.steps / wall for name, (wall, _) in best.items()}
    cpu_ms = {name: 1e3 * cpu / args.steps for name, (_, cpu) in best.items()}

    print(f"obs {args.obs_size}x{args.obs_size}, {args.steps} random steps, best of {args.repeats}, one process, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    rows = [("raw miniworld", args.stock_id, "raw"), ("our wrapper", args.stock_id, "wrapper"),
            ("our env", "MiniWorldRevisit-v0", "ours")]
    for label, env_id, name in rows:
        print(f"{label:<14s} {env_id:<24s} {fps[name]:7.0f} frames/s  {cpu_ms[name]:5.2f} ms CPU/frame")
    print(f"wrapper / raw: {fps['wrapper'] / fps['raw']:.0%} of the frames/s, "
          f"{cpu_ms['wrapper'] / cpu_ms['raw']:.0%} of the CPU per frame")


if __name__ == "__main__":
    main(tyro.cli(Args))
