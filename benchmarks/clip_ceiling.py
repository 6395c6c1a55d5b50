"""How well can ANY single integrated address recall context places on MNIST maps with `clip` borders?
`python benchmarks/clip_ceiling.py --data data/mnist_map_clip_test`

Under `clip` a move into the map's edge does not happen, and in open loop a model sees only the actions. What it can
know of its place is then a distribution, and this script computes it exactly, model-free, from the recorded walks:
per axis, the start index s is uniform over the lattice (the env draws it so); a start is consistent when walking the
recorded actions from it reproduces every displacement seen in the context frames [0, K) (moved or blocked, which a
model reads from the frames); each consistent start gives the displacement d_t = x_t - x_0 at every open-loop step.
The two axes are independent, so P(d_t) is the product of their posteriors. Optionally a model also reads the
lattice *phase* of the start from the frames: with `step` half a digit, a window is either aligned with the digit
cells or straddles two (index mod digit/unit), which the context frames show.

For every open-loop step that revisits a place seen in the context (the evaluation's `revisit_context` group), it
reports what an address that knows the given facts can reach with a PERFECT memory and decoder (the stored context
frame of a place is its frame again, exactly; a place not in the context is predicted as the context's mean frame):

    hit rate        P(the most probable displacement is the true one): the best a single address can do
    MSE best guess  predict the context frame at the most probable displacement
    MSE hedged      predict the posterior mixture sum_d P(d) frame(d) (what a soft read over hypotheses could do)

Rows: `every move happens` (context exact, open loop assumes each move is made: the gate without knowledge of the
map), `extent known` (the Bayes posterior above), `extent + phase`, and `true moves` (0 error: the oracle). A
trained model adds its own decoding error (its recall with the true open-loop moves) on top of these figures.
With `--eval` (an eval.json of `worldmodel.evaluate` on the same folder) the MSEs are also given as x `none`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from envs.mnist_map import ACTION_DELTAS  # noqa: E402
from gtmm.cli import UserError, run  # noqa: E402
from rollouts.storage import episode_path, load_episode, read_manifest  # noqa: E402

MNIST_MAP_ID = "MnistMap-v0"
ROWS = ("every move happens", "extent known", "extent + phase", "true moves")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="a held-out MNIST-map folder with the clip border")
    p.add_argument("--context", type=int, default=8, help="context frames K (the evaluation's --context)")
    p.add_argument("--seq-len", type=int, default=48, help="frames per window T (the evaluation's)")
    p.add_argument("--windows", type=int, default=256, help="episodes (first window of each), as the evaluation")
    p.add_argument("--eval", default="", help="an eval.json on the same data: adds x none from its baseline")
    args = p.parse_args(argv)
    if not 0 < args.context < args.seq_len:
        p.error(f"--context {args.context} / --seq-len {args.seq_len}: expected 0 < context < seq_len")
    return args


def map_geometry(manifest: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lattice size, pixels per lattice unit, lattice period of the digit cells), each per axis (2,), from the env
    the folder was recorded with."""
    env = manifest["env"]
    if env.get("id") != MNIST_MAP_ID:
        raise UserError(f"--data: recorded with {env.get('id')!r}, expected {MNIST_MAP_ID} (an MNIST-map folder)")
    import gymnasium as gym

    import envs  # noqa: F401  (registers the ids)

    core = gym.make(env["id"], **env.get("kwargs", {})).unwrapped.core
    geometry = core.geometry
    if geometry.border != "clip":
        raise UserError(f"--data: border {geometry.border!r}, expected 'clip' (under 'wrap' every move happens)")
    unit = np.asarray(geometry.unit, dtype=np.int64)
    period = np.asarray(geometry.digit_shape, dtype=np.int64) // unit
    return np.asarray(geometry.lattice_shape, dtype=np.int64), unit, np.maximum(period, 1)


def axis_posterior(index: np.ndarray, actions: np.ndarray, size: int, context: int, period: int | None
                   ) -> np.ndarray:
    """Displacement paths (S, T) of the starts consistent with the context, along one axis: index (T,) the true
    lattice index, actions (T-1,) the deltas along this axis. With `period`, starts must also share the true
    start's phase (index mod period)."""
    T = len(index)
    starts = np.arange(size)
    walk = np.empty((size, T), dtype=np.int64)
    walk[:, 0] = starts
    for t in range(1, T):
        walk[:, t] = np.clip(walk[:, t - 1] + actions[t - 1], 0, size - 1)
    paths = walk - starts[:, None]  # (L, T)
    ok = np.all(paths[:, :context] == (index[:context] - index[0]), axis=1)
    if period is not None:
        ok &= starts % period == index[0] % period
    return paths[ok]


def measure(root: Path, context: int, seq_len: int, windows: int) -> dict[str, dict[str, float]]:
    """Hit rate and the two ideal MSEs of each row, over the open-loop revisits of context places."""
    manifest = read_manifest(root)
    size, unit, period = map_geometry(manifest)
    records = [r for r in sorted(manifest["episodes"], key=lambda r: r["index"]) if r["steps"] + 1 >= seq_len]
    if not records:
        raise UserError(f"--data {root}: no episode has {seq_len} frames")
    pick = np.unique(np.linspace(0, len(records) - 1, min(windows, len(records))).round().astype(int))
    sums = {row: {"hit": 0.0, "mse_guess": 0.0, "mse_hedged": 0.0} for row in ROWS}
    steps = 0
    for i in pick:
        episode = load_episode(episode_path(root, records[i]), sha256=records[i]["sha256"])
        index = (episode["pose"][:seq_len] / unit).round().astype(np.int64)  # (T, 2) lattice indices
        deltas = ACTION_DELTAS[episode["action"][:seq_len - 1]]  # (T-1, 2)
        obs = episode["obs"][:seq_len].astype(np.float32) / 255.0  # (T, H, W, C)
        seen = {tuple(index[k] - index[0]): obs[k] for k in range(context)}  # context frames by displacement
        mean_frame = obs[:context].mean(0)
        revisits = [t for t in range(context, seq_len)
                    if episode["revisit"][t] and tuple(index[t] - index[0]) in seen]
        if not revisits:
            continue
        # every move happens after the (exactly read) context
        assumed = (index[context - 1] - index[0]) + np.cumsum(deltas[context - 1:], axis=0)  # frames K..T-1
        posteriors = {row: [axis_posterior(index[:, a], deltas[:, a], int(size[a]), context,
                                           int(period[a]) if row == "extent + phase" else None) for a in (0, 1)]
                      for row in ("extent known", "extent + phase")}
        for t in revisits:
            truth, target = tuple(index[t] - index[0]), obs[t]
            hypotheses = {
                "every move happens": {tuple(assumed[t - context]): 1.0},
                "true moves": {truth: 1.0},
            }
            for row, (rows, cols) in posteriors.items():
                dr, pr = np.unique(rows[:, t], return_counts=True)
                dc, pc = np.unique(cols[:, t], return_counts=True)
                hypotheses[row] = {(int(a), int(b)): (ca / len(rows)) * (cb / len(cols))
                                   for a, ca in zip(dr, pr) for b, cb in zip(dc, pc)}
            for row, probs in hypotheses.items():
                guess = max(probs, key=probs.get)
                hedged = sum(p * seen.get(d, mean_frame) for d, p in probs.items())
                sums[row]["hit"] += float(guess == truth)
                sums[row]["mse_guess"] += float(((seen.get(guess, mean_frame) - target) ** 2).mean())
                sums[row]["mse_hedged"] += float(((hedged - target) ** 2).mean())
            steps += 1
    if steps == 0:
        raise UserError(f"--data {root}: no open-loop step revisits a context place (K {context}, T {seq_len})")
    return {row: {k: v / steps for k, v in figures.items()} | {"steps": steps} for row, figures in sums.items()}


def baseline_mse(path: str) -> float:
    """The `none` baseline's open-loop MSE on context revisits from an eval.json."""
    try:
        result = json.loads(Path(path).read_text())
        return next(float(m["open_loop"]["mse_revisit_context"]) for m in result["models"].values()
                    if m["role"] == "baseline")
    except (OSError, ValueError, KeyError, StopIteration, TypeError) as exc:
        raise UserError(f"--eval {path}: expected an eval.json of worldmodel.evaluate with a --baseline ({exc})")


def main(argv: list[str] | None = None) -> None:
    """Print the ceiling table."""
    args = parse_args(argv)
    root = Path(args.data)
    figures = measure(root, args.context, args.seq_len, args.windows)
    none = baseline_mse(args.eval) if args.eval else math.nan
    steps = next(iter(figures.values()))["steps"]
    print(f"{root.name}: {steps} open-loop steps revisiting a context place (K {args.context}, T {args.seq_len}); "
          "perfect memory and decoder" + (f"; x none against its MSE {none:.4f}" if args.eval else ""))
    print("| address knows | hit rate | MSE best guess | MSE hedged |"
          + (" x none (guess / hedged) |" if args.eval else ""))
    print("|---|---|---|---|" + ("---|" if args.eval else ""))
    for row, f in figures.items():
        ratio = f" {f['mse_guess'] / none:.3f} / {f['mse_hedged'] / none:.3f} |" if args.eval else ""
        print(f"| {row} | {f['hit']:.3f} | {f['mse_guess']:.4f} | {f['mse_hedged']:.4f} |{ratio}")


if __name__ == "__main__":
    run(main)
