"""Collector agents on the real MNIST map: options, reproducibility, the retrace property, and a short SB3 run."""

from __future__ import annotations

import numpy as np
import pytest

import agents
import envs
from agents.base import ExploreAgent, LoopAgent


def run(agent_name: str, num_envs: int, env_seeds: list[int], agent_seeds: list[int], steps: int, **kwargs):
    """Drive a vector MNIST map; returns actions (steps, N), revisit (steps+1, N) and the agent."""
    vec = envs.make_vec("mnist_map", num_envs, grid=6, max_steps=steps)
    agent = agents.make_agent(agent_name, vec.single_action_space, vec.inverse_actions, **kwargs)
    agent.reset(num_envs, 0)
    obs, info = vec.reset(seed=env_seeds)
    agent.reset_envs(np.ones(num_envs, bool), agent_seeds)
    actions, revisits, phases = [], [info["revisit"]], []
    for _ in range(steps):
        action = agent.act(obs, info)
        phases.append(list(getattr(agent, "going_out", [True] * num_envs)))
        obs, _, _, _, info = vec.step(action)
        actions.append(action)
        revisits.append(info["revisit"])
    return np.array(actions), np.array(revisits), np.array(phases), agent


def test_factory_rejects_bad_input():
    vec = envs.make_vec("mnist_map", 1)
    with pytest.raises(ValueError, match="unknown agent 'nope'"):
        agents.make_agent("nope", vec.single_action_space)
    with pytest.raises(ValueError, match="bad options"):
        agents.make_agent("random", vec.single_action_space, wings=2)
    with pytest.raises(ValueError, match="needs the env's inverse_actions"):
        agents.make_agent("loop", vec.single_action_space, None)
    with pytest.raises(ValueError, match="Discrete"):
        agents.make_agent("random", vec.single_observation_space)
    with pytest.raises(ValueError, match="subset"):
        agents.make_agent("random", vec.single_action_space, actions=[0, 9])


@pytest.mark.parametrize("name", ["random", "loop", "explore"])
def test_actions_depend_only_on_episode_seeds(name):
    """Env 1 of a batch of 3 acts exactly like a batch of 1 with the same env and agent seeds."""
    batch, _, _, _ = run(name, 3, [5, 6, 7], [50, 60, 70], steps=40)
    alone, _, _, _ = run(name, 1, [6], [60], steps=40)
    assert np.array_equal(batch[:, 1], alone[:, 0])
    assert len(np.unique(batch)) > 1
    again, _, _, _ = run(name, 3, [5, 6, 7], [50, 60, 70], steps=40)
    assert np.array_equal(batch, again)


def test_random_repeat_holds_actions():
    actions, _, _, _ = run("random", 4, [0, 1, 2, 3], [0, 1, 2, 3], steps=200, max_repeat=5)
    changes = (actions[1:] != actions[:-1]).mean()
    single, _, _, _ = run("random", 4, [0, 1, 2, 3], [0, 1, 2, 3], steps=200)
    assert changes < 0.5 * (single[1:] != single[:-1]).mean()


@pytest.mark.parametrize("name,kwargs", [("loop", {"min_out": 3, "max_out": 10}), ("explore", {"explore_steps": 15})])
def test_way_back_only_revisits(name, kwargs):
    """Every frame reached while retracing shows a place of the way out: revisit is True there, by construction."""
    actions, revisits, going_out, agent = run(name, 4, [1, 2, 3, 4], [9, 8, 7, 6], steps=128, **kwargs)
    assert isinstance(agent, LoopAgent if name == "loop" else ExploreAgent)
    back = ~going_out  # (steps, N): action t was a step of the way back, so frame t+1 is a return
    assert back.sum() > 100
    assert revisits[1:][back].all()
    # and a good share of revisits overall, more than the random walk on the same maps
    _, random_revisits, _, _ = run("random", 4, [1, 2, 3, 4], [9, 8, 7, 6], steps=128)
    assert revisits.mean() > random_revisits.mean() - 0.05 and revisits.mean() > 0.4


def test_explore_prefers_new_places_before_returning():
    _, revisits, going_out, _ = run("explore", 4, [1, 2, 3, 4], [1, 2, 3, 4], steps=64, explore_steps=20)
    first_out = revisits[1:21]  # the first coverage phase
    assert first_out.mean() < 0.5 and going_out[:20].all()


def test_sb3_train_then_collect(tmp_path):
    from agents.train_sb3 import TrainSB3Config, train

    policy = train(TrainSB3Config(env="mnist_map", env_kwargs='{"max_steps": 32}', timesteps=256, num_envs=2,
                                  n_steps=64, batch_size=64, out=tmp_path / "policy.zip"))
    assert policy.is_file() and (tmp_path / "policy.json").is_file()
    batch, _, _, agent = run("sb3", 2, [3, 4], [30, 40], steps=32, policy=str(policy))
    alone, _, _, _ = run("sb3", 1, [4], [40], steps=32, policy=str(policy))
    assert np.array_equal(batch[:, 1], alone[:, 0]), "sampling uses the per-episode generators"
    assert batch.min() >= 0 and batch.max() < 4
    # and the collector runs it: `python -m rollouts.collect --agent sb3 --policy policy.zip`
    from rollouts import storage
    from rollouts.collect import CollectConfig, collect

    summary = collect(CollectConfig(env="mnist_map", agent="sb3", policy=policy, episodes=2, steps=16,
                                    out=tmp_path / "data", progress=False))
    assert summary["episodes"] == 2 and summary["steps"] == 32
    manifest = storage.read_manifest(tmp_path / "data")
    assert manifest["agent"] == {"name": "sb3", "kwargs": {"policy_sha256": storage.sha256_file(policy)}}
    with pytest.raises(ValueError, match="does not exist"):
        agents.make_agent("sb3", agent.model.action_space, policy=str(tmp_path / "missing.zip"))
