"""Stable-Baselines3 policies as collector agents, and what training one needs (a small CNN, a novelty reward).

``SB3Agent`` samples from the saved policy's action distribution with the agent's per-env generators, so
collections stay reproducible and independent of the number of envs (``model.predict`` would draw from torch's
global generator instead).

Trust model: loading a policy never executes code from the file, so a ``policy.zip`` someone sent you is safe to
pass to ``collect --agent sb3`` or ``dream --agent sb3``. SB3's own ``PPO.load`` is NOT used: it unpickles the
``:serialized:`` cloudpickle fields of the zip's ``data`` entry (policy class, spaces, schedules), which runs any
code a crafted file holds. Instead ``load_policy`` reads the zip with ``zipfile`` + ``json`` and never unpickles:
``gtmm_policy.json`` (written into the zip by ``python -m agents.train_sb3``) names the algorithm, the policy by its
SB3 alias (``CnnPolicy``), the policy kwargs with classes by name from ``SAFE_CLASSES`` only (e.g. ``SmallCNN``),
and the observation/action spaces as plain numbers; the policy is built from our installed code and only its
weights come from the file (``policy.pth``, read with ``torch.load(weights_only=True)``). Refused with one clear
error naming the file: a zip without ``gtmm_policy.json`` (e.g. saved by plain SB3: retrain it with
``python -m agents.train_sb3``), a class name outside ``SAFE_CLASSES``, a ``policy.pth`` whose pickle needs
anything but tensors, and anything that is not such a zip. The ``:serialized:`` fields are never read.

SB3 on our envs directly: ``PPO("CnnPolicy", gym.make("MnistMap-v0"), policy_kwargs=policy_kwargs_for())``.
SB3's default CNN (NatureCNN) needs frames of at least 36x36 and fails on the 28x28 MNIST-map window; ``SmallCNN`` fits
any size (MiniWorld's 64x64 frames work either way).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, FlattenExtractor, NatureCNN
from torch import nn

from gtmm.cli import UserError
from gtmm.fs import write_bytes_atomic
from agents.base import Agent

ALGORITHMS = {"ppo": PPO, "a2c": A2C, "dqn": DQN}
SPEC_NAME = "gtmm_policy.json"  # the plain-JSON recipe inside a policy zip that rebuilds the policy without unpickling
SPEC_FORMAT = 1
MAX_OBS_ELEMENTS = 1 << 26  # a recorded observation space larger than this is refused (a crafted file, not a policy)


class SmallCNN(BaseFeaturesExtractor):
    """Three stride-2 3x3 convolutions (32, 64, 64 channels) and a linear layer to ``features_dim``.

    SB3's NatureCNN needs images of at least 36x36 (an 8x8 stride-4 kernel first); the MNIST map window is smaller.
    """

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 128):
        super().__init__(observation_space, features_dim)
        channels = observation_space.shape[0]  # SB3 hands image spaces over channels-first
        self.cnn = nn.Sequential(
            nn.Conv2d(channels, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            num_flat = self.cnn(torch.zeros(1, *observation_space.shape)).shape[1]
        self.linear = nn.Sequential(nn.Linear(num_flat, features_dim), nn.ReLU())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0, 1] -> (B, features_dim)
        """Features of a batch of channels-first images: (B, C, H, W) in [0, 1] -> (B, features_dim)."""
        return self.linear(self.cnn(observations))


class NoveltyReward(gym.Wrapper):
    """Reward 1 for each step that reaches a place not seen before in the episode (``info["visit_count"] == 0``),
    else 0; the env's own reward is dropped. Our envs have no task reward: this one teaches a policy to cover the
    map, which makes it a useful collector (and a different one from the hand-written agents)."""

    def step(self, action):
        """Step the env and replace its reward with 1.0 on a first visit of a place, else 0.0."""
        obs, _, terminated, truncated, info = self.env.step(action)
        return obs, float(int(info["visit_count"]) == 0), terminated, truncated, info


# Classes a policy spec may name: its features extractor, activation and optimizer. Nothing else is ever looked up,
# so a spec cannot make us import or call anything outside this table.
SAFE_CLASSES: dict[str, type] = {
    "SmallCNN": SmallCNN, "NatureCNN": NatureCNN, "FlattenExtractor": FlattenExtractor,
    "Tanh": nn.Tanh, "ReLU": nn.ReLU, "ELU": nn.ELU, "LeakyReLU": nn.LeakyReLU, "GELU": nn.GELU, "SiLU": nn.SiLU,
    "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "RMSprop": torch.optim.RMSprop, "SGD": torch.optim.SGD,
}


# -- the policy spec: plain JSON that rebuilds a policy -------------------------------------------------------------------

def _space_to_json(space: gym.Space) -> dict[str, Any]:
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.Box):
        def bound(values: np.ndarray) -> Any:  # one number for the usual constant bounds (0..255 images)
            flat = values.reshape(-1)
            return flat[0].item() if flat.size and (flat == flat[0]).all() else values.tolist()
        return {"type": "Box", "shape": list(space.shape), "dtype": space.dtype.name,
                "low": bound(space.low), "high": bound(space.high)}
    raise UserError(f"observation/action space {space}: only Box and Discrete spaces can be saved as a gtmm policy")


def _space_from_json(spec: Any) -> gym.Space:
    """The space of a spec entry, checked field by field (ValueError with what is wrong)."""
    if not isinstance(spec, dict):
        raise ValueError(f"space {spec!r}: expected an object")
    if spec.get("type") == "Discrete":
        n, start = spec.get("n"), spec.get("start", 0)
        if not (isinstance(n, int) and isinstance(start, int) and n >= 1):
            raise ValueError(f"Discrete space {spec}: expected integer n >= 1 and start")
        return gym.spaces.Discrete(n, start=start)
    if spec.get("type") == "Box":
        shape, dtype = spec.get("shape"), spec.get("dtype")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 1 for d in shape)
                and math.prod(shape) <= MAX_OBS_ELEMENTS):
            raise ValueError(f"Box shape {shape!r}: expected a list of positive ints, at most {MAX_OBS_ELEMENTS} "
                             "elements")
        if dtype not in ("uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bool"):
            raise ValueError(f"Box dtype {dtype!r}: expected a numeric dtype name")
        if not all(isinstance(spec.get(k), (int, float, list)) and not isinstance(spec.get(k), bool)
                   for k in ("low", "high")):
            raise ValueError(f"Box bounds {spec.get('low')!r}, {spec.get('high')!r}: expected numbers or lists")
        low, high = (np.asarray(spec[k], dtype=np.float64) for k in ("low", "high"))
        if low.dtype == object or high.dtype == object or low.shape not in ((), tuple(shape)) \
                or high.shape not in ((), tuple(shape)):
            raise ValueError(f"Box bounds: expected numbers or nested lists of shape {shape}")
        low, high = (np.broadcast_to(b, shape).astype(dtype) for b in (low, high))
        return gym.spaces.Box(low=low, high=high, shape=tuple(shape), dtype=dtype)
    raise ValueError(f"space type {spec.get('type')!r}: expected Box or Discrete")


def _kwargs_to_json(value: Any, where: str) -> Any:
    """Policy kwargs as JSON: classes by their SAFE_CLASSES name (``{"class": "SmallCNN"}``), the rest plain."""
    if isinstance(value, type):
        names = [name for name, cls in SAFE_CLASSES.items() if cls is value]
        if not names:
            raise UserError(f"policy kwargs {where}: class {value.__qualname__} is not in agents.sb3.SAFE_CLASSES, "
                            "so the policy could not be loaded safely; add it there")
        return {"class": names[0]}
    if isinstance(value, dict):
        return {str(k): _kwargs_to_json(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_kwargs_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UserError(f"policy kwargs {where}: {type(value).__name__} values cannot be saved as plain JSON")


def _kwargs_from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"class"}:
            name = value["class"]
            if name not in SAFE_CLASSES:
                raise ValueError(f"class {name!r} is not one of the known classes {sorted(SAFE_CLASSES)}")
            return SAFE_CLASSES[name]
        return {k: _kwargs_from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_kwargs_from_json(v) for v in value]
    return value


def policy_spec(model: BaseAlgorithm) -> dict[str, Any]:
    """The plain-JSON recipe of ``model``'s policy: algorithm, SB3 policy alias, constructor kwargs and spaces."""
    algo = next((name for name, cls in ALGORITHMS.items() if type(model) is cls), None)
    if algo is None:
        raise UserError(f"{type(model).__name__}: expected one of {sorted(ALGORITHMS)} to save a gtmm policy")
    alias = next((name for name, cls in type(model).policy_aliases.items() if type(model.policy) is cls), None)
    if alias is None:
        raise UserError(f"policy class {type(model.policy).__name__}: expected one of {type(model).__name__}'s "
                        f"aliases {sorted(type(model).policy_aliases)}")
    kwargs = dict(model.policy_kwargs)
    if isinstance(model, OnPolicyAlgorithm):  # PPO and A2C pass it to the policy beside policy_kwargs (DQN not)
        kwargs["use_sde"] = bool(model.use_sde)
    return {"format": SPEC_FORMAT, "algo": algo, "policy": alias, "policy_kwargs": _kwargs_to_json(kwargs, "policy_kwargs"),
            "observation_space": _space_to_json(model.policy.observation_space),
            "action_space": _space_to_json(model.policy.action_space)}


def save_policy(model: BaseAlgorithm, path: str | os.PathLike) -> Path:
    """``model.save`` plus ``gtmm_policy.json`` inside the zip, written atomically: a zip ``SB3Agent`` can load."""
    path = Path(path)
    spec = policy_spec(model)
    buffer = io.BytesIO()
    model.save(buffer)
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr(SPEC_NAME, json.dumps(spec, indent=1) + "\n")
    write_bytes_atomic(path, buffer.getbuffer())
    return path


def load_policy(path: str | os.PathLike, algo: str | None = None) -> tuple[BasePolicy, dict[str, Any]]:
    """The policy of an SB3 zip, rebuilt from its ``gtmm_policy.json`` and loaded with its ``policy.pth`` weights,
    in eval mode on the CPU; and the spec. Never unpickles anything from the file (see the module docstring);
    any zip that cannot be rebuilt that way is a UserError naming the file. ``algo``, if given, must match."""
    retrain = "make a loadable one with python -m agents.train_sb3"
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UserError(f"SB3 policy {path}: not a policy zip ({error}); {retrain}") from error
    with archive:
        names = set(archive.namelist())
        if SPEC_NAME not in names:
            raise UserError(f"SB3 policy {path}: no {SPEC_NAME} inside, so it cannot be loaded without unpickling "
                            f"code from it (refused); {retrain}")
        if "policy.pth" not in names:
            raise UserError(f"SB3 policy {path}: no policy.pth (weights) inside; {retrain}")
        try:
            spec = json.loads(archive.read(SPEC_NAME))
            if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
                raise ValueError(f"format {spec.get('format') if isinstance(spec, dict) else spec!r}, expected "
                                 f"{SPEC_FORMAT}")
            if spec.get("algo") not in ALGORITHMS:
                raise ValueError(f"algo {spec.get('algo')!r}, expected one of {sorted(ALGORITHMS)}")
            algorithm = ALGORITHMS[spec["algo"]]
            if spec.get("policy") not in algorithm.policy_aliases:
                raise ValueError(f"policy {spec.get('policy')!r}, expected one of {sorted(algorithm.policy_aliases)}")
            kwargs = _kwargs_from_json(spec.get("policy_kwargs", {}))
            if not isinstance(kwargs, dict):
                raise ValueError("policy_kwargs: expected an object")
            observation_space = _space_from_json(spec.get("observation_space"))
            action_space = _space_from_json(spec.get("action_space"))
        except ValueError as error:  # json.JSONDecodeError included
            raise UserError(f"SB3 policy {path}: bad {SPEC_NAME}: {' '.join(str(error).split())}; {retrain}") from error
        if algo is not None and algo != spec["algo"]:
            raise UserError(f"SB3 policy {path}: trained with {spec['algo']}, but algo {algo!r} was asked for")
        try:
            state = torch.load(io.BytesIO(archive.read("policy.pth")), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise UserError(f"SB3 policy {path}: policy.pth is not loadable safely (its pickle needs more than "
                            "tensors; refused without running it)") from error
        except Exception as error:  # noqa: BLE001 - a damaged archive raises RuntimeError/EOFError/...
            raise UserError(f"SB3 policy {path}: policy.pth is not a torch state dict ({type(error).__name__}: "
                            f"{' '.join(str(error).split())[:200]})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"SB3 policy {path}: policy.pth is not a state dict of tensors")
    # the policy's own initialisation draws from torch's global generator: keep that out of the caller's randomness
    with torch.random.fork_rng(devices=[]):
        try:
            # the learning-rate schedule only feeds the policy's optimizer, which acting never steps
            policy = algorithm.policy_aliases[spec["policy"]](observation_space, action_space, lambda _: 0.0, **kwargs)
        except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as error:
            raise UserError(f"SB3 policy {path}: cannot build the policy its {SPEC_NAME} describes "
                            f"({type(error).__name__}: {' '.join(str(error).split())[:300]}); {retrain}") from error
        try:
            policy.load_state_dict(state, strict=True)
        except RuntimeError as error:  # missing/unexpected keys or other sizes
            raise UserError(f"SB3 policy {path}: policy.pth does not fit the policy its {SPEC_NAME} describes "
                            f"({' '.join(str(error).split())[:300]})") from error
    policy.set_training_mode(False)
    return policy, spec


class SB3Agent(Agent):
    """A saved SB3 policy (``.zip`` written by ``python -m agents.train_sb3``). Actions are sampled from its
    distribution (``deterministic=False``) with the per-env generators, or its most likely action
    (``deterministic=True``). The policy is rebuilt without unpickling anything (see ``load_policy``)."""

    def __init__(self, action_space: gym.Space, inverse_actions: Sequence[int] | None = None,
                 policy: str | os.PathLike | None = None, algo: str | None = None, deterministic: bool = False):
        super().__init__(action_space, inverse_actions)
        if policy is None:
            raise UserError("agent 'sb3' needs a policy file: --policy path/to/policy.zip")
        if not os.path.isfile(policy):
            raise UserError(f"SB3 policy file {policy} does not exist (train one with python -m agents.train_sb3)")
        if algo is not None and algo not in ALGORITHMS:
            raise UserError(f"algo {algo!r}: expected one of {sorted(ALGORITHMS)}")
        # `model` is the policy itself (SB3's BasePolicy has the algorithm's predict and spaces)
        self.model, self.spec = load_policy(policy, algo)
        if self.model.action_space != action_space:
            raise UserError(f"SB3 policy {policy} acts in {self.model.action_space}, the env in {action_space}")
        self.deterministic = deterministic

    def _reset_env(self, i: int) -> None:
        pass  # the policies are feed-forward: nothing to forget between episodes

    def act(self, obs: np.ndarray, info: dict[str, np.ndarray]) -> np.ndarray:
        """Actions (N,) for the observations (N, H, W, C): sampled with the per-env generators, or the argmax."""
        policy = self.model
        if self.deterministic or not hasattr(policy, "get_distribution"):  # DQN has no distribution
            actions, _ = self.model.predict(obs, deterministic=True)
            return np.asarray(actions, dtype=np.int64)
        with torch.no_grad():
            obs_tensor, _ = policy.obs_to_tensor(obs)  # transposes HWC images and moves to the policy's device
            probs = policy.get_distribution(obs_tensor).distribution.probs.double().cpu().numpy()  # (N, A)
        probs /= probs.sum(axis=1, keepdims=True)
        return np.array([rng.choice(self.num_actions, p=p) for rng, p in zip(self.rngs, probs)], dtype=np.int64)


def policy_kwargs_for(features_dim: int = 128) -> dict[str, Any]:
    """SB3 policy kwargs for our image envs: the ``SmallCNN`` features extractor, which fits any image size.

    SB3's ``CnnPolicy`` uses NatureCNN, whose first 8x8 stride-4 kernel needs frames of at least 36x36:
    ``PPO("CnnPolicy", gym.make("MnistMap-v0"))`` fails on the 28x28 window with "Kernel size can't be greater than
    actual input size". Pass these kwargs instead (what ``python -m agents.train_sb3`` does)::

        from stable_baselines3 import PPO
        import gymnasium as gym, envs
        from agents.sb3 import policy_kwargs_for
        model = PPO("CnnPolicy", gym.make("MnistMap-v0"), policy_kwargs=policy_kwargs_for())
    """
    return {"features_extractor_class": SmallCNN, "features_extractor_kwargs": {"features_dim": int(features_dim)}}
