"""Training throughput of every memory at one fixed size: `python benchmarks/train_throughput.py`.

Times full training steps (forward, backward, clip, Adam) on a synthetic batch of the preset's size and prints
frames/s and step time per memory, with each memory's step time relative to the `none` baseline (the issue asks
for introspective within 1.3x of none). On a shared CPU, run it alone: other processes skew every figure.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch
import tyro

from worldmodel.config import preset
from worldmodel.memory import MEMORIES
from worldmodel.model import GTMM, param_groups
from worldmodel.train import resolve_device


@dataclass
class Args:
    """Frames/s of a training step for each memory type at a fixed size."""

    preset: str = "mnist_cpu"
    """sizes from this training preset"""
    memories: tuple[str, ...] = MEMORIES
    """memories to time"""
    address: str = "actions"
    """address pathway of the slot memories"""
    frame: int = 28
    """frame side: 28 (28x28x1) or 64 (64x64x3)"""
    batch: Optional[int] = None
    """sequences per batch (default: the preset's)"""
    seq_len: Optional[int] = None
    """frames per sequence (default: the preset's)"""
    steps: int = 5
    """timed steps per memory"""
    warmup: int = 1
    """untimed steps first"""
    device: str = "auto"
    """auto, cpu, cuda"""
    threads: int = 1
    """torch CPU threads"""


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = preset(args.preset)
    B, T = args.batch or cfg.batch, args.seq_len or cfg.seq_len
    obs_shape = {28: (28, 28, 1), 64: (64, 64, 3)}.get(args.frame)
    if obs_shape is None:
        raise ValueError(f"--frame {args.frame}: expected 28 or 64")
    g = torch.Generator().manual_seed(0)
    batch = {
        "obs": torch.randint(0, 256, (B, T, *obs_shape), generator=g, dtype=torch.uint8).to(device),
        "prev_action": torch.randint(0, 4, (B, T), generator=g).to(device),
        "revisit": torch.zeros(B, T, dtype=torch.bool, device=device),
        "pose": (torch.rand(B, T, 2, generator=g) * 84).to(device),
    }
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    print(f"preset {args.preset}: batch {B} x {T} frames of {obs_shape}, address {args.address}, {device}, "
          f"{args.threads} thread(s), {args.steps} timed steps")
    print(f"{'memory':<14} {'params':>8} {'s/step':>8} {'frames/s':>9} {'x none':>7}")
    base = None
    for memory in args.memories:
        torch.manual_seed(0)
        model_cfg = dataclasses.replace(cfg, memory=memory, address=args.address).model_config(obs_shape, 4, 2)
        model = GTMM(model_cfg).to(device)
        opt = torch.optim.Adam(param_groups(model, cfg.lr, cfg.address_lr_scale))
        times = []
        for i in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with autocast:
                loss = model(batch, free_nats=cfg.free_nats, kl_balance=cfg.kl_balance)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        step = sorted(times)[len(times) // 2]  # median: robust to a neighbour's burst on a shared machine
        base = step if memory == "none" else base
        ratio = f"{step / base:7.2f}" if base else f"{'-':>7}"
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{memory:<14} {n_params / 1e6:7.2f}M {step:8.3f} {B * T / step:9.0f} {ratio}", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
