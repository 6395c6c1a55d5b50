"""Env-steps per second of MnistMap-v0: the single env through ``gym.make`` and the native vector env at a few N.

Pinned to one thread (numpy's BLAS pools are set to 1 before numpy is imported) and one core, no torch. Random actions
are drawn before the clock starts. Each figure is the best of ``--repeats`` runs, measured two ways: wall clock, and
this process's CPU time (``time.process_time``), which still means something when other processes crowd the core.

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


def best_rate(run, n_steps: int, repeats: int) -> tuple[float, float]:
    """(steps per wall second, steps per CPU second), each the best over ``repeats`` calls of ``run(repeat)``."""
    best_wall = best_cpu = float("inf")
    for repeat in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run(repeat)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return n_steps / best_wall, n_steps / best_cpu


def time_single(args: Args) -> tuple[float, float]:
    env = gym.make("MnistMap-v0", border=args.border, max_steps=args.max_steps)
    actions = np.random.default_rng(0).integers(0, env.action_space.n, args.single_steps).tolist()

    def run(repeat: int) -> None:
        env.reset(seed=repeat)
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()

    return best_rate(run, args.single_steps, args.repeats)


def time_vector(args: Args, num_envs: int) -> tuple[float, float]:
    env = gym.make_vec("MnistMap-v0", num_envs=num_envs, vectorization_mode="vector_entry_point", border=args.border, max_steps=args.max_steps)
    n_batch_steps = max(1, args.vector_env_steps // num_envs)
    actions = np.random.default_rng(0).integers(0, env.single_action_space.n, (n_batch_steps, num_envs))

    def run(repeat: int) -> None:
        env.reset(seed=repeat)  # outside the loop: every timed run also crosses the autoresets of max_steps
        for batch_actions in actions:
            env.step(batch_actions)

    return best_rate(run, n_batch_steps * num_envs, args.repeats)


def main(args: Args) -> None:
    if args.pin_cpu and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    print(f"MnistMap-v0, 3x3 map, 28x28 window, border={args.border}, max_steps={args.max_steps}, numpy {np.__version__}, 1 thread")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall-clock figures suffer when it exceeds the cores)")
    print(f"{'':38s} {'steps/s (wall)':>16s} {'steps/CPU-s':>14s}")
    wall, cpu = time_single(args)
    print(f"{'single env (gym.make, random actions)':38s} {wall:>16,.0f} {cpu:>14,.0f}")
    for num_envs in args.num_envs:
        wall, cpu = time_vector(args, num_envs)
        print(f"{f'vector env N={num_envs}':38s} {wall:>16,.0f} {cpu:>14,.0f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
