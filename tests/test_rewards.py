"""Reward tasks of the envs (issue 15 item 1, ``envs/rewards.py``): opt-in, exact, the same in single and vector envs,
and recorded by ``rollouts.collect``; without a task the envs are what they were."""

from __future__ import annotations

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.mnist_map import MnistMapEnv, MnistMapVectorEnv
from envs.rewards import goal_cells
from rollouts.collect import CollectConfig, collect
from rollouts.storage import load_episode, read_manifest

UP, DOWN, LEFT, RIGHT = range(4)


def play(env: gym.Env, seed: int, actions) -> list[tuple]:
    """(obs, reward, terminated, truncated, info) of reset (reward None) and each step, until the episode ends."""
    obs, info = env.reset(seed=seed)
    out = [(obs, None, False, False, info)]
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(int(action))
        out.append((obs, reward, terminated, truncated, info))
        if terminated or truncated:
            break
    return out


@pytest.mark.parametrize("task", ["coverage", "find_digit"])
def test_check_env_with_a_task(task):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*alternative render modes.*")
        warnings.filterwarnings("ignore", message=".*different from the unwrapped version.*")
        check_env(MnistMapEnv(task=task))
        check_env(gym.make("MnistMap-v0", task=task))


def test_bad_task_is_one_clear_error():
    for make in (lambda: MnistMapEnv(task="x"), lambda: MnistMapVectorEnv(2, task="x"),
                 lambda: envs.make("mnist_map", task="x")):
        with pytest.raises(ValueError, match=r"^task 'x': expected one of None, 'coverage', 'find_digit'$"):
            make()
    from envs.miniworld import MiniWorldRevisitEnv

    with pytest.raises(ValueError, match=r"^task 'find_digit': expected one of None, 'coverage'$"):
        MiniWorldRevisitEnv(task="find_digit")  # checked before any OpenGL work


def test_a_task_changes_rewards_only():
    """Same seed, same actions: the frames, poses and revisits of a task env are the task-free env's (the task draws
    after the map); without a task the reward is 0 and info has no target."""
    actions = np.random.default_rng(0).integers(4, size=60)
    plain = play(MnistMapEnv(), 9, actions)
    assert all(step[1] in (None, 0.0) for step in plain) and "target" not in plain[-1][4]
    for task in ("coverage", "find_digit"):
        tasked = play(MnistMapEnv(task=task), 9, actions)
        for (o1, _, _, _, i1), (o2, _, _, _, i2) in zip(plain, tasked):
            np.testing.assert_array_equal(o1, o2)
            np.testing.assert_array_equal(i1["pose"], i2["pose"])
            assert i1["visit_count"] == i2["visit_count"]


@pytest.mark.parametrize("border", ["clip", "wrap"])
def test_coverage_pays_each_new_place_once(border):
    env = MnistMapEnv(task="coverage", border=border, max_steps=200)
    steps = play(env, 3, np.random.default_rng(1).integers(4, size=200))
    rewards = np.array([s[1] for s in steps[1:]])
    counts = np.array([s[4]["visit_count"] for s in steps[1:]])
    np.testing.assert_array_equal(rewards, (counts == 0).astype(np.float32))
    places = {tuple(s[4]["pose"]) for s in steps}
    assert rewards.sum() == len(places) - 1  # every place but the start (not rewarded: no step led to it)
    assert not any(s[2] for s in steps)  # coverage never terminates


def test_goal_cells_are_the_windows_centred_on_a_digit():
    geometry = MnistMapEnv().geometry
    from envs.mnist_map import position_pixels

    cells = goal_cells(position_pixels(geometry), 28, (28, 28), 3, "clip").reshape(5, 5)
    expected = np.full((5, 5), -1)
    expected[::2, ::2] = np.arange(9).reshape(3, 3)  # top-lefts at multiples of 28: exactly one digit in view
    np.testing.assert_array_equal(cells, expected)
    # a 20 px window at multiples of 14: centres 10, 38, 66 are 4 px from the digit centres 14, 42, 70 (< 7)
    small = np.array([[0, 0], [28, 56], [14, 0], [56, 56]])
    assert goal_cells(small, 20, (28, 28), 3, "clip").tolist() == [0, 5, -1, 8]
    # around the torus: a 20 px window at column 82 has its centre at 92 = 8 (mod 84), 6 px from digit 0's centre
    edge = np.array([[0, 82]])
    assert goal_cells(edge, 20, (28, 28), 3, "wrap").tolist() == [0]
    assert goal_cells(edge, 20, (28, 28), 3, "clip").tolist() == [-1]  # no torus: 22 px from digit 2's centre


def path_to(env: MnistMapEnv, goal: int) -> list[int]:
    """Shortest action path from the current position to position id ``goal`` (breadth-first on the env's table)."""
    start, table = int(env.core.position[0]), env.core.next_position
    parents, frontier = {start: None}, [start]
    while goal not in parents:
        reached = []
        for position in frontier:
            for following in table[position, :4]:
                if int(following) not in parents:
                    parents[int(following)] = position
                    reached.append(int(following))
        frontier = reached
    path, node = [], goal
    while parents[node] is not None:
        previous = parents[node]
        path.append(int(np.flatnonzero(table[previous, :4] == node)[0]))
        node = previous
    return path[::-1]


@pytest.mark.parametrize("border", ["clip", "wrap"])
def test_find_digit_ends_on_the_target_with_reward_one(border):
    env = MnistMapEnv(task="find_digit", border=border)
    for seed in range(5):
        _, info = env.reset(seed=seed)
        target, labels = info["target"], env.map_labels.reshape(-1)
        goal_cell = env.core.goal.goal_cell
        assert target in labels
        start_cell = goal_cell[env.core.position[0]]
        assert start_cell < 0 or labels[start_cell] != target  # the start never shows the target
        goals = [p for p in range(len(goal_cell)) if goal_cell[p] >= 0 and labels[goal_cell[p]] == target]
        # walk to the nearest goal, through positions that are not goals (rewards 0), and end there with 1
        path = min((path_to(env, g) for g in goals), key=len)
        for k, action in enumerate(path):
            _, reward, terminated, truncated, info = env.step(action)
            assert (reward, terminated) == ((1.0, True) if k == len(path) - 1 else (0.0, False)), (seed, k)
        assert info["target"] == target


def test_vector_env_rewards_equal_single_envs_across_autoreset():
    """The native vector env: each map's rewards, terminations and targets are those of a single env seeded s + i
    (which resets itself when its episode ends, as NEXT_STEP does)."""
    N, steps = 3, 60
    for task in ("coverage", "find_digit"):
        vec = MnistMapVectorEnv(N, task=task, max_steps=20)
        singles = [MnistMapEnv(task=task, max_steps=20) for _ in range(N)]
        _, info = vec.reset(seed=30)
        single_infos = [env.reset(seed=30 + i)[1] for i, env in enumerate(singles)]
        assert (task == "find_digit") == ("target" in info)
        rng, done, ends = np.random.default_rng(2), [False] * N, 0
        for _ in range(steps):
            actions = rng.integers(4, size=N)
            _, rewards, terminated, truncated, info = vec.step(actions)
            for i, env in enumerate(singles):
                if done[i]:  # the vector env's autoreset step: reward 0, not done, the reset info
                    single_infos[i], reward, end = env.reset()[1], 0.0, (False, False)
                else:
                    _, reward, term, trunc, single_infos[i] = env.step(int(actions[i]))
                    end = (term, trunc)
                assert (rewards[i], terminated[i], truncated[i]) == (reward, *end)
                done[i] = any(end)
                ends += end[0]
                if task == "find_digit":
                    assert info["target"][i] == single_infos[i]["target"]
        assert ends > 0 if task == "find_digit" else ends == 0


def test_miniworld_coverage_rewards_new_poses():
    from envs.miniworld import MiniWorldRevisitEnv

    env = MiniWorldRevisitEnv(num_rows=1, num_cols=1, room_size=8.0, num_objects=0, max_steps=20, task="coverage")
    env.reset(seed=0)
    # left: a new heading; right: back to the start pose (a revisit); right again: new; left: revisit
    rewards = [env.step(a)[1] for a in (0, 1, 1, 0)]
    assert rewards == [1.0, 0.0, 1.0, 0.0]
    env.close()
    stock = envs.make("miniworld:Hallway", task="coverage")  # the stock task's reward is replaced
    stock.reset(seed=0)
    assert [stock.step(a)[1] for a in (0, 1)] == [1.0, 0.0]
    stock.close()


def test_collect_records_the_task_and_its_rewards(tmp_path):
    out = tmp_path / "coverage"
    collect(CollectConfig(env="mnist_map", agent="random", episodes=2, steps=30, out=out, progress=False,
                          env_kwargs=json.dumps({"task": "coverage"})))
    manifest = read_manifest(out)
    assert manifest["env"]["kwargs"]["task"] == "coverage"
    for record in manifest["episodes"]:
        episode = load_episode(out / record["file"])
        np.testing.assert_array_equal(episode["reward"], (episode["visit_count"][1:] == 0).astype(np.float32))
        assert episode["reward"].sum() > 0
    found = tmp_path / "find"
    collect(CollectConfig(env="mnist_map", agent="random", episodes=4, steps=60, out=found, progress=False,
                          env_kwargs=json.dumps({"task": "find_digit"}), workers=2))
    episodes = [load_episode(found / r["file"]) for r in read_manifest(found)["episodes"]]
    ended = [e for e in episodes if e["terminated"][-1]]
    assert ended, "random walks of 60 steps find a digit of 9 now and then"
    for episode in ended:  # an episode that found the target ends there, with its only reward
        assert episode["reward"][-1] == 1.0 and episode["reward"][:-1].sum() == 0
