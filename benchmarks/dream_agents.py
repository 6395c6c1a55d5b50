"""Do policies trained only in our world model's dreams work in the real env? (issue 15, item 5)

    python benchmarks/dream_agents.py --out runs/dream_agents            # CPU default: ~30-40 min on 2 shared cores
    python benchmarks/dream_agents.py --smoke --out /tmp/dream_smoke     # toy sizes, seconds: for the tests

The experiment, on the MNIST map's coverage task (``task="coverage"``: reward 1 for each step that enters a lattice
position not visited earlier in the episode; ``--episode-steps`` steps per episode, 24 new places at most on the
default 5x5 lattice):

1. a fixed dataset of N real steps (``--real-steps``): ``rollouts.collect`` with the ``--data-agent`` (random walk by
   default) and a fixed seed;
2. world models trained on it with ``--reward-head`` (``worldmodel.train``, the ``--wm-preset`` sizes,
   ``--wm-steps`` updates, whole episodes as training windows so every coverage reward is predictable from the
   window): ``introspective`` (``--address auto``: the additive path integrator with the blocked-move gate) and
   ``none`` (no memory: its LSTM alone must remember where it has been); and, beside the target's two,
   ``introspective_pose``: the same memory addressed by the env's pose (``--address pose``; in a dream the pose
   dead-reckoned from the actions, exact on the MNIST map, moves blocked by the map's border included). Why: the
   ``auto`` address's blocked-move gate decides in a dream from the last latent alone whether a move happened, and
   nothing in a frame of the map says where the map ends, so a dream can believe a move into the border reached a
   new place (the reward table under the main one shows what each dream pays for such moves);
3. PPO (Stable-Baselines3) trained ONLY inside each model's dreams for ``--ppo-steps`` steps: a dream starts from the
   first frame of a recorded episode (context 1, so it starts where a real episode does), lasts as long as a real
   episode, and pays the reward its reward head predicts (``DreamVecEnv`` below: the dreams of one checkpoint
   stepped in one forward call, ``worldmodel.dream.DreamBatch``);
4. baselines: PPO on the real env with the same N steps and with 10x N steps (same PPO settings); a uniform random
   policy; the scripted ``explore`` agent (keeps its heading while each step lands somewhere new; it reads
   ``info["visit_count"]``, i.e. it is told the coverage state the learned policies must infer);
5. every policy evaluated in the REAL env: mean return over ``--eval-episodes`` episodes (the same held-out maps and
   start positions for every policy, so differences are paired) with a 95% confidence interval; and in each dream:
   the return the dream predicts for the policy, next to the return the same dreamed actions really earn (the
   dream's pose is dead-reckoned exactly on the MNIST map, so its coverage is known): the dream-vs-real gap.

What the policies observe: the window's pose (``info["pose"]`` scaled to [0, 1), in a dream the integrated pose),
not the frame. A feed-forward policy cannot remember which places it has covered, and from the 28x28 frame alone it
cannot even tell where it is (every map is new): PPO from frames (SmallCNN, 2-4 stacked frames) stayed at or below
the random walk's return for 80,000 real steps on this machine, while from the pose it learns a covering route in
~20,000. The reward still needs memory: whether a step pays depends on the whole episode so far, which only the world
model can know in a dream -- so the dream's reward head, not the policy, is where the two world models differ.

Outputs in ``--out``: ``data/`` (the N real steps), ``wm_<name>/`` (a run of ``worldmodel.train`` per world model),
``policies/`` (one SB3 zip per PPO policy, loadable without unpickling, ``agents.sb3``), ``table.md`` (the table
printed at the end) and ``results.json`` (every number, the resolved config, timings). Finished stages are reused
when their definition is unchanged (a killed run resumes; changing ``--eval-episodes`` only re-evaluates); a stage
whose definition changed is redone from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal, Optional

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from gtmm.cli import UserError, check_range, parse, resolve_device, run  # noqa: E402
from gtmm.fs import FolderLock, write_bytes_atomic  # noqa: E402
from envs.mnist_map import POSE_DIM  # noqa: E402

from stable_baselines3.common.vec_env import VecEnv  # noqa: E402  (the dream adapter below subclasses it)

ENV = "mnist_map"
TASK = "coverage"
# The world models dreamed in, by name: the two of the target, and the introspective memory addressed by the
# env's pose (in a dream: the pose dead-reckoned from the actions, exact on the MNIST map, blocked moves included),
# which shows what the memory does once its address knows where the map ends (see the module docstring).
WORLD_MODELS: dict[str, dict[str, str]] = {
    "introspective": {"memory": "introspective", "address": "auto"},
    "none": {"memory": "none", "address": "auto"},
    "introspective_pose": {"memory": "introspective", "address": "pose"},
}
TARGET = ("introspective", "none")  # the target compares these two
EVAL_SEED = 1_000_000  # held-out maps: collect's episode seeds and PPO's training seeds stay far below
Z95 = 1.959964  # two-sided 95% normal quantile

# Budgets (each field can still be set by its own flag). cpu: the README's run on 2 shared CPU cores; smoke: the
# whole pipeline at toy sizes, for the tests (its numbers mean nothing).
BUDGETS: dict[str, dict[str, Any]] = {
    "cpu": {"real_steps": 10_000, "wm_steps": 3000, "ppo_steps": 100_000, "eval_episodes": 200, "episode_steps": 32,
            "wm_preset": "mnist_cpu", "num_envs": 16, "n_steps": 64, "batch_size": 256},
    "smoke": {"real_steps": 96, "wm_steps": 6, "ppo_steps": 256, "eval_episodes": 6, "episode_steps": 8,
              "wm_preset": "debug", "num_envs": 4, "n_steps": 16, "batch_size": 32},
}


@dataclass
class Args:
    """Train PPO only in the dreams of a memory and a memory-free world model of N real steps, and against real-env
    PPO (N and 10x N steps), random and scripted baselines; evaluate all of them in the real MNIST-map coverage task."""

    out: Path = Path("runs/dream_agents")
    """folder of the data, world models, policies, table.md and results.json (locked while the benchmark runs)"""
    smoke: bool = False
    """tiny sizes for a quick end-to-end check (the tests); flags given beside it still win"""
    world_models: tuple[str, ...] = tuple(WORLD_MODELS)
    """world models to dream in (introspective and none are needed for the target): introspective (--address auto),
    none, introspective_pose (--address pose: the dream's dead-reckoned pose)"""
    real_steps: Optional[int] = None
    """N: real env steps in the fixed dataset, and PPO's real-env budget of the 'same data' baseline (cpu: 10,000)"""
    wm_steps: Optional[int] = None
    """world-model training updates, each model (cpu: 3,000)"""
    ppo_steps: Optional[int] = None
    """P: PPO steps inside each world model's dreams (cpu: 100,000 = the 10x N baseline's budget)"""
    eval_episodes: Optional[int] = None
    """E: real-env (and dream) episodes per policy evaluation (cpu: 200)"""
    episode_steps: Optional[int] = None
    """steps of every episode, real or dreamed (cpu: 32)"""
    wm_preset: Optional[str] = None
    """worldmodel.train preset of every world model (cpu: mnist_cpu)"""
    num_envs: Optional[int] = None
    """envs (or dreams, stepped in one forward call) in PPO's rollouts (cpu: 16)"""
    n_steps: Optional[int] = None
    """PPO steps per env between updates (cpu: 64)"""
    batch_size: Optional[int] = None
    """PPO minibatch size (cpu: 256)"""
    data_agent: Literal["random", "loop"] = "random"
    """agent collecting the N real steps"""
    learning_rate: float = 1e-3
    """PPO's Adam learning rate (every PPO policy)"""
    gamma: float = 0.95
    """PPO's discount (every PPO policy)"""
    ent_coef: float = 0.01
    """PPO's entropy bonus (every PPO policy)"""
    n_epochs: int = 10
    """PPO epochs per update (every PPO policy)"""
    temperature: float = 1.0
    """dream sampling temperature (scale of the prior's std)"""
    seed: int = 0
    """seed of the data, the world models, PPO and the dreams (the evaluation maps are fixed)"""
    device: str = "cpu"
    """torch device of the world models (training and dreams): cpu, cuda, cuda:N or auto; PPO's small MLP stays on
    the CPU"""
    threads: int = 1
    """torch CPU threads (0 = torch's default)"""


def resolved(args: Args) -> Args:
    """``args`` with the budget's value in every field left unset, each value checked (UserError naming the flag)."""
    budget = BUDGETS["smoke" if args.smoke else "cpu"]
    args = dataclasses.replace(args, **{k: v for k, v in budget.items() if getattr(args, k) is None})
    for name in ("real_steps", "wm_steps", "ppo_steps", "eval_episodes", "episode_steps", "num_envs", "n_steps",
                 "batch_size", "n_epochs"):
        check_range(name, getattr(args, name), low=1)
    check_range("eval_episodes", args.eval_episodes, low=2)  # a confidence interval needs two
    unknown = [name for name in args.world_models if name not in WORLD_MODELS]
    if unknown or not set(TARGET) <= set(args.world_models):
        others = ", ".join(n for n in WORLD_MODELS if n not in TARGET)
        raise UserError(f"--world-models {' '.join(args.world_models)}: expected {' and '.join(TARGET)} and any of "
                        f"{others}")
    args = dataclasses.replace(args, world_models=tuple(n for n in WORLD_MODELS if n in args.world_models))
    check_range("threads", args.threads, low=0)
    check_range("temperature", args.temperature, low=0.0)
    check_range("gamma", args.gamma, low=0.0, high=1.0)
    if not args.learning_rate > 0:
        raise UserError(f"--learning-rate {args.learning_rate}: expected > 0")
    from worldmodel.config import PRESETS

    if args.wm_preset not in PRESETS:
        raise UserError(f"--wm-preset {args.wm_preset!r}: expected one of {', '.join(sorted(PRESETS))}")
    resolve_device(args.device)  # UserError for a device this machine does not have
    return args


# -- what the policies see: the pose ---------------------------------------------------------------------------------

def pose_scale(episode_steps: int) -> float:
    """Pixels that map the MNIST map's pose (row, col of the window's top-left pixel) into [0, 1): its larger side."""
    from envs.mnist_map import map_geometry

    return float(max(map_geometry(env_kwargs(episode_steps)).map_shape))


def env_kwargs(episode_steps: int) -> dict[str, Any]:
    """The real env of the experiment: the default MNIST map, the coverage task, episodes of ``episode_steps``."""
    return {"task": TASK, "max_steps": episode_steps}


def pose_space(dim: int) -> gym.spaces.Box:
    """Observation space of the policies: the scaled pose (D,)."""
    return gym.spaces.Box(0.0, 1.0, (dim,), dtype=np.float32)


class PoseObservation(gym.Wrapper):
    """The env with ``info["pose"] / scale`` as its observation (float32 (D,)); reward, ends and info unchanged."""

    def __init__(self, env: gym.Env, scale: float):
        super().__init__(env)
        self.scale = scale
        self.observation_space = pose_space(POSE_DIM)

    def reset(self, **kwargs: Any):
        """Reset the env; the observation is its scaled pose."""
        _, info = self.env.reset(**kwargs)
        return (np.asarray(info["pose"], np.float32) / self.scale), info

    def step(self, action):
        """Step the env; the observation is its scaled pose."""
        _, reward, terminated, truncated, info = self.env.step(action)
        return (np.asarray(info["pose"], np.float32) / self.scale), reward, terminated, truncated, info


# -- dreams as an SB3 vector env -------------------------------------------------------------------------------------

class DreamVecEnv(VecEnv):
    """``num_envs`` dreams of one checkpoint as a Stable-Baselines3 ``VecEnv``, stepped in one forward call of the
    model (``worldmodel.dream.DreamBatch``, the implementation behind ``Dream-v0``).

    Each dream starts from the first ``context`` frames of a recorded episode of ``data`` and ends when the reward
    heads' termination fires or after ``max_steps`` dreamed steps (``TimeLimit.truncated``). Observation: the
    dream's pose divided by ``scale`` (integrated from the actions off record, exactly as the env moves: see
    ``worldmodel.dream``); reward: the reward head's prediction. SB3's autoreset: a dream that ends restarts in the
    same step, its last observation in ``info["terminal_observation"]``. ``info["visit_count"]`` is the dream's
    dead-reckoned visit count (0: the step reached a new place), so the true coverage of dreamed actions is known.

    Seeding as ``DreamVectorEnv``: dream i draws its episodes and prior noise from the generator of seed
    ``seed + i``, so it does not depend on the batch size.

    Why not ``make_vec_env`` over ``Dream-v0``: that builds ``num_envs`` copies of the model and calls each on one
    dream; and Gymnasium's ``DreamVectorEnv`` resets a finished dream on the *next* step (``NEXT_STEP``), which
    SB3's same-step API cannot express without stepping the other dreams.
    """

    def __init__(self, checkpoint: str, data: str, num_envs: int, max_steps: int, scale: float, seed: int,
                 context: int = 1, temperature: float = 1.0, device: str = "cpu") -> None:
        from worldmodel.dream import DreamBatch

        self.dreams = DreamBatch(checkpoint, num_envs, data=data, context=context, temperature=temperature,
                                 max_steps=max_steps, device=device, threads=0)
        if not self.dreams.predicts_reward:
            raise UserError(f"checkpoint {checkpoint}: no reward head, so its dreams pay nothing to learn from; "
                            "train it with --reward-head on rollouts with rewards")
        self.scale = float(scale)
        super().__init__(num_envs, pose_space(self.dreams.pose_dim), self.dreams.action_space)
        self._rngs = [gym.utils.seeding.np_random(seed + i)[0] for i in range(num_envs)]
        self._actions = np.zeros(num_envs, dtype=np.int64)
        self._started = False

    def _pose_obs(self, pose: np.ndarray) -> np.ndarray:
        """(n, D) poses -> observations; a dream whose pose became unknown cannot be observed (a UserError)."""
        from worldmodel.dream import UNKNOWN_POSE

        if (pose == np.float32(UNKNOWN_POSE)).any():
            raise UserError("dream: the pose became unknown (the env declares no action effects), so a pose-observing "
                            "policy cannot act in it")
        return (pose / self.scale).astype(np.float32)

    def _restart(self, rows: np.ndarray) -> np.ndarray:
        """Start new dreams in ``rows`` (each from a generator drawn from its own); their first observations."""
        _, infos = self.dreams.reset(rows, [np.random.default_rng(self._rngs[i].integers(2**63)) for i in rows])
        return self._pose_obs(infos["pose"])

    def reset(self) -> np.ndarray:
        """Start every dream; observations (N, D)."""
        self._started = True
        return self._restart(np.arange(self.num_envs))

    def step_async(self, actions: np.ndarray) -> None:
        """Remember the actions (N,) of the next ``step_wait``."""
        self._actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)

    def step_wait(self):
        """Dream one step of every dream: (obs (N, D), predicted reward (N,), done (N,), infos)."""
        if not self._started:
            raise RuntimeError("DreamVecEnv.step before reset")
        _, infos = self.dreams.step(self._actions)
        obs = self._pose_obs(infos["pose"])
        rewards = self.dreams.last_reward.astype(np.float32)  # (N,) the reward head's prediction
        terminated = self.dreams.last_terminated.copy()  # (N,)
        truncated = (self.dreams.steps >= self.dreams.max_steps) & ~terminated
        dones = terminated | truncated
        info_list = [{"visit_count": int(c), "TimeLimit.truncated": bool(t)}
                     for c, t in zip(infos["visit_count"], truncated)]
        ended = np.flatnonzero(dones)
        if len(ended):
            for i in ended:
                info_list[i]["terminal_observation"] = obs[i].copy()
            obs[ended] = self._restart(ended)
        return obs, rewards, dones, info_list

    def close(self) -> None:
        """Release the dreams (and any real env they keep)."""
        self.dreams.close()

    # SB3's VecEnv attribute plumbing: the dreams share one object, so every index answers for it
    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        """The attribute of the dream batch, once per index (``render_mode``: None, SB3 renders no dream)."""
        value = None if attr_name == "render_mode" else getattr(self.dreams, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        """Set an attribute of the dream batch (shared by all dreams)."""
        setattr(self.dreams, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        """Call a method of the dream batch, once per index."""
        return [getattr(self.dreams, method_name)(*method_args, **method_kwargs) for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices=None) -> list[bool]:
        """Dreams are never wrapped in Gymnasium wrappers."""
        return [False for _ in self._get_indices(indices)]


# -- the stages ------------------------------------------------------------------------------------------------------

def _json(value: Any) -> Any:
    """``value`` as plain JSON (paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def _write_json(path: Path, value: Any) -> None:
    write_bytes_atomic(path, (json.dumps(_json(value), indent=1, sort_keys=True) + "\n").encode())


def _reusable(record: Path, definition: dict[str, Any], *needed: Path) -> bool:
    """A finished stage of the same definition: its record says so and its outputs exist."""
    if not record.is_file() or not all(p.exists() for p in needed):
        return False
    try:
        return json.loads(record.read_text()).get("definition") == _json(definition)
    except ValueError:  # a damaged record: redo the stage
        return False


def collect_data(args: Args, log: Callable[[str], None]) -> Path:
    """Stage 1: the fixed dataset of N real steps (``rollouts.collect``; resumable, same content for a same seed)."""
    from rollouts.collect import CollectConfig, collect

    folder = args.out / "data"
    episodes = math.ceil(args.real_steps / args.episode_steps)
    config = CollectConfig(env=ENV, out=folder, agent=args.data_agent, episodes=episodes,
                           steps=args.episode_steps, seed=args.seed, workers=min(episodes, 64),
                           env_kwargs=json.dumps({"task": TASK}), progress=False, threads=args.threads)
    log(f"[data] {episodes} episodes x {args.episode_steps} steps of the {args.data_agent} agent -> {folder}")
    collect(config)
    return folder


def wm_config(args: Args, name: str, data: Path):
    """World model ``name``'s ``worldmodel.train`` config: the preset, whole episodes as windows, the reward heads."""
    from worldmodel.config import preset

    steps = args.wm_steps
    return dataclasses.replace(
        preset(args.wm_preset), data=str(data), out=str(args.out / f"wm_{name}"), **WORLD_MODELS[name],
        # a window that starts mid-episode cannot know which places its episode visited before it: the coverage
        # reward of its first steps would be noise to the reward head. Whole episodes (reset frame + every step) are
        # exactly what a dream replays (context 1, then an episode's length)
        seq_len=args.episode_steps + 1, slots=0, reward_head=True, steps=steps, seed=args.seed, device=args.device,
        threads=args.threads, progress=False, val_fraction=0.0, val_every=0, log_every=max(1, steps // 10),
        image_every=steps, ckpt_every=steps, curriculum_start=0)


def train_world_model(args: Args, name: str, data: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Stage 2: one world model with reward heads (reused when a finished run of the same definition is there)."""
    from worldmodel.train import dataset_fingerprint, train

    cfg = wm_config(args, name, data)
    folder = Path(cfg.out)
    where = ("threads", "device", "progress")  # where and how visibly it runs is not what it is
    definition = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in where},
                  "data": dataset_fingerprint(data)}
    record = folder / "benchmark.json"
    if _reusable(record, definition, folder / "ckpt.pt"):
        log(f"[wm {name}] reusing {folder}")
        return json.loads(record.read_text())
    for stale in ("ckpt.pt", "best.pt", "benchmark.json"):  # another definition (or a killed run): start over
        (folder / stale).unlink(missing_ok=True)
    log(f"[wm {name}] training {cfg.steps} steps ({cfg.preset} preset, seq_len {cfg.seq_len}, reward heads) -> "
        f"{folder}")
    tick = time.perf_counter()
    info = train(cfg)
    losses = [loss for _, loss in info["losses"]]
    result = {"definition": definition, "checkpoint": str(folder / "ckpt.pt"), "seconds": time.perf_counter() - tick,
              "address": info["config"].address, "final_loss": losses[-1] if losses else None,
              "skipped_steps": info["skipped"]}
    _write_json(record, result)
    return result


def ppo_settings(args: Args) -> dict[str, Any]:
    """PPO's settings, the same for every PPO policy of the table."""
    return {"n_steps": args.n_steps, "batch_size": args.batch_size, "n_epochs": args.n_epochs,
            "learning_rate": args.learning_rate, "gamma": args.gamma, "ent_coef": args.ent_coef}


def train_policy(args: Args, name: str, steps: int, make_env: Callable[[], VecEnv], identity: dict[str, Any],
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Stage 3/4: PPO (SB3 ``MlpPolicy`` on the scaled pose) for ``steps`` env steps on ``make_env()`` (a VecEnv that
    records episode returns: ``Monitor`` / ``VecMonitor``); saved as a loadable zip (``agents.sb3.save_policy``).
    Reused when a finished policy of the same definition is there."""
    import torch
    from stable_baselines3 import PPO

    from agents.sb3 import save_policy

    folder = args.out / "policies"
    folder.mkdir(parents=True, exist_ok=True)
    path, record = folder / f"{name}.zip", folder / f"{name}.json"
    definition = {"steps": steps, "ppo": ppo_settings(args), "num_envs": args.num_envs, "seed": args.seed, **identity}
    if _reusable(record, definition, path):
        log(f"[ppo {name}] reusing {path}")
        return json.loads(record.read_text())
    log(f"[ppo {name}] {steps} steps")
    tick = time.perf_counter()
    vec = make_env()
    with torch.random.fork_rng(devices=[]):  # PPO seeds torch's global generator: keep it out of the caller's
        model = PPO("MlpPolicy", vec, seed=args.seed, device="cpu", verbose=0, **ppo_settings(args))
        first: list[float] = []

        def remember_first(locals_: dict[str, Any], _globals: dict[str, Any]) -> bool:
            if not first and model.ep_info_buffer:  # the first finished episodes: the untrained policy's return
                first.extend(float(e["r"]) for e in model.ep_info_buffer)
            return True

        model.learn(total_timesteps=steps, callback=remember_first)
    vec.close()
    save_policy(model, path)
    last = [float(e["r"]) for e in model.ep_info_buffer]
    result = {"definition": definition, "policy": str(path), "seconds": time.perf_counter() - tick,
              "timesteps": int(model.num_timesteps),
              "train_return_first": float(np.mean(first)) if first else None,
              "train_return_last": float(np.mean(last)) if last else None}
    log(f"[ppo {name}] training return {result['train_return_first']} -> {result['train_return_last']} "
        f"({result['seconds']:.0f} s)")
    _write_json(record, result)
    return result


# -- evaluation ------------------------------------------------------------------------------------------------------

class PolicyAgent:
    """A saved PPO policy acting on the scaled pose (``agents.sb3.SB3Agent``: sampled with per-episode generators)."""

    def __init__(self, path: str, action_space: gym.Space, scale: float):
        from agents.sb3 import SB3Agent

        self.agent, self.scale = SB3Agent(action_space, policy=path), scale

    def reset(self, num_envs: int, seed: int) -> None:
        """Start ``num_envs`` episodes (per-episode generators from ``seed``)."""
        self.agent.reset(num_envs, seed)

    def act(self, obs: np.ndarray, info: dict[str, np.ndarray]) -> np.ndarray:
        """Actions (N,) from the poses in ``info`` (the frames are not looked at)."""
        return self.agent.act((np.asarray(info["pose"], np.float32) / self.scale), info)


def make_eval_agent(kind: str, path: Optional[str], action_space: gym.Space, inverse_actions, scale: float):
    """The policy ``kind`` (random, explore, or ppo from ``path``) with the batched agent interface."""
    from agents import make_agent

    if kind == "ppo":
        return PolicyAgent(path, action_space, scale)
    return make_agent(kind, action_space, inverse_actions)


STEP_KINDS = ("new", "revisit", "blocked")  # a step reaches a new place, an earlier one, or stays (a blocked move)


def rollout_returns(vec: gym.vector.VectorEnv, agent, steps: int, seed: int) -> dict[str, Any]:
    """One episode in each env of ``vec`` (reset with ``seed``: env i gets seed + i), the agent seeded ``seed``.

    Returns per episode (E,): ``return`` (the env's reward summed: predicted in a dream) and ``covered`` (steps with
    ``visit_count == 0``: the coverage the actions really earn, known in dreams by dead reckoning); and per kind of
    step (``STEP_KINDS``, told apart by the visit count and whether the pose changed) the reward paid in all and the
    number of such steps, ``by_kind``: where a dream's reward head is right (coverage pays 1, 0, 0) and where not."""
    obs, info = vec.reset(seed=seed)
    agent.reset(vec.num_envs, seed)
    total, covered = np.zeros(vec.num_envs), np.zeros(vec.num_envs)
    by_kind = {kind: {"reward": 0.0, "steps": 0} for kind in STEP_KINDS}
    live = np.ones(vec.num_envs, dtype=bool)  # False once an env's episode ended (the NEXT_STEP reset is not counted)
    pose = np.asarray(info["pose"]).copy()  # (E, D)
    for _ in range(steps):
        obs, reward, terminated, truncated, info = vec.step(agent.act(obs, info))
        new = np.asarray(info["visit_count"]) == 0  # (E,)
        stayed = (np.asarray(info["pose"]) == pose).all(axis=1)  # (E,) a move into the map's border
        pose = np.asarray(info["pose"]).copy()
        for kind, mask in zip(STEP_KINDS, (new, ~new & ~stayed, ~new & stayed)):
            by_kind[kind]["reward"] += float(reward[live & mask].sum())
            by_kind[kind]["steps"] += int((live & mask).sum())
        total += np.where(live, reward, 0.0)
        covered += live & new
        live &= ~(terminated | truncated)
        if not live.any():
            break
    return {"return": total, "covered": covered, "by_kind": by_kind}


def summary(values: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation and the half-width of the 95% confidence interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "ci95": Z95 * std / math.sqrt(len(values))}


def evaluate(args: Args, policies: dict[str, dict[str, Any]], checkpoints: dict[str, str], data: Path,
             log: Callable[[str], None]) -> dict[str, Any]:
    """Stage 5: every policy in the real env and in each world model's dream, on fixed held-out episodes."""
    import envs
    from worldmodel.dream import DreamVectorEnv

    scale, E, T = pose_scale(args.episode_steps), args.eval_episodes, args.episode_steps
    results: dict[str, Any] = {name: {"real": None, "dreams": {}} for name in policies}
    real = envs.make_vec(ENV, E, **env_kwargs(T))
    single = envs.make(ENV, **env_kwargs(T))
    inverse = single.unwrapped.inverse_actions  # for the explore agent, which retraces moves
    single.close()
    for name, policy in policies.items():
        agent = make_eval_agent(policy["kind"], policy.get("policy"), real.single_action_space, inverse, scale)
        got = rollout_returns(real, agent, T, EVAL_SEED)
        results[name]["real"] = {"return": summary(got["return"]), "returns": got["return"].tolist(),
                                 "by_kind": got["by_kind"]}
        log(f"[eval] {name}: real return {results[name]['real']['return']['mean']:.2f} "
            f"+- {results[name]['real']['return']['ci95']:.2f}")
    real.close()
    for wm, checkpoint in checkpoints.items():
        dream = DreamVectorEnv(checkpoint, E, data=str(data), context=1, max_steps=T, temperature=args.temperature,
                               device=args.device, threads=0)
        for name, policy in policies.items():
            agent = make_eval_agent(policy["kind"], policy.get("policy"), dream.single_action_space, inverse, scale)
            got = rollout_returns(dream, agent, T, EVAL_SEED)
            results[name]["dreams"][wm] = {"predicted": summary(got["return"]), "covered": summary(got["covered"]),
                                           "by_kind": got["by_kind"]}
        dream.close()
    return results


# -- the table -------------------------------------------------------------------------------------------------------

BASELINES = (  # name, how it acts, what it was trained on
    ("real_n", "ppo", "the real env, N steps"),
    ("real_10n", "ppo", "the real env, 10x N steps"),
    ("random", "random", "(uniform random actions)"),
    ("explore", "explore", "(scripted; reads the env's visit counts)"),
)
DESCRIBED = {"introspective": "introspective world model (address auto)", "none": "memory-free world model",
             "introspective_pose": "introspective world model (address pose)"}


def rows(args: Args) -> list[tuple[str, str, str]]:
    """(name, kind, trained on) of every policy of the table: one per world model dreamed in, then the baselines."""
    return [(f"dream_{wm}", "ppo", f"dreams of the {DESCRIBED[wm]}") for wm in args.world_models] + list(BASELINES)


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean and 95% CI of a - b over the same episodes (every policy meets the same maps and starts)."""
    return summary(np.asarray(a) - np.asarray(b))


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's target: the memory-dream policy reaches >= 80% of PPO-10xN's real return and beats the
    none-dream policy (the paired 95% CI of the difference above 0)."""
    memory, none, best = (results[k]["real"] for k in ("dream_introspective", "dream_none", "real_10n"))
    ratio = memory["return"]["mean"] / best["return"]["mean"] if best["return"]["mean"] > 0 else float("nan")
    diff = paired_difference(memory["returns"], none["returns"])
    beats = bool(diff["mean"] - diff["ci95"] > 0)
    return {"ratio_to_real_10n": ratio, "reaches_80_percent": bool(ratio >= 0.8), "minus_none": diff,
            "beats_none": beats, "met": bool(ratio >= 0.8 and beats)}


def _cell(s: Optional[dict[str, float]]) -> str:
    return "n/a" if s is None else f"{s['mean']:.2f} ± {s['ci95']:.2f}"


def _diff(results: dict[str, Any], a: str, b: str) -> str:
    """Policy ``a``'s real return minus policy ``b``'s, paired over the evaluation episodes, with its 95% CI."""
    d = paired_difference(results[a]["real"]["returns"], results[b]["real"]["returns"])
    return f"{d['mean']:+.2f} ± {d['ci95']:.2f}"


def _per_step(by_kind: dict[str, dict[str, float]], kind: str) -> str:
    steps = by_kind[kind]["steps"]
    return f"{by_kind[kind]['reward'] / steps:.2f}" if steps else "-"


def table(args: Args, results: dict[str, Any], check: dict[str, Any]) -> str:
    """The markdown table of the run, the target's verdict and the reward heads' errors under it."""
    best = results["real_10n"]["real"]["return"]["mean"]
    steps = {**{f"dream_{wm}": args.ppo_steps for wm in args.world_models}, "real_n": args.real_steps,
             "real_10n": 10 * args.real_steps}
    lines = [f"MNIST map, coverage task, {args.episode_steps}-step episodes; {args.eval_episodes} held-out episodes "
             f"per policy (the same for all), mean ± 95% CI. N = {args.real_steps} real steps of the "
             f"{args.data_agent} agent; world models: {args.wm_steps} steps of the {args.wm_preset} preset; PPO "
             "observes the pose.", "",
             "| policy | trained on | PPO steps | real return | % of PPO 10x N | "
             + " | ".join(f"{wm} dream predicts (really earns)" for wm in args.world_models) + " |",
             "|---|---|---|---|---|" + "---|" * len(args.world_models)]
    for name, _, what in rows(args):
        r = results[name]
        dreams = [f"{_cell(r['dreams'][wm]['predicted'])} ({r['dreams'][wm]['covered']['mean']:.2f})"
                  for wm in args.world_models]
        share = 100.0 * r["real"]["return"]["mean"] / best if best > 0 else float("nan")
        lines.append(f"| {name} | {what} | {steps.get(name, '-')} | {_cell(r['real']['return'])} | {share:.0f}% | "
                     + " | ".join(dreams) + " |")
    d = check["minus_none"]
    gap = {wm: results[f"dream_{wm}"]["dreams"][wm]["predicted"]["mean"] - results[f"dream_{wm}"]["real"]["return"]
           ["mean"] for wm in args.world_models}  # predicted in its own dream minus earned in the real env
    gaps = ", ".join(f"dream_{wm} {value:+.2f}" for wm, value in gap.items())
    share = {wm: results[f"dream_{wm}"]["real"]["return"]["mean"] / best for wm in args.world_models}
    lines += ["", f"Target (introspective-dream policy >= 80% of PPO 10x N, and > none-dream policy): "
              f"{'MET' if check['met'] else 'NOT MET'}: {100 * check['ratio_to_real_10n']:.0f}% of PPO 10x N "
              f"({'>=' if check['reaches_80_percent'] else '<'} 80%); introspective-dream minus none-dream "
              f"{d['mean']:+.2f} ± {d['ci95']:.2f} ({'beats' if check['beats_none'] else 'does not beat'} it).",
              *(f"Beside the target: dream_{wm} reaches {100 * share[wm]:.0f}% of PPO 10x N; minus none-dream "
                f"{_diff(results, f'dream_{wm}', 'dream_none')}; minus PPO 10x N "
                f"{_diff(results, f'dream_{wm}', 'real_10n')}." for wm in args.world_models if wm not in TARGET),
              f"Dream-vs-real gap (a dream policy's return predicted in its own dream minus its real return): {gaps}.",
              "", "Reward per step a dream pays the random policy, by kind of step (the coverage task pays 1 / 0 / 0; "
              "kinds from the dream's dead-reckoned pose):", "",
              "| dream | new place | revisit | blocked move (stays) |", "|---|---|---|---|"]
    lines += [f"| {wm} | " + " | ".join(_per_step(results["random"]["dreams"][wm]["by_kind"], k) for k in STEP_KINDS)
              + " |" for wm in args.world_models]
    lines.append("| (real env) | " + " | ".join(_per_step(results["random"]["real"]["by_kind"], k)
                                              for k in STEP_KINDS) + " |")
    return "\n".join(lines) + "\n"


# -- the benchmark ---------------------------------------------------------------------------------------------------

def benchmark(args: Args) -> dict[str, Any]:
    """Run every stage (reusing finished ones) and write table.md and results.json to ``--out``."""
    args = resolved(args)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {line}", flush=True)

    with FolderLock(args.out, "benchmarks/dream_agents"):
        import envs
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.vec_env import VecMonitor

        from worldmodel.checkpoint import sha256_of

        data = collect_data(args, log)
        wms = {wm: train_world_model(args, wm, data, log) for wm in args.world_models}
        checkpoints = {wm: result["checkpoint"] for wm, result in wms.items()}
        scale = pose_scale(args.episode_steps)

        trained: dict[str, dict[str, Any]] = {}
        for wm, ckpt in checkpoints.items():
            trained[f"dream_{wm}"] = train_policy(
                args, f"dream_{wm}", args.ppo_steps,
                lambda ckpt=ckpt: VecMonitor(DreamVecEnv(ckpt, str(data), args.num_envs, args.episode_steps, scale,
                                                         args.seed + 1, temperature=args.temperature,
                                                         device=args.device)),
                {"dream": sha256_of(ckpt), "temperature": args.temperature}, log)

        def real_env() -> VecEnv:
            return make_vec_env(lambda: PoseObservation(envs.make(ENV, **env_kwargs(args.episode_steps)), scale),
                                n_envs=args.num_envs, seed=args.seed + 1)

        for name, steps in (("real_n", args.real_steps), ("real_10n", 10 * args.real_steps)):
            trained[name] = train_policy(args, name, steps, real_env, {"env": env_kwargs(args.episode_steps)}, log)
        policies = {name: ({"kind": "ppo", "policy": trained[name]["policy"]} if kind == "ppo" else {"kind": kind})
                    for name, kind, _ in rows(args)}
        results = evaluate(args, policies, checkpoints, data, log)
        check = verdict(results)
        text = table(args, results, check)
        report = {"config": dataclasses.asdict(args), "results": results, "verdict": check, "policies": trained,
                  "world_models": wms, "pose_scale": scale, "seconds": time.perf_counter() - start,
                  "machine": {"platform": platform.platform(), "processor": platform.processor(),
                              "torch": torch.__version__, "threads": torch.get_num_threads()}}
        write_bytes_atomic(args.out / "table.md", text.encode())
        _write_json(args.out / "results.json", report)
    print(text, end="")
    log(f"wrote {args.out / 'table.md'} and {args.out / 'results.json'}")
    return report


def main(argv: Optional[list[str]] = None) -> None:
    """``python benchmarks/dream_agents.py``: parse the flags and run the benchmark."""
    benchmark(parse(Args, argv, prog="benchmarks/dream_agents.py"))


if __name__ == "__main__":
    run(main)
