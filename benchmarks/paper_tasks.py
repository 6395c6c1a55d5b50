"""The paper's memory benchmarks (Gemici et al. 2017, sec. 5.1-5.5): every memory on every sequence task, 3 seeds.

    python benchmarks/paper_tasks.py --budget cpu --table runs/paper_tasks/table.md      # 2 CPU cores
    python benchmarks/paper_tasks.py --budget gpu --table runs/paper_tasks/table.md      # one GPU

For each (task, memory, seed) this trains a GTMM through the project's trainer (`worldmodel.train.train`, the same
path as `python -m worldmodel.train --task <task> --memory <memory>`), action-free, address `hidden`, for `--steps`
updates, then evaluates the checkpoint on `--eval-sequences` fresh *test-split* sequences (unseen exemplars; unseen
classes for one-shot recall) and prints a markdown table, one row per (task, memory), mean and spread over seeds:

- KL/step at recall positions (`revisit`: frames a perfect memory makes predictable) and at the other positions,
  in nats, under the posterior (one latent sample per step, fixed seed);
- recall / reference: the recall KL divided by what the same model pays where it cannot know the frame: the KL at
  the other positions (without memory a copied frame is as new as any other), except for parity recall, whose
  answer is one of two fixed images (the same pair in train and test): there the reference is the KL the model pays
  when the sequence ends with the image of the *wrong* parity (equal on average to the right one's for a model that
  does not know the parity). `recalls` if the mean ratio is at most 0.25, `partly` at most 0.75, `fails` above;
  `untrained` if the reference is under 1 nat (the model hardly encodes its frames); a crashed or diverged run says so;
- found: where a recall repeats an earlier frame, the read attention mass of the best head on the slots holding
  that frame (`worldmodel.retrieval`: exact for the FIFO, write shares for NTM/LRU/DNC), next to chance (a uniform
  read over the filled slots). It separates the two ways to fail: the read missed the frame (found ~ chance), or
  found it and the prior did not use it (found ~ 1, ratio high).

Budgets (`--budget`, each field can still be set by its own flag): `cpu` 2,000 steps x batch 16, 2 processes of one
torch thread; `gpu` the same steps at batch 64 on `cuda`, all 75 runs at once (`--jobs 75`: each process is launch
bound, so the GPU runs many side by side; 15 runs of 2,000 steps took 196 s together on one H100). Both train in
fp32 (`--precision`: compiled bf16 on CUDA broke the learning of reads).

The model is the paper's with issue 14's four changes, each its own flag (docs/paper_ablation.md measures each):
content read keys (`--memory-kwargs '{"content_keys": true}'`, `worldmodel.memory.base.ContentKeys`), slots that
store the latent's mean (`--write-latent mean`), a linear path from the read to the prior (`--prior-skip`), and a
robust prior (`--prior-outlier 0.01`, `worldmodel.nets.outlier_kl`, `none` too). The paper's own model:
`--memory-kwargs '{}' --write-latent sample --no-prior-skip --prior-outlier 0`. `none` gets no memory kwargs.

Runs live in `--out/<task>/<memory>/seed<k>/` (checkpoint, TensorBoard, `result.json`); a finished run whose
training config equals the one asked for is reused, so a killed benchmark resumes where it stopped, and a changed
knob retrains instead of reporting a stale result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from gtmm.cli import UserError, parse, parse_json_object, run  # noqa: E402

RECALLS, PARTLY = 0.25, 0.75  # verdict thresholds on recall KL / reference KL
MIN_REFERENCE = 1.0  # nats: below this the model hardly encodes its frames and a small recall KL means nothing
BUDGETS: dict[str, dict[str, Any]] = {
    # 2 shared CPU cores: ~85 s a run with one thread on an idle core (the machine of the README's table)
    "cpu": {"steps": 2000, "batch": 16, "jobs": 2, "device": "cpu"},
    # one GPU: 4x the data per step; every run in its own process at once (a step is launch bound, not math bound)
    "gpu": {"steps": 2000, "batch": 64, "jobs": 75, "device": "cuda"},
}


@dataclass
class Args:
    """Train each memory on each of the paper's sequence tasks at a fixed budget, over seeds; tabulate recall KL."""

    budget: Literal["cpu", "gpu"] = "cpu"
    """named budget filling --steps, --batch, --jobs, --device where they are not given (see BUDGETS)"""
    steps: Optional[int] = None
    """training steps per run (default: the budget's)"""
    batch: Optional[int] = None
    """sequences per training batch (default: the budget's)"""
    jobs: Optional[int] = None
    """runs trained at once, each in its own process (default: the budget's)"""
    device: Optional[str] = None
    """cpu, cuda, cuda:N or auto (default: the budget's)"""
    seq_len: int = 10
    """frames per sequence; each task's kwargs fill it (envs.sequences.kwargs_for_length), as the trainer does"""
    tasks: tuple[str, ...] = ()
    """tasks to run (empty = all of envs.sequences.TASKS)"""
    memories: tuple[str, ...] = ()
    """memories to compare (empty = all of worldmodel.memory.MEMORIES)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds of the runs (model init, data order); the table shows their mean and spread"""
    out: str = "runs/paper_tasks"
    """folder of the runs, one sub-folder per task, memory and seed"""
    threads: int = 1
    """torch threads per run"""
    compile: Literal["auto", "on", "off"] = "auto"
    """the trainer's --compile (auto: CUDA graphs on a GPU, eager on the CPU)"""
    cuda_graphs: bool = True
    """the trainer's --cuda-graphs (with the compiled step on a GPU: replay it as CUDA graphs)"""
    precision: Literal["auto", "bf16", "fp32"] = "fp32"
    """the trainer's --precision; fp32 (what the trainer's auto also picks for a --task): on one H100, compiled with
    bf16 autocast, introspective learnt to read on similarity-cued recall in 1 of 7 runs, in fp32 in 14 of 14
    memory runs (and eager bf16 2 of 2); at these sizes bf16 is no faster (README)"""
    eval_sequences: int = 256
    """test-split sequences per evaluation (the same ones for every run)"""
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
    free_nats: float = 0.0
    """free bits per step (0: the loss keeps pushing the recall KL down, which is what the benchmark measures)"""
    augment_shift: int = 0
    """move each training image by up to this many pixels (the trainer's --augment-shift; 0 = off)"""
    prior_skip: bool = True
    """the memories' prior gets a linear path from the read (the trainer's --prior-skip)"""
    prior_outlier: float = 0.01
    """eps of every model's robust prior, `none` too (the trainer's --prior-outlier; 0 = the plain Gaussian)"""
    write_latent: Literal["sample", "mean"] = "mean"
    """what every memory stores: the sampled latent (the paper's) or its mean (--write-latent of the trainer)"""
    memory_kwargs: str = '{"content_keys": true}'
    """JSON object of memory arguments for every memory but `none` (content_keys: read heads can also match what a
    slot holds, which cued recall needs; content_address: the older way, through the slot's address)"""
    task_kwargs: str = "{}"
    """JSON object: task name -> fields of its *training* batches (the trainer's --task-kwargs), e.g.
    '{"parity_recall": {"prefix": "even"}}' for parity's curriculum; evaluation always uses the plain task"""
    table: str = ""
    """also write the markdown table to this file"""
    train: bool = True
    """train runs that are not finished; --no-train only tabulates the finished ones"""


def resolved(args: Args) -> Args:
    """`args` with the budget's values where --steps, --batch, --jobs, --device were not given, every value checked."""
    from envs.sequences import TASKS
    from worldmodel.memory import MEMORIES

    budget = BUDGETS[args.budget]
    args = dataclasses.replace(args, **{k: v for k, v in budget.items() if getattr(args, k) is None})
    for name, given, known in (("--tasks", args.tasks, TASKS), ("--memories", args.memories, MEMORIES)):
        bad = [x for x in given if x not in known]
        if bad:
            raise UserError(f"{name} {' '.join(bad)}: expected some of {', '.join(known)}")
    for name in ("steps", "batch", "jobs", "threads", "eval_sequences", "seq_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if not args.seeds:
        raise UserError("--seeds: expected at least one seed")
    per_task = parse_json_object(args.task_kwargs, "task_kwargs")
    for task, fields in per_task.items():
        if task not in TASKS or not isinstance(fields, dict):
            raise UserError(f"--task-kwargs {args.task_kwargs}: expected task name -> JSON object of its fields, "
                            f"with names among {', '.join(TASKS)}; got {task!r}: {fields!r}")
    # the trainer's own checks, once up front on each memory's config (the model flags are the trainer's: a bad
    # --prior-outlier or --memory-kwargs would otherwise be one failed row per run, not one line)
    from worldmodel.train import check_config

    for memory in args.memories or MEMORIES:
        for task in {(args.tasks or TASKS)[0], *(t for t in per_task if t in (args.tasks or TASKS))}:
            check_config(train_config(args, task, memory, args.seeds[0]))
    return args


def run_dir(args: Args, task: str, memory: str, seed: int) -> Path:
    """The folder of one run."""
    return Path(args.out) / task / memory / f"seed{seed}"


def train_config(args: Args, task: str, memory: str, seed: int):
    """The trainer's config of one run: the `mnist_cpu` preset at the benchmark's sizes, no free nats by default.

    Free nats would stop the loss from pushing a step's KL below the threshold, which is exactly the quantity the
    benchmark measures at recall positions, so they are off."""
    from worldmodel.config import preset

    return dataclasses.replace(
        preset("mnist_cpu"), task=task, memory=memory, address="hidden", out=str(run_dir(args, task, memory, seed)),
        device=args.device, seed=seed, threads=args.threads, compile=args.compile, cuda_graphs=args.cuda_graphs,
        precision=args.precision, steps=args.steps, seq_len=args.seq_len, batch=args.batch, lr=args.lr,
        z_dim=args.z_dim, h_dim=args.h_dim, embed_dim=args.embed_dim, channels=args.channels,
        hidden_dim=args.hidden_dim, addr_dim=args.addr_dim,
        heads=args.heads, free_nats=args.free_nats, kl_balance=args.kl_balance, address_lr_scale=1.0,
        write_latent=args.write_latent if memory != "none" else "sample", prior_skip=args.prior_skip and memory != "none",
        prior_outlier=args.prior_outlier, augment_shift=args.augment_shift,
        curriculum_start=0, progress=False, memory_kwargs="{}" if memory == "none" else args.memory_kwargs,
        task_kwargs=json.dumps(parse_json_object(args.task_kwargs, "task_kwargs").get(task, {})),
        log_every=max(1, args.steps // 20), image_every=args.steps, ckpt_every=max(1, args.steps // 4),
        val_every=0,
    )


def run_definition(cfg) -> dict[str, Any]:
    """What makes two runs the same run: the training config without where, how fast and how long it runs, with
    `seq_len` as the trainer fits it to the task (it saves 9 for a 10-frame request of a 3 + 2 x 3 task)."""
    from envs.sequences import kwargs_for_length, sequence_length
    from worldmodel.config import RESUME_MAY_CHANGE

    definition = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_MAY_CHANGE and k not in ("out", "resume")}
    if cfg.task is not None:
        definition["seq_len"] = sequence_length(cfg.task, **kwargs_for_length(cfg.task, cfg.seq_len))
    if parse_json_object(definition.get("task_kwargs", "{}"), "task_kwargs") == {}:
        definition.pop("task_kwargs", None)  # the plain task: the same run as one made before the flag existed
    return definition


def image_identity(recall_of: np.ndarray) -> np.ndarray:
    """(B, T) int: the first position showing each frame's image, following copies of copies (dynamic
    dependencies), so that every earlier showing of a recalled image counts as the right slot."""
    B, T = recall_of.shape
    identity = np.tile(np.arange(T), (B, 1))  # (B, T)
    rows = np.arange(B)
    for t in range(T):  # recall_of[:, t] < t: the source's identity is already resolved
        source = recall_of[:, t]
        identity[:, t] = np.where(source >= 0, identity[rows, np.maximum(source, 0)], t)
    return identity


def recall_retrieval(memory, seq: dict[str, Any], recall_of: np.ndarray) -> dict[str, np.ndarray]:
    """Per recall step (copies only), how much of the read went to the slots that hold the recalled frame.

    `seq`: `GTMM.observe(..., diagnostics=True)` output with `read_weights` (B, T, R, N), `read_gate` (B, T, R) and
    the write records; `recall_of` (B, T). Positions are matched as places are in `worldmodel.retrieval` (a "pose"
    that is the image's identity). Returns flat arrays over the recall steps whose frame memory still holds:
    `found` (the best head's correct mass), `chance` (a uniform read's), `gate` (mean over heads)."""
    import torch

    from worldmodel.retrieval import retrieval_from_steps

    if memory.slots == 0 or not (recall_of >= 0).any():
        return {}
    pose = torch.as_tensor(image_identity(recall_of), dtype=torch.float32, device=seq["read_weights"].device)
    records = {k: v for k, v in seq.items() if k.startswith("write_")}  # (B, T, N) each; none for the FIFO
    figures = retrieval_from_steps(memory, seq["read_weights"], seq["read_gate"], records, pose.unsqueeze(-1), tol=0.5)
    mask = torch.as_tensor(recall_of >= 0, device=pose.device) & figures["target"]  # (B, T)
    return {
        "found": figures["correct_mass"].amax(-1)[mask].cpu().numpy(),
        "chance": figures["chance_mass"][mask].cpu().numpy(),
        "gate": figures["gate"].mean(-1)[mask].cpu().numpy(),
    }


def counted_levels(k: int) -> list[int]:
    """How many counted digits the parity evaluation tries: 1, 2, 3, about half of k, and k."""
    return sorted({j for j in (1, 2, 3, (k + 1) // 2, k) if 1 <= j <= k})


def evaluate(run_dir: str | Path, task: str, sequences: int, seed: int, device: str = "cpu") -> dict[str, Any]:
    """Per-step KL and NLL of a trained checkpoint on fresh test-split sequences of `task`, split by recall position,
    and where the memory's reads went at the recall steps (`recall_retrieval`)."""
    import torch

    from envs.sequences import kwargs_for_length, parity_images, sample_batch
    from gtmm.cli import resolve_device
    from worldmodel import checkpoint
    from worldmodel.model import batch_to_torch

    dev = resolve_device(device)
    model, cfg = checkpoint.load(run_dir, dev)
    task_kwargs = kwargs_for_length(task, cfg.seq_len)  # what the trainer sampled (it saves the fitted seq_len)
    rng = np.random.default_rng([seed, 1])  # the same sequences for every memory
    kl_steps, nll_steps, recall, kl_wrong = [], [], [], []
    by_counted: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}  # parity of the last j digits: right, wrong
    if task == "parity_recall":
        by_counted = {j: ([], []) for j in counted_levels(task_kwargs["k"])}
    easy_rng = np.random.default_rng([seed, 2])  # its own stream: the main sequences stay those of before
    retrieval: dict[str, list[np.ndarray]] = {}
    with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, sequences, 64):
            sample = sample_batch(task, min(64, sequences - start), rng, split="test", **task_kwargs)
            assert sample["obs"].shape[1] == cfg.seq_len, f"eval length {sample['obs'].shape[1]} != trained {cfg.seq_len}"
            batch = batch_to_torch(sample, dev)
            seq = model.observe(batch["obs"], batch["prev_action"], batch["pose"], sample=True, diagnostics=True)
            kl_steps.append(seq["kl"].float().cpu().numpy())  # (B, T)
            nll_steps.append(seq["nll"].float().cpu().numpy())  # (B, T)
            recall.append(sample["revisit"])  # (B, T)
            for key, value in recall_retrieval(model.cell.memory, seq, sample["recall_of"]).items():
                retrieval.setdefault(key, []).append(value)
            if task == "parity_recall":
                # The counterfactual: the same digits followed by the image of the *wrong* parity. A model that
                # knows the parity pays much less KL for the right image than for the wrong one; one that does not
                # pays the same for both (on average).
                wrong = sample["obs"].copy()  # (B, T, H, W, 1)
                wrong[:, -1, :, :, 0] = parity_images()[1 - sample["label"][:, -1]]  # the same pair in every split
                seq = model.observe(torch.as_tensor(wrong, device=dev), batch["prev_action"], batch["pose"],
                                    diagnostics=False)
                kl_wrong.append(seq["kl"][:, -1].float().cpu().numpy())  # (B,)
                # How many digits can it count? Sequences whose last j digits count and the ones before are even
                # (prefix='even', counted=j): j = 1 is the simplest parity (the last digit's, one step back), j = k
                # the task itself; a curriculum (prefix='even', grow_every) moves a model up these levels. A model
                # that fails the task may still count a few digits, or none.
                for j in counted_levels(task_kwargs["k"]):
                    easy = sample_batch(task, len(sample["label"]), easy_rng, split="test",
                                        **{**task_kwargs, "prefix": "even", "counted": j})
                    pair_seed = int(easy_rng.integers(2**62))
                    for answer, store in ((easy["label"][:, -1], by_counted[j][0]),
                                          (1 - easy["label"][:, -1], by_counted[j][1])):
                        torch.manual_seed(pair_seed)  # both answers after the same latent draws: a paired comparison
                        shown = easy["obs"].copy()  # (B, T, H, W, 1)
                        shown[:, -1, :, :, 0] = parity_images()[answer]
                        b = batch_to_torch({**easy, "obs": shown}, dev)
                        seq = model.observe(b["obs"], b["prev_action"], b["pose"], diagnostics=False)
                        store.append(seq["kl"][:, -1].float().cpu().numpy())  # (B,)
    kl, nll, recall = (np.concatenate(x) for x in (kl_steps, nll_steps, recall))
    extra: dict[str, Any] = {"kl_recall_wrong_parity": float(np.concatenate(kl_wrong).mean())} if kl_wrong else {}
    if by_counted:
        means = {j: [float(np.concatenate(x).mean()) for x in pair] for j, pair in by_counted.items()}
        extra["parity_ratio_by_counted"] = {str(j): right / max(wrong, 1e-9) for j, (right, wrong) in means.items()}
        # the share of sequences whose right answer costs less than the wrong one: 0.5 is no parity, 1 all of it
        # (robust where the ratio of means is not: a few confident misses carry the mean KL)
        extra["parity_accuracy_by_counted"] = {
            str(j): float((np.concatenate(right) < np.concatenate(wrong)).mean()) for j, (right, wrong) in by_counted.items()}
        right, wrong = means[1]
        extra.update(kl_last_digit_parity_right=right, kl_last_digit_parity_wrong=wrong,
                     last_digit_parity_ratio=right / max(wrong, 1e-9),
                     last_digit_parity_sequences=int(sum(len(x) for x in by_counted[1][0])))
    extra.update({f"read_{key}": float(np.concatenate(values).mean()) for key, values in retrieval.items()})
    recall_kl = np.sort(kl[recall])  # (R,) ascending
    tail = recall_kl[len(recall_kl) - max(1, len(recall_kl) // 20):]  # the costliest 5% of the recalls
    return {
        **extra,
        "kl_recall": float(recall_kl.mean()),
        # why a mean fails: a typical recall (the median) against a few confident misses (the tail's share)
        "kl_recall_median": float(np.median(recall_kl)),
        "kl_recall_tail_share": float(tail.sum() / max(recall_kl.sum(), 1e-9)),
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


def run_one(args: Args, task: str, memory: str, seed: int) -> dict[str, Any]:
    """Train (or reuse) one run and evaluate it; errors are returned, not raised, so the table can show them."""
    result: dict[str, Any] = {"task": task, "memory": memory, "seed": seed, "steps": args.steps}
    folder = run_dir(args, task, memory, seed)
    if args.jobs > 1:
        # many runs compile at once (CUDA graphs on a GPU): one inductor compile thread each, not one per core each
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    try:
        import torch

        from worldmodel.train import train

        torch.set_num_threads(args.threads)
        cfg = train_config(args, task, memory, seed)
        result["definition"] = run_definition(cfg)
        done = folder / "result.json"
        if done.is_file():
            saved = json.loads(done.read_text())
            if saved.get("definition") == result["definition"] and saved.get("steps") == args.steps \
                    and "error" not in saved:
                return saved
        if not args.train:
            return {**result, "not_run": True}
        # a checkpoint of the same run is continued (to more steps, or after a kill); one of another definition, or
        # one aimed past --steps, is another run: start over rather than resume it
        before = saved_config(folder)
        resume = ((folder / "ckpt.pt").is_file() and before is not None and before.steps <= args.steps
                  and run_definition(before) == result["definition"])
        if not resume:
            for stale in ("ckpt.pt", "best.pt"):
                (folder / stale).unlink(missing_ok=True)
        tick = time.perf_counter()
        info = train(dataclasses.replace(cfg, resume=resume))
        result["train_s"] = time.perf_counter() - tick
        result["skipped_steps"] = info["skipped"]
        result.update(evaluate(folder, task, args.eval_sequences, seed=0, device=args.device))
    except Exception as e:  # noqa: BLE001 -- one broken run must not hide the other results
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result


def saved_config(folder: Path):
    """The training config a (possibly unfinished) run saved in its config.json, or None."""
    from worldmodel.config import TrainConfig

    try:
        return TrainConfig.from_dict(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def reference_kl(result: dict[str, Any]) -> float:
    """What this model would pay at a recall position if it remembered nothing (see module docstring)."""
    return result.get("kl_recall_wrong_parity", result["kl_other"])


def ratio(result: dict[str, Any]) -> float:
    """Recall KL / reference KL of one run."""
    return result["kl_recall"] / max(reference_kl(result), 1e-9)


def problem(result: dict[str, Any]) -> Optional[str]:
    """Why a run has no ratio to show (not run, error, diverged, untrained), or None."""
    if result.get("not_run"):
        return "not run (unfinished, --no-train)"
    if "error" in result:
        return f"error: {result['error'].splitlines()[0][:80]}"
    if not all(math.isfinite(result[k]) for k in ("kl_recall", "kl_other", "nll_bound")):
        return "diverged (non-finite loss)"
    if reference_kl(result) < MIN_REFERENCE:
        return "untrained (encodes < 1 nat per frame)"
    return None


def verdict(value: float) -> str:
    """`recalls`, `partly` or `fails` for a recall / reference ratio."""
    return "recalls" if value <= RECALLS else "partly" if value <= PARTLY else "fails"


def spread(values: list[float], digits: int = 2) -> str:
    """'mean ± std' (population std over the seeds), or the value alone for one seed."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table, one row per (task, memory) in the order given, mean ± std over the seeds that ran."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["task"], r["memory"]), []).append(r)
    lines = [
        ("| task | memory | seeds | KL/step recall | KL/step other | recall / reference | per seed | median recall / "
         "reference | costliest 5% of recall KL | found (chance) | verdict |"),
        "|---|---|---:|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for (task, memory), runs in groups.items():
        ok = [r for r in runs if problem(r) is None]
        bad = [f"seed {r['seed']}: {problem(r)}" for r in runs if problem(r) is not None]
        if not ok:
            lines.append(f"| {task} | {memory} | 0/{len(runs)} | - | - | - | - | - | - | - | {'; '.join(bad)} |")
            continue
        ratios = [ratio(r) for r in ok]
        found = [r["read_found"] for r in ok if "read_found" in r]
        chance = [r["read_chance"] for r in ok if "read_chance" in r]
        found_cell = f"{np.mean(found):.2f} ({np.mean(chance):.2f})" if found else "-"
        # diagnostics, not the verdict: results saved before they existed lack them
        typical = [r["kl_recall_median"] / max(reference_kl(r), 1e-9) for r in ok if "kl_recall_median" in r]
        tails = [r["kl_recall_tail_share"] for r in ok if "kl_recall_tail_share" in r]
        typical_cell = spread(typical) if typical else "-"
        tail_cell = f"{np.mean(tails):.0%}" if tails else "-"
        lines.append(
            f"| {task} | {memory} | {len(ok)}/{len(runs)} | {spread([r['kl_recall'] for r in ok], 1)} | "
            f"{spread([r['kl_other'] for r in ok], 1)} | {spread(ratios)} | {' '.join(f'{x:.2f}' for x in ratios)} | "
            f"{typical_cell} | {tail_cell} | {found_cell} | "
            f"{verdict(float(np.mean(ratios)))}{'; ' + '; '.join(bad) if bad else ''} |"
        )
    return "\n".join(lines)


def exit_with_parent(parent: int) -> None:
    """In a worker: leave as soon as the benchmark that started it is gone. A killed benchmark (SIGKILL, SIGTERM to
    its process only) otherwise leaves its workers training their current runs as orphans."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Train and evaluate every (task, memory, seed), print the table (and write it to --table)."""
    from envs.sequences import TASKS
    from worldmodel.memory import MEMORIES

    args = resolved(parse(Args, argv, prog="benchmarks.paper_tasks"))
    tasks = args.tasks or TASKS
    memories = args.memories or MEMORIES
    triples = [(task, memory, seed) for task in tasks for memory in memories for seed in args.seeds]
    tick = time.perf_counter()
    results = []
    with ProcessPoolExecutor(min(args.jobs, len(triples)), mp_context=get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        # spawn: fresh interpreters, so each job's torch thread count, CUDA context and RNG are its own
        futures = [pool.submit(run_one, args, *triple) for triple in triples]
        for fut in futures:
            r = fut.result()
            results.append(r)
            found = f", found {r['read_found']:.2f} (chance {r['read_chance']:.2f})" if "read_found" in r else ""
            shown = problem(r) or f"recall / reference {ratio(r):.2f}{found}"
            print(f"[paper_tasks] {r['task']} / {r['memory']} / seed {r['seed']}: {shown} (KL recall "
                  f"{r.get('kl_recall', math.nan):.2f}, other {r.get('kl_other', math.nan):.2f}, "
                  f"train {r.get('train_s', 0.0):.0f} s)", flush=True)
    table = format_table(results)
    import torch

    device = args.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(0)})"
    header = (f"{len(triples)} runs ({len(args.seeds)} seeds) x {args.steps} steps (batch {args.batch}, {args.seq_len} "
              f"frames, memory kwargs {args.memory_kwargs}, slots store the latent's {args.write_latent}, "
              f"training images moved by <= {args.augment_shift} px{', prior skip' if args.prior_skip else ''}"
              f"{f', robust prior eps {args.prior_outlier}' if args.prior_outlier else ''}"
              f"{f', trained on task kwargs {args.task_kwargs}' if parse_json_object(args.task_kwargs, 'task_kwargs') else ''}), "
              f"{args.jobs} jobs x {args.threads} thread(s) on {device} (compile {args.compile}"
              f"{'' if args.cuda_graphs else ', no CUDA graphs'}, precision {args.precision}), "
              f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{time.perf_counter() - tick:.0f} s in all")
    print(header)
    print(table, flush=True)
    for r in results:
        if "traceback" in r:
            print(f"\n[{r['task']} / {r['memory']} / seed {r['seed']}]\n{r['traceback']}")
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(header + "\n\n" + table + "\n")
    return results


if __name__ == "__main__":
    run(main)
