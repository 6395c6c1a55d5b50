"""Training-batch throughput of `rollouts.dataset.RolloutWindows`: `python benchmarks/loader_throughput.py`.

Writes a synthetic rollout folder (numpy-made episodes in the real on-disk format, no env needed), decodes its
cache once, then on one core times drawing random batches of windows two ways:

    per-window   the loader before issue 12: B `windows[i]` calls, then a stack per array (what
                 `worldmodel.train.RolloutSource.sample` did)
    sample_batch one vectorised gather per array (`RolloutWindows.sample_batch`)

and reports frames/s of each. Then it checks the overlap of `rollouts.dataset.Prefetcher`: a stand-in training
step of `--step-ms` of torch work consumes batches, and the time the loop waits for its batch is reported with and
without the background thread (on CUDA the batches also go through pinned memory to the GPU).

Imports torch, numpy and this repository only (argparse, not tyro; the repository's modules still import tyro).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script from a checkout that is not installed
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from rollouts import storage  # noqa: E402
from rollouts.dataset import Prefetcher, RolloutWindows  # noqa: E402
from worldmodel.model import BATCH_DTYPES as model_dtypes, OPTIONAL_DTYPES  # noqa: E402

# what train.py moves to the device: the batch contract and the optional reward keys the windows now carry
BATCH_DTYPES = {**model_dtypes, **OPTIONAL_DTYPES}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--frame", type=int, default=28, choices=(28, 64), help="28 (28x28x1) or 64 (64x64x3) frames")
    p.add_argument("--episodes", type=int, default=200, help="synthetic episodes to write")
    p.add_argument("--steps", type=int, default=127, help="transitions per episode (frames = steps + 1)")
    p.add_argument("--batch", type=int, default=16, help="windows per batch")
    p.add_argument("--seq-len", type=int, default=48, help="frames per window")
    p.add_argument("--batches", type=int, default=300, help="batches timed per method")
    p.add_argument("--step-ms", type=float, default=20.0, help="torch work per stand-in training step (prefetch check)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda: where the prefetched batches go")
    p.add_argument("--data", default=None, help="an existing rollout folder instead of a synthetic one")
    args = p.parse_args(argv)
    if min(args.episodes, args.steps, args.batch, args.seq_len, args.batches) < 1 or args.seq_len > args.steps + 1:
        p.error("--episodes, --steps, --batch, --seq-len, --batches: expected >= 1, and --seq-len <= --steps + 1")
    return args


def write_synthetic(root: Path, episodes: int, steps: int, obs_shape: tuple[int, int, int], seed: int = 0) -> None:
    """A rollout folder of random-walk episodes with random frames, in the format `rollouts.collect` writes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    manifest = storage.new_manifest(env_name="synthetic", env_id="synthetic", env_kwargs={}, agent_name="random",
                                    agent_kwargs={}, seed=seed, steps_per_episode=steps, obs_shape=obs_shape,
                                    num_actions=4, pose_dim=2, episodes_requested=episodes)
    for index in range(episodes):
        action = rng.integers(0, 4, steps).astype(np.int64)
        episode = {
            # low-entropy frames keep the compressed files small; the decoded cache is what the loader reads
            "obs": (rng.integers(0, 4, (steps + 1, *obs_shape)) * 64).astype(np.uint8),
            "action": action,
            "reward": np.zeros(steps, np.float32),
            "terminated": np.zeros(steps, bool),
            "truncated": np.eye(1, steps, steps - 1, dtype=bool)[0],
            "pose": np.cumsum(rng.normal(size=(steps + 1, 2)), axis=0).astype(np.float32),
            "revisit": rng.random(steps + 1) < 0.3,
            "visit_count": np.zeros(steps + 1, np.int32),
        }
        file = storage.episode_filename(index)
        sha = storage.save_episode(root / file, episode,
                                   identity=storage.episode_identity(manifest, index, env_seed=index, agent_seed=index))
        manifest["episodes"].append(storage.episode_record(index, file, sha, (root / file).stat().st_size, episode,
                                                           env_seed=index, agent_seed=index))
    storage.write_manifest(root, manifest)


def per_window(windows: RolloutWindows, index: np.ndarray) -> dict[str, np.ndarray]:
    """The batch as the training loop drew it before `sample_batch`: one `__getitem__` per window, then stacks."""
    items = [windows[int(i)] for i in index]
    return {k: np.stack([item[k].numpy() for item in items]) for k in items[0]}


def frames_per_second(draw, windows: RolloutWindows, batch: int, batches: int) -> float:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(batches):
        draw(windows, rng.integers(len(windows), size=batch))
    return batch * windows.seq_len * batches / (time.perf_counter() - start)


def busy(ms: float, device: torch.device) -> None:
    """About `ms` of torch work (matrix products), the stand-in for a training step."""
    x = torch.randn(256, 256, device=device)
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        x = torch.tanh(x @ x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def waits(windows: RolloutWindows, args: argparse.Namespace, device: torch.device, prefetch: bool
          ) -> tuple[float, int]:
    """Mean ms per step the stand-in loop waits for its batch (sample_batch + transfer), with or without prefetch,
    and (with prefetch) how many of the batches the loop read differ from the ones made directly: each batch's
    frames are summed on the consumer's stream right after `get`, as a training step would read them, while the
    copies of the next batches run on the side stream (a missed wait would sum a half-copied batch)."""
    def make(step: int) -> dict[str, np.ndarray]:
        return windows.sample_batch(np.random.default_rng([0, step]).integers(len(windows), size=args.batch))

    steps, waited, wrong = 30, 0.0, 0
    if prefetch:
        with Prefetcher(make, device, start=0, depth=2, dtypes=BATCH_DTYPES) as loader:
            busy(args.step_ms, device)  # the first batches get made while the "model" starts
            for step in range(steps):
                start = time.perf_counter()
                batch = loader.get(step)
                waited += time.perf_counter() - start
                checksum = batch["obs"].sum(dtype=torch.int64)  # queued on this stream, after the copy's event
                busy(args.step_ms, device)
                wrong += int(checksum.item() != int(make(step)["obs"].sum(dtype=np.int64)))
                del batch
    else:
        for step in range(steps):
            start = time.perf_counter()
            batch = {k: torch.from_numpy(v).to(device, dtype=BATCH_DTYPES[k]) for k, v in make(step).items()}
            waited += time.perf_counter() - start
            busy(args.step_ms, device)
            del batch
    return 1e3 * waited / steps, wrong


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    obs_shape = (28, 28, 1) if args.frame == 28 else (64, 64, 3)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp) / "rollouts"
        if not args.data:
            start = time.perf_counter()
            write_synthetic(root, args.episodes, args.steps, obs_shape)
            print(f"wrote {args.episodes} synthetic episodes of {args.steps + 1} frames {obs_shape} in "
                  f"{time.perf_counter() - start:.1f} s")
        windows = RolloutWindows(root, seq_len=args.seq_len, split="all", cache_dir=Path(tmp) / "cache")
        print(f"{len(windows)} windows of {args.seq_len} frames {windows.obs_shape}, batch {args.batch}, one core")
        # page the whole cache in first: the steady state of a run whose data fits in the page cache
        windows.sample_batch(np.arange(0, len(windows), args.seq_len))
        old = frames_per_second(per_window, windows, args.batch, args.batches)
        new = frames_per_second(RolloutWindows.sample_batch, windows, args.batch, args.batches)
        print(f"{'per-window (before)':<24} {old:12,.0f} frames/s")
        print(f"{'sample_batch (after)':<24} {new:12,.0f} frames/s   x{new / old:.1f}")
        for prefetch in (False, True):
            wait, wrong = waits(windows, args, device, prefetch)
            check = f"; {wrong} of 30 batches differ from the ones made directly" if prefetch else ""
            print(f"{'prefetch' if prefetch else 'no prefetch':<24} waits {wait:7.2f} ms per {args.step_ms:.0f} ms "
                  f"step for its batch on {device}{check}")


if __name__ == "__main__":
    main()
