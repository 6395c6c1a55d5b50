"""Dream throughput: dreamed frames per second of `worldmodel.dream.DreamVectorEnv`, by batch size and device.

    python benchmarks/dream_throughput.py
    python benchmarks/dream_throughput.py --checkpoint runs/intro_additive --data data/mnist_map --num-envs 1 16 256
    python benchmarks/dream_throughput.py --device cuda --num-envs 1024 --preset gpu
    python benchmarks/dream_throughput.py --device cpu --preset debug --num-envs 64 256 1024   # the env's own cost

N dreams step in one forward call of the model (prior step + decoder), so frames/s should grow with N until the
device is busy. Without --checkpoint, an untrained model of a preset's sizes (default `mnist_cpu`) is saved through
the checkpoint API into a temp folder: speed does not depend on the weights. Without --data, 8 short MNIST-map
episodes are collected into a temp folder for the context frames. Reset (the warm-up on K context frames) is
excluded; the figure is steady-state stepping with a fixed action pattern, split into the model's share
(`GTMM.step_prior` and the frame's conversion, timed around the same calls on the same states) and the rest of
the env's step (bookkeeping: on record or not, pose, revisits, info, per-dream noise draws). Each figure is the
median of --rounds timed blocks, so a busy shared CPU disturbs it less. On a GPU the model's step is short and the
rest decides the frames/s (issue 12); on a CPU, `--preset debug` (a tiny model) shows the rest the same way.
argparse, not tyro: the GPU machine has torch and numpy only (the repository's modules still need gymnasium and
tyro there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from worldmodel import checkpoint  # noqa: E402
from worldmodel.config import preset  # noqa: E402
from worldmodel.dream import DreamVectorEnv  # noqa: E402
from worldmodel.model import GTMM  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a trained run folder or ckpt.pt (default: an untrained model)")
    p.add_argument("--preset", default="mnist_cpu", help="sizes of the untrained model when no --checkpoint is given")
    p.add_argument("--memory", default="introspective", help="memory of the untrained model")
    p.add_argument("--data", default=None, help="rollout folder for the context frames (default: 8 collected episodes)")
    p.add_argument("--num-envs", type=int, nargs="+", default=[1, 8, 64], help="batch sizes to measure")
    p.add_argument("--steps", type=int, default=50, help="timed steps per round and batch size (after 3 warm-up steps)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per batch size: the figures are their medians")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or min(args.num_envs) < 1:
        p.error(f"--steps {args.steps} / --rounds {args.rounds} / --num-envs {args.num_envs}: expected >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from rollouts.collect import CollectConfig, collect  # the envs and their digits: only to make data

            data = str(Path(tmp) / "data")
            collect(CollectConfig(env="mnist_map", agent="loop", episodes=8, steps=31, out=Path(data), progress=False))
        ckpt = args.checkpoint
        if ckpt is None:
            train_cfg = preset(args.preset)
            train_cfg.memory = args.memory
            model = GTMM(train_cfg.model_config((28, 28, 1), num_actions=4, pose_dim=2))
            ckpt = str(checkpoint.save(Path(tmp) / "run" / "ckpt.pt", model=model, optimizer=None, config=train_cfg,
                                       step=0))
        print(f"checkpoint {args.checkpoint or f'untrained {args.preset} / {args.memory}'} | data "
              f"{args.data or 'temp'} | threads {torch.get_num_threads()} | torch {torch.__version__}")
        for n in args.num_envs:
            vec = DreamVectorEnv(ckpt, n, data=data, max_steps=10**9, device=args.device)
            vec.reset(seed=0)
            actions = np.arange(n) % vec.single_action_space.n
            for _ in range(3):
                vec.step(actions)
            device = vec.dreams.device
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            step_times, model_times = [], []
            for _ in range(args.rounds):  # interleaved, so a burst of load on a shared machine hits both alike
                model_times.append(time_model_share(vec, actions))
                sync()
                start = time.perf_counter()
                for t in range(args.steps):
                    vec.step((actions + t) % vec.single_action_space.n)
                sync()
                step_times.append((time.perf_counter() - start) / args.steps)
            step, model = float(np.median(step_times)), float(np.median(model_times))
            card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            print(f"num_envs {n:5d} on {card}: {1 / step:8.1f} batched steps/s, {n / step:9.0f} dreamed frames/s, "
                  f"{1e3 * step:7.2f} ms/step (the model's step_prior: {1e3 * model:6.2f} ms; the rest: "
                  f"{1e3 * max(step - model, 0.0):6.2f} ms)", flush=True)
            vec.close()


def time_model_share(vec: DreamVectorEnv, actions: np.ndarray, repeats: int = 10) -> float:
    """Seconds per call of the model's own step (`GTMM.step_prior` + uint8 frames to the host) on the dreams'
    current states, without the env's per-dream bookkeeping (the states are not advanced)."""
    dreams = vec.dreams
    device = dreams.device
    action = torch.as_tensor(actions, device=device)
    pose = torch.zeros(len(actions), dreams.model.cfg.pose_dim, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        dreams.model.step_prior(dreams.state, action, pose)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            frames, _ = dreams.model.step_prior(dreams.state, action, pose)
            frames.mul(255).round().to(torch.uint8).cpu()
        sync()
    return (time.perf_counter() - start) / repeats


if __name__ == "__main__":
    main()
