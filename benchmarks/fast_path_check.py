"""Does the compiled training step train the same model as the uncompiled one? Gradients compared step by step.

    python benchmarks/fast_path_check.py --device cuda                       # the paper-task model, 4 variants
    python benchmarks/fast_path_check.py --device cpu --modes default --precisions fp32 --steps 4

Why: on one H100 the paper's similarity-cued recall trained with the compiled CUDA-graph step never learnt to read
its memory (found 0.28-0.40, KL of a recall ~ `none`'s; two of three runs blew up), while the same runs on the
CPU, eager or compiled by inductor, recall. `train_throughput.py --check` compares one batch of the `gpu` preset;
this compares every step of a short training run of the model that failed.

For each variant (a `torch.compile` mode x a precision), `--steps` training steps on fresh batches of `--task`: at
each step the loss and the gradients of the uncompiled fast path (which the tests hold equal to the step-by-step
reference) and of the compiled one, at the same parameters, on the same batch, with the same latent noise. The
optimiser then steps with the uncompiled gradients and the compiled model takes the new weights, so every step
compares at the parameters an uncompiled run would have, including the CUDA-graph replays from the third step on
(cudagraph trees warm up, then record, then replay). Prints, per variant and step, the loss difference, the
gradient difference relative to the gradient (L2 over every parameter: `grad diff`) and the same for the worst
tensor among those that carry >= 0.1% of the largest tensor's norm (`worst`, named). On this project's CPU
(inductor, mnist_cpu sizes, batch 16): fp32 1e-8 (worst 2e-7), bf16 3e-4 (worst 5e-3) on both paths alike; a
defect shows as differences of order 1 that do not shrink.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling paper_tasks.py: the model it checks

from gtmm.cli import UserError, parse, run  # noqa: E402


@dataclass
class Args:
    """Compare the compiled and the uncompiled training step, step by step, on a short training run."""

    device: str = "auto"
    """auto (cuda if available), cpu, cuda"""
    task: str = "similarity_cued_recall"
    """sequence task of the batches (envs.sequences.TASKS)"""
    memory: str = "introspective"
    """memory of the model"""
    steps: int = 6
    """training steps per variant (>= 3 reaches the CUDA-graph replays)"""
    batch: int = 64
    """sequences per batch"""
    seq_len: int = 10
    """frames per sequence"""
    modes: tuple[str, ...] = ("default", "reduce-overhead")
    """torch.compile modes to compare (reduce-overhead: CUDA graphs on a GPU, the trainer's default there)"""
    precisions: tuple[Literal["fp32", "bf16"], ...] = ("fp32", "bf16")
    """autocast of both paths: fp32 (off) or bf16"""
    backend: str = "inductor"
    """torch.compile backend (aot_eager: trace only, no code generation; for a quick dry run)"""
    seed: int = 0
    """seed of the model init and the batches"""


def train_config(args: Args):
    """The trainer's config of the compared model: exactly a run of `benchmarks/paper_tasks.py` (its sizes, the
    `hidden` address and issue 14's model options), at this check's task, memory, batch and length."""
    import paper_tasks  # a sibling script (benchmarks/ is on sys.path when this one runs or is imported)

    bench = paper_tasks.Args(steps=args.steps, batch=args.batch, jobs=1, device=args.device, seq_len=args.seq_len)
    return paper_tasks.train_config(bench, args.task, args.memory, args.seed)


def compare(args: Args, mode: str, precision: str, device) -> list[dict]:
    """One variant: per step, the loss and gradient differences of the compiled vs the uncompiled step."""
    import torch

    from worldmodel.model import GTMM, batch_to_torch, param_groups
    from worldmodel.train import TaskSource, batch_rng

    cfg = train_config(args)
    source = TaskSource(cfg.task, cfg.seq_len)
    torch.manual_seed(args.seed)
    reference = GTMM(cfg.model_config(source.obs_shape, source.num_actions, source.pose_dim)).to(device)
    compiled = copy.deepcopy(reference)
    torch._dynamo.reset()  # each variant compiles its own graphs
    compiled.compile_step(None if mode == "default" else mode, backend=args.backend)
    optimiser = torch.optim.Adam(param_groups(reference, cfg.lr, cfg.address_lr_scale))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    rows = []
    for step in range(args.steps):
        batch = batch_to_torch(source.sample(args.batch, batch_rng(args.seed, 0, step)), device)
        result = {}
        for label, model in (("reference", reference), ("compiled", compiled)):
            torch.manual_seed(1000 + step)  # the same latent noise on both paths
            tick = time.perf_counter()
            with autocast:
                loss = model(batch, free_nats=cfg.free_nats, kl_balance=cfg.kl_balance)["loss"]
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result[label] = (float(loss.detach()), grads, time.perf_counter() - tick)
        (loss_r, grads_r, _), (loss_c, grads_c, seconds) = result["reference"], result["compiled"]
        # relative L2 errors: of the whole gradient, and of the worst tensor among those that carry >= 0.1% of the
        # largest tensor's norm (a tensor whose gradient is ~1e-7 at init is all rounding noise in bf16 on any path)
        norms = {n: float(g.float().norm()) for n, g in zip(names, grads_r) if g is not None}
        floor = 1e-3 * max(norms.values())
        worst, worst_name, total_diff, total = 0.0, "-", 0.0, 0.0
        for name, gr, gc in zip(names, grads_r, grads_c):
            if gr is None or gc is None:
                if (gr is None) != (gc is None):
                    worst, worst_name = math.inf, f"{name} (gradient on one path only)"
                continue
            diff = float((gr.float() - gc.float()).norm())
            total_diff, total = total_diff + diff ** 2, total + norms[name] ** 2
            relative = diff / max(norms[name], 1e-30)
            if norms[name] >= floor and (not math.isfinite(relative) or relative > worst):
                worst, worst_name = relative, name
        rows.append({"step": step, "loss": loss_r, "loss_diff": loss_c - loss_r,
                     "grad_diff": math.sqrt(total_diff / max(total, 1e-30)), "worst": worst, "tensor": worst_name,
                     "compiled_s": seconds})
        # step with the reference's gradients; the compiled model takes the same new weights
        for p, g in zip((p for p in reference.parameters() if p.requires_grad), grads_r):
            p.grad = None if g is None else g.detach().clone()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.grad_clip)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        with torch.no_grad():
            for pc, pr in zip(compiled.parameters(), reference.parameters()):
                pc.copy_(pr)  # in place: the compiled graphs read the parameters where they are
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Print the per-step comparison of every variant; returns the rows (for tests)."""
    args = parse(Args, argv, prog="benchmarks/fast_path_check.py",
                 description=__doc__.split("\n")[0] if __doc__ else None)
    import torch

    from envs.sequences import TASKS
    from gtmm.cli import resolve_device
    from worldmodel.memory import MEMORIES

    if args.task not in TASKS:
        raise UserError(f"--task {args.task!r}: expected one of {', '.join(TASKS)}")
    if args.memory not in MEMORIES:
        raise UserError(f"--memory {args.memory!r}: expected one of {', '.join(MEMORIES)}")
    for name in ("steps", "batch", "seq_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    bad = [m for m in args.modes if m not in modes]
    if bad or not args.modes:
        raise UserError(f"--modes {' '.join(args.modes)}: expected some of {', '.join(modes)}")
    device = resolve_device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    cfg = train_config(args)
    print(f"{args.task} / {args.memory} (benchmarks/paper_tasks.py's model: z {cfg.z_dim}, h {cfg.h_dim}, "
          f"memory kwargs {cfg.memory_kwargs}, writes {cfg.write_latent}, prior skip {cfg.prior_skip}, robust prior "
          f"{cfg.prior_outlier}), batch {args.batch} x {args.seq_len}, {card}, torch {torch.__version__}, backend "
          f"{args.backend}", flush=True)
    print(f"{'mode':<16} {'precision':<9} {'step':>4} {'loss':>9} {'loss diff':>10} {'grad diff':>9} "
          f"{'worst':>9} {'compiled s':>10}  worst tensor")
    rows = []
    for mode in args.modes:
        for precision in args.precisions:
            for row in compare(args, mode, precision, device):
                row.update(mode=mode, precision=precision)
                rows.append(row)
                print(f"{mode:<16} {precision:<9} {row['step']:>4} {row['loss']:9.3f} {row['loss_diff']:10.2e} "
                      f"{row['grad_diff']:9.1e} {row['worst']:9.1e} {row['compiled_s']:10.2f}  {row['tensor']}",
                      flush=True)
    return rows


if __name__ == "__main__":
    run(main)
