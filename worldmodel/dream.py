"""Dreaming: a trained GTMM standing in for the environment it was trained on (issue #5).

    gymnasium.make("Dream-v0", checkpoint="runs/intro_pose", data="data/mnist_map")
    python -m worldmodel.dream --checkpoint runs/intro_pose --data data/mnist_map_test --out dream.gif
    python -m worldmodel.dream --checkpoint runs/intro_pose --data data/mnist_map_test --agent loop --episode-steps 200 \
        --out dream_loop.gif
    python -m rollouts.collect --env dream --env-kwargs '{"checkpoint": "runs/intro_pose", "data": "data/mnist_map",
        "threads": 1}' --agent loop --episodes 10 --episode-steps 64 --out data/dreamed
    python -m agents.train_sb3 --env dream --env-kwargs '{"checkpoint": "runs/intro_pose", "data": "data/mnist_map"}'

A dream is the model's open loop (the `imagine` path of `worldmodel.model`): `reset` teacher-forces the posterior
over K real context frames (the memory is written from what was really seen), then every `step(action)` runs
equations (1)-(7) with z_t drawn from the prior p(z_t | h_t, r_t) -- with its std scaled by `temperature` -- and
decodes x_t = mean of p(x_t | z_t) (8) into a uint8 frame. Nothing of the real env is consulted for the frames.

The scalar `DreamEnv` and the batched `DreamVectorEnv` share one implementation (`DreamBatch`): N dreams step in one
forward call of the model on its device (a GPU when there is one), and their bookkeeping (on record or not, pose,
revisits, info) is a fixed number of numpy calls on arrays of all N dreams, not a Python loop over them (issue 12:
with 1,024 dreams on a GPU the loop, not the model, set the pace). Each dream's prior noise comes from its own key
in one vectorised draw for all (`normal_noise`); only shadow envs and resets stay loops.

Where the dream is (`info["pose"]`, `revisit`, `visit_count`; the contract of `envs/__init__.py`), and how it is
known, `info["pose_source"]`:
    - "recorded": at reset (the last context frame) and after it while the actions taken are exactly the recorded
      episode's next actions ("on record"): the recorded pose, revisit and visit_count (where the agent really is).
    - "shadow": with `shadow=True` a real env (the live one, or the recorded episode's env rebuilt from the manifest
      and its env seed, checked against the recorded context frames) is stepped beside the dream with the same
      actions: pose, revisit and visit_count are the real env's until that real episode ends. A live env (`env=`)
      always shadows.
    - "integrated": otherwise, once the actions leave the record, the pose is integrated from the last known pose
      with the env's declared action effects (`action_effects`, recorded in the manifest), without rendering: the
      env's own dead reckoning (`envs.odometry`: `LatticeOdometry` on the MNIST map, `SE2Odometry` in MiniWorld), and
      revisit / visit_count follow from the poses of the whole episode so far by the env's own revisit rule. On the
      MNIST map this is the real pose (moves are exact; a `clip` border clamps them to the map as the env blocks
      them). In MiniWorld walls and objects are unknown to the dream: the pose assumes every move happened.
    - "unknown": where the env declares no action effects (or `integrate_pose=False`): `pose` is the finite sentinel
      `UNKNOWN_POSE` in every component (never NaN, so same-seed dreams compare equal and Gymnasium's `check_env`
      passes), `revisit` False and `visit_count` 0. A model with the `pose` address needs the pose to dream, so it
      cannot dream there.
    `info["pose_known"]` is `pose_source != "unknown"`; `info["on_record"]` says the actions so far are the recorded
    ones. The frames are always dreamed; the real frame, when known, is `env.dreams.tracks[i].real_obs`.
    - a model whose action address has the blocked-move gate (`worldmodel.gate`) is told whether each move happened
      wherever the dream knows it (recorded or shadow poses, and the MNIST map's dead reckoning, which clamps at the
      declared clip border exactly as the env does); elsewhere (MiniWorld's walls) the gate guesses from z_{t-1}.
      Without this, a dream walking into the border moved its memory address on as if the move had happened.
    - reward and termination are the model's predictions (its reward heads, `worldmodel.reward`; `info
      ["reward_predicted"]` True), or 0 and never for a model without them; a dream truncates after `max_steps`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import gymnasium as gym
import numpy as np
import tyro
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from gtmm import cli
from gtmm.cli import UserError, parse_json_object
from worldmodel import checkpoint as ckpt_io
from worldmodel.model import GTMM, ModelState

INFO_KEYS = ("pose", "revisit", "visit_count", "pose_known", "pose_source", "on_record")
POSE_SOURCES = ("recorded", "shadow", "integrated", "unknown")  # info["pose_source"]; see the module docstring
RECORDED, SHADOW, INTEGRATED, UNKNOWN = range(len(POSE_SOURCES))
UNKNOWN_POSE = -1.0e6  # info["pose"] where it is unknown: finite (NaN != NaN breaks equality checks), no real place


# -- the model side: warm up on real frames, then step the prior ---------------------------------------------------------

@contextlib.contextmanager
def prior_temperature(model: GTMM, temperature: float):
    """Scale the std of the prior p(z_t) by `temperature` inside the block (a forward hook on the prior head).

    `GTMM.step_prior` has no temperature argument; the hook changes only what the prior head returns, so the cell
    samples z_t = mu_p + temperature * sigma_p * eps and writes that z_t to memory, as a cooler prior would.
    """
    if temperature == 1.0:
        yield
        return

    def scale(_module, _inputs, output):
        mean, std = output
        return mean, std * temperature

    handle = model.cell.prior.register_forward_hook(scale)
    try:
        yield
    finally:
        handle.remove()


def _rows(state: ModelState, index: torch.Tensor) -> ModelState:
    """The sub-batch `index` of a state (every tensor has the batch on axis 0)."""
    return ModelState(h=state.h[index], c=state.c[index], z=state.z[index], read=state.read[index],
                      memory={k: v[index] for k, v in state.memory.items()},
                      address={k: v[index] for k, v in state.address.items()})


def _set_rows(state: ModelState, index: torch.Tensor, rows: ModelState) -> ModelState:
    """`state` with the batch rows `index` replaced by `rows` (out of place)."""
    def put(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        out = dst.clone()
        out[index] = src
        return out

    return ModelState(h=put(state.h, rows.h), c=put(state.c, rows.c), z=put(state.z, rows.z),
                      read=put(state.read, rows.read),
                      memory={k: put(v, rows.memory[k]) for k, v in state.memory.items()},
                      address={k: put(v, rows.address[k]) for k, v in state.address.items()})


def normal_noise(keys: np.ndarray, counters: np.ndarray, dim: int) -> np.ndarray:
    """Standard normal draws (N, dim) float32, row i a pure function of (keys[i], counters[i]): a counter-based
    generator (the splitmix64 hash of key + index, then Box-Muller on two 24-bit uniforms), so all N dreams draw in
    one vectorised call (1,024 x 16 draws ~0.3 ms vs ~1.6 ms for a loop over generators) and a dream's noise never
    depends on its batch. Tails are cut near 5.9 sigma (the smallest uniform is 2^-25). keys, counters: (N,) uint64."""
    index = counters[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)  # (N, dim) the draw's number
    x = keys[:, None] + index * np.uint64(0x9E3779B97F4A7C15)  # uint64 arithmetic wraps, as the hash wants
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    u1 = ((x >> np.uint64(40)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -24)  # (0, 1)
    u2 = ((x >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0 ** -24)  # [0, 1)
    return np.sqrt(np.float32(-2.0) * np.log(u1)) * np.cos(np.float32(2.0 * np.pi) * u2)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Mean frames in [0, 1] (..., H, W, C) -> uint8 numpy, as the real env's observations."""
    return frames.float().mul(255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


# -- where the context frames come from ----------------------------------------------------------------------------------

class Track:
    """One dream's link to reality: the recorded episode it started from and/or a real env stepped beside it.

    The per-step bookkeeping lives in its `DreamBatch`'s arrays (row `i`); `t`, `on_record` and `steps` read them."""

    def __init__(self, batch: "DreamBatch", i: int, episode: Optional[dict[str, np.ndarray]], episode_index: int,
                 shadow: Optional[gym.Env], context_obs: np.ndarray, real_info: Optional[dict[str, Any]] = None,
                 shadow_obs: Optional[np.ndarray] = None) -> None:
        self.batch, self.i = batch, i
        self.episode = episode  # the recorded episode (data mode), None for a live env
        self.episode_index = episode_index  # manifest index of the episode (-1 for a live env)
        self.shadow = shadow  # a real env stepped with the same actions (shadow mode / live env), else None
        self.context_obs = context_obs  # (K, H, W, C) the real context frames
        self.real_info = real_info  # the real env's last info (shadowed), else None
        self.shadow_obs = shadow_obs  # the real env's frame at this step, while it is stepped beside the dream

    @property
    def t(self) -> int:
        """Frame index into the episode of the current frame, while on record."""
        return int(self.batch.t[self.i])

    @property
    def on_record(self) -> bool:
        """Every action since reset was the recorded one (and the record has not run out)."""
        return bool(self.batch.on_record[self.i])

    @property
    def steps(self) -> int:
        """Dreamed steps since reset."""
        return int(self.batch.steps[self.i])

    @property
    def real_obs(self) -> Optional[np.ndarray]:
        """The real frame at this step when known (shadowed, or on record), else None."""
        if self.shadow_obs is not None:
            return self.shadow_obs
        return self.episode["obs"][self.t] if self.on_record else None


class DreamBatch:
    """N dreams of one checkpoint, stepped together: the single implementation behind `DreamEnv` and
    `DreamVectorEnv`. See the module docstring for what is real in `info`.

    Args:
        checkpoint: a run folder or its ckpt.pt, of a model trained on recorded rollouts (it must have actions).
        num_envs: dreams stepped in one forward call.
        data: rollout folder (`python -m rollouts.collect`) giving the context episodes; exclusive with `env`.
        env: live env short name (`envs.make`) giving the context; exclusive with `data`.
        env_kwargs: constructor arguments of the live env.
        context: K, real frames teacher-forced at reset (0 = the checkpoint's `open_loop_context`).
        temperature: scale of the prior std when sampling z_t (0 = the prior mean, deterministic).
        max_steps: dreamed steps before truncation.
        shadow: step a real env beside each dream with the same actions, for real pose/revisit in `info`.
        integrate_pose: off record and without a shadow, integrate the pose from the env's declared action effects
            (False: the pose is unknown there).
        context_agent: collector agent (agents.make_agent) taking the K-1 context actions in a live env.
        device: auto (cuda if available), cpu, cuda, cuda:N.
        threads: torch CPU threads to set (0 = leave torch's default). One dream's ops are tiny: on a busy CPU more
            threads than free cores make a step 10-20x slower (measured: 10 ms with 1 thread, 230 ms with 2).
    """

    def __init__(self, checkpoint: str, num_envs: int = 1, data: Optional[str] = None, env: Optional[str] = None,
                 env_kwargs: Optional[dict[str, Any]] = None, context: int = 0, temperature: float = 1.0,
                 max_steps: int = 100, shadow: bool = False, context_agent: str = "random",
                 device: str = "auto", threads: int = 0, integrate_pose: bool = True) -> None:
        from worldmodel.train import resolve_device

        if (data is None) == (env is None):
            raise UserError(f"dream: give exactly one of data= (rollout folder) or env= (live env short name); "
                             f"got data={data!r}, env={env!r}")
        if num_envs < 1:
            raise UserError(f"dream: num_envs {num_envs}: expected >= 1")
        if temperature < 0:
            raise UserError(f"dream: temperature {temperature}: expected >= 0")
        if max_steps < 1:
            raise UserError(f"dream: max_steps {max_steps}: expected >= 1")
        if threads < 0:
            raise UserError(f"dream: threads {threads}: expected >= 0 (0 = leave torch's default)")
        if not isinstance(integrate_pose, (bool, np.bool_)):
            raise UserError(f"dream: integrate_pose {integrate_pose!r}: expected true or false")
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.model, self.train_config = ckpt_io.load(checkpoint, self.device)
        cfg = self.model.cfg
        if cfg.num_actions < 1:
            raise UserError(f"checkpoint {checkpoint}: the model was trained without actions (num_actions 0, e.g. a "
                             "sequence task); a dream needs a model trained on recorded rollouts")
        self.context = context or self.train_config.open_loop_context
        if self.context < 1:
            raise UserError(f"dream: context {self.context}: expected >= 1 real frame")
        self.num_envs, self.temperature, self.max_steps = num_envs, float(temperature), max_steps
        self.shadow, self.needs_pose = bool(shadow) or env is not None, cfg.address == "pose"
        self.obs_shape, self.num_actions, self.pose_dim = tuple(cfg.obs_shape), cfg.num_actions, cfg.pose_dim
        self.observation_space = spaces.Box(0, 255, self.obs_shape, dtype=np.uint8)
        self.action_space = spaces.Discrete(self.num_actions)

        # -- the real env's identity: from the dataset's manifest or the live env ------------------------------------
        self.data = data
        if data is not None:
            from rollouts.storage import read_manifest

            self.manifest = read_manifest(data)
            self.env_name, self.env_kwargs = self.manifest["env"]["name"], dict(self.manifest["env"]["kwargs"])
            real = (tuple(self.manifest["obs_shape"]), int(self.manifest["num_actions"]), int(self.manifest["pose_dim"]))
            self.candidates = [e for e in sorted(self.manifest["episodes"], key=lambda e: e["index"])
                               if e["steps"] + 1 >= self.context]
            if not self.candidates:
                raise UserError(f"{data}: no episode has the {self.context} frames of context the dream needs")
            self._episodes: dict[int, dict[str, np.ndarray]] = {}
        else:
            self.manifest, self.env_name, self.env_kwargs = None, env, dict(env_kwargs or {})
            real = None
        if real is not None and real != (self.obs_shape, self.num_actions, self.pose_dim):
            raise UserError(f"{data}: frames/actions/pose {real} differ from the checkpoint's "
                             f"{(self.obs_shape, self.num_actions, self.pose_dim)}: this model was trained on another env")
        self.context_agent = context_agent
        self.inverse_actions: Optional[tuple[int, ...]] = None
        self._shadows: list[Optional[gym.Env]] = [None] * num_envs
        if self.shadow:
            self._real_env(0)  # built now: checks the real env's spaces against the checkpoint, reads inverse_actions
        if self.inverse_actions is None:
            inv = cfg.address_kwargs.get("inverse_actions")
            self.inverse_actions = tuple(int(a) for a in inv) if inv is not None else self._probe_inverse_actions()
        # dead reckoning from the env's declared action effects (None: the pose off record is unknown)
        self.odometry = self._odometry(num_envs) if integrate_pose else None

        self.state: Optional[ModelState] = None
        self.tracks: list[Optional[Track]] = [None] * num_envs
        self.last_obs = np.zeros((num_envs, *self.obs_shape), dtype=np.uint8)
        # the reward heads' prediction of the last step (`worldmodel.reward`); 0 / False for a model without them
        self.predicts_reward = self.model.reward_head is not None
        self.last_reward = np.zeros(num_envs, dtype=np.float32)
        self.last_terminated = np.zeros(num_envs, dtype=bool)
        # -- every dream's bookkeeping, as arrays with the dream on axis 0 (one numpy call steps them all) ------------
        N, D = num_envs, self.pose_dim
        self._rows = np.arange(N)
        self.steps = np.zeros(N, dtype=np.int64)  # (N,) dreamed steps since reset
        # (N,) each dream's prior-noise key, drawn at reset from the generator that picked its episode, and the
        # number of noise draws made since (see `normal_noise`)
        self.noise_key = np.zeros(N, dtype=np.uint64)
        self.noise_count = np.zeros(N, dtype=np.uint64)
        self.t = np.zeros(N, dtype=np.int64)  # (N,) frame index into the recorded episode, while on record
        self.on_record = np.zeros(N, dtype=bool)  # (N,) every action since reset was the recorded one
        self.shadowed = np.zeros(N, dtype=bool)  # (N,) a real env is stepped beside the dream
        self.record_len = np.zeros(N, dtype=np.int64)  # (N,) recorded actions of the dream's episode (0: live env)
        self.record_action = np.full((N, 1), -1, dtype=np.int64)  # (N, L) recorded actions, -1 past the end
        self.record_pose = np.zeros((N, 2, D), dtype=np.float32)  # (N, L + 1, D) recorded poses
        self.record_visit_count = np.zeros((N, 2), dtype=np.int64)  # (N, L + 1) recorded visit counts
        self.record_revisit = np.zeros((N, 2), dtype=bool)  # (N, L + 1) recorded revisit flags
        self.pose = np.full((N, D), UNKNOWN_POSE, dtype=np.float64)  # (N, D) where each dream is now
        self.pose_source = np.full(N, UNKNOWN, dtype=np.int8)  # (N,) index into POSE_SOURCES
        self._stale_shadow_obs: list[int] = []  # dreams whose shadow ended last step: forget its frame next step

    def _odometry(self, num_envs: int) -> Any:
        """The env's dead reckoning (`envs.odometry`) from the manifest (data) or the live env; None if it declares
        no action effects or is not one of ours."""
        import envs

        if self.manifest is not None:
            env_id, effects = self.manifest["env"]["id"], self.manifest["env"].get("action_effects")
            kwargs = self.env_kwargs
        else:
            env_id, kwargs = envs.resolve(self.env_name)
            kwargs.update(self.env_kwargs)
            effects = getattr(self._real_env(0).unwrapped, "action_effects", None)
        return envs.odometry(env_id, kwargs, effects, num_envs)

    # -- real envs (shadows and live contexts) ----------------------------------------------------------------------

    def _real_env(self, i: int) -> gym.Env:
        """Dream i's real env, built once (the live env, or the manifest's env for shadowing)."""
        import envs

        if self._shadows[i] is None:
            kwargs = dict(self.env_kwargs)
            if "max_steps" in kwargs:  # the recorded episodes' length: a shadow must last as long as the dream
                kwargs["max_steps"] = max(int(kwargs["max_steps"]), self.max_steps + self.context)
            real = envs.make(self.env_name, **kwargs)
            got = (tuple(real.observation_space.shape), int(real.action_space.n))
            if got != (self.obs_shape, self.num_actions):
                raise UserError(f"env {self.env_name!r}: observations {got[0]} and {got[1]} actions, the checkpoint "
                                 f"dreams {self.obs_shape} and {self.num_actions}: not the env it was trained on")
            if self.inverse_actions is None and hasattr(real.unwrapped, "inverse_actions"):
                self.inverse_actions = tuple(real.unwrapped.inverse_actions)
            self._shadows[i] = real
        return self._shadows[i]

    def _probe_inverse_actions(self) -> Optional[tuple[int, ...]]:
        """The real env's inverse_actions (for the loop/explore agents), read off a throwaway instance."""
        import envs

        try:
            real = envs.make(self.env_name, **self.env_kwargs)
        except Exception:  # the env may be unavailable here (e.g. no GL); the dream itself does not need it
            return None
        inv = getattr(real.unwrapped, "inverse_actions", None)
        real.close()
        return None if inv is None else tuple(int(a) for a in inv)

    def close(self) -> None:
        """Close the real envs kept beside the dreams (idempotent)."""
        for i, real in enumerate(self._shadows):
            if real is not None:
                real.close()
                self._shadows[i] = None

    # -- contexts -------------------------------------------------------------------------------------------------------

    def _load_episode(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        from rollouts.storage import check_episode_record, episode_path, load_episode

        index = int(record["index"])
        if index not in self._episodes:
            path = episode_path(self.data, record)  # confined to the data folder, never a path the manifest invents
            episode = load_episode(path, sha256=record["sha256"])
            check_episode_record(self.manifest, record, episode, str(path))
            self._episodes[index] = episode
        return self._episodes[index]

    def _context(self, i: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], Track]:
        """K real frames for dream i (obs (K, H, W, C), prev_action (K,), pose (K, D)) and its Track."""
        from rollouts.dataset import episode_prev_action

        K = self.context
        if self.data is not None:
            record = self.candidates[int(rng.integers(len(self.candidates)))]
            episode = self._load_episode(record)
            track = Track(self, i, episode=episode, episode_index=int(record["index"]), shadow=None,
                          context_obs=episode["obs"][:K])
            if self.shadow:
                track.shadow = self._replay_shadow(i, record, episode)
            ctx = {"obs": episode["obs"][:K], "prev_action": episode_prev_action(episode["action"])[:K],
                   "pose": episode["pose"][:K]}
            return ctx, track
        # a live env: reset with a seed from rng, K-1 actions of the context agent
        from agents import make_agent

        real = self._real_env(i)
        obs, info = real.reset(seed=int(rng.integers(2**31)))
        agent = make_agent(self.context_agent, real.action_space, self.inverse_actions)
        agent.reset(1, int(rng.integers(2**31)))
        frames, actions, poses = [obs], [-1], [np.asarray(info["pose"], np.float32)]
        for _ in range(K - 1):
            action = int(agent.act(obs[None], {k: np.asarray(v)[None] for k, v in info.items()})[0])
            obs, _, terminated, truncated, info = real.step(action)
            if terminated or truncated:
                raise UserError(f"env {self.env_name!r} ended its episode within the {K} context frames")
            frames.append(obs), actions.append(action), poses.append(np.asarray(info["pose"], np.float32))
        ctx = {"obs": np.stack(frames), "prev_action": np.array(actions, np.int64), "pose": np.stack(poses)}
        if ctx["pose"].shape[1:] != (self.pose_dim,):
            raise UserError(f"env {self.env_name!r}: info['pose'] has shape {ctx['pose'].shape[1:]}, the checkpoint "
                             f"expects ({self.pose_dim},): not the env it was trained on")
        track = Track(self, i, episode=None, episode_index=-1, shadow=real, context_obs=ctx["obs"], real_info=info,
                      shadow_obs=obs)
        return ctx, track

    def _replay_shadow(self, i: int, record: dict[str, Any], episode: dict[str, np.ndarray]) -> gym.Env:
        """Rebuild the recorded episode's env from the manifest and its env seed, and replay the context actions."""
        if "env_seed" not in record:
            raise UserError(f"{self.data}: episode {record['index']} has no env_seed in the manifest; shadow=True "
                             "needs it to rebuild the real env")
        real = self._real_env(i)
        obs, info = real.reset(seed=int(record["env_seed"]))
        for action in episode["action"][:self.context - 1]:
            obs, *_, info = real.step(int(action))
        if not np.array_equal(obs, episode["obs"][self.context - 1]):
            raise UserError(f"{self.data}: episode {record['index']} cannot be replayed in a fresh {self.env_name!r} "
                             f"env from its env_seed (frame {self.context - 1} differs); use shadow=False")
        return real

    def _record_rows(self, rows: np.ndarray, episodes: list[Optional[dict[str, np.ndarray]]]) -> None:
        """Copy the recorded actions, poses and revisits of the dreams `rows`' episodes into the record arrays
        (padded to the longest episode so far; a live env's dream has an empty record)."""
        longest = max([len(e["action"]) for e in episodes if e is not None] + [0])
        L = self.record_action.shape[1]
        if longest > L:  # grow every record array to the new longest episode (padding: action -1 never matches)
            grow = longest - L
            self.record_action = np.pad(self.record_action, ((0, 0), (0, grow)), constant_values=-1)
            self.record_pose = np.pad(self.record_pose, ((0, 0), (0, grow), (0, 0)))
            self.record_visit_count = np.pad(self.record_visit_count, ((0, 0), (0, grow)))
            self.record_revisit = np.pad(self.record_revisit, ((0, 0), (0, grow)))
        for i, episode in zip(rows, episodes):
            n = 0 if episode is None else len(episode["action"])
            self.record_len[i] = n
            self.record_action[i] = -1
            if episode is not None:
                self.record_action[i, :n] = episode["action"]
                self.record_pose[i, :n + 1] = episode["pose"]
                self.record_visit_count[i, :n + 1] = episode["visit_count"]
                self.record_revisit[i, :n + 1] = episode["revisit"]

    # -- the dream itself -----------------------------------------------------------------------------------------------

    def reset(self, indices: np.ndarray, rngs: list[np.random.Generator]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Start new dreams in slots `indices` (one generator each picks the episode / live seed): warm the model
        up on their K context frames in one batched call. Returns the last context frames (n, H, W, C) and their
        infos as arrays with a leading n axis (`INFO_KEYS`)."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        contexts, tracks = [], []
        for i, rng in zip(rows, rngs):
            ctx, track = self._context(int(i), rng)
            self.tracks[int(i)] = track
            contexts.append(ctx), tracks.append(track)
            self.noise_key[i] = rng.integers(2**63)
        self.noise_count[rows] = 0
        batch = {k: np.stack([c[k] for c in contexts]) for k in contexts[0]}  # (n, K, ...)
        recorded = np.array([track.episode is not None for track in tracks])  # (n,) else a live env's context
        self._record_rows(rows, [track.episode for track in tracks])
        K = self.context
        self.steps[rows], self.t[rows], self.on_record[rows] = 0, K - 1, recorded
        self.shadowed[rows] = [track.shadow is not None for track in tracks]
        self.pose[rows] = batch["pose"][:, -1]  # (n, D) the last context frame's real pose
        self.pose_source[rows] = np.where(recorded, RECORDED, SHADOW)
        if self.odometry is not None:  # the places of the context are the first visits of the dream's episode
            self.odometry.reset(rows)
            for k in range(K):
                self.odometry.visit(batch["pose"][:, k].astype(np.float64), rows)
        # the last context frame's info is real: recorded, or the live env's
        live = [track.real_info or {} for track in tracks]
        last = min(K - 1, self.record_len.max())  # K - 1 for recorded dreams (their episodes have K frames or more)
        visit_count = np.where(recorded, self.record_visit_count[rows, last],
                               [int(info.get("visit_count", 0)) for info in live])
        revisit = np.where(recorded, self.record_revisit[rows, last], [bool(info.get("revisit", False)) for info in live])

        tensors = {k: torch.as_tensor(v).to(self.device) for k, v in batch.items()}
        state_rows = self.model.warmup(tensors["obs"], tensors["prev_action"], tensors["pose"].float())  # (n, ...)
        index = torch.as_tensor(rows, device=self.device, dtype=torch.long)
        if self.state is None:
            self.state = self.model.init_state(self.num_envs, self.device)
        self.state = _set_rows(self.state, index, state_rows)
        obs = batch["obs"][:, -1]  # (n, H, W, C) the last real frame
        self.last_obs[rows] = obs
        return obs, self._infos(rows, visit_count.astype(np.int64), revisit.astype(bool))

    def _infos(self, rows: np.ndarray | slice, visit_count: np.ndarray, revisit: np.ndarray) -> dict[str, np.ndarray]:
        """The info arrays of dreams `rows` from the bookkeeping arrays (leading axis: those dreams)."""
        source = self.pose_source[rows]
        return {"pose": self.pose[rows].astype(np.float32), "revisit": revisit, "visit_count": visit_count,
                "pose_known": source != UNKNOWN, "pose_source": _SOURCE_NAMES[source],
                "on_record": self.on_record[rows].copy()}

    def _advance(self, actions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Move every dream's link to reality by `actions` (N,): on record or not, pose, revisits. Returns the info
        arrays of the frames the actions lead to, and per dream whether the dream knows if its move happened (N,)
        bool and whether it did (N,) bool. O(1) numpy calls for all N dreams; a loop only over shadowed ones."""
        rows = self._rows
        self.steps += 1
        # on record while the action taken is the recorded episode's next one (the pad -1 past its end never is)
        recorded_next = self.record_action[rows, np.minimum(self.t, self.record_action.shape[1] - 1)]  # (N,)
        self.on_record &= (self.t < self.record_len) & (recorded_next == actions)
        self.t += self.on_record
        # off record, the pose goes on from the last known one by dead reckoning (or becomes unknown)
        known = self.pose_source != UNKNOWN  # (N,) before this step
        previous = self.pose
        if self.odometry is not None:
            pose = np.where(known[:, None], self.odometry.integrate(self.pose, actions), UNKNOWN_POSE)  # (N, D)
            source = np.where(known, INTEGRATED, UNKNOWN).astype(np.int8)
        else:
            pose = np.full_like(self.pose, UNKNOWN_POSE)
            source = np.full(len(rows), UNKNOWN, dtype=np.int8)
        on = self.on_record
        pose[on] = self.record_pose[on, self.t[on]]
        source[on] = RECORDED
        # a shadow env is stepped per dream (it is a real env); its pose, revisits and frame are the truth
        for i in self._stale_shadow_obs:  # the shadow ended on the step before: its frame is no longer this one's
            if self.tracks[i] is not None:
                self.tracks[i].shadow_obs = None
        self._stale_shadow_obs = []
        shadow_rows = np.flatnonzero(self.shadowed)
        shadow_info = []
        for i in shadow_rows:
            track = self.tracks[i]
            track.shadow_obs, _, terminated, truncated, info = track.shadow.step(int(actions[i]))
            track.real_info = info
            pose[i], source[i] = info["pose"], SHADOW
            shadow_info.append((int(info["visit_count"]), bool(info["revisit"])))
            if terminated or truncated:  # the real episode is over: from the next step on, dead reckoning
                track.shadow = None
                self.shadowed[i] = False
                self._stale_shadow_obs.append(int(i))
        self.pose, self.pose_source = pose, source
        # did each move happen? Known where both poses are real, or integrated by an odometry that knows where moves
        # are blocked (the MNIST map's declared bounds); elsewhere (MiniWorld's walls) the model's gate guesses
        trusted = (source == RECORDED) | (source == SHADOW)
        if getattr(self.odometry, "knows_blocked_moves", False):
            trusted |= source == INTEGRATED
        move_known = trusted & known  # (N,)
        moved = (pose != previous).any(-1)  # (N,)
        # revisits: the recorded or shadow env's where they are real; else the env's rule on the integrated poses.
        # Every known pose joins its dream's history, so a later integrated revisit counts the recorded visits too.
        visit_count = np.zeros(len(rows), dtype=np.int64)
        if self.odometry is not None:
            known_rows = np.flatnonzero(source != UNKNOWN)
            visit_count[known_rows] = self.odometry.visit(pose[known_rows], known_rows)
        revisit = visit_count > 0
        visit_count[on] = self.record_visit_count[on, self.t[on]]
        revisit[on] = self.record_revisit[on, self.t[on]]
        if len(shadow_rows):
            visit_count[shadow_rows], revisit[shadow_rows] = np.array(shadow_info).T
        return self._infos(slice(None), visit_count, revisit), move_known, moved

    @torch.no_grad()
    def step(self, actions: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Dream one step of all N dreams in one forward call: actions (N,) -> frames (N, H, W, C) uint8 and the
        info arrays (leading axis N, `INFO_KEYS`).

        Dream i's prior noise comes from its own key (drawn at reset from the generator its env seeded) and its own
        count of draws (`normal_noise`), so what it samples depends on its seed and actions only, never on the batch
        size or its neighbours -- as a real env's randomness does; the global torch RNG is not touched."""
        assert self.state is not None, "DreamBatch.step before reset"
        actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)
        infos, move_known, happened = self._advance(actions)
        if self.needs_pose and not infos["pose_known"].all():
            raise UserError("dream: this model reads memory by the env's pose (address 'pose'), and the actions left "
                             "the recorded episode of an env whose action effects are unknown, so the pose is "
                             "unknown; dream with shadow=True (a real env stepped beside the dream) or with a model "
                             "of another address")
        action_t = torch.as_tensor(actions, device=self.device)  # (N,)
        pose_t = torch.as_tensor(infos["pose"], device=self.device)  # (N, D); read only by the pose address
        sample = self.temperature > 0
        noise = None
        if sample:  # (N, Z) standard normal, each dream's from its own key; drawn with numpy on the host, so a seed
            # gives the same noise on any device
            noise = torch.as_tensor(normal_noise(self.noise_key, self.noise_count, self.model.cfg.z_dim),
                                    device=self.device)
            self.noise_count += np.uint64(1)
        moved = None
        if self.model.cell.gate is not None:  # a gated action address: where the dream knows if the move happened
            if self.model.cell.address.guesses_moves:
                guess = self.model.cell.move_guess(self.state, action_t)  # (N,) the model's own belief
            else:  # the lattice filter: 0.5 is no evidence (it weighs every start hypothesis alike)
                guess = torch.full(action_t.shape, 0.5, device=self.device)
            moved = torch.where(torch.as_tensor(move_known, device=self.device),
                                torch.as_tensor(happened, device=self.device).to(guess.dtype), guess)
        with prior_temperature(self.model, self.temperature):
            # `GTMM.step_prior` with the noise given: the model's batched cell step, then the mean decode (8)
            out, self.state = self.model.cell(self.state, action_t, pose_t, None, sample=sample, noise=noise,
                                              moved=moved)
            frames = self.model.decode_mean(out["z"])  # (N, H, W, C) in [0, 1]
            if self.predicts_reward:  # (R1), (R2) from the new state (h_t, r_t, z_t), batched like the frames
                reward, terminated = self.model.reward(self.state)
                self.last_reward[:] = reward.float().cpu().numpy()
                self.last_terminated[:] = terminated.float().cpu().numpy() > 0.5
        obs = to_uint8(frames)  # (N, H, W, C)
        self.last_obs[:] = obs
        return obs, infos


_SOURCE_NAMES = np.array(POSE_SOURCES)  # pose_source codes -> names, one fancy index for all dreams


def _info_row(infos: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """Row i of the info arrays as a single env's info (plain Python scalars, the pose an array)."""
    return {"pose": infos["pose"][i], "revisit": bool(infos["revisit"][i]),
            "visit_count": int(infos["visit_count"][i]), "pose_known": bool(infos["pose_known"][i]),
            "pose_source": str(infos["pose_source"][i]), "on_record": bool(infos["on_record"][i])}


def _check_actions(space: spaces.Discrete, actions: np.ndarray) -> None:
    """UserError naming the first action (N,) that is not in the discrete ``space`` (one vectorised test)."""
    bad = np.flatnonzero((actions < space.start) | (actions >= space.start + space.n))
    if len(bad):
        raise UserError(f"action {actions[bad[0]]!r} is not in the action space {space}")


def _check_action(space: gym.Space, action: Any) -> None:
    if not space.contains(action):
        raise UserError(f"action {action!r} is not in the action space {space}")


# -- the Gymnasium envs ------------------------------------------------------------------------------------------------

class DreamEnv(gym.Env):
    """A trained GTMM world model as a Gymnasium environment.

    ## Description
    The frames come from the model, not from the world: `reset` shows the model K real frames of an episode (from a
    rollout folder, `data=`, the episode picked by the reset seed; or from a live env, `env=`) so its memory holds
    what was really seen, then every `step(action)` samples the next latent from the prior (temperature-scaled std)
    and decodes it. Places seen in the context should come back when the agent returns to them -- if the memory
    works.

    ## Action Space
    `Discrete(A)`, the actions of the env the model was trained on (A from the checkpoint).

    ## Observation Space
    | Num | Observation     | Min | Max | Shape          | dtype |
    |-----|-----------------|-----|-----|----------------|-------|
    | 0   | dreamed frame   | 0   | 255 | (H, W, C)      | uint8 |
    (H, W, C) is the trained model's frame shape, the same as the real env's observations.

    ## Rewards
    What the model's reward heads predict for the step (`worldmodel.reward`, trained with `--reward-head` on
    rollouts collected with a reward task, e.g. `--env-kwargs '{"task": "coverage"}'`); `info["reward_predicted"]`
    says so. A model without them gives 0: wrap the dream instead (e.g. `agents.sb3.NoveltyReward`, which reads
    `visit_count`: known in dreams of our envs, see Info).

    ## Starting State
    The last of the K context frames (a real frame); `info` is that frame's real pose/revisit/visit_count.

    ## Episode End
    Terminates where the termination head says p > 0.5 (a model with reward heads, data of a task that ends, e.g.
    `find_digit`); truncates after `max_steps` dreamed steps.

    ## Info
    | Key           | Type           | Meaning                                                                  |
    |---------------|----------------|--------------------------------------------------------------------------|
    | `pose`        | float32 (D,)   | where the dream is (`envs/__init__.py`); `UNKNOWN_POSE` where unknown     |
    | `revisit`     | bool           | the place was seen earlier this episode (context frames included)        |
    | `visit_count` | int            | earlier steps of this episode at this place                              |
    | `pose_source` | str            | "recorded", "shadow", "integrated" (dead reckoning) or "unknown"         |
    | `pose_known`  | bool           | `pose_source != "unknown"`                                               |
    | `on_record`   | bool           | every action so far was the recorded episode's                           |
    Off record and without a shadow, pose and revisits are integrated from the env's declared action effects (exact
    on the MNIST map; in MiniWorld a move into a wall is assumed to have happened). See the module docstring.

    ## Arguments
    `checkpoint` (required), `data` or `env` (exactly one), `env_kwargs`, `context` (K, 0 = the checkpoint's
    `open_loop_context`), `temperature` (1.0), `max_steps` (100), `shadow` (False), `integrate_pose` (True),
    `context_agent` ("random"), `device` ("auto"), `threads` (0 = torch's default), `render_mode` (None or
    "rgb_array").

    ## Version History
    * v0: initial version; `pose_source` and integrated poses off record added later (the pose was NaN there).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}

    def __init__(self, checkpoint: str, data: Optional[str] = None, env: Optional[str] = None,
                 env_kwargs: Optional[dict[str, Any]] = None, context: int = 0, temperature: float = 1.0,
                 max_steps: int = 100, shadow: bool = False, context_agent: str = "random", device: str = "auto",
                 threads: int = 0, render_mode: Optional[str] = None, integrate_pose: bool = True) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise UserError(f"DreamEnv: render_mode {render_mode!r}: expected None or one of "
                             f"{self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.dreams = DreamBatch(checkpoint, 1, data=data, env=env, env_kwargs=env_kwargs, context=context,
                                 temperature=temperature, max_steps=max_steps, shadow=shadow,
                                 context_agent=context_agent, device=device, threads=threads,
                                 integrate_pose=integrate_pose)
        self.observation_space, self.action_space = self.dreams.observation_space, self.dreams.action_space
        self.inverse_actions = self.dreams.inverse_actions
        self.pose_dim = self.dreams.pose_dim
        self._ready = False

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        """Start a dream with a generator drawn from the env's ``np_random``; returns its first frame and info."""
        super().reset(seed=seed)
        obs, infos = self.dreams.reset(np.array([0]), [np.random.default_rng(self.np_random.integers(2**63))])
        self._ready = True
        return obs[0], _info_row(infos, 0)

    def step(self, action):
        """Dream one frame for ``action``: the reward (and termination) the model's reward heads predict, 0 (and
        never) for a model without them; the dream truncates after ``max_steps``."""
        if not self._ready:
            raise RuntimeError("DreamEnv.step called before reset")
        _check_action(self.action_space, action)
        obs, infos = self.dreams.step(np.array([int(action)]))
        truncated = bool(self.dreams.steps[0] >= self.dreams.max_steps)
        info = {**_info_row(infos, 0), "reward_predicted": self.dreams.predicts_reward}
        return (obs[0], float(self.dreams.last_reward[0]), bool(self.dreams.last_terminated[0]), truncated, info)

    def render(self):
        """The last dreamed frame as RGB (grey frames repeated to 3 channels), or None without rgb_array."""
        if self.render_mode == "rgb_array":
            frame = self.dreams.last_obs[0]
            return np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame.copy()
        return None

    def close(self) -> None:
        """Release the dream batch and any real env it keeps."""
        self.dreams.close()


class DreamVectorEnv(VectorEnv):
    """`num_envs` dreams stepped in one forward call of the model (on a GPU when there is one).

    Same dynamics and info as `DreamEnv` (both run `DreamBatch`). `reset(seed=s)` gives dream i the generator of
    seed `s + i`, so dream i dreams what a `DreamEnv` reset with `s + i` dreams (the same episode and, from its own
    noise key, the same prior samples), whatever the batch size and the other dreams -- up to float rounding:
    the batched float32 matmuls of a row round differently for different batch sizes (MKL on CPU; measured ~1e-6 in
    the state), so a decoded pixel can come out one grey level apart. Autoreset is
    Gymnasium 1.x `NEXT_STEP`: the step after an episode ends returns that dream's reset frame and info, reward 0,
    not done, and ignores its action. Infos are arrays with a leading `num_envs` axis.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, checkpoint: str, num_envs: int = 1, data: Optional[str] = None, env: Optional[str] = None,
                 env_kwargs: Optional[dict[str, Any]] = None, context: int = 0, temperature: float = 1.0,
                 max_steps: int = 100, shadow: bool = False, context_agent: str = "random",
                 device: str = "auto", threads: int = 0, integrate_pose: bool = True) -> None:
        self.dreams = DreamBatch(checkpoint, num_envs, data=data, env=env, env_kwargs=env_kwargs, context=context,
                                 temperature=temperature, max_steps=max_steps, shadow=shadow,
                                 context_agent=context_agent, device=device, threads=threads,
                                 integrate_pose=integrate_pose)
        self.num_envs = num_envs
        self.single_observation_space, self.single_action_space = self.dreams.observation_space, self.dreams.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.inverse_actions = self.dreams.inverse_actions
        self.pose_dim = self.dreams.pose_dim
        self._rngs: Optional[list[np.random.Generator]] = None
        self._needs_reset = np.zeros(num_envs, dtype=bool)

    def _reset_rows(self, rows: np.ndarray, obs: np.ndarray, infos: dict[str, np.ndarray]) -> None:
        """Restart dreams `rows` in place in `obs` and `infos` (each from a generator drawn from its own)."""
        new_obs, new_infos = self.dreams.reset(rows, [np.random.default_rng(self._rngs[i].integers(2**63))
                                                      for i in rows])
        obs[rows] = new_obs
        for key, value in new_infos.items():
            infos[key][rows] = value

    def reset(self, *, seed: int | list[int] | None = None, options: Optional[dict[str, Any]] = None):
        """Start every dream: an int ``seed`` s gives dream i the seed s + i, a list one seed per dream."""
        if seed is None:
            seeds = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            if len(seed) != self.num_envs:
                raise UserError(f"DreamVectorEnv.reset: {len(seed)} seeds for {self.num_envs} envs")
            seeds = [None if s is None else int(s) for s in seed]
        # dream i's generator is the one a DreamEnv reset with seed s_i builds (gymnasium's np_random of s_i)
        self._rngs = [gym.utils.seeding.np_random(s)[0] for s in seeds]
        rows = np.arange(self.num_envs)
        obs, infos = self.dreams.reset(rows, [np.random.default_rng(rng.integers(2**63)) for rng in self._rngs])
        self._needs_reset[:] = False
        return obs.copy(), infos

    def step(self, actions):
        """Dream one frame per env for ``actions`` (N,); ended dreams restart (NEXT_STEP autoreset)."""
        if self._rngs is None:
            raise RuntimeError("DreamVectorEnv.step called before reset")
        actions = np.array(actions, dtype=np.int64).reshape(self.num_envs)  # a copy: resetting rows are changed
        resetting = np.flatnonzero(self._needs_reset)
        actions[resetting] = 0  # ignored (NEXT_STEP autoreset): any valid action keeps the batch call uniform
        _check_actions(self.single_action_space, actions)
        obs, infos = self.dreams.step(actions)
        obs = obs.copy()
        rewards = self.dreams.last_reward.copy()  # (N,) predicted by the reward heads (0 without them)
        terminated = self.dreams.last_terminated.copy()  # (N,)
        infos["reward_predicted"] = np.full(self.num_envs, self.dreams.predicts_reward)
        truncated = self.dreams.steps >= self.dreams.max_steps  # (N,)
        if len(resetting):
            self._reset_rows(resetting, obs, infos)
            truncated[resetting] = False
            rewards[resetting], terminated[resetting] = 0.0, False
        self._needs_reset = terminated | truncated
        return obs, rewards, terminated, truncated, infos

    def close_extras(self, **kwargs: Any) -> None:
        """Release the dream batch and any real envs it keeps (called by ``VectorEnv.close``)."""
        self.dreams.close()


# -- the command line: side-by-side GIFs of real vs dreamed frames ----------------------------------------------------

@dataclass
class DreamConfig:
    """Dream with a trained GTMM and save a GIF (or MP4): real over dreamed frames where the real frame is known."""

    checkpoint: str
    """the model: a run folder or its ckpt.pt"""
    data: Optional[str] = None
    """rollout folder giving the context episodes (and, with --agent recorded, the actions)"""
    env: Optional[str] = None
    """live env short name giving the context instead of --data (implies a real env beside the dream)"""
    env_kwargs: str = "{}"
    """JSON object of the live env's constructor arguments"""
    agent: str = "recorded"
    """who acts: recorded (each episode's own actions: real vs dreamed), random, loop, explore, sb3"""
    policy: Optional[str] = None
    """saved SB3 policy (.zip) for --agent sb3"""
    shadow: bool = True
    """with --agent other than recorded: step a real env beside each dream for real frames/revisits (--no-shadow: none)"""
    episodes: int = 4
    """dreams side by side (columns of the video), stepped in one batch"""
    steps: Annotated[int, tyro.conf.arg(name="episode-steps", aliases=("--steps",))] = 200
    """dreamed steps of each dream (--agent recorded stops where the shortest recorded episode ends); --steps is its
    old name, kept as an alias (in train, --steps counts updates)"""
    context: int = 0
    """K real context frames (0 = the checkpoint's open_loop_context)"""
    temperature: float = 1.0
    """scale of the prior's std (0 = prior mean)"""
    seed: int = 0
    """seed of the episodes picked, the agent and the prior noise"""
    out: str = "dream.gif"
    """output file: .gif or .mp4"""
    fps: int = 8
    """frames per second of the output"""
    scale: int = 3
    """pixel upscaling of each frame"""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N"""
    threads: int = 1
    """torch CPU threads (0 = torch's default; small models step fastest on one)"""


REVISIT_COLOUR = (220, 40, 40)  # red border: this frame shows a place seen before in the episode
CONTEXT_COLOUR = (120, 120, 120)  # grey border: a real context frame
DREAM_COLOUR = (40, 90, 220)  # blue border: a dreamed first visit


def _tile(frame: np.ndarray, scale: int, colour: tuple[int, int, int], pad: int = 2) -> np.ndarray:
    """One frame (H, W, C) uint8 -> an upscaled RGB tile with a coloured border."""
    rgb = np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame
    rgb = rgb.repeat(scale, 0).repeat(scale, 1)
    out = np.empty((rgb.shape[0] + 2 * pad, rgb.shape[1] + 2 * pad, 3), np.uint8)
    out[:] = colour
    out[pad:-pad, pad:-pad] = rgb
    return out


def _blank_like(frame: np.ndarray) -> np.ndarray:
    return np.full_like(frame, 255)


def compose(real: list[Optional[np.ndarray]], dream: list[np.ndarray], revisit: list[bool], context: bool,
            scale: int, caption: str = "") -> np.ndarray:
    """One video frame: a column per dream, the real frame on top (white when unknown) and the dreamed one below;
    borders grey (real context), red (revisit), blue (first visit); a caption strip on top."""
    import cv2  # only for the caption text

    columns = []
    for r, d, rev in zip(real, dream, revisit):
        colour = CONTEXT_COLOUR if context else (REVISIT_COLOUR if rev else DREAM_COLOUR)
        top = _tile(r if r is not None else _blank_like(d), scale, colour if r is not None else (255, 255, 255))
        columns.append(np.concatenate([top, np.full((4, top.shape[1], 3), 255, np.uint8), _tile(d, scale, colour)], 0))
        columns.append(np.full((columns[-1].shape[0], 6, 3), 255, np.uint8))
    body = np.concatenate(columns[:-1], 1)
    header = np.full((16, body.shape[1], 3), 255, np.uint8)
    cv2.putText(header, caption, (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, body], 0)


def write_video(frames: list[np.ndarray], path: str, fps: int) -> None:
    """GIF through Pillow, MP4 through OpenCV (both already dependencies)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(out, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0,
                       optimize=True)
    elif out.suffix == ".mp4":
        import cv2

        h, w = frames[0].shape[:2]
        writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        for f in frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        writer.release()
    else:
        raise UserError(f"--out {path}: expected a .gif or .mp4 file")


def dream_video(cfg: DreamConfig) -> dict[str, Any]:
    """Run `cfg.episodes` dreams side by side and write the video; returns a summary (frames, per-pixel errors)."""
    from agents import AGENTS, make_agent

    if cfg.agent not in ("recorded", *AGENTS):
        raise UserError(f"--agent {cfg.agent!r}: expected recorded or one of {AGENTS}")
    if Path(cfg.out).suffix not in (".gif", ".mp4"):
        raise UserError(f"--out {cfg.out}: expected a .gif or .mp4 file")
    for flag, field in (("episodes", "episodes"), ("episode_steps", "steps"), ("scale", "scale"), ("fps", "fps")):
        cli.check_range(flag, getattr(cfg, field), low=1)
    cli.check_range("context", cfg.context, low=0)
    cli.check_range("temperature", cfg.temperature, low=0.0)
    if (cfg.data is None) == (cfg.env is None):  # the library says data=/env=; the command's user typed flags
        raise UserError(f"give exactly one of --data (rollout folder) or --env (live env); got --data {cfg.data}, "
                        f"--env {cfg.env}")
    env_kwargs = parse_json_object(cfg.env_kwargs, "env_kwargs")
    if cfg.agent == "recorded" and cfg.data is None:
        raise UserError("--agent recorded replays the actions of recorded episodes: give --data")
    vec = DreamVectorEnv(cfg.checkpoint, cfg.episodes, data=cfg.data, env=cfg.env, env_kwargs=env_kwargs,
                         context=cfg.context,
                         temperature=cfg.temperature, max_steps=cfg.steps,
                         shadow=cfg.shadow and cfg.agent != "recorded" and cfg.data is not None, device=cfg.device,
                         threads=cfg.threads)
    dreams = vec.dreams
    obs, info = vec.reset(seed=cfg.seed)
    steps = cfg.steps
    if cfg.agent == "recorded":
        steps = min(steps, min(len(t.episode["action"]) - t.t for t in dreams.tracks))
        if steps < 1:
            raise UserError(f"{cfg.data}: the picked episodes have no recorded step after the {dreams.context} "
                             "context frames")
        agent = None
    else:
        kwargs = {"policy": cfg.policy} if cfg.agent == "sb3" else {}
        agent = make_agent(cfg.agent, vec.single_action_space, dreams.inverse_actions, **kwargs)
        agent.reset(cfg.episodes, cfg.seed)

    # the context: real frames in both columns (grey borders)
    video = []
    for k in range(dreams.context):
        ctx = [t.context_obs[k] for t in dreams.tracks]
        video.append(compose(ctx, ctx, [False] * cfg.episodes, True, cfg.scale,
                             f"t={k} real context (top: real, bottom: dream)"))
    errors = {"revisit": [], "first": []}
    for _ in range(steps):
        if agent is None:
            action = np.array([int(t.episode["action"][t.t]) for t in dreams.tracks])
        else:
            action = agent.act(obs, info)
        obs, _, _, truncated, info = vec.step(action)
        real = [t.real_obs for t in dreams.tracks]
        for i, r in enumerate(real):
            if r is not None:
                err = float(np.mean((r.astype(np.float32) - obs[i].astype(np.float32)) ** 2) / 255.0 ** 2)
                errors["revisit" if info["revisit"][i] else "first"].append(err)
        video.append(compose(real, list(obs), list(info["revisit"]), False, cfg.scale,
                             f"t={len(video)} dream (red: revisit)"))
        if truncated.any():
            break
    vec.close()
    write_video(video, cfg.out, cfg.fps)
    summary = {"out": cfg.out, "frames": len(video), "context": dreams.context, "dreamed_steps": len(video) - dreams.context,
               "mse_revisit": float(np.mean(errors["revisit"])) if errors["revisit"] else None,
               "mse_first_visit": float(np.mean(errors["first"])) if errors["first"] else None,
               "bytes": Path(cfg.out).stat().st_size}
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m worldmodel.dream``: parse the flags and write the dream video."""
    dream_video(cli.parse(DreamConfig, argv, prog="worldmodel.dream"))


if __name__ == "__main__":
    cli.run(main)
