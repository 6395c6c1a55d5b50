"""GTMM world models: generative temporal models with memory (Gemici et al. 2017, arXiv 1702.04649).

The Python API: `load` a trained model (a run folder, a ckpt.pt, or a model shipped in the package, `pretrained:NAME`,
see `python -m worldmodel.pretrained list`) and dream with it. `import worldmodel` is light (no torch): `load` and
`dream_from` import what they need when called.

```python
import gymnasium as gym
import numpy as np

import envs  # registers MnistMap-v0
import worldmodel

model = worldmodel.load("pretrained:mnist_map")  # a GTMM in eval mode on the CPU
env = gym.make("MnistMap-v0", split="test", border="wrap")  # held-out digits, the map a torus
obs, info = env.reset(seed=0)
frames, actions = [obs], []
for action in [3, 3, 1, 1]:  # right, right, down, down: 5 real frames of context
    obs, *_ = env.step(action)
    frames.append(obs)
    actions.append(action)
way_back = [0, 0, 2, 2]  # up, up, left, left: back over places the model has seen
dreamed = worldmodel.dream_from(model, np.stack(frames), actions, way_back)  # (4, 28, 28, 1) uint8
truth = np.stack([env.step(action)[0] for action in way_back])
print("open-loop MSE on the way back:", np.mean((dreamed / 255.0 - truth / 255.0) ** 2))
```

What the model (`worldmodel.model.GTMM`) offers, all on torch tensors (B batch, T time):
    observe(obs, prev_action, pose)       teacher forcing over real frames: per-step `nll`, `kl` (B, T) in nats,
                                          latents, and the recurrent `state` after the last frame
    imagine(state, prev_action, pose)     open loop from `state`: the frames (B, T, H, W, C) in [0, 1] predicted from
                                          the prior alone for the given actions (pose: only the `pose` address)
    step_prior(state, action, pose)       one dreamed frame and the next state (what the `Dream-v0` env steps)
    predict_open_loop(obs, prev_action, pose, K)   see K frames, predict the rest (what `evaluate` scores)
`dream_from` (below) is `observe` on a context then `imagine`, with the action convention handled and numpy in and out.

Axis legend, used in every shape comment of this package:
    B batch, T time, C channels, H height, W width, Z latent size, D pose size, A number of actions,
    N memory slots, R read heads.

A training batch is a dict of tensors, the same whether it comes from recorded rollouts
(``rollouts.dataset``) or from the paper's sequence tasks (``envs.sequences``):
    obs          uint8   (B, T, H, W, C)   frames x_t
    prev_action  int64   (B, T)            a_{t-1}, the action that led to x_t; -1 = no action (episode start,
                                           action-free tasks)
    revisit      bool    (B, T)            x_t shows a place seen earlier (or, for sequence tasks, a frame that a
                                           perfect memory makes predictable)
    pose         float32 (B, T, D)         the env's pose for x_t (D may be 0 for action-free tasks)
and, from recorded rollouts, two optional keys the reward heads train on (``worldmodel.reward``):
    reward       float32 (B, T)            r_{t-1}, the reward received on arriving at x_t (0 at an episode's start)
    terminated   bool    (B, T)            the episode terminated at x_t
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:  # type names only: importing the model pulls in torch
    import numpy as np
    import torch

    from worldmodel.model import GTMM

__all__ = ["load", "dream_from"]


def load(checkpoint: str, device: "str | torch.device" = "cpu") -> "GTMM":
    """The trained model of `checkpoint` in eval mode on `device`: a run folder, its ckpt.pt (or best.pt), or
    `pretrained:NAME` (a model shipped in the package). Loading never runs code from the file (weights-only).

    Its sizes are `model.cfg` (a `ModelConfig`: obs_shape, num_actions, memory, address, ...); the run's training
    config is `worldmodel.checkpoint.load(checkpoint)[1]`."""
    from worldmodel import checkpoint as checkpoints

    return checkpoints.load(checkpoint, device)[0]


def dream_from(model: "GTMM", frames: "np.ndarray", actions: Sequence[int] | "np.ndarray",
               future_actions: Sequence[int] | "np.ndarray", poses: Optional["np.ndarray"] = None,
               sample: bool = False) -> "np.ndarray":
    """Dream what comes after a context: see `frames`, then take `future_actions` with no more frames.

    - `frames` uint8 (K, H, W, C), or (B, K, H, W, C) for a batch: the real context, K >= 1 frames.
    - `actions` (K-1,) or (B, K-1): as recorded by `rollouts.collect`, `actions[t]` led from `frames[t]` to
      `frames[t+1]` (the model's own input is shifted: `prev_action[t] = actions[t-1]`, -1 before the first frame;
      getting that shift wrong is the usual way to feed a world model the wrong actions).
    - `future_actions` (S,) or (B, S): `future_actions[0]` is taken on the last context frame.
    - `poses` float (K + S, D) or (B, K + S, D): only a model with the `pose` address reads them (it needs them).
    - `sample`: False predicts from the prior means (deterministic, what `evaluate` scores); True samples.

    Returns the S dreamed frames, uint8 (S, H, W, C) or (B, S, H, W, C)."""
    import numpy as np
    import torch

    obs = np.asarray(frames)
    single = obs.ndim == 4
    if single:
        obs = obs[None]
    if obs.ndim != 5 or tuple(obs.shape[2:]) != tuple(model.cfg.obs_shape) or obs.shape[1] < 1:
        raise ValueError(f"dream_from: frames {tuple(np.shape(frames))}: expected (K, H, W, C) or (B, K, H, W, C) "
                         f"with K >= 1 and (H, W, C) = {tuple(model.cfg.obs_shape)}, the model's")
    B, K = obs.shape[:2]
    past = np.asarray(actions, dtype=np.int64).reshape(B, -1) if np.size(actions) else np.zeros((B, 0), np.int64)
    future = np.asarray(future_actions, dtype=np.int64).reshape(B, -1)  # (B, S)
    S = future.shape[1]
    if past.shape[1] != K - 1:
        raise ValueError(f"dream_from: {past.shape[1]} actions for {K} context frames: expected K - 1 = {K - 1} "
                         "(actions[t] leads from frames[t] to frames[t + 1])")
    for name, a in (("actions", past), ("future_actions", future)):
        if a.size and (a.min() < 0 or a.max() >= model.cfg.num_actions):
            raise ValueError(f"dream_from: {name} span [{a.min()}, {a.max()}], the model has "
                             f"{model.cfg.num_actions} actions")
    if S < 1:
        raise ValueError("dream_from: future_actions is empty: nothing to dream")
    if poses is None:
        if model.cfg.address == "pose":
            raise ValueError("dream_from: this model reads memory by the env's pose (address 'pose'): pass poses "
                             f"(K + S = {K + S} of them)")
        pose = np.zeros((B, K + S, model.cfg.pose_dim), np.float32)
    else:
        pose = np.asarray(poses, dtype=np.float32).reshape(B, K + S, model.cfg.pose_dim)
    device = model.device
    # the model's input at step t is the action that led to frame t: -1 (none) before the first context frame
    prev_action = np.concatenate([np.full((B, 1), -1, np.int64), past, future], axis=1)  # (B, K + S)
    to = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    with torch.no_grad():
        state = model.warmup(to(obs), to(prev_action[:, :K]), to(pose[:, :K]))
        dream = model.imagine(state, to(prev_action[:, K:]), to(pose[:, K:]), sample=sample, diagnostics=False)
    out = (dream["frames"].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # (B, S, H, W, C)
    return out[0] if single else out


def __getattr__(name: str) -> Any:
    """Lazy names: `worldmodel.GTMM`, `worldmodel.ModelConfig`, `worldmodel.TrainConfig` import on first use."""
    if name == "GTMM":
        from worldmodel.model import GTMM

        return GTMM
    if name in ("ModelConfig", "TrainConfig"):
        from worldmodel import config

        return getattr(config, name)
    raise AttributeError(f"module 'worldmodel' has no attribute {name!r}")
