"""Train a Stable-Baselines3 PPO collector policy on one of our envs.

    python -m agents.train_sb3 --env mnist_map --timesteps 20000 --out policies/mnist_map_ppo.zip
    python -m rollouts.collect --env mnist_map --agent sb3 --policy policies/mnist_map_ppo.zip --out data/mnist_map_ppo

Our envs have no task reward (reward is always 0), so by default (``--reward novelty``) the env is wrapped in
``agents.sb3.NoveltyReward``: +1 for every step that reaches a place not seen before in the episode. The policy
learns to cover the map, a different behaviour from the hand-written agents. ``--reward env`` keeps the env's own.
Images go through ``agents.sb3.SmallCNN`` (SB3's NatureCNN cannot take the 28x28 MNIST-map window).
Seeded: the same command gives the same policy on the same machine and thread count.

The zip is SB3's own format plus a ``gtmm_policy.json`` entry (algorithm, policy alias, policy kwargs with classes by
name, spaces, all plain JSON), so ``SB3Agent`` rebuilds the policy and loads only its weights, never unpickling
anything from the file (the trust model is in ``agents.sb3``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from gtmm import cli
from gtmm.cli import UserError, parse_json_object
import envs
from gtmm.fs import write_bytes_atomic
from agents.sb3 import NoveltyReward, policy_kwargs_for, save_policy


@dataclass
class TrainSB3Config:
    env: str = "mnist_map"
    """env short name or Gymnasium id (as for rollouts.collect)"""
    out: Path = Path("policy.zip")
    """where to save the policy (.zip); the resolved config goes next to it as <out>.json"""
    timesteps: int = 20_000
    """total env steps of PPO training"""
    env_kwargs: str = "{}"
    """JSON object of env constructor arguments"""
    reward: Literal["novelty", "env"] = "novelty"
    """novelty: +1 per new place this episode (our envs have no reward); env: the env's own reward"""
    num_envs: int = 4
    """envs stepped together for PPO's rollouts (in one process)"""
    n_steps: int = 128
    """PPO steps per env between updates"""
    batch_size: int = 128
    """PPO minibatch size"""
    learning_rate: float = 3e-4
    """Adam learning rate"""
    seed: int = 0
    """seed of the envs, the policy's initialisation and PPO's sampling"""
    threads: int = 1
    """torch CPU threads (fixed so runs are reproducible)"""


def train(config: TrainSB3Config) -> Path:
    """Train and save the policy; returns the path of the ``.zip``."""
    if config.timesteps < 1 or config.num_envs < 1 or config.n_steps < 1:
        raise UserError(f"--timesteps, --num-envs and --n-steps must be >= 1, got {config.timesteps}, "
                         f"{config.num_envs}, {config.n_steps}")
    if config.out.suffix != ".zip":
        raise UserError(f"--out {config.out}: expected a path ending in .zip (SB3 appends it otherwise)")
    env_kwargs = parse_json_object(config.env_kwargs, "env_kwargs")
    torch.set_num_threads(config.threads)

    def make_env():
        # the reward wrapper goes inside make_vec_env's Monitor, so logged episode returns are the ones PPO sees
        env = envs.make(config.env, **env_kwargs)
        return NoveltyReward(env) if config.reward == "novelty" else env

    vec_env = make_vec_env(make_env, n_envs=config.num_envs, seed=config.seed)
    model = PPO("CnnPolicy", vec_env, n_steps=config.n_steps, batch_size=config.batch_size,
                learning_rate=config.learning_rate, seed=config.seed, device="cpu", verbose=0,
                policy_kwargs=policy_kwargs_for())
    model.learn(total_timesteps=config.timesteps, progress_bar=False)
    config.out.parent.mkdir(parents=True, exist_ok=True)
    save_policy(model, config.out)  # SB3's zip plus gtmm_policy.json: loadable without unpickling (agents.sb3)
    sidecar = json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}, indent=1)
    write_bytes_atomic(config.out.with_suffix(".json"), (sidecar + "\n").encode())
    vec_env.close()
    rewards = [ep["r"] for ep in model.ep_info_buffer] if model.ep_info_buffer else []
    mean = f"{sum(rewards) / len(rewards):.2f}" if rewards else "n/a (no episode finished)"
    print(f"saved {config.out}: {config.timesteps} steps of PPO on {config.env} ({config.reward} reward), "
          f"mean episode return of the last {len(rewards)} episodes {mean}")
    return config.out


def main(argv: list[str] | None = None) -> None:
    """``python -m agents.train_sb3``: parse the flags and train the policy."""
    train(cli.parse(TrainSB3Config, argv, prog="agents.train_sb3"))


if __name__ == "__main__":
    cli.run(main)
