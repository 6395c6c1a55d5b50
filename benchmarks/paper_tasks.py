"""The paper's memory benchmarks (Gemici et al. 2017, sec. 5.1-5.5): every memory on every sequence task, one budget.

    python benchmarks/paper_tasks.py --steps 600 --seq-len 10 --jobs 3

For each (task, memory) pair this trains a GTMM through the project's trainer (`worldmodel.train.train`, the same
path as `python -m worldmodel.train --task <task> --memory <memory>`), action-free, address `hidden`, for `--steps`
updates, then evaluates the checkpoint on `--eval-sequences` fresh *test-split* sequences (unseen exemplars; unseen
classes for one-shot recall) and prints a markdown table:

- KL/step at recall positions (`revisit`: frames a perfect memory makes predictable) and at the other positions,
  in nats, under the posterior (one latent sample per step, fixed seed);
- the NLL bound per sequence: sum over the sequence of NLL + KL (the negative ELBO), in nats;
- a verdict. The paper's claim is that memory models drive the KL at recall positions towards zero where the LSTM
  baseline (`none`) cannot. We compare the recall KL with what the same model pays where it cannot know the frame:
  the KL at the other positions (without memory, a copied frame is as new as any other), except for parity recall,
  whose answer is one of two fixed images (the same pair in train and test): there the reference is the KL the model
  pays when the sequence ends with the image of the *wrong* parity (equal on average to the right one's for a model
  that does not know the parity).
  `recalls` if the recall KL is at most 25% of the reference, `partly` at most 75%, `fails` above; `untrained` if
  the reference is under 1 nat (the model hardly encodes its frames); a run that crashed or diverged says so.

Runs live in `--out/<task>/<memory>/` (checkpoint, TensorBoard, `result.json`); a finished run is reused, so a
killed benchmark resumes where it stopped. On CPU give each job one torch thread and run as many jobs as cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import tyro

RECALLS, PARTLY = 0.25, 0.75  # verdict thresholds on recall KL / reference KL
MIN_REFERENCE = 1.0  # nats: below this the model hardly encodes its frames and a small recall KL means nothing


@dataclass
class Args:
    """Train each memory on each of the paper's sequence tasks at a fixed budget; print KL at recall vs other steps."""

    steps: int = 600
    """training steps per run (the budget)"""
    seq_len: int = 10
    """frames per sequence; each task's kwargs fill it (envs.sequences.kwargs_for_length), as the trainer does"""
    tasks: tuple[str, ...] = ()
    """tasks to run (empty = all of envs.sequences.TASKS)"""
    memories: tuple[str, ...] = ()
    """memories to compare (empty = all of worldmodel.memory.MEMORIES)"""
    out: str = "runs/paper_tasks"
    """folder of the runs, one sub-folder per task and memory"""
    jobs: int = 2
    """runs trained at once, each in its own process"""
    threads: int = 1
    """torch threads per run"""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto"""
    seed: int = 0
    """seed of every run (model init, data order) and of the evaluation sequences"""
    eval_sequences: int = 256
    """test-split sequences per evaluation"""
    batch: int = 16
    """sequences per training batch"""
    lr: float = 1e-3
    """Adam learning rate"""
    z_dim: int = 16
    """latent size Z"""
    h_dim: int = 64
    """LSTM controller size"""
    embed_dim: int = 64
    """frame embedding size"""
    channels: int = 16
    """channels of the first conv layer"""
    hidden_dim: int = 64
    """hidden size of the prior/posterior MLPs"""
    addr_dim: int = 16
    """size of a slot's address part"""
    heads: int = 2
    """memory read heads"""
    kl_balance: float = 0.8
    """KL balancing weight of the prior term (0.5 = plain ELBO gradient)"""
    table: str = ""
    """also write the markdown table to this file"""
    train: bool = True
    """train runs that are not finished; --no-train only tabulates the finished ones"""


def train_config(args: Args, task: str, memory: str):
    """The trainer's config of one run: the `mnist_cpu` preset at the benchmark's sizes, no free nats.

    Free nats would stop the loss from pushing a step's KL below the threshold, which is exactly the quantity the
    benchmark measures at recall positions, so they are off."""
    from worldmodel.config import preset

    return dataclasses.replace(
        preset("mnist_cpu"), task=task, memory=memory, address="hidden", out=str(Path(args.out) / task / memory),
        device=args.device, seed=args.seed, threads=args.threads, steps=args.steps, seq_len=args.seq_len, batch=args.batch,
        lr=args.lr,
        z_dim=args.z_dim, h_dim=args.h_dim, embed_dim=args.embed_dim, channels=args.channels,
        hidden_dim=args.hidden_dim, addr_dim=args.addr_dim, heads=args.heads, free_nats=0.0,
        kl_balance=args.kl_balance, address_lr_scale=1.0, curriculum_start=0, progress=False,
        log_every=max(1, args.steps // 20), image_every=args.steps, ckpt_every=max(1, args.steps // 4),
    )


def evaluate(run_dir: str | Path, task: str, sequences: int, seed: int, device: str = "cpu") -> dict[str, Any]:
    """Per-step KL and NLL of a trained checkpoint on fresh test-split sequences of `task`, split by recall position."""
    import torch

    from envs.sequences import kwargs_for_length, parity_images, sample_batch
    from worldmodel import checkpoint
    from worldmodel.model import batch_to_torch
    from worldmodel.train import resolve_device

    dev = resolve_device(device)
    model, cfg = checkpoint.load(run_dir, dev)
    task_kwargs = kwargs_for_length(task, cfg.seq_len)  # what the trainer sampled (it saves the fitted seq_len)
    rng = np.random.default_rng([seed, 1])  # the same sequences for every memory
    kl_steps, nll_steps, recall, kl_wrong = [], [], [], []
    with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, sequences, 64):
            sample = sample_batch(task, min(64, sequences - start), rng, split="test", **task_kwargs)
            assert sample["obs"].shape[1] == cfg.seq_len, f"eval length {sample['obs'].shape[1]} != trained {cfg.seq_len}"
            batch = batch_to_torch(sample, dev)
            seq = model.observe(batch["obs"], batch["prev_action"], batch["pose"], sample=True)
            kl_steps.append(seq["kl"].float().cpu().numpy())  # (B, T)
            nll_steps.append(seq["nll"].float().cpu().numpy())  # (B, T)
            recall.append(sample["revisit"])  # (B, T)
            if task == "parity_recall":
                # The counterfactual: the same digits followed by the image of the *wrong* parity. A model that
                # knows the parity pays much less KL for the right image than for the wrong one; one that does not
                # pays the same for both (on average).
                wrong = sample["obs"].copy()  # (B, T, H, W, 1)
                wrong[:, -1, :, :, 0] = parity_images()[1 - sample["label"][:, -1]]  # the same pair in every split
                seq = model.observe(torch.as_tensor(wrong, device=dev), batch["prev_action"], batch["pose"])
                kl_wrong.append(seq["kl"][:, -1].float().cpu().numpy())  # (B,)
    kl, nll, recall = (np.concatenate(x) for x in (kl_steps, nll_steps, recall))
    extra = {"kl_recall_wrong_parity": float(np.concatenate(kl_wrong).mean())} if kl_wrong else {}
    return {
        **extra,
        "kl_recall": float(kl[recall].mean()),
        "kl_other": float(kl[~recall].mean()),
        "nll_recall": float(nll[recall].mean()),
        "nll_other": float(nll[~recall].mean()),
        "nll_bound": float((nll + kl).sum(axis=1).mean()),  # -ELBO per sequence
        "kl_per_step": kl.mean(axis=0).tolist(),  # (T,) for plots
        "recall_positions": recall.mean(axis=0).tolist(),  # (T,) fraction of sequences recalling at t
        "task_kwargs": task_kwargs,
        "sequences": int(kl.shape[0]),
        "length": int(kl.shape[1]),
    }


def run_one(args: Args, task: str, memory: str) -> dict[str, Any]:
    """Train (or reuse) one run and evaluate it; errors are returned, not raised, so the table can show them."""
    result: dict[str, Any] = {"task": task, "memory": memory, "steps": args.steps, "seq_len": args.seq_len}
    run_dir = Path(args.out) / task / memory
    try:
        import torch

        from worldmodel.train import train

        torch.set_num_threads(args.threads)
        cfg = train_config(args, task, memory)
        done = run_dir / "result.json"
        if done.is_file():
            saved = json.loads(done.read_text())
            if saved.get("steps") == args.steps and "error" not in saved:
                return saved
        if not args.train:
            return {**result, "not_run": True}
        resume = (run_dir / "ckpt.pt").is_file()
        tick = time.perf_counter()
        info = train(dataclasses.replace(cfg, resume=resume))
        result["train_s"] = time.perf_counter() - tick
        result["skipped_steps"] = info["skipped"]
        result.update(evaluate(run_dir, task, args.eval_sequences, args.seed, args.device))
    except Exception as e:  # noqa: BLE001 -- one broken memory must not hide the other 24 results
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def reference_kl(result: dict[str, Any]) -> float:
    """What this model would pay at a recall position if it remembered nothing (see module docstring)."""
    return result.get("kl_recall_wrong_parity", result["kl_other"])


def verdict(result: dict[str, Any]) -> str:
    if result.get("not_run"):
        return "not run (unfinished, --no-train)"
    if "error" in result:
        return f"error: {result['error'].splitlines()[0][:80]}"
    if not all(math.isfinite(result[k]) for k in ("kl_recall", "kl_other", "nll_bound")):
        return "diverged (non-finite loss)"
    if reference_kl(result) < MIN_REFERENCE:
        return "untrained (encodes < 1 nat per frame)"
    ratio = result["kl_recall"] / reference_kl(result)
    return "recalls" if ratio <= RECALLS else "partly" if ratio <= PARTLY else "fails"


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table, one row per run, grouped by task, with the recall KL relative to the `none` baseline."""
    results_ok = [r for r in results if "error" not in r and not r.get("not_run")]
    baseline = {r["task"]: r for r in results_ok if r["memory"] == "none"}
    lines = [
        "| task | memory | KL/step recall | KL/step other | recall / reference | recall vs none | NLL bound / seq | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r not in results_ok:
            lines.append(f"| {r['task']} | {r['memory']} | - | - | - | - | - | {verdict(r)} |")
            continue
        base = baseline.get(r["task"])
        vs_none = f"{r['kl_recall'] / base['kl_recall']:.2f}" if base and base["kl_recall"] > 0 else "-"
        lines.append(
            f"| {r['task']} | {r['memory']} | {r['kl_recall']:.2f} | {r['kl_other']:.2f} | "
            f"{r['kl_recall'] / max(reference_kl(r), 1e-9):.2f} | {vs_none} | {r['nll_bound']:.1f} | {verdict(r)} |"
        )
    return "\n".join(lines)


def main(args: Args) -> list[dict[str, Any]]:
    from envs.sequences import TASKS
    from worldmodel.memory import MEMORIES

    tasks = args.tasks or TASKS
    memories = args.memories or MEMORIES
    for name, given, known in (("--tasks", tasks, TASKS), ("--memories", memories, MEMORIES)):
        bad = [x for x in given if x not in known]
        if bad:
            raise ValueError(f"{name}: unknown {bad}, expected some of {list(known)}")
    if args.steps < 1 or args.jobs < 1 or args.threads < 1 or args.eval_sequences < 1:
        raise ValueError(f"--steps, --jobs, --threads, --eval-sequences must be >= 1; got {args.steps}, "
                         f"{args.jobs}, {args.threads}, {args.eval_sequences}")
    pairs = [(task, memory) for task in tasks for memory in memories]
    tick = time.perf_counter()
    results = []
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        # spawn: fresh interpreters, so each job's torch thread count and RNG are its own
        futures = [pool.submit(run_one, args, t, m) for t, m in pairs]
        for fut in futures:
            r = fut.result()
            results.append(r)
            print(f"[paper_tasks] {r['task']} / {r['memory']}: {verdict(r)} (KL recall "
                  f"{r.get('kl_recall', math.nan):.2f}, other {r.get('kl_other', math.nan):.2f}, "
                  f"train {r.get('train_s', 0.0):.0f} s)", flush=True)
    table = format_table(results)
    import platform

    import torch

    header = (f"{len(pairs)} runs x {args.steps} steps (batch {args.batch}, {args.seq_len} frames), {args.jobs} jobs x {args.threads} "
              f"thread(s) on {args.device}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{time.perf_counter() - tick:.0f} s in all")
    print(header)
    print(table, flush=True)
    for r in results:
        if "traceback" in r:
            print(f"\n[{r['task']} / {r['memory']}]\n{r['traceback']}")
    if args.table:
        Path(args.table).write_text(header + "\n\n" + table + "\n")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
