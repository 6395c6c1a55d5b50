"""Where a dream is (issue 15 item 3): off record and without a shadow env, `Dream-v0` integrates the pose from the
env's declared action effects and counts revisits by the env's own rule, so an agent walking a dream is told where
it revisits as the real env would tell it. Also: the vectorised bookkeeping of `DreamVectorEnv` (issue 12) reports,
row for row, what single dreams report.

The shipped `pretrained:mnist_map` model dreams the frames (no training here); the real envs are rebuilt from the
manifest's kwargs and each episode's env seed and replay the context, then take the same actions as the dream.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401  (registers Dream-v0)
from agents import make_agent
from rollouts.collect import CollectConfig, collect
from rollouts.storage import read_manifest
from worldmodel.dream import DreamEnv, DreamVectorEnv

CHECKPOINT = "pretrained:mnist_map"  # 8 context frames

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Loop walks on a torus (wrap) and random walks that bump into a clip border: 4 episodes of 40 steps each."""
    root = tmp_path_factory.mktemp("dream_pose")
    out = {}
    for border, agent in (("wrap", "loop"), ("clip", "random")):
        out[border] = root / border
        collect(CollectConfig(env="mnist_map", agent=agent, episodes=4, steps=40, out=out[border], seed=3,
                              env_kwargs=f'{{"border": "{border}"}}', progress=False))
    return out


def real_envs(data: Path, dreams) -> list[gym.Env]:
    """For each dream, the real env of its episode, replayed through the context frames."""
    manifest = read_manifest(data)
    records = {e["index"]: e for e in manifest["episodes"]}
    reals = []
    for track in dreams.tracks:
        real = gym.make("MnistMap-v0", **manifest["env"]["kwargs"]).unwrapped
        real.reset(seed=records[track.episode_index]["env_seed"])
        for action in track.episode["action"][:dreams.context - 1]:
            real.step(int(action))
        np.testing.assert_array_equal(real.core.observe()[0], track.episode["obs"][dreams.context - 1])
        reals.append(real)
    return reals


def walk(data: Path, agent_name: str, num_envs: int, steps: int, seed: int) -> dict[str, np.ndarray]:
    """`num_envs` dreams driven by an agent that sees the dreams only, and the real envs taking the same actions:
    the dreams' and the real infos, stacked (steps, num_envs)."""
    vec = DreamVectorEnv(CHECKPOINT, num_envs, data=str(data), max_steps=steps, device="cpu")
    obs, info = vec.reset(seed=seed)
    reals = real_envs(data, vec.dreams)
    agent = make_agent(agent_name, vec.single_action_space, vec.inverse_actions)
    agent.reset(num_envs, seed)
    got: dict[str, list] = {k: [] for k in ("pose", "revisit", "visit_count", "pose_source", "real_pose",
                                            "real_revisit", "real_visit_count")}
    for _ in range(steps):
        action = agent.act(obs, info)
        obs, _, _, _, info = vec.step(action)
        real = [r.step(int(a))[4] for r, a in zip(reals, action)]
        for key in ("pose", "revisit", "visit_count", "pose_source"):
            got[key].append(info[key])
        for key in ("pose", "revisit", "visit_count"):
            got["real_" + key].append(np.stack([r[key] for r in real]))
    vec.close()
    return {k: np.stack(v) for k, v in got.items()}


def test_loop_walk_in_a_dream_reports_revisits_where_the_real_walk_does(folders):
    """The loop agent walks out and back inside dreams of torus maps: every step's revisit, visit count and pose
    equal the real env's under the same actions, though the walk soon leaves the recorded episodes."""
    got = walk(folders["wrap"], "loop", num_envs=3, steps=30, seed=5)
    integrated = got["pose_source"] == "integrated"
    assert integrated.mean() > 0.5, "the walk should leave the record: this test is about dead reckoning"
    assert got["real_revisit"][integrated].sum() >= 10, "a loop walk revisits: the comparison must cover revisits"
    np.testing.assert_array_equal(got["revisit"], got["real_revisit"])
    np.testing.assert_array_equal(got["visit_count"], got["real_visit_count"])
    np.testing.assert_array_equal(got["pose"], got["real_pose"])


def test_clip_border_moves_are_blocked_as_in_the_env(folders):
    """Random walks on a clip-border map bump into the edges: the integrated pose stays where the real window is
    blocked, and visit counts follow."""
    got = walk(folders["clip"], "random", num_envs=2, steps=40, seed=1)
    integrated = got["pose_source"] == "integrated"
    assert integrated.sum() > 40
    blocked = (np.diff(got["real_pose"], axis=0) == 0).all(-1)  # (steps - 1, N) a move that did not move
    assert blocked.any(), "the walks should hit the border"
    np.testing.assert_array_equal(got["pose"], got["real_pose"])
    np.testing.assert_array_equal(got["visit_count"], got["real_visit_count"])


def test_vector_dreams_report_what_single_dreams_report(folders):
    """Dream i of a batch (vectorised bookkeeping) and a DreamEnv seeded s + i: the same info at every step, on and
    off record, up to truncation; frames within a grey level (batched float rounding, test_dream_repro). Then the
    NEXT_STEP autoreset puts each restarted dream's real context info into its row."""
    data, N, steps = str(folders["wrap"]), 3, 10
    vec = DreamVectorEnv(CHECKPOINT, N, data=data, max_steps=steps, device="cpu")
    singles = [DreamEnv(CHECKPOINT, data=data, max_steps=steps, device="cpu") for _ in range(N)]
    obs, info = vec.reset(seed=20)
    now = [env.reset(seed=20 + i) for i, env in enumerate(singles)]
    sources = set()
    for step in range(steps + 1):
        for i, (single_obs, single_info) in enumerate(now):
            assert set(single_info) == set(info)
            for key, value in single_info.items():
                np.testing.assert_array_equal(info[key][i], value, err_msg=f"step {step}, dream {i}, {key}")
            assert np.abs(obs[i].astype(int) - single_obs.astype(int)).max() <= 1
            sources.add(single_info["pose_source"])
        if step == steps:
            break
        track = vec.dreams.tracks[0]  # dream 0 keeps to its record while it lasts, the others leave it at once
        recorded = int(track.episode["action"][track.t]) if track.t < len(track.episode["action"]) else 0
        actions = [recorded, 0, 3]
        obs, _, _, truncated, info = vec.step(np.array(actions))
        for i, env in enumerate(singles):
            single_obs, _, _, single_truncated, single_info = env.step(actions[i])
            now[i] = (single_obs, single_info)
            assert single_truncated == truncated[i] == (step == steps - 1)
    assert sources == {"recorded", "integrated"}
    obs, _, _, truncated, info = vec.step(np.array([1, 2, 3]))  # the autoreset: ignored actions, context infos
    K = vec.dreams.context
    assert not truncated.any() and info["on_record"].all() and (info["pose_source"] == "recorded").all()
    for i, track in enumerate(vec.dreams.tracks):
        np.testing.assert_array_equal(info["pose"][i], track.episode["pose"][K - 1])
        assert info["visit_count"][i] == track.episode["visit_count"][K - 1]
        np.testing.assert_array_equal(obs[i], track.episode["obs"][K - 1])
    vec.close()


def test_odometry_only_for_envs_that_declare_their_effects(folders):
    """`envs.odometry`: dead reckoning where the env declares action effects of the kind it has; None elsewhere,
    and then a dream's pose off record is unknown (the path of integrate_pose=False, tests/test_dream.py)."""
    manifest = read_manifest(folders["wrap"])
    env_id, kwargs, effects = manifest["env"]["id"], manifest["env"]["kwargs"], manifest["env"]["action_effects"]
    assert envs.odometry(env_id, kwargs, effects, 2) is not None
    assert envs.odometry(env_id, kwargs, None, 2) is None  # an old manifest without action effects
    assert envs.odometry(env_id, kwargs, {**effects, "kind": "se2"}, 2) is None  # not what this env does
    assert envs.odometry("Dream-v0", {}, effects, 2) is None  # a dream of a dream: its bounds are unknown here


@pytest.mark.slow
def test_miniworld_dream_turning_in_place_revisits_where_the_real_env_does(tmp_path):
    """MiniWorld (se2 effects): a tiny model trained for one step on one big empty room dreams a full turn left and
    back off record; the integrated headings and revisits equal the real env's under the same actions (turns are
    never blocked; a move into a wall would be, which the dream cannot know: the module docstring says so)."""
    import dataclasses

    from worldmodel.config import preset
    from worldmodel.train import train

    data = tmp_path / "room"
    room = '{"num_rows": 1, "num_cols": 1, "room_size": 8.0, "num_objects": 0}'
    collect(CollectConfig(env="miniworld", agent="random", episodes=2, steps=12, out=data, env_kwargs=room,
                          progress=False))
    train(dataclasses.replace(preset("debug"), data=str(data), steps=1, out=str(tmp_path / "run"), progress=False,
                              threads=1))
    dream = DreamEnv(str(tmp_path / "run"), data=str(data), device="cpu")
    dream.reset(seed=0)
    manifest, track = read_manifest(data), dream.dreams.tracks[0]
    record = next(e for e in manifest["episodes"] if e["index"] == track.episode_index)
    real = envs.make("miniworld", **{**manifest["env"]["kwargs"], "max_steps": 64})  # the episodes were 12 steps
    real.reset(seed=record["env_seed"])
    for action in track.episode["action"][:dream.dreams.context - 1]:
        real.step(int(action))
    turn = 360 // 30  # the env's default turn_step is 30 degrees
    sources, revisits = [], []
    for action in [0] * turn + [1] * turn:
        info = dream.step(action)[4]
        real_info = real.step(action)[4]
        np.testing.assert_allclose(info["pose"], real_info["pose"], atol=1e-4)
        assert (info["revisit"], info["visit_count"]) == (real_info["revisit"], real_info["visit_count"])
        sources.append(info["pose_source"]), revisits.append(info["revisit"])
    assert sources.count("integrated") >= 2 * turn - 1 and sum(revisits) >= turn
    real.close(), dream.close()
