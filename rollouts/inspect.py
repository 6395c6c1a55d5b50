"""Print what a rollout folder holds, check every file against the manifest, and draw an episode as a GIF.

    python -m rollouts.inspect data/mnist_map
    python -m rollouts.inspect data/mnist_map --episode 3 --gif episode3.gif --scale 6

``--verify`` (the default) trusts nothing the manifest says: each file is read and compared with its entry and the
folder's header, and every mismatch is listed before the command fails (exit 2). Inspecting writes nothing unless
``--gif`` names a file.

The GIF shows the frames upscaled (nearest neighbour); a frame whose ``revisit`` flag is set (the place was seen
earlier in the episode) gets a red border, a first visit a thin grey one.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import tyro

from gtmm import cli
from gtmm.cli import UserError, check_range
from gtmm.fs import write_bytes_atomic
from rollouts import storage

RED = np.array([230, 30, 30], dtype=np.uint8)
GREY = np.array([90, 90, 90], dtype=np.uint8)


@dataclass
class InspectConfig:
    """Print what a rollout folder holds, check every file against the manifest, and draw an episode as a GIF."""
    root: Annotated[Path, tyro.conf.Positional]
    """rollout folder (written by python -m rollouts.collect)"""
    episode: int | None = None
    """index of an episode to describe (its manifest entry) and to draw with --gif (default: the first one)"""
    gif: Path | None = None
    """write a GIF of the episode to this .gif file (nothing is written without it)"""
    scale: int = 4
    """upscaling factor of the GIF frames"""
    fps: float = 8.0
    """GIF frames per second"""
    verify: bool = True
    """read every episode file and check it against the manifest: sha256, size, steps, revisits, return,
    termination, frame shape, pose size, actions, and the episode identity stored inside the file"""


def check_flags(config: InspectConfig) -> None:
    """UserError naming the flag for a bad --scale, --fps, --episode or --gif (before any file is read)."""
    check_range("scale", config.scale, 1)
    if not config.fps > 0:
        raise UserError(f"--fps {config.fps}: expected > 0")
    if config.episode is not None:
        check_range("episode", config.episode, 0)
    if config.gif is not None:
        # a .gif name only: a slip like --gif data/manifest.json must not overwrite the folder's files
        if config.gif.suffix.lower() != ".gif":
            raise UserError(f"--gif {config.gif}: expected a file name ending in .gif")
        if config.gif.is_dir():
            raise UserError(f"--gif {config.gif} is a folder, expected a .gif file name")
        if not config.gif.parent.is_dir():
            raise UserError(f"--gif {config.gif}: folder {config.gif.parent} does not exist")


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


def dataset_stats(root: Path) -> dict[str, Any]:
    """Counts and shares from the manifest (no file is read; ``storage.verify_folder`` checks the files)."""
    manifest = storage.read_manifest(root)
    records = manifest["episodes"]
    steps = np.array([e["steps"] for e in records])
    revisit_share = np.array([e["revisit_frames"] / (e["steps"] + 1) for e in records])
    counts = storage.manifest_counts(records)
    return {
        "episodes": len(records),
        "steps": int(steps.sum()),
        "steps_per_episode": [int(steps.min()), float(steps.mean()), int(steps.max())] if len(records) else None,
        "revisit_share": counts["revisit_frames"] / max(1, counts["frames"]),
        "revisit_share_per_episode": ([float(revisit_share.min()), float(revisit_share.mean()),
                                       float(revisit_share.max())] if len(records) else None),
        "bytes": counts["bytes"],
        "raw_bytes": int(counts["frames"] * np.prod(manifest["obs_shape"])),
        "missing_episodes": sorted(set(range(manifest["episodes_requested"])) - {e["index"] for e in records}),
    }


def inspect(config: InspectConfig) -> dict[str, Any]:
    """Print the folder's manifest header and statistics, verify every file (``--verify``), describe one episode and
    draw it (``--gif``). A folder whose files disagree with its manifest is a UserError after every mismatch is
    listed."""
    check_flags(config)
    manifest = storage.read_manifest(config.root)
    header = {k: v for k, v in manifest.items() if k != "episodes"}
    print(json.dumps(header, indent=1))
    stats = dataset_stats(config.root)
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
        report = storage.verify_folder(config.root)
        for note in report["notes"]:
            print(f"note: {note}")
        for mismatch in report["mismatches"]:
            print(f"mismatch: {mismatch}")
        stats["verified"], stats["mismatches"] = report["verified"], report["mismatches"]
        if report["mismatches"]:
            raise UserError(f"{config.root}: {len(report['mismatches'])} mismatches between the manifest and the "
                             f"episode files (listed above); {report['verified']} of {stats['episodes']} files match")
        print(f"verified {report['verified']} episode files against the manifest (sha256, size, steps, revisits, "
              "return, shapes, actions, identity)")

    records = {e["index"]: e for e in manifest["episodes"]}
    if config.episode is None and config.gif is None:
        return stats
    index = config.episode if config.episode is not None else min(records, default=0)
    if index not in records:
        raise UserError(f"--episode {index}: the folder has no such episode "
                         f"(indices {min(records, default=None)}..{max(records, default=None)})")
    record = records[index]
    print("episode " + json.dumps(record))
    if config.gif is None:
        return stats
    path = storage.episode_path(config.root, record)
    episode = storage.load_episode(path, sha256=record["sha256"])
    storage.check_episode_record(manifest, record, episode, str(path))  # also with --no-verify: draw the right one
    frames = mark_frames(episode["obs"], episode["revisit"], config.scale)
    import imageio.v2 as imageio

    buffer = io.BytesIO()
    imageio.mimsave(buffer, list(frames), format="GIF", duration=1.0 / config.fps, loop=0)
    write_bytes_atomic(config.gif, buffer.getvalue())  # never a half-written GIF, and the umask is respected
    print(f"wrote {config.gif}: {len(frames)} frames, {int(episode['revisit'].sum())} revisits marked red")
    stats["gif"] = str(config.gif)
    return stats


def main(argv: list[str] | None = None) -> None:
    """``python -m rollouts.inspect``: parse the flags and inspect the folder."""
    inspect(cli.parse(InspectConfig, argv, prog="rollouts.inspect"))


if __name__ == "__main__":
    cli.run(main)
