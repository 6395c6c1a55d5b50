"""Is the lattice filter's belief about where a walk started calibrated? `python benchmarks/filter_calibration.py
--checkpoint runs/clip_lattice_place --data data/mnist_map_clip_test`

A checkpoint whose address is the lattice filter with place evidence (`--address auto` on an MNIST map with `clip`
borders) sees the first K frames of each held-out episode (the evaluation's context), and this script scores its
posterior over the start on each axis against the recorded pose, with the place evidence weighed by the model's
learned weight tau and by each `--weights` value instead:

    log P(true start)   mean over walks of the log-probability of the true start (both axes): the proper score
                        that trains tau (`ActionAddress.start_loss`), higher is better
    ruled out           share of walks where the true start has probability < 0.001 (a forecast from there is lost)
    top-1               share of walks whose likeliest start is the true one
    confidence          mean probability of the likeliest start: calibrated when it matches top-1

Prints one row per weight. Runs on the CPU in a minute.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from gtmm.cli import UserError, run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run folder or ckpt.pt whose address is the lattice filter")
    p.add_argument("--data", required=True, help="held-out rollouts (e.g. collected with --env mnist_map_test)")
    p.add_argument("--context", type=int, default=8, help="K: frames seen before the score is taken")
    p.add_argument("--windows", type=int, default=256, help="held-out episodes, one window from each start")
    p.add_argument("--weights", type=float, nargs="*", default=[1.0],
                   help="evidence weights tau to score besides the model's own (1 = every frame independent)")
    args = p.parse_args(argv)
    if args.context < 1 or args.windows < 1 or any(not w >= 0 for w in args.weights):
        raise UserError(f"--context {args.context} / --windows {args.windows} / --weights {args.weights}: expected "
                        f">= 1, >= 1 and >= 0")  # one error line (gtmm.cli.run), not argparse's usage block
    return args


@torch.no_grad()
def score(model, batches: list[dict[str, torch.Tensor]], context: int) -> dict[str, float]:
    """The four figures of the module docstring for `model`'s filter as it is (its current evidence weight)."""
    address = model.cell.address
    log_p, top, confidence = [], [], []
    for batch in batches:
        seen = model.observe(batch["obs"][:, :context], batch["prev_action"][:, :context],
                             batch["pose"][:, :context], sample=False, diagnostics=False)
        log_w = seen["state"].address["log_w"].log_softmax(-1)  # (B, D, L) over the start on each axis
        # an episode's first frame comes with no action: the start is where the first frame was seen
        start = (batch["pose"][:, 0].float() / address.lattice_unit).round().long()  # (B, D)
        log_p.append(log_w.gather(-1, start.unsqueeze(-1)).squeeze(-1).sum(-1))  # (B,)
        top.append((log_w.argmax(-1) == start).all(-1).float())
        confidence.append(log_w.max(-1).values.sum(-1).exp())
    log_p_all = torch.cat(log_p)
    return {"log_p": float(log_p_all.clamp(min=-50).mean()), "ruled_out": float((log_p_all < math.log(1e-3)).float().mean()),
            "top1": float(torch.cat(top).mean()), "confidence": float(torch.cat(confidence).mean())}


def main(argv: list[str] | None = None) -> None:
    """Print the calibration table of a lattice-filter checkpoint on held-out walks."""
    from worldmodel import checkpoint
    from worldmodel.evaluate import _batches, episode_start_windows

    args = parse_args(argv)
    torch.set_num_threads(1)
    model, _ = checkpoint.load(args.checkpoint, "cpu")
    model.eval()
    address = model.cell.address
    if getattr(address, "place_head", None) is None:
        raise UserError(f"--checkpoint {args.checkpoint}: its address is not the lattice filter with place evidence "
                        f"(train on an MNIST map with clip borders and --address auto)")
    windows, index, _, _ = episode_start_windows(args.data, args.context + 1, args.windows)
    batches = list(_batches(windows, index, 64, torch.device("cpu")))
    learned = float(address.place_log_temperature.detach().exp())
    print(f"{args.checkpoint}: {len(index)} held-out walks of {args.data}, start scored after {args.context} frames")
    print(f"{'evidence weight tau':<26} {'log P(true start)':>17} {'ruled out':>9} {'top-1':>6} {'confidence':>10}")
    for label, tau in [(f"{learned:.3f} (the model's)", learned)] + [(f"{w:g}", w) for w in args.weights]:
        with torch.no_grad():
            address.place_log_temperature.fill_(math.log(max(tau, 1e-12)))
        r = score(model, batches, args.context)
        print(f"{label:<26} {r['log_p']:17.3f} {r['ruled_out']:9.3f} {r['top1']:6.3f} {r['confidence']:10.3f}")


if __name__ == "__main__":
    run(main)
