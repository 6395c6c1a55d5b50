"""Train a Stable-Baselines3 PPO collector policy on one of our envs.

    python -m agents.train_sb3 --env mnist_map --timesteps 20000 --out policies/mnist_map_ppo.zip
    python -m rollouts.collect --env mnist_map --agent sb3 --policy policies/mnist_map_ppo.zip --out data/mnist_map_ppo

Our envs have no task reward (reward is always 0), so by default (``--reward novelty``) the env is wrapped in
``agents.sb3.NoveltyReward``: +1 for every step that reaches a place not seen before in the episode. The policy
learns to cover the map, a different behaviour from the hand-written agents. ``--reward env`` keeps the env's own.
Images go through ``agents.sb3.SmallCNN`` (SB3's NatureCNN cannot take the 28x28 MNIST-map window).
Seeded: the same command gives the same policy on the same machine and thread count.

Monitoring uses SB3's own machinery: its progress bar (``--progress``, on a terminal only), its logger writing
TensorBoard event files to ``--tb`` (default ``<out folder>/tb/<out stem>_N``, one numbered run folder per run; off a
terminal SB3's plain table is printed after every rollout instead of a bar, so cluster logs show progress), and its
``EvalCallback`` every ``--eval-every`` env steps on a separate eval env (own seed, same reward), writing
``evaluations.npz`` to ``<out folder>/<out stem>_eval/`` and ``eval/mean_reward`` to TensorBoard. Evaluation acts
deterministically and on its own env, so it does not change the trained policy. ``--device auto`` picks CUDA when
available.

The zip is SB3's own format plus a ``gtmm_policy.json`` entry (algorithm, policy alias, policy kwargs with classes by
name, spaces, all plain JSON), so ``SB3Agent`` rebuilds the policy and loads only its weights, never unpickling
anything from the file (the trust model is in ``agents.sb3``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first
from stable_baselines3.common.vec_env import VecEnv, VecTransposeImage

from gtmm import cli
from gtmm.cli import UserError, parse_json_object
import envs
from gtmm.fs import write_bytes_atomic
from agents.sb3 import NoveltyReward, policy_kwargs_for, save_policy


@dataclass
class TrainSB3Config:
    """Train a Stable-Baselines3 PPO collector policy on one of our envs; the zip loads without unpickling."""
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
    """torch CPU threads (0 = torch's default, all cores); 1 by default in every command: small recurrent steps gain little from more, and more threads than free cores slow them a lot; fixed so runs are reproducible"""
    device: str = "auto"
    """torch device of the policy: auto (CUDA if available, else CPU), cpu, cuda or cuda:N"""
    progress: bool = True
    """SB3's progress bar (shown only when stderr is a terminal; off one, SB3's plain table after every rollout)"""
    tb: Optional[Path] = None
    """TensorBoard log folder (SB3's logger; each run writes <tb>/<out stem>_N); default <out folder>/tb"""
    tensorboard: bool = True
    """write TensorBoard event files (--no-tensorboard: none)"""
    eval_every: int = 0
    """evaluate the policy every this many env steps on a separate eval env with SB3's EvalCallback (0: off)"""
    eval_episodes: int = 5
    """episodes per evaluation"""


def eval_dir_for(out: Path) -> Path:
    """Where ``EvalCallback`` writes ``evaluations.npz`` for the policy saved at ``out``: ``<out stem>_eval/``."""
    return out.parent / f"{out.stem}_eval"


def _transposed_like_training(vec_env: VecEnv) -> VecEnv:
    """``vec_env`` wrapped in ``VecTransposeImage`` when SB3 wraps the training env so (HWC images): EvalCallback
    expects the eval env to have the training env's type (it warns otherwise)."""
    space = vec_env.observation_space
    if is_image_space(space) and not is_image_space_channels_first(space):
        return VecTransposeImage(vec_env)
    return vec_env


def train(config: TrainSB3Config) -> Path:
    """Train and save the policy; returns the path of the ``.zip``."""
    if config.timesteps < 1 or config.num_envs < 1 or config.n_steps < 1:
        raise UserError(f"--timesteps, --num-envs and --n-steps must be >= 1, got {config.timesteps}, "
                         f"{config.num_envs}, {config.n_steps}")
    if config.eval_every < 0 or config.eval_episodes < 1:
        raise UserError(f"--eval-every {config.eval_every} / --eval-episodes {config.eval_episodes}: expected >= 0 "
                        "and >= 1")
    if config.out.suffix != ".zip":
        raise UserError(f"--out {config.out}: expected a path ending in .zip (SB3 appends it otherwise)")
    env_kwargs = parse_json_object(config.env_kwargs, "env_kwargs")
    device = cli.resolve_device(config.device)
    cli.check_range("threads", config.threads, 0)
    if config.threads > 0:
        torch.set_num_threads(config.threads)

    def make_env():
        # the reward wrapper goes inside make_vec_env's Monitor, so logged episode returns are the ones PPO sees
        env = envs.make(config.env, **env_kwargs)
        return NoveltyReward(env) if config.reward == "novelty" else env

    vec_env = make_vec_env(make_env, n_envs=config.num_envs, seed=config.seed)
    bar = config.progress and sys.stderr.isatty()
    tb_dir = (config.tb if config.tb is not None else config.out.parent / "tb") if config.tensorboard else None
    # verbose=1 makes SB3's logger print its table after every rollout: the plain progress lines of a log file;
    # with the bar on, those tables would tear it
    model = PPO("CnnPolicy", vec_env, n_steps=config.n_steps, batch_size=config.batch_size,
                learning_rate=config.learning_rate, seed=config.seed, device=device, verbose=0 if bar else 1,
                policy_kwargs=policy_kwargs_for(), tensorboard_log=None if tb_dir is None else str(tb_dir))
    callback, eval_env = None, None
    if config.eval_every > 0:
        # a separate env with its own seed, so evaluation never steps (or reseeds) the training envs
        eval_env = _transposed_like_training(make_vec_env(make_env, n_envs=1, seed=config.seed + 1_000_003))
        # EvalCallback counts calls, one per vec-env step of num_envs env steps
        callback = EvalCallback(eval_env, eval_freq=max(config.eval_every // config.num_envs, 1),
                                n_eval_episodes=config.eval_episodes, log_path=str(eval_dir_for(config.out)),
                                deterministic=True, verbose=0 if bar else 1)
    model.learn(total_timesteps=config.timesteps, callback=callback, progress_bar=bar, tb_log_name=config.out.stem)
    config.out.parent.mkdir(parents=True, exist_ok=True)
    save_policy(model, config.out)  # SB3's zip plus gtmm_policy.json: loadable without unpickling (agents.sb3)
    sidecar = json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}, indent=1)
    write_bytes_atomic(config.out.with_suffix(".json"), (sidecar + "\n").encode())
    vec_env.close()
    if eval_env is not None:
        eval_env.close()
    rewards = [ep["r"] for ep in model.ep_info_buffer] if model.ep_info_buffer else []
    mean = f"{sum(rewards) / len(rewards):.2f}" if rewards else "n/a (no episode finished)"
    print(f"saved {config.out}: {config.timesteps} steps of PPO on {config.env} ({config.reward} reward), "
          f"mean episode return of the last {len(rewards)} episodes {mean}"
          + (f"; TensorBoard: {model.logger.get_dir()}" if tb_dir is not None else ""))
    return config.out


def main(argv: list[str] | None = None) -> None:
    """``python -m agents.train_sb3``: parse the flags and train the policy."""
    train(cli.parse(TrainSB3Config, argv, prog="agents.train_sb3"))


if __name__ == "__main__":
    cli.run(main)
