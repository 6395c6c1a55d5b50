"""Env-steps per second of MnistMap-v0: the single env through ``gym.make`` and the native vector env at a few N.

Pinned to one thread (numpy's BLAS pools are set to 1 before numpy is imported), no torch. Other processes may share
the machine, so each figure is the best of ``--repeats`` runs. Random actions are drawn before the clock starts.

    .venv/bin/python benchmarks/env_throughput.py
    .venv/bin/python benchmarks/env_throughput.py --num-envs 1024 4096 --border wrap
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import envs  # noqa: E402,F401  (registers MnistMap-v0)


@dataclass
class Args:
    num_envs: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    """batch sizes of the vector env to time"""
    single_steps: int = 20_000
    """steps timed for the single env"""
    vector_env_steps: int = 4_000_000
    """env-steps timed per vector batch size (rounded to whole batch steps)"""
    repeats: int = 3
    """runs per figure; the best is printed"""
    border: str = "clip"
    """border mode: clip or wrap"""
    max_steps: int = 128
    """episode length, so autoresets are part of the timing"""
    pin_cpu: bool = True
    """pin this process to one CPU core (Linux only)"""


def time_single(args: Args) -> float:
    env = gym.make("MnistMap-v0", border=args.border, max_steps=args.max_steps)
    actions = np.random.default_rng(0).integers(0, env.action_space.n, args.single_steps).tolist()
    best = float("inf")
    for repeat in range(args.repeats):
        env.reset(seed=repeat)
        start = time.perf_counter()
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        best = min(best, time.perf_counter() - start)
    return args.single_steps / best


def time_vector(args: Args, num_envs: int) -> float:
    env = gym.make_vec("MnistMap-v0", num_envs=num_envs, vectorization_mode="vector_entry_point", border=args.border, max_steps=args.max_steps)
    n_batch_steps = max(1, args.vector_env_steps // num_envs)
    actions = np.random.default_rng(0).integers(0, env.single_action_space.n, (n_batch_steps, num_envs))
    best = float("inf")
    for repeat in range(args.repeats):
        env.reset(seed=repeat)
        start = time.perf_counter()
        for batch_actions in actions:
            env.step(batch_actions)
        best = min(best, time.perf_counter() - start)
    return n_batch_steps * num_envs / best


def main(args: Args) -> None:
    if args.pin_cpu and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    print(f"MnistMap-v0, 3x3 map, 28x28 window, border={args.border}, max_steps={args.max_steps}, numpy {np.__version__}, 1 thread")
    print(f"single env (gym.make, random actions): {time_single(args):>12,.0f} steps/s")
    for num_envs in args.num_envs:
        print(f"vector env N={num_envs:<5d}:                  {time_vector(args, num_envs):>12,.0f} env-steps/s")


if __name__ == "__main__":
    main(tyro.cli(Args))
