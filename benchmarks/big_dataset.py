"""Training on a dataset bigger than memory (issue 12): `python benchmarks/big_dataset.py --gb 4`.

Writes a synthetic rollout folder of 64x64x3 episodes in our on-disk format (the storage functions and manifest of
`rollouts.collect`, so `python -m rollouts.inspect --verify` accepts it), made with numpy instead of an env: each
episode walks a smooth random texture on a torus (4 actions moving the view 8 px, declared as `translate` action
effects), so frames overlap and revisit places and compress like rendered data (~10x), with consistent actions,
poses, revisit flags and visit counts. Then it runs `python -m worldmodel.train` on it as a subprocess three times,
sampling the child's resident memory (`/proc/<pid>/status` VmRSS and VmHWM, and `ru_maxrss` from `wait4`):

    killed   cold start: SIGKILLed once the cache build has recorded `--kill-at` of the training episodes
    resumed  the same command again: the build continues from its progress record, then trains `--train-steps`
    warm     again: the cache is reused (start-up reads four .npy headers per split), trains

After the kill it checks that no final cache file exists (a torn cache is never published), and after the resumed
build that the cached rows of the episodes around the kill point (and a few others) equal the decoded episodes.
It prints one table: decoded GB, cache build s (killed + resumed start-up), warm start-up s, peak RSS MB, steps/s.
Start-up is the time from launching the process to the trainer's `[train] rollouts:...` line (imports, cache,
validation windows, model), before the first step.

The data (about `--gb` / 10 on disk), the cache (about `--gb`) and the runs go to `--work` (default: a new folder
under $TMPDIR, deleted at the end unless `--keep`); the free space there is checked first. `--checkout DIR` runs the
trainer of another checkout (e.g. `git archive` of an older commit) for a before/after comparison; its builds write
no progress record, so pass `--kill-at 0` with it (no killed run).

Imports numpy and this repository only (argparse, not tyro); the trainer runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout that is not installed
    sys.path.insert(1, str(ROOT))

from rollouts import storage  # noqa: E402
from rollouts.collect import episode_seeds  # noqa: E402
from rollouts.dataset import CACHE_ENV, RolloutWindows, default_cache_dir, split_episodes  # noqa: E402

FRAME = 64  # frames are FRAME x FRAME x 3
WORLD = 256  # each episode's texture is WORLD x WORLD (a torus): 32 x 32 places at 8 px per move
MOVE = 8
MOVES = np.array([[-MOVE, 0], [MOVE, 0], [0, -MOVE], [0, MOVE]])  # up, down, left, right in (row, col) pixels
INVERSE = [1, 0, 3, 2]
HEADER = re.compile(r"^\[train\] rollouts:")
LOG_LINE = re.compile(r"^\[train\] step (\d+)/\d+ .*\| (\d+) frames/s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gb", type=float, default=4.0, help="decoded size of the dataset (frames and the rest), GB")
    p.add_argument("--episode-steps", type=int, default=1023, help="transitions per episode (frames = this + 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic episodes")
    p.add_argument("--work", type=Path, default=None, help="folder for data, cache and runs (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep --work (a rerun with the same flags reuses the data)")
    p.add_argument("--kill-at", type=float, default=0.5, help="SIGKILL the first run once this share of the cache "
                   "build is recorded (0: no killed run)")
    p.add_argument("--train-steps", type=int, default=40, help="training steps of the resumed and the warm run")
    p.add_argument("--batch", type=int, default=8, help="windows per batch")
    p.add_argument("--seq-len", type=int, default=32, help="frames per window")
    p.add_argument("--preset", default="debug", help="training preset (model sizes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    p.add_argument("--checkout", type=Path, default=None, help="run the trainer of this checkout instead of ours")
    p.add_argument("--poll", type=float, default=0.02, help="seconds between samples of the child's memory")
    args = p.parse_args(argv)
    if args.gb <= 0 or args.episode_steps < 1 or args.train_steps < 1 or args.batch < 1 or args.seq_len < 2:
        p.error("--gb > 0, --episode-steps >= 1, --train-steps >= 1, --batch >= 1 and --seq-len >= 2 expected")
    if args.seq_len > args.episode_steps + 1:
        p.error(f"--seq-len {args.seq_len}: expected <= --episode-steps + 1 = {args.episode_steps + 1}")
    if not 0 <= args.kill_at < 1:
        p.error(f"--kill-at {args.kill_at}: expected a share in [0, 1)")
    return args


# -- the synthetic dataset --------------------------------------------------------------------------------------------

def smooth_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]: random values on a lattice of ``cell`` px, smoothstep-interpolated and
    periodic (the texture tiles the torus seamlessly)."""
    n = size // cell
    lattice = rng.random((n, n, 3)).astype(np.float32)
    lattice = np.concatenate([lattice, lattice[:1]], 0)
    lattice = np.concatenate([lattice, lattice[:, :1]], 1)  # (n + 1, n + 1, 3): the last row/column wraps
    x = np.arange(size) / cell
    i = x.astype(np.int64)
    f = (x - i).astype(np.float32)
    f = (f * f * (3 - 2 * f))[:, None]  # smoothstep weights: (size, 1)
    rows = lattice[i] * (1 - f[:, :, None]) + lattice[i + 1] * f[:, :, None]  # (size, n + 1, 3)
    return rows[:, i] * (1 - f[None, :, :]) + rows[:, i + 1] * f[None, :, :]  # (size, size, 3)


def texture(rng: np.random.Generator) -> np.ndarray:
    """A (WORLD, WORLD, 3) uint8 texture: three octaves of smooth noise (broad shapes, then finer detail)."""
    mix = 0.55 * smooth_noise(rng, WORLD, 64) + 0.3 * smooth_noise(rng, WORLD, 16) + 0.15 * smooth_noise(rng, WORLD, 4)
    return (mix * 255).astype(np.uint8)


def make_episode(env_seed: int, agent_seed: int, steps: int) -> dict[str, np.ndarray]:
    """One episode in the storage layout: a random walk (an action repeats with probability 0.5) of the view over
    its own texture; pose = the view's (row, col) in pixels, revisit = the pose was visited earlier."""
    world, agent = np.random.default_rng(env_seed), np.random.default_rng(agent_seed)
    tex = texture(world)
    tiled = np.concatenate([tex, tex[:, :FRAME]], 1)
    tiled = np.concatenate([tiled, tiled[:FRAME]], 0)  # (WORLD + FRAME, WORLD + FRAME, 3): crops need no wrap
    action = agent.integers(0, 4, steps)
    repeat = agent.random(steps) < 0.5
    for t in range(1, steps):
        if repeat[t]:
            action[t] = action[t - 1]
    pose = np.zeros((steps + 1, 2), np.int64)
    pose[0] = world.integers(0, WORLD // MOVE, 2) * MOVE
    pose[1:] = (pose[0] + np.cumsum(MOVES[action], axis=0)) % WORLD
    obs = np.stack([tiled[r:r + FRAME, c:c + FRAME] for r, c in pose])  # (T + 1, FRAME, FRAME, 3)
    place = pose[:, 0] * WORLD + pose[:, 1]
    visit_count = np.zeros(steps + 1, np.int32)
    seen: dict[int, int] = {}
    for t, p in enumerate(place.tolist()):
        visit_count[t] = seen.get(p, 0)
        seen[p] = visit_count[t] + 1
    truncated = np.zeros(steps, bool)
    truncated[-1] = True  # cut at --episode-steps, as collect marks it
    return {"obs": obs, "action": action.astype(np.int64), "reward": np.zeros(steps, np.float32),
            "terminated": np.zeros(steps, bool), "truncated": truncated, "pose": pose.astype(np.float32),
            "revisit": visit_count > 0, "visit_count": visit_count}


def episode_bytes(steps: int) -> int:
    """Decoded bytes of one episode's arrays."""
    frames = steps + 1
    return frames * (FRAME * FRAME * 3 + 2 * 4 + 1 + 4) + steps * (8 + 4 + 1 + 1)


def new_manifest(episodes: int, steps: int, seed: int) -> dict[str, Any]:
    """The folder's manifest, with the env facts collect records (inverse actions, translate effects)."""
    manifest = storage.new_manifest(
        env_name="synthetic_texture", env_id="synthetic_texture",
        env_kwargs={"world": WORLD, "frame": FRAME, "move": MOVE}, agent_name="random",
        agent_kwargs={"repeat": 0.5}, seed=seed, steps_per_episode=steps, obs_shape=(FRAME, FRAME, 3),
        num_actions=4, pose_dim=2, episodes_requested=episodes)
    manifest["env"]["inverse_actions"] = INVERSE
    manifest["env"]["action_effects"] = {"kind": "translate", "moves": MOVES.tolist(), "exact": True}
    return manifest


def write_dataset(root: Path, episodes: int, steps: int, seed: int = 0, say=print) -> dict[str, Any]:
    """Write (or finish) the synthetic folder; returns its manifest. Episode k comes from ``episode_seeds(seed, k)``
    as in collect, so a rerun that finds some episodes already written only writes the rest."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = new_manifest(episodes, steps, seed)
    if (root / storage.MANIFEST_NAME).exists():
        old = storage.read_manifest(root)
        header = ("episodes", "counts")
        if {k: v for k, v in old.items() if k not in header} == {k: v for k, v in manifest.items() if k not in header}:
            manifest["episodes"] = [e for e in old["episodes"] if (root / e["file"]).is_file()]
    done = {e["index"] for e in manifest["episodes"]}
    start, written = time.perf_counter(), 0
    for index in range(episodes):
        if index in done:
            continue
        env_seed, agent_seed = episode_seeds(seed, index)
        episode = make_episode(env_seed, agent_seed, steps)
        file = storage.episode_filename(index)
        sha = storage.save_episode(root / file, episode, storage.episode_identity(manifest, index, env_seed, agent_seed))
        manifest["episodes"].append(storage.episode_record(index, file, sha, (root / file).stat().st_size, episode,
                                                           env_seed=env_seed, agent_seed=agent_seed))
        written += 1
        if written % 25 == 0 or index == episodes - 1:
            storage.write_manifest(root, manifest)  # resumable like collect: a crash loses at most 25 episodes
            say(f"  wrote {len(manifest['episodes'])}/{episodes} episodes ({time.perf_counter() - start:.0f} s)")
    storage.write_manifest(root, manifest)
    return storage.read_manifest(root)


# -- running the trainer and watching its memory ----------------------------------------------------------------------

def vm_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a live process in kB (empty once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def run_trainer(args: argparse.Namespace, data: Path, out: Path, env: dict[str, str],
                kill_when=None) -> dict[str, Any]:
    """Run ``python -m worldmodel.train`` to the end (or until ``kill_when()`` is true: then SIGKILL it) while
    sampling its memory; returns times, memory peaks, steps/s and its output."""
    command = [sys.executable, "-m", "worldmodel.train", "--preset", args.preset, "--data", str(data),
               "--out", str(out), "--steps", str(args.train_steps), "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--log-every", "10", "--val-every", str(args.train_steps),
               "--image-every", str(args.train_steps), "--ckpt-every", str(args.train_steps), "--no-progress",
               "--threads", str(args.threads), "--device", "cpu"]
    cwd = args.checkout or ROOT
    env = {**env, "PYTHONPATH": str(cwd)}
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rss = hwm = 0
    killed_at = None
    while proc.poll() is None:
        status = vm_status(proc.pid)
        rss, hwm = max(rss, status.get("VmRSS", 0)), max(hwm, status.get("VmHWM", 0))
        if kill_when is not None and killed_at is None and kill_when():
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = time.perf_counter() - start
        time.sleep(args.poll)
    reader.join(timeout=10)
    startup = next((t for t, line in lines if HEADER.match(line)), None)
    rates = [int(m.group(2)) / (args.batch * args.seq_len) for _, line in lines if (m := LOG_LINE.match(line))]
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - start, "killed_at": killed_at,
            "startup": startup, "rss_mb": rss / 1024, "hwm_mb": hwm / 1024,
            "steps_per_s": float(np.median(rates)) if rates else None, "output": "\n".join(l for _, l in lines)}


def max_child_rss_kb() -> int:
    """``ru_maxrss`` of this process's waited-for children (kB on Linux): the largest of them so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def progress_of(cache_dir: Path) -> tuple[int, int]:
    """(episodes recorded, episodes in total) of the training split's cache build in progress; (0, 0) if none."""
    for record in cache_dir.glob(".train-*.progress.json"):
        try:
            state = json.loads(record.read_text())
            return int(state["episodes"]), int(state["of"])
        except (OSError, ValueError, KeyError):
            pass
    return 0, 0


def frames_written(cache_dir: Path) -> int:
    """Bytes of frames the training split's cache build has written so far (its partial obs file)."""
    return sum(p.stat().st_size for p in cache_dir.glob(".train-*-obs.npy.partial"))


def spot_check(data: Path, manifest: dict[str, Any], around: int, rng: np.random.Generator) -> int:
    """Compare the cached rows of training episodes ``around - 1 .. around + 1`` (the kill point) and three random
    ones with their decoded files; returns how many matched (raises on a mismatch)."""
    train = split_episodes(manifest, "train")
    steps = manifest["steps_per_episode"]
    # windows of a whole episode (every synthetic episode has steps + 1 frames): window i is training episode i
    windows = RolloutWindows(data, seq_len=steps + 1, split="train")
    picks = sorted({p for p in (around - 1, around, around + 1, *rng.integers(len(train), size=3).tolist())
                    if 0 <= p < len(train)})
    for p in picks:
        cached = windows.sample_batch(np.array([p]))
        episode = storage.load_episode(storage.episode_path(data, train[p]))
        for key in ("obs", "revisit", "pose"):
            if not np.array_equal(cached[key][0], episode[key]):
                raise AssertionError(f"cached {key} of training episode {p} differs from its file")
    windows.close()
    return len(picks)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    steps = args.episode_steps
    episodes = max(2, round(args.gb * 1e9 / episode_bytes(steps)))
    decoded = episodes * episode_bytes(steps)
    work = args.work or Path(tempfile.mkdtemp(prefix="gtmm-big-"))
    work.mkdir(parents=True, exist_ok=True)
    data, cache_root, runs = work / "data", work / "cache", work / "runs"
    free = shutil.disk_usage(work).free
    need = decoded * 1.15 + decoded / 5  # the caches (train and val splits) and the compressed files (~1/10)
    print(f"{episodes} episodes of {steps + 1} frames {FRAME}x{FRAME}x3: {decoded / 1e9:.2f} GB decoded; "
          f"{work}: {free / 1e9:.1f} GB free, needs about {need / 1e9:.1f} GB")
    if need > free:
        raise SystemExit(f"not enough free space in {work}: pass a smaller --gb or another --work")
    try:
        start = time.perf_counter()
        manifest = write_dataset(data, episodes, steps, args.seed)
        print(f"dataset: {manifest['counts']['bytes'] / 1e9:.2f} GB on disk ({decoded / manifest['counts']['bytes']:.1f}x"
              f" compression) in {time.perf_counter() - start:.0f} s; {data}")
        os.environ[CACHE_ENV] = str(cache_root)  # default_cache_dir below and the trainer's agree on the folder
        cache_dir = default_cache_dir(data, manifest)
        env = dict(os.environ)
        results: dict[str, dict[str, Any]] = {}
        around = 0
        if args.kill_at > 0:
            frames_bytes = sum(e["steps"] + 1 for e in split_episodes(manifest, "train")) * FRAME * FRAME * 3

            def kill_when() -> bool:  # by bytes written, not records: the kill may land between two records
                return frames_written(cache_dir) >= args.kill_at * frames_bytes

            results["killed"] = r = run_trainer(args, data, runs / "killed", env, kill_when)
            if r["killed_at"] is None:  # a small --gb: built between two samples of its progress
                print(f"killed: the first run finished its cache build before the kill ({r['seconds']:.1f} s in all)")
                if r["returncode"] != 0:
                    raise SystemExit(f"the first run failed ({r['returncode']}):\n{r['output'][-3000:]}")
            else:
                around, total = progress_of(cache_dir)
                published = sorted(p.name for p in cache_dir.glob("train-*.npy"))
                print(f"killed: SIGKILL after {r['killed_at']:.1f} s with {frames_written(cache_dir) / 1e9:.2f} of "
                      f"{frames_bytes / 1e9:.2f} GB of frames written, {around}/{total} episodes recorded; final "
                      f"cache files: {published or 'none (only .partial files)'}")
                if published:
                    raise SystemExit("the killed run published a cache file:\n" + r["output"][-3000:])
        for name in ("resumed", "warm"):
            results[name] = r = run_trainer(args, data, runs / name, env)
            if r["returncode"] != 0:
                raise SystemExit(f"the {name} run failed ({r['returncode']}):\n{r['output'][-3000:]}")
            print(f"{name}: start-up {r['startup']:.1f} s, {r['seconds']:.1f} s in all, peak RSS "
                  f"{max(r['hwm_mb'], r['rss_mb']):.0f} MB, {r['steps_per_s']:.2f} steps/s")
            if name == "resumed":
                checked = spot_check(data, manifest, around, np.random.default_rng(args.seed))
                print(f"resumed cache: {checked} episodes (around the kill point and random) equal their files")
        peak = max(max(r["hwm_mb"], r["rss_mb"]) for r in results.values())
        peak_ru = max_child_rss_kb() / 1024
        killed = results.get("killed", {})
        if killed.get("killed_at") is not None:  # the build's time: until the kill, then the resumed start-up
            build, how = killed["killed_at"] + results["resumed"]["startup"], "killed + resumed start-up"
        else:  # built in one go by the first run
            build, how = (killed or results["resumed"])["startup"], "cold start-up"
        print()
        print(f"| decoded GB | cache build s ({how}) | warm start-up s | peak RSS MB | steps/s |")
        print("|---|---|---|---|---|")
        print(f"| {decoded / 1e9:.2f} | {build:.1f} | {results['warm']['startup']:.1f} | {peak:.0f} "
              f"(ru_maxrss {peak_ru:.0f}) | {results['warm']['steps_per_s']:.2f} |")
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            for sub in (data, cache_root, runs):
                shutil.rmtree(sub, ignore_errors=True)


if __name__ == "__main__":
    main()
