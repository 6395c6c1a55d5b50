"""Training throughput of every memory at one fixed size: `python benchmarks/train_throughput.py`.

Times full training steps (forward, backward, clip, Adam) on a synthetic batch of the preset's size and prints, per
memory, frames/s and step time of two ways of running the recurrence side by side:

    eager  the step-by-step reference (`GTMM.observe(..., diagnostics=True)`: `GTMMCell.forward` at every step)
    fast   what training runs (`GTMM.forward`: the fast path, `GTMMCell.scan_step`), compiled with `--compile`

and each memory's fast step time relative to the fast `none` baseline (the issue asks for introspective within
1.3x of none on the CPU). `--compile` is on by default on CUDA (mode `reduce-overhead`: CUDA graphs) and off on the
CPU; the compile time of the first steps is reported apart and excluded from the figures.

On a shared CPU, run it alone: other processes skew every figure. `--timer cpu` times the process's CPU time
instead of the wall clock (1 thread: what the step itself costs, less sensitive to a neighbour's load).
The script imports only torch, numpy and this repository (no tyro), so it runs on a bare GPU machine; run with
`PYTHONPATH=<checkout>` against another checkout (e.g. a `git worktree` of an older commit) for a before/after
table: on a tree without the fast path it times the one path it has, as `eager`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

if __package__ in (None, ""):  # run as a script: make the checkout importable unless PYTHONPATH names another
    root = str(Path(__file__).resolve().parents[1])
    if not any(Path(p or ".").resolve() != Path(root) and (Path(p or ".") / "worldmodel").is_dir() for p in sys.path[1:]):
        sys.path.insert(1, root)

from gtmm.cli import run  # noqa: E402
from worldmodel.config import preset  # noqa: E402
from worldmodel.memory import MEMORIES  # noqa: E402
from worldmodel.model import GTMM, param_groups  # noqa: E402
from worldmodel.nets import outlier_kl  # noqa: E402

FRAMES = {28: (28, 28, 1), 64: (64, 64, 3)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (argparse, not tyro: the GPU machine has torch and numpy only)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="mnist_cpu", help="sizes from this training preset")
    p.add_argument("--memories", nargs="+", default=list(MEMORIES), help="memories to time")
    p.add_argument("--address", default="actions", help="address pathway of the slot memories")
    p.add_argument("--address-kwargs", default=None,
                   help="JSON object of the address's arguments (default: the preset's), e.g. the MNIST map's lattice "
                        "filter: '{\"integrator\": \"lattice\", \"moves\": [[-14, 0], [14, 0], [0, -14], [0, 14]], "
                        "\"extent\": [56, 56], \"gate\": true, \"place_evidence\": true}'")
    p.add_argument("--frame", type=int, default=28, choices=sorted(FRAMES), help="frame side: 28 (28x28x1) or 64 (64x64x3)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=None, help="frames per sequence (default: the preset's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per memory and path")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (after the compile steps)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--paths", nargs="+", default=["eager", "fast"], choices=["eager", "fast"], help="paths to time")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="compile the fast step (default: on for CUDA, off for CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the fast step (default: reduce-overhead on CUDA, default on CPU)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the fast step (aot_eager: trace only, for a quick dry run)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "bf16-convs", "fp32"],
                   help="arithmetic of the timed steps, as the trainer's --precision (auto: bf16 on CUDA, bf16-convs "
                        "on a CPU with bf16 in hardware, else fp32)")
    p.add_argument("--timer", default="wall", choices=["wall", "cpu"], help="wall clock, or this process's CPU time")
    p.add_argument("--check", action="store_true",
                   help="before timing, check that eager and fast give the same loss and gradients on one batch")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps {args.steps} / --warmup {args.warmup}: expected >= 1 and >= 0")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def has_fast_path() -> bool:
    """Whether this checkout's model has the fast path (older ones time the reference only)."""
    return "diagnostics" in inspect.signature(GTMM.observe).parameters


def reference_loss(model: GTMM, batch: dict[str, torch.Tensor], free_nats: float, kl_balance: float) -> torch.Tensor:
    """`GTMM.forward`'s loss through the step-by-step reference path (`diagnostics=True`)."""
    seq = model.observe(batch["obs"], batch["prev_action"], batch["pose"], sample=True, diagnostics=True)
    sg = lambda x: x.detach().float()  # noqa: E731
    pm, ps, qm, qs = (seq[k].float() for k in ("prior_mean", "prior_std", "post_mean", "post_std"))
    eps = model.cfg.prior_outlier
    kl_prior, kl_post = outlier_kl(sg(qm), sg(qs), pm, ps, eps), outlier_kl(qm, qs, sg(pm), sg(ps), eps)
    if free_nats > 0:
        kl_prior, kl_post = kl_prior.clamp(min=free_nats), kl_post.clamp(min=free_nats)
    return (seq["nll"] + kl_balance * kl_prior + (1.0 - kl_balance) * kl_post).mean()


def synthetic_batch(B: int, T: int, obs_shape: tuple[int, int, int], device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "obs": torch.randint(0, 256, (B, T, *obs_shape), generator=g, dtype=torch.uint8).to(device),
        "prev_action": torch.randint(0, 4, (B, T), generator=g).to(device),
        "revisit": torch.zeros(B, T, dtype=torch.bool, device=device),
        "pose": (torch.rand(B, T, 2, generator=g) * 84).to(device),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = preset(args.preset)
    B, T = args.batch or cfg.batch, args.seq_len or cfg.seq_len
    obs_shape = FRAMES[args.frame]
    fast_available = has_fast_path()
    compile_on = args.compile if args.compile is not None else device.type == "cuda"
    mode = args.compile_mode or ("reduce-overhead" if device.type == "cuda" else None)
    paths = [p for p in args.paths if p == "eager" or fast_available] or ["eager"]
    batch = synthetic_batch(B, T, obs_shape, device)
    if hasattr(cfg, "resolved_precision"):  # the trainer's own rule
        precision = dataclasses.replace(cfg, precision=args.precision).resolved_precision(device.type)
    elif hasattr(cfg, "uses_bf16"):  # older checkouts (PYTHONPATH=<tree>): bf16 or fp32
        precision = "bf16" if dataclasses.replace(cfg, precision=args.precision).uses_bf16(device.type) else "fp32"
    else:  # older still: its trainer autocast to bf16 on CUDA, and had no --precision
        bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
        precision = "bf16" if bf16 else "fp32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    clock: Callable[[], float] = time.process_time if args.timer == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fast_label = f"fast ({'compiled, ' + (mode or 'default') if compile_on else 'eager'})" if fast_available else "-"
    print(f"preset {args.preset}: batch {B} x {T} frames of {obs_shape}, address {args.address}{' ' + args.address_kwargs if args.address_kwargs else ''}, {card}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, {precision}, "
          f"{args.steps} timed steps, "
          f"{args.timer} time; fast path: {fast_label if fast_available else 'not in this checkout'}")
    print(f"{'memory':<14} {'params':>8} {'eager s/step':>12} {'eager fr/s':>10} {'fast s/step':>11} "
          f"{'fast fr/s':>10} {'speedup':>7} {'x none':>7} {'compile s':>9}")
    base = None
    for memory in args.memories:
        torch.manual_seed(0)
        address_kwargs = cfg.address_kwargs if args.address_kwargs is None else args.address_kwargs
        model_cfg = dataclasses.replace(cfg, memory=memory, address=args.address,
                                        address_kwargs=address_kwargs).model_config(obs_shape, 4, 2)
        model = GTMM(model_cfg).to(device)
        if precision == "bf16-convs":
            model.set_conv_bf16(True)
        opt = torch.optim.Adam(param_groups(model, cfg.lr, cfg.address_lr_scale))
        losses: dict[str, Callable[[], torch.Tensor]] = {
            "eager": lambda: reference_loss(model, batch, cfg.free_nats, cfg.kl_balance) if fast_available
            else model(batch, free_nats=cfg.free_nats, kl_balance=cfg.kl_balance)["loss"],
            "fast": lambda: model(batch, free_nats=cfg.free_nats, kl_balance=cfg.kl_balance)["loss"],
        }
        if args.check and fast_available:
            check_paths(model, losses, autocast)
        figures: dict[str, float] = {}
        compile_s = math.nan
        for path in paths:
            if path == "fast" and compile_on:
                torch._dynamo.reset()  # each model compiles its own graphs: no stale ones against the limit
                model.compile_step(mode, backend=args.compile_backend)
                start = time.perf_counter()
                for _ in range(2):  # step 0 (fresh state) and step >= 1 each compile a graph, forward and backward
                    train_step(model, opt, losses[path], autocast, cfg.grad_clip)
                sync()
                compile_s = time.perf_counter() - start
                if args.check:
                    check_paths(model, losses, autocast, fast_label="compiled")
            times = []
            for i in range(args.warmup + args.steps):
                sync()
                start = clock()
                train_step(model, opt, losses[path], autocast, cfg.grad_clip)
                sync()
                if i >= args.warmup:
                    times.append(clock() - start)
            figures[path] = sorted(times)[len(times) // 2]  # median: robust to a neighbour's burst
            if path == "fast" and compile_on:
                model.compile_step(None, backend=None)
        fast = figures.get("fast", figures.get("eager"))
        base = fast if memory == "none" else base
        cell = lambda key: (f"{figures[key]:12.3f} {B * T / figures[key]:10.0f}" if key in figures  # noqa: E731
                            else f"{'-':>12} {'-':>10}")
        speedup = f"{figures['eager'] / figures['fast']:7.2f}" if len(figures) == 2 else f"{'-':>7}"
        ratio = f"{fast / base:7.2f}" if base else f"{'-':>7}"
        n_params = sum(p.numel() for p in model.parameters())
        fast_cell = cell("fast")[1:]
        print(f"{memory:<14} {n_params / 1e6:7.2f}M {cell('eager')} {fast_cell} {speedup} {ratio} "
              f"{compile_s:9.1f}", flush=True)


def train_step(model: GTMM, opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor], autocast: Any,
               grad_clip: float) -> None:
    with autocast:
        loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


def check_paths(model: GTMM, losses: dict[str, Callable[[], torch.Tensor]], autocast: Any,
                fast_label: str = "fast") -> None:
    """Same loss and gradients from the eager and the fast path on one batch (same noise: same seed)."""
    grads = {}
    for path in ("eager", "fast"):
        torch.manual_seed(123)
        with autocast:
            loss = losses[path]()
        params = [p for p in model.parameters() if p.requires_grad]
        grads[path] = (loss.detach().float(), torch.autograd.grad(loss, params, allow_unused=True))
    (le, ge), (lf, gf) = grads["eager"], grads["fast"]
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                for a, b in zip(ge, gf) if a is not None and b is not None)
    print(f"  check: loss eager {le.item():.4f} {fast_label} {lf.item():.4f}; largest gradient difference "
          f"{worst:.1e} (relative to the tensor's largest)", flush=True)


if __name__ == "__main__":
    run(main)  # a bad flag value (a preset, --address-kwargs) is one error line, not a traceback
