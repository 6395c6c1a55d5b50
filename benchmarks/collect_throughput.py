"""Collection throughput: recorded env steps per second (agent + env + compression + atomic writes), by workers.

    python benchmarks/collect_throughput.py
    python benchmarks/collect_throughput.py --envs mnist_map --workers 1 2 8 --episodes 200

Each run collects into a fresh temp folder with ``rollouts.collect`` and reports the steps/s of the collection
loop (env start-up excluded, as in the collector's own summary). MNIST-map workers are maps in one numpy vector
env; MiniWorld workers are processes (one GL context each), so their figure also includes process start-up.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rollouts.collect import CollectConfig, collect  # noqa: E402


@dataclass
class BenchConfig:
    envs: list[str] = field(default_factory=lambda: ["mnist_map", "miniworld"])
    """env short names to measure"""
    workers: list[int] = field(default_factory=lambda: [1, 2])
    """worker counts to measure"""
    agent: str = "random"
    """collector agent"""
    episodes: int = 64
    """episodes per mnist_map run (MiniWorld runs use a quarter, it is ~20x slower)"""
    steps: int = 128
    """steps per episode"""
    miniworld_kwargs: str = '{"obs_size": 64}'
    """env kwargs for MiniWorld runs (JSON)"""


def main() -> None:
    config = tyro.cli(BenchConfig)
    print(f"cpus {os.cpu_count()}, agent {config.agent}, {config.steps} steps per episode")
    print(f"{'env':<12}{'workers':>8}{'episodes':>10}{'steps/s':>10}{'wall s':>9}{'MB':>8}")
    for env in config.envs:
        for workers in config.workers:
            episodes = config.episodes if env.startswith("mnist_map") else max(workers, config.episodes // 4)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                summary = collect(CollectConfig(
                    env=env, agent=config.agent, episodes=episodes, steps=config.steps, workers=workers,
                    out=Path(tmp) / "data", progress=False,
                    env_kwargs=config.miniworld_kwargs if env.startswith("miniworld") else "{}"))
                wall = time.perf_counter() - start
            print(f"{env:<12}{workers:>8}{episodes:>10}{summary['steps_per_second']:>10.0f}{wall:>9.1f}"
                  f"{summary['bytes'] / 1e6:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
