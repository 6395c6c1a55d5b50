"""Dream throughput: dreamed frames per second of `worldmodel.dream.DreamVectorEnv`, by batch size and device.

    python benchmarks/dream_throughput.py
    python benchmarks/dream_throughput.py --checkpoint runs/intro_additive --data data/mnist_map --num-envs 1 16 256

N dreams step in one forward call of the model (prior step + decoder), so frames/s should grow with N until the
device is busy. Without --checkpoint, an untrained model of a preset's sizes (default `mnist_cpu`) is saved through
the checkpoint API into a temp folder: speed does not depend on the weights. Without --data, 8 short MNIST-map
episodes are collected into a temp folder for the context frames. Reset (the warm-up on K context frames) is
excluded; the figure is steady-state stepping with a fixed action pattern.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rollouts.collect import CollectConfig, collect  # noqa: E402
from worldmodel import checkpoint  # noqa: E402
from worldmodel.config import preset  # noqa: E402
from worldmodel.dream import DreamVectorEnv  # noqa: E402
from worldmodel.model import GTMM  # noqa: E402


@dataclass
class BenchConfig:
    checkpoint: Optional[str] = None
    """a trained run folder or ckpt.pt (default: an untrained model of --preset's sizes)"""
    preset: str = "mnist_cpu"
    """sizes of the untrained model when no --checkpoint is given"""
    memory: str = "introspective"
    """memory of the untrained model"""
    data: Optional[str] = None
    """rollout folder for the context frames (default: 8 MNIST-map episodes collected to a temp folder)"""
    num_envs: list[int] = field(default_factory=lambda: [1, 8, 64])
    """batch sizes to measure"""
    steps: int = 50
    """timed steps per batch size (after 3 warm-up steps)"""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda"""
    threads: int = 1
    """torch CPU threads"""


def main(cfg: BenchConfig) -> None:
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = cfg.data
        if data is None:
            data = str(Path(tmp) / "data")
            collect(CollectConfig(env="mnist_map", agent="loop", episodes=8, steps=31, out=Path(data), progress=False))
        ckpt = cfg.checkpoint
        if ckpt is None:
            train_cfg = preset(cfg.preset)
            train_cfg.memory = cfg.memory
            model = GTMM(train_cfg.model_config((28, 28, 1), num_actions=4, pose_dim=2))
            ckpt = str(checkpoint.save(Path(tmp) / "run" / "ckpt.pt", model=model, optimizer=None, config=train_cfg,
                                       step=0))
        print(f"checkpoint {cfg.checkpoint or f'untrained {cfg.preset} / {cfg.memory}'} | data {cfg.data or 'temp'} | "
              f"threads {torch.get_num_threads()}")
        for n in cfg.num_envs:
            vec = DreamVectorEnv(ckpt, n, data=data, max_steps=10**9, device=cfg.device)
            vec.reset(seed=0)
            actions = np.arange(n) % vec.single_action_space.n
            for _ in range(3):
                vec.step(actions)
            sync = torch.cuda.synchronize if vec.dreams.device.type == "cuda" else (lambda: None)
            sync()
            start = time.perf_counter()
            for t in range(cfg.steps):
                vec.step((actions + t) % vec.single_action_space.n)
            sync()
            elapsed = time.perf_counter() - start
            print(f"num_envs {n:5d} on {vec.dreams.device}: {cfg.steps / elapsed:8.1f} batched steps/s, "
                  f"{n * cfg.steps / elapsed:9.0f} dreamed frames/s, {1e3 * elapsed / cfg.steps:7.2f} ms/step")
            vec.close()


if __name__ == "__main__":
    main(tyro.cli(BenchConfig))
