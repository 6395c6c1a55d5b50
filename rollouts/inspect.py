"""Print what a rollout folder holds and write a GIF of one episode with its revisit frames marked.

    python -m rollouts.inspect data/mnist_map
    python -m rollouts.inspect data/mnist_map --episode 3 --gif episode3.gif --scale 6

The GIF shows the frames upscaled (nearest neighbour); a frame whose ``revisit`` flag is set (the place was seen
earlier in the episode) gets a red border, a first visit a thin grey one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import tyro

from gtmm import cli
from gtmm.cli import UserError
from rollouts import storage
from rollouts.dataset import iter_episodes

RED = np.array([230, 30, 30], dtype=np.uint8)
GREY = np.array([90, 90, 90], dtype=np.uint8)


@dataclass
class InspectConfig:
    root: Annotated[Path, tyro.conf.Positional]
    """rollout folder (written by python -m rollouts.collect)"""
    episode: int = 0
    """index of the episode to draw"""
    gif: Path | None = None
    """where to write the GIF (default <root>/preview_episode_<index>.gif)"""
    scale: int = 4
    """upscaling factor of the frames"""
    fps: float = 8.0
    """GIF frames per second"""
    verify: bool = True
    """read every episode and check its sha256 (slower on big folders)"""


def mark_frames(obs: np.ndarray, revisit: np.ndarray, scale: int) -> np.ndarray:
    """(T, H, W, C) uint8 frames -> (T, H*scale + 2b, W*scale + 2b, 3) RGB with a red border on revisit frames."""
    if scale < 1:
        raise UserError(f"scale {scale}: expected >= 1")
    frames = np.repeat(np.repeat(obs, scale, axis=1), scale, axis=2)  # (T, H*s, W*s, C)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)  # grey -> RGB
    frames = frames[..., :3]
    border = max(2, scale)
    T, H, W, _ = frames.shape
    out = np.empty((T, H + 2 * border, W + 2 * border, 3), dtype=np.uint8)
    out[:] = np.where(revisit[:, None, None, None], RED, GREY)  # (T, 1, 1, 3) colour of each frame's border
    out[:, border:border + H, border:border + W] = frames
    return out


def dataset_stats(root: Path, verify: bool) -> dict[str, Any]:
    """Counts from the manifest; with ``verify`` every file is read back and checked as well."""
    manifest = storage.read_manifest(root)
    records = manifest["episodes"]
    steps = np.array([e["steps"] for e in records])
    revisit_share = np.array([e["revisit_frames"] / (e["steps"] + 1) for e in records])
    stats = {
        "episodes": len(records),
        "steps": int(steps.sum()),
        "steps_per_episode": [int(steps.min()), float(steps.mean()), int(steps.max())] if len(records) else None,
        "revisit_share": manifest["counts"]["revisit_frames"] / max(1, manifest["counts"]["frames"]),
        "revisit_share_per_episode": ([float(revisit_share.min()), float(revisit_share.mean()),
                                       float(revisit_share.max())] if len(records) else None),
        "bytes": manifest["counts"]["bytes"],
        "raw_bytes": int(manifest["counts"]["frames"] * np.prod(manifest["obs_shape"])),
        "missing_episodes": sorted(set(range(manifest["episodes_requested"])) - {e["index"] for e in records}),
    }
    if verify:
        stats["verified"] = sum(1 for _ in iter_episodes(root))
    return stats


def inspect(config: InspectConfig) -> dict[str, Any]:
    manifest = storage.read_manifest(config.root)
    header = {k: v for k, v in manifest.items() if k != "episodes"}
    print(json.dumps(header, indent=1))
    stats = dataset_stats(config.root, config.verify)
    low, mean, high = stats["steps_per_episode"] or (0, 0, 0)
    print(f"episodes {stats['episodes']} (of {manifest['episodes_requested']} requested), steps {stats['steps']} "
          f"(per episode min/mean/max {low}/{mean:.1f}/{high})")
    if stats["revisit_share_per_episode"]:
        r_low, r_mean, r_high = stats["revisit_share_per_episode"]
        print(f"revisit share {stats['revisit_share']:.3f} of frames (per episode min/mean/max "
              f"{r_low:.3f}/{r_mean:.3f}/{r_high:.3f})")
    print(f"size {stats['bytes'] / 1e6:.2f} MB on disk, {stats['raw_bytes'] / 1e6:.2f} MB of raw frames "
          f"({stats['raw_bytes'] / max(1, stats['bytes']):.1f}x compression)")
    if stats["missing_episodes"]:
        print(f"missing episodes: {len(stats['missing_episodes'])} (re-run the collect command to finish)")
    if config.verify:
        print(f"verified {stats['verified']} episode files (sha256, shapes)")

    records = {e["index"]: e for e in manifest["episodes"]}
    if config.episode not in records:
        raise UserError(f"--episode {config.episode}: the folder has no such episode "
                         f"(indices {min(records, default=None)}..{max(records, default=None)})")
    record = records[config.episode]
    episode = storage.load_episode(config.root / record["file"], sha256=record["sha256"])
    frames = mark_frames(episode["obs"], episode["revisit"], config.scale)
    gif = config.gif or config.root / f"preview_episode_{config.episode:06d}.gif"
    import imageio.v2 as imageio

    imageio.mimsave(gif, list(frames), duration=1.0 / config.fps, loop=0)
    print(f"wrote {gif}: {len(frames)} frames, {int(episode['revisit'].sum())} revisits marked red")
    stats["gif"] = str(gif)
    return stats


def main(argv: list[str] | None = None) -> None:
    """``python -m rollouts.inspect``: parse the flags and inspect the folder."""
    inspect(cli.parse(InspectConfig, argv, prog="rollouts.inspect"))


if __name__ == "__main__":
    cli.run(main)
