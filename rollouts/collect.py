"""Record episodes of an agent in an env, one lossless ``.npz`` per episode plus ``manifest.json``.

    python -m rollouts.collect --env mnist_map --agent loop --episodes 1000 --episode-steps 128 --out data/mnist_map
    python -m rollouts.collect --env miniworld --agent explore --episodes 100 --workers 2 --out data/miniworld
    python -m rollouts.collect --env mnist_map --env-kwargs '{"grid": 6}' --agent sb3 --policy policy.zip --out ...

Reproducible and resumable: episode ``k`` is recorded from an env seed and an agent seed derived from
``(--seed, k)`` only, so its content (and sha256) does not depend on ``--workers``, on which other episodes run
beside it, or on an earlier interrupted run. Re-running the same command skips episodes already written and
verified, and ends with the same folder an uninterrupted run gives.

Safe under faults: the output folder is locked (``gtmm.fs.FolderLock``), so a second collect into the same ``--out``
stops at once with one line naming the folder and the holder (a killed collect's lock is taken over by the next
run); every file is written atomically, so a full disk or a kill leaves the manifest and every file it names intact,
and the same command resumes (the manifest is rewritten once 1/64 of its episodes are new, or 5 s on, and on Ctrl-C or
an error, so a kill re-collects at most that share). ``--env dream`` records the checkpoint's sha256 and refuses to
resume with another model.

Workers: envs with a native vector env (MNIST map) run ``--workers`` maps in one process (``envs.make_vec``);
other envs (MiniWorld) run one process per worker, each owning its own GL context (``AsyncVectorEnv``, spawn).
Episodes run in waves of ``--workers``: all envs of a wave are reset together with their episodes' seeds and
stepped until every one has ended; Gymnasium 1.x's NEXT_STEP autoreset step is therefore never recorded.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import gymnasium as gym
import numpy as np
import tyro
from tqdm import tqdm

from gtmm import cli
from gtmm.cli import UserError, check_range, parse_json_object
from gtmm.fs import LOCK_NAME, FolderLock
import envs
from agents import AGENTS, make_agent
from rollouts import storage


@dataclass
class CollectConfig:
    """Record episodes of an agent in an env: one lossless .npz per episode plus manifest.json (re-run to resume)."""
    env: str = "mnist_map"
    """env: a short name (mnist_map, mnist_map_test, miniworld, miniworld:<MiniWorld id>) or a registered Gymnasium id"""
    out: Path = Path("data/mnist_map")
    """output folder (created; re-running the same command resumes)"""
    agent: str = "random"
    """collector agent: random, loop, explore or sb3"""
    episodes: int = 100
    """number of episodes in the folder when done"""
    steps: Annotated[int, tyro.conf.arg(name="episode-steps", aliases=("--steps",))] = 128
    """steps per episode (the env's own time limit may end episodes earlier); --steps is its old name, kept as an
    alias (in train, --steps counts updates)"""
    seed: int = 0
    """base seed: episode k's env and agent seeds derive from (seed, k)"""
    workers: int = 1
    """envs run at once: maps in one vector env (MNIST map) or processes (others)"""
    env_kwargs: str = "{}"
    """JSON object of env constructor arguments, e.g. '{"grid": 6, "border": "wrap"}'"""
    agent_kwargs: str = "{}"
    """JSON object of agent options, e.g. '{"max_repeat": 3}' (see agents/__init__.py)"""
    policy: Path | None = None
    """saved SB3 policy (.zip) for --agent sb3"""
    progress: bool = True
    """show a progress bar"""
    threads: int = 1
    """torch CPU threads (0 = torch's default, all cores); 1 by default in every command: small recurrent steps gain little from more, and more threads than free cores slow them a lot (only the sb3 agent's policy uses torch)"""


def episode_seeds(base_seed: int, index: int) -> tuple[int, int]:
    """(env seed, agent seed) of episode ``index``: a function of (base seed, index) only."""
    env_seed, agent_seed = np.random.SeedSequence([base_seed, index]).generate_state(2, np.uint32)
    return int(env_seed), int(agent_seed)


def _accepts_max_steps(env_id: str) -> bool:
    """Whether the env's constructor takes ``max_steps`` (then --episode-steps sets it, so the env truncates where we stop)."""
    if env_id not in gym.registry:
        return False
    entry_point = gym.registry[env_id].entry_point
    try:
        creator = gym.envs.registration.load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
        return "max_steps" in inspect.signature(creator).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def resolve_env(name: str, user_kwargs: dict[str, Any], steps: int) -> tuple[str, dict[str, Any]]:
    """(env id, full kwargs) as recorded in the manifest; unknown or missing kwargs are a UserError naming the
    accepted ones, before any env (or worker process) is made."""
    try:
        env_id, kwargs = envs.resolve(name)
    except UserError as error:
        raise UserError(f"--env: {error}") from None
    kwargs.update(user_kwargs)
    if "max_steps" not in kwargs and _accepts_max_steps(env_id):
        kwargs["max_steps"] = steps
    envs.check_kwargs(name, kwargs, vector=_has_vector_env(env_id), where="--env-kwargs")
    return env_id, kwargs


def _has_vector_env(env_id: str) -> bool:
    return env_id in gym.registry and gym.registry[env_id].vector_entry_point is not None


def dream_checkpoint_sha256(env_id: str, env_kwargs: dict[str, Any]) -> str | None:
    """sha256 of the world model a ``Dream-v0`` collection dreams with (None for other envs): the path in the kwargs
    may later hold another model, and one folder must never mix episodes of two."""
    if env_id != "Dream-v0" or "checkpoint" not in env_kwargs:
        return None
    from worldmodel.checkpoint import sha256_of  # torch: only for dreams, which load it anyway

    try:
        return sha256_of(env_kwargs["checkpoint"])
    except UserError as error:
        raise UserError(f"--env-kwargs: {error}") from None


def make_collector_env(name: str, env_id: str, kwargs: dict[str, Any], workers: int) -> gym.vector.VectorEnv:
    """``workers`` envs: the native vector env where one exists, else one process per env (own GL context).

    Dreams are the exception: a batched model step rounds a row differently for different batch sizes (CPU GEMM
    kernels), so a dream stepped beside others can land a pixel one grey level away from the same dream alone. To
    keep episode k a function of (seed, k) only, whatever ``--workers`` is, each dream runs as its own 1-dream env."""
    make_one = functools.partial(envs.make, name, **kwargs)  # picklable: each worker process builds its own env
    if env_id == "Dream-v0":
        return gym.vector.SyncVectorEnv([make_one] * workers)
    if _has_vector_env(env_id):
        return envs.make_vec(name, workers, **kwargs)
    if workers == 1:
        return gym.vector.SyncVectorEnv([make_one])
    return gym.vector.AsyncVectorEnv([make_one] * workers, context="spawn")


def _env_attr(vec: gym.vector.VectorEnv, name: str) -> Any:
    """Attribute ``name`` of the (first) env of ``vec``, or None when the env does not have it."""
    if hasattr(vec, name):
        return getattr(vec, name)
    try:
        return vec.get_attr(name)[0]
    except AttributeError:
        return None


def inverse_actions_of(vec: gym.vector.VectorEnv) -> tuple[int, ...] | None:
    """The env's ``inverse_actions`` (the contract in ``envs/__init__.py``), or None when it has none."""
    inverse = _env_attr(vec, "inverse_actions")
    return None if inverse is None else tuple(int(a) for a in inverse)


def action_facts(vec: gym.vector.VectorEnv, env_name: str) -> dict[str, Any]:
    """What the manifest's ``env`` entry records about the actions: ``inverse_actions`` and ``action_effects`` (the
    env contract), each only when the env declares it (a reader takes a missing one as unknown: older manifests
    have neither). ``worldmodel.train --address auto`` chooses the model's address from them."""
    facts: dict[str, Any] = {}
    inverse = inverse_actions_of(vec)
    if inverse is not None:
        facts["inverse_actions"] = list(inverse)
    effects = _env_attr(vec, "action_effects")
    if effects is not None:
        try:  # as the manifest will read back (lists, not tuples), so the episodes' stored identity matches it
            facts["action_effects"] = json.loads(json.dumps(effects))
        except (TypeError, ValueError) as error:
            raise UserError(f"env {env_name!r}: action_effects is not JSON data ({error}); see the contract in "
                            "envs/__init__.py") from error
    return facts


def _info_column(info: dict[str, Any], key: str, env_name: str) -> np.ndarray:
    if key not in info:
        raise UserError(f"env {env_name!r} does not report info[{key!r}] (see the contract in envs/__init__.py)")
    return np.asarray(info[key])


class Recorder:
    """Per-env buffers of one wave's episodes, filled from vector-env steps."""

    def __init__(self, num_envs: int, env_name: str):
        self.env_name = env_name
        self.buffers: list[dict[str, list]] = [dict() for _ in range(num_envs)]

    def start(self, obs: np.ndarray, info: dict[str, Any]) -> None:
        """Clear every env's buffer and record the first frame of its episode (obs and info columns)."""
        pose, revisit, count = (_info_column(info, k, self.env_name) for k in ("pose", "revisit", "visit_count"))
        for i, buffer in enumerate(self.buffers):
            buffer.clear()
            buffer.update(obs=[obs[i]], pose=[pose[i]], revisit=[revisit[i]], visit_count=[count[i]],
                          action=[], reward=[], terminated=[], truncated=[])

    def add(self, live: np.ndarray, action, obs, reward, terminated, truncated, info) -> None:
        """Append one step (action, reward, flags, next frame and info) to the buffers of the ``live`` envs."""
        pose, revisit, count = (_info_column(info, k, self.env_name) for k in ("pose", "revisit", "visit_count"))
        for i in np.flatnonzero(live):
            b = self.buffers[i]
            b["action"].append(action[i]), b["reward"].append(reward[i])
            b["terminated"].append(terminated[i]), b["truncated"].append(truncated[i])
            b["obs"].append(obs[i]), b["pose"].append(pose[i])
            b["revisit"].append(revisit[i]), b["visit_count"].append(count[i])

    def episode(self, i: int, cut: bool) -> dict[str, np.ndarray]:
        """Env ``i``'s episode as storage arrays; ``cut`` marks the last step truncated (we stopped it at --episode-steps)."""
        b = self.buffers[i]
        episode = {key: np.asarray(b[key], dtype=dtype) for key, (dtype, _) in storage.EPISODE_KEYS.items()}
        episode["pose"] = episode["pose"].reshape(len(episode["pose"]), -1)
        if cut and len(episode["truncated"]) and not episode["terminated"][-1]:
            episode["truncated"][-1] = True
        return episode


def _check_compatible(manifest: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
    """The folder's manifest was written by the same command (up to --episodes and --workers)."""
    found_sha, wanted_sha = manifest["env"].get("checkpoint_sha256"), expected["env"].get("checkpoint_sha256")
    if found_sha != wanted_sha:
        raise UserError(f"{path}: the folder was dreamed by checkpoint sha256 {found_sha} but "
                         f"{expected['env']['kwargs'].get('checkpoint')} now has sha256 {wanted_sha}: one folder must "
                         "not mix episodes of two models; collect into another --out (nothing was written)")
    fields = {
        "env.name": (manifest["env"]["name"], expected["env"]["name"]),
        "env.id": (manifest["env"]["id"], expected["env"]["id"]),
        "env.kwargs": (manifest["env"]["kwargs"], expected["env"]["kwargs"]),
        "agent.name": (manifest["agent"]["name"], expected["agent"]["name"]),
        "agent.kwargs": (manifest["agent"]["kwargs"], expected["agent"]["kwargs"]),
        "seed": (manifest["seed"], expected["seed"]),
        "steps_per_episode": (manifest["steps_per_episode"], expected["steps_per_episode"]),
    }
    for field, (found, wanted) in fields.items():
        if found != wanted:
            raise UserError(f"{path}: the folder holds {field}={found!r} but this command asks for {wanted!r}; "
                             "collect into another --out (nothing was written)")


def _check_env_matches(manifest: dict[str, Any], obs_shape, num_actions: int, pose_dim: int, path: Path) -> None:
    for field, found, wanted in (("obs_shape", list(manifest["obs_shape"]), list(obs_shape)),
                                 ("num_actions", manifest["num_actions"], num_actions),
                                 ("pose_dim", manifest["pose_dim"], pose_dim)):
        if found != wanted:
            raise UserError(f"{path}: the folder holds {field}={found!r}, this env gives {wanted!r}; "
                             "collect into another --out (nothing was written)")


def check_flags(config: CollectConfig) -> None:
    """UserError naming the flag for every bad flag that needs no env or file (before anything is made or locked)."""
    for flag, field in (("episodes", "episodes"), ("episode_steps", "steps"), ("workers", "workers")):
        check_range(flag, getattr(config, field), 1)
    check_range("threads", config.threads, 0)
    check_range("seed", config.seed, 0)  # np.random.SeedSequence takes no negative entropy
    if config.agent not in AGENTS:
        raise UserError(f"--agent {config.agent!r}: expected one of {AGENTS}")
    if config.out.exists() and not config.out.is_dir():
        raise UserError(f"--out {config.out} is a file, expected a folder (choose another output folder)")
    if config.agent == "sb3":
        if config.policy is None:
            raise UserError("--agent sb3 needs --policy path/to/policy.zip")
        if not config.policy.is_file():
            raise UserError(f"--policy {config.policy}: file not found")
    elif config.policy is not None:
        raise UserError(f"--policy is only used by --agent sb3, got --agent {config.agent} (drop --policy)")


def collect(config: CollectConfig) -> dict[str, Any]:
    """Run the collection described by ``config``; returns the summary it prints."""
    check_flags(config)
    if config.agent == "sb3":  # the only agent that runs torch (importing it costs seconds: not for the others)
        import torch

        if config.threads > 0:
            torch.set_num_threads(config.threads)
    env_kwargs_user = parse_json_object(config.env_kwargs, "env_kwargs")
    agent_kwargs = parse_json_object(config.agent_kwargs, "agent_kwargs")
    if config.agent == "sb3":
        agent_kwargs["policy"] = str(config.policy)
    env_id, env_kwargs = resolve_env(config.env, env_kwargs_user, config.steps)
    recorded_agent_kwargs = dict(agent_kwargs)
    if config.agent == "sb3":  # the policy's content, not its path, decides the actions
        recorded_agent_kwargs["policy_sha256"] = storage.sha256_file(config.policy)
        recorded_agent_kwargs.pop("policy")
    checkpoint_sha256 = dream_checkpoint_sha256(env_id, env_kwargs)

    expected = storage.new_manifest(env_name=config.env, env_id=env_id, env_kwargs=env_kwargs, agent_name=config.agent,
                                    agent_kwargs=recorded_agent_kwargs, seed=config.seed,
                                    steps_per_episode=config.steps, obs_shape=(), num_actions=0, pose_dim=0,
                                    episodes_requested=config.episodes, checkpoint_sha256=checkpoint_sha256)
    out = config.out
    created = [p for p in (out, *out.parents) if not p.exists()]  # folders the lock will create, deepest first
    try:
        # one collect per folder: a second one (or an export) waits for nothing and fails with one line
        with FolderLock(out, "collect"):
            todo, elapsed, collected_steps = _collect_locked(config, out, expected, env_id, env_kwargs, agent_kwargs)
    except BaseException:
        for folder in created:  # folders this run made and left empty (it failed before writing): remove them
            try:
                folder.rmdir()
            except OSError:
                break
        raise

    counts = storage.read_manifest(out)["counts"]
    summary = {
        "out": str(out),
        "episodes": counts["episodes"],
        "steps": counts["steps"],
        "revisit_share": counts["revisit_frames"] / max(1, counts["frames"]),
        "bytes": counts["bytes"],
        "collected_now": len(todo),
        "seconds": elapsed,
        "steps_per_second": collected_steps / max(elapsed, 1e-9),
    }
    print(f"{summary['episodes']} episodes, {summary['steps']} steps, revisit share {summary['revisit_share']:.3f}, "
          f"{summary['bytes'] / 1e6:.1f} MB in {out} ({len(todo)} collected now in {elapsed:.1f} s, "
          f"{summary['steps_per_second']:.0f} steps/s)")
    return summary


def _collect_locked(config: CollectConfig, out: Path, expected: dict[str, Any], env_id: str,
                    env_kwargs: dict[str, Any], agent_kwargs: dict[str, Any]) -> tuple[list[int], float, int]:
    """The collection itself, run while holding the folder's lock; returns (episodes collected now, seconds, steps)."""
    manifest_path = out / storage.MANIFEST_NAME
    manifest: dict[str, Any] | None = None
    if manifest_path.exists():
        manifest = storage.read_manifest(out)
        _check_compatible(manifest, expected, manifest_path)
    elif any(p.name != LOCK_NAME for p in out.iterdir()):  # our own lock file does not make a folder "used"
        raise UserError(f"--out {out}: the folder is not empty and has no {storage.MANIFEST_NAME}; "
                         "collect into an empty or new folder (nothing was written)")

    vec = make_collector_env(config.env, env_id, env_kwargs, config.workers)
    try:
        obs, info = vec.reset(seed=[episode_seeds(config.seed, k)[0] for k in range(config.workers)])
        obs_shape = tuple(vec.single_observation_space.shape)
        if len(obs_shape) != 3 or vec.single_observation_space.dtype != np.uint8:
            raise UserError(f"env {config.env!r}: observations are {vec.single_observation_space}, "
                             "expected uint8 images (H, W, C)")
        if not isinstance(vec.single_action_space, gym.spaces.Discrete):
            raise UserError(f"env {config.env!r}: actions are {vec.single_action_space}, expected Discrete")
        num_actions = int(vec.single_action_space.n)
        pose_dim = int(_info_column(info, "pose", config.env).reshape(config.workers, -1).shape[1])
        if manifest is None:
            manifest = dict(expected, obs_shape=list(obs_shape), num_actions=num_actions, pose_dim=pose_dim)
            # only in a new folder: a resumed folder keeps its env entry, which its episodes store as their identity
            manifest["env"] = {**expected["env"], **action_facts(vec, config.env)}
        else:
            _check_env_matches(manifest, obs_shape, num_actions, pose_dim, manifest_path)
            manifest["episodes_requested"] = max(manifest["episodes_requested"], config.episodes)
        agent = make_agent(config.agent, vec.single_action_space, inverse_actions_of(vec), **agent_kwargs)
        agent.reset(config.workers, config.seed)
        for leftover in out.glob(".*.tmp"):  # temp files of a killed run (atomic writes never leave anything else)
            leftover.unlink()
        manifest["episodes"] = _verified_records(manifest, out)
        storage.write_manifest(out, manifest)

        done = {e["index"] for e in manifest["episodes"]}
        todo = [k for k in range(config.episodes) if k not in done]
        start_time = time.perf_counter()
        bar = tqdm(total=len(todo), unit="ep", disable=not config.progress, desc=f"collect {config.env}/{config.agent}")
        unlisted, last_write = 0, time.monotonic()  # episodes written since the manifest was, and when it was
        try:
            for wave_start in range(0, len(todo), config.workers):
                wave = todo[wave_start:wave_start + config.workers]
                records = _run_wave(vec, agent, wave, config, out, manifest)
                manifest["episodes"].extend(records)
                unlisted += len(records)
                if manifest_due(unlisted, len(manifest["episodes"]), time.monotonic() - last_write):
                    storage.write_manifest(out, manifest)
                    unlisted, last_write = 0, time.monotonic()
                bar.update(len(wave))
            if unlisted:  # the last waves
                storage.write_manifest(out, manifest)
        except BaseException:  # Ctrl-C or an error: list what was written (best effort: the disk may be full)
            if unlisted:
                with contextlib.suppress(OSError):
                    storage.write_manifest(out, manifest)
            raise
        bar.close()
        elapsed = time.perf_counter() - start_time
        new = set(todo)
        collected_steps = sum(e["steps"] for e in manifest["episodes"] if e["index"] in new)
    finally:
        vec.close()
    return todo, elapsed, collected_steps


MANIFEST_EVERY_SHARE = 1 / 64  # rewrite the manifest once this share of its episodes is unlisted ...
MANIFEST_EVERY_S = 5.0  # ... or this long after the last rewrite


def manifest_due(unlisted: int, listed: int, since_write_s: float) -> bool:
    """Whether to rewrite the manifest after a wave. Every rewrite costs O(episodes listed), so rewriting after each
    wave made a long collection quadratic (3,000 MNIST-map episodes ran at 256 episodes/s first and 56 at the end);
    rewriting once 1/64 of the listed episodes are new keeps each episode's share of that cost constant. A kill then
    loses at most that share (or 5 s) of the run: the episodes it wrote but did not list are collected again,
    identically, on resume. Small folders still get a manifest after every wave."""
    return unlisted >= listed * MANIFEST_EVERY_SHARE or since_write_s >= MANIFEST_EVERY_S


def _verified_records(manifest: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """The manifest's episodes whose files exist with the right checksum. A listed file that is missing is dropped
    (it is collected again, identically); one whose checksum differs is an error (never overwritten)."""
    kept = []
    for record in manifest["episodes"]:
        path = storage.episode_path(out, record)
        if not path.exists():
            continue
        storage.check_sha256(path, record["sha256"])
        kept.append(record)
    return kept


def _run_wave(vec: gym.vector.VectorEnv, agent, wave: list[int], config: CollectConfig, out: Path,
              manifest: dict[str, Any]) -> list[dict]:
    """Record episodes ``wave`` (at most ``workers``) side by side; unused envs run along and are not recorded."""
    num_envs = config.workers
    seeds = [episode_seeds(config.seed, k) for k in wave]
    # spare envs of a short last wave still need seeds; they reuse the wave's (their steps are thrown away)
    env_seeds = [s[0] for s in seeds] + [seeds[0][0]] * (num_envs - len(wave))
    agent_seeds = [s[1] for s in seeds] + [seeds[0][1]] * (num_envs - len(wave))
    obs, info = vec.reset(seed=env_seeds)
    agent.reset_envs(np.ones(num_envs, dtype=bool), agent_seeds)
    recorder = Recorder(num_envs, config.env)
    recorder.start(obs, info)
    live = np.arange(num_envs) < len(wave)
    for _ in range(config.steps):
        action = agent.act(obs, info)
        obs, reward, terminated, truncated, info = vec.step(action)
        recorder.add(live, action, obs, reward, terminated, truncated, info)
        live &= ~(np.asarray(terminated) | np.asarray(truncated))  # the next step would be the autoreset: stop here
        if not live.any():
            break
    records = []
    for i, index in enumerate(wave):
        episode = recorder.episode(i, cut=True)
        file = storage.episode_filename(index)
        # a format-1 folder being resumed stays format 1 (no identity), so it matches an uninterrupted old run
        identity = (storage.episode_identity(manifest, index, *seeds[i]) if manifest["format_version"] >= 2 else None)
        sha = storage.save_episode(out / file, episode, identity)
        records.append(storage.episode_record(index, file, sha, (out / file).stat().st_size, episode,
                                              env_seed=seeds[i][0], agent_seed=seeds[i][1]))
    return records


def main(argv: list[str] | None = None) -> None:
    """``python -m rollouts.collect``: parse the flags and collect."""
    collect(cli.parse(CollectConfig, argv, prog="rollouts.collect"))


if __name__ == "__main__":
    cli.run(main)
