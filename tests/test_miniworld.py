"""MiniWorld envs: Gymnasium API, headless import, exact poses and revisit ground truth, per-episode layouts."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.miniworld import (
    INVERSE_ACTIONS,
    MiniWorldRevisitEnv,
    RevisitTracker,
    import_miniworld,
    make_stock,
    texture_rgba_bottom_up,
)

ROOT = Path(__file__).resolve().parent.parent
FORWARD, BACK, LEFT, RIGHT = 2, 3, 0, 1


def small_env(**kwargs) -> MiniWorldRevisitEnv:
    """One big empty room: nothing blocks a few steps from a spot well inside it."""
    return MiniWorldRevisitEnv(**{"num_rows": 1, "num_cols": 1, "room_size": 8.0, "num_objects": 0, **kwargs})


def reset_in_open_space(env: MiniWorldRevisitEnv, clearance: float) -> tuple[np.ndarray, dict]:
    """Reset with the first seed that puts the agent at least ``clearance`` metres from every wall."""
    for seed in range(100):
        obs, info = env.reset(seed=seed)
        x, z, _ = info["pose"]
        sim = env.sim
        if min(x - sim.min_x, sim.max_x - x, z - sim.min_z, sim.max_z - z) >= clearance:
            return obs, info
    raise AssertionError("no seed in 0..99 starts the agent in open space")


def play(env: gym.Env, seed: int, actions: list[int]) -> tuple[np.ndarray, np.ndarray]:
    obs, info = env.reset(seed=seed)
    frames, poses = [obs], [info["pose"]]
    for action in actions:
        obs, _, _, _, info = env.step(action)
        frames.append(obs)
        poses.append(info["pose"])
    return np.stack(frames), np.stack(poses)


def test_importing_does_not_touch_opengl():
    code = "import sys, envs, envs.miniworld; print('pyglet.gl' in sys.modules, 'miniworld' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_missing_gl_names_the_packages_to_install():
    # glvnd finds no EGL vendor library here, as on a machine without Mesa's EGL.
    code = "import envs\ntry:\n    envs.make('miniworld')\nexcept Exception as e:\n    print(type(e).__name__, e)"
    env = {**os.environ, "__EGL_VENDOR_LIBRARY_FILENAMES": "/nonexistent/egl_vendor.json"}
    env.pop("PYGLET_HEADLESS", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.stdout.startswith("DependencyNotInstalled"), out.stdout + out.stderr
    for hint in ("libegl1", "libegl-mesa0", "libgl1-mesa-dri", "libgles2", "xvfb-run"):
        assert hint in out.stdout


def test_check_env_custom():
    env = gym.make("MiniWorldRevisit-v0", max_steps=16).unwrapped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)  # with a spec: also makes it in every render mode and closes it twice
    assert not [str(w.message) for w in caught]
    env.close()


def test_check_env_stock():
    env = make_stock("MiniWorld-Hallway-v0", render_mode="rgb_array")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    # Without gym.make there is no spec to re-make the env from in other render modes: the only allowed warning.
    assert all("spec" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert env.action_space == gym.spaces.Discrete(4)
    assert env.observation_space.shape == (64, 64, 3)
    assert env.unwrapped.inverse_actions == INVERSE_ACTIONS and env.unwrapped.pose_dim == 3
    env.close()


def test_info_contract_and_rendering():
    env = small_env(obs_size=32, render_mode="rgb_array", render_size=48, max_steps=5)
    obs, info = env.reset(seed=0)
    assert obs.shape == (32, 32, 3) and obs.dtype == np.uint8
    for _ in range(5):
        assert set(info) == {"pose", "revisit", "visit_count"}
        assert info["pose"].dtype == np.float32 and info["pose"].shape == (3,)
        assert abs(info["pose"][2]) <= np.float32(np.pi)  # [-pi, pi) before rounding to float32
        assert type(info["revisit"]) is bool and type(info["visit_count"]) is int
        obs, reward, terminated, truncated, info = env.step(LEFT)
        assert reward == 0.0 and not terminated
    assert truncated  # max_steps=5
    with pytest.raises(gym.error.ResetNeeded):
        env.step(LEFT)
    with pytest.raises(AssertionError):
        env.reset()
        env.step(4)
    assert env.render().shape == (48, 48, 3)
    top = env.render_top_view()
    assert top.shape == (48, 48, 3) and len(np.unique(top.reshape(-1, 3), axis=0)) > 3
    env.close()
    env.close()


def test_out_and_back_revisits_exactly_the_start():
    env = small_env(turn_step=30.0, move_step=0.4)
    obs0, info = reset_in_open_space(env, clearance=2.0)
    start = info["pose"]
    half_turn = [LEFT] * 6  # 6 x 30 degrees
    path = [FORWARD] * 3 + half_turn + [FORWARD] * 3 + half_turn
    infos = []
    for action in path:
        obs, _, _, _, info = env.step(action)
        infos.append(info)
    # Going out: three new places 0.4 m apart, straight ahead.
    heading = start[2]
    for k in range(3):
        expected = start[:2] + 0.4 * (k + 1) * np.array([np.cos(heading), -np.sin(heading)])
        np.testing.assert_allclose(infos[k]["pose"][:2], expected, atol=1e-5)
    # Every pose on the way is new (coming back along the same line faces the other way) ...
    assert [i["revisit"] for i in infos[:-1]] == [False] * (len(path) - 1)
    assert [i["visit_count"] for i in infos[:-1]] == [0] * (len(path) - 1)
    # ... until the last turn faces the start direction again, at the start: the same pose and the same frame.
    assert infos[-1]["revisit"] and infos[-1]["visit_count"] == 1
    np.testing.assert_allclose(infos[-1]["pose"], start, atol=1e-5)
    np.testing.assert_array_equal(obs, obs0)
    # Undoing any action comes back too (inverse_actions), and counts every earlier visit.
    for action in range(4):
        env.step(action)
        _, _, _, _, info = env.step(INVERSE_ACTIONS[action])
        np.testing.assert_allclose(info["pose"], start, atol=1e-5)
        assert info["revisit"] and info["visit_count"] == 2 + action


def test_stock_env_has_exact_steps_and_revisits():
    env = make_stock("Hallway")  # short name of MiniWorld-Hallway-v0
    assert env.unwrapped.env_id == "MiniWorld-Hallway-v0"
    assert (env.turn_step, env.move_step) == (15.0, 0.15)  # the stock sizes, without their noise
    _, info0 = env.reset(seed=0)
    _, _, _, _, info1 = env.step(LEFT)
    _, _, _, _, info2 = env.step(RIGHT)
    assert np.isclose(info1["pose"][2] - info0["pose"][2], np.radians(15.0), atol=1e-5)
    assert not info1["revisit"] and info2["revisit"] and info2["visit_count"] == 1
    np.testing.assert_allclose(info2["pose"], info0["pose"], atol=1e-6)
    custom = make_stock("MiniWorld-OneRoom-v0", obs_size=32, turn_step=90.0)
    _, info0 = custom.reset(seed=0)
    _, _, _, _, info1 = custom.step(LEFT)
    assert custom.observation_space.shape == (32, 32, 3)
    assert np.isclose(abs(info1["pose"][2] - info0["pose"][2]), np.pi / 2, atol=1e-5)
    env.close()
    custom.close()


def test_same_seed_same_frames_and_pickle_round_trip():
    actions = [FORWARD, LEFT, FORWARD, FORWARD, RIGHT, BACK, FORWARD]
    env = gym.make("MiniWorldRevisit-v0")
    frames, poses = play(env, 7, actions)
    again_frames, again_poses = play(env, 7, actions)
    np.testing.assert_array_equal(frames, again_frames)
    np.testing.assert_array_equal(poses, again_poses)
    copy = pickle.loads(pickle.dumps(env.unwrapped))
    copy_frames, _ = play(copy, 7, actions)
    np.testing.assert_array_equal(frames, copy_frames)
    env.close()
    copy.close()


def test_layout_is_redrawn_every_episode():
    env = MiniWorldRevisitEnv(num_rows=2, num_cols=2)

    def layout() -> tuple:
        rooms = tuple((r.wall_tex_name, r.floor_tex_name, r.ceil_tex_name) for r in env.sim.rooms)
        things = tuple((type(e).__name__, *np.round(e.pos, 6)) for e in env.sim.entities)
        return rooms, things

    firsts, layouts = [], []
    for seed in range(4):
        obs, _ = env.reset(seed=seed)
        firsts.append(obs)
        layouts.append(layout())
    assert len(set(layouts)) == 4
    # Rooms within an episode look different from each other (distinct wall textures).
    assert all(len({room[0] for room in rooms[:4]}) == 4 for rooms, _ in layouts)
    # Different first frames, with different colour statistics, not just a shifted view.
    means = np.array([f.reshape(-1, 3).mean(0) for f in firsts])
    assert np.abs(means[:, None] - means[None]).sum(-1)[np.triu_indices(4, 1)].min() > 1.0
    obs, _ = env.reset(seed=2)
    assert layout() == layouts[2]
    np.testing.assert_array_equal(obs, firsts[2])
    env.reset()  # no seed: the generator moves on, a new layout
    assert layout() not in layouts
    env.close()


def test_vector_env_reports_info_arrays():
    vec = envs.make_vec("miniworld", 2, max_steps=8)
    _, info = vec.reset(seed=[0, 1])
    assert info["pose"].shape == (2, 3) and info["revisit"].shape == (2,) and info["visit_count"].shape == (2,)
    _, _, _, _, info = vec.step(np.array([LEFT, RIGHT]))
    _, _, _, _, info = vec.step(np.array([RIGHT, LEFT]))
    assert info["revisit"].tolist() == [True, True]
    vec.close()


def test_async_vector_env_with_spawn_and_a_clear_error_after_fork():
    vec = gym.vector.AsyncVectorEnv([lambda: envs.make("miniworld", max_steps=8)] * 2, context="spawn")
    _, info = vec.reset(seed=[0, 1])
    obs, _, _, _, info = vec.step(np.array([FORWARD, LEFT]))
    assert obs.shape == (2, 64, 64, 3) and info["pose"].shape == (2, 3)
    vec.close()
    # This process holds GL state now; a forked child must fail loudly instead of hanging inside pyglet.
    import_miniworld()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            envs.make("miniworld")
            code = 1
        except RuntimeError as err:
            code = 0 if "spawn" in str(err) else 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(obs_size=0), "obs_size"),
        (dict(obs_size=64.0), "obs_size"),
        (dict(turn_step=0.0), "turn_step"),
        (dict(turn_step=270.0), "turn_step"),
        (dict(move_step=-0.1), "move_step"),
        (dict(move_step=3.0), "move_step"),  # more than half a 4 m room
        (dict(room_size=1.5), "room_size"),
        (dict(num_rows=0), "num_rows"),
        (dict(num_objects=-1), "num_objects"),
        (dict(max_steps=0), "max_steps"),
        (dict(revisit_radius=-1.0), "revisit_radius"),
        (dict(revisit_angle=200.0), "revisit_angle"),
        (dict(render_mode="human"), "render_mode"),
    ],
)
def test_bad_parameters_raise_value_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MiniWorldRevisitEnv(**kwargs)


def test_bad_stock_ids_raise_value_error():
    with pytest.raises(ValueError, match="NoSuchWorld"):
        make_stock("NoSuchWorld")
    with pytest.raises(ValueError, match="Box"):
        make_stock("MiniWorld-Sign-v0")  # a Dict observation (image + goal), not an image
    with pytest.raises(ValueError, match="turn_step"):
        make_stock("MiniWorld-OneRoom-v0", turn_step=-15)
    with pytest.raises(ValueError, match="obs_size"):
        make_stock("MiniWorld-OneRoom-v0", obs_width=32)
    with pytest.raises(ValueError, match="miniworld:"):
        envs.resolve("miniworld:")


def test_revisit_tracker_thresholds():
    tracker = RevisitTracker(radius=0.2, angle=15.0)
    assert tracker.visit(0.0, 0.0, 0.0) == (False, 0)
    assert tracker.visit(0.15, 0.0, np.radians(10)) == (True, 1)  # within both thresholds
    assert tracker.visit(0.0, 0.3, 0.0) == (False, 0)  # too far
    assert tracker.visit(0.0, 0.0, np.radians(20)) == (True, 1)  # matches (0.15, 0, 10 deg) only
    assert tracker.visit(0.0, 0.0, np.pi) == (False, 0)  # facing the other way
    assert tracker.visit(0.0, 0.0, 2 * np.pi) == (True, 2)  # headings compare modulo 2 pi: matches the first two
    for k in range(600):  # grows past its initial capacity
        tracker.visit(100.0 + k, 0.0, 0.0)
    assert tracker.visit(0.0, 0.0, 0.0) == (True, 3)
    tracker.reset()
    assert tracker.visit(0.0, 0.0, 0.0) == (False, 0)


def test_fast_texture_loader_uploads_pyglets_own_bytes():
    import_miniworld()
    from pyglet import image

    from miniworld.utils import get_file_path

    # An RGB and an RGBA file; pyglet's conversion below is the slow path we skip (~0.5 s per 512x512 texture).
    for name in ("white_1", "lava_1"):
        path = get_file_path("textures", name, "png")
        img = image.load(path)
        expected = np.frombuffer(img.get_image_data().get_data("RGBA", img.width * 4), dtype=np.uint8)
        np.testing.assert_array_equal(texture_rgba_bottom_up(path).reshape(-1), expected)


def test_se2_odometry_follows_the_env_in_open_space():
    """Dead reckoning for dreams (``SE2Odometry`` from ``action_effects``, MiniWorld's x += f cos h, z -= f sin h):
    poses within float32 rounding of the env's and the same revisits, on a walk that never meets a wall."""
    env = small_env(turn_step=30.0, move_step=0.4)
    _, info = reset_in_open_space(env, clearance=2.5)
    odometry = envs.odometry("MiniWorldRevisit-v0", {}, env.action_effects, num_envs=3)
    rows = np.array([2])
    pose = info["pose"][None].astype(np.float64)
    odometry.visit(pose, rows)
    start = pose[0, :2].copy()
    rng = np.random.default_rng(1)
    revisits = 0
    for _ in range(60):
        action = int(rng.integers(4))
        ahead = odometry.integrate(pose, np.array([action]))
        if np.linalg.norm(ahead[0, :2] - start) > 1.2:  # stay in the open: 2.5 m from every wall at the start
            action = INVERSE_ACTIONS[action] if action in (FORWARD, BACK) else action
            ahead = odometry.integrate(pose, np.array([action]))
        _, _, _, _, info = env.step(action)
        pose = ahead
        np.testing.assert_allclose(pose[0], info["pose"], atol=1e-4)
        count = odometry.visit(pose, rows)
        assert count.tolist() == [info["visit_count"]]
        revisits += info["revisit"]
    assert revisits >= 10
    env.close()


def test_revisit_tracker_rows_are_independent_walks():
    """The batched tracker (a dream batch's) keeps one history per walk: walk 1 never sees walk 0's poses."""
    tracker = RevisitTracker(radius=0.2, angle=15.0, num_envs=2, capacity=2)
    both = np.array([0, 1])
    assert tracker.visit_rows(both, np.zeros(2), np.zeros(2), np.zeros(2)).tolist() == [0, 0]
    assert tracker.visit_rows(np.array([0]), np.zeros(1), np.zeros(1), np.zeros(1)).tolist() == [1]
    for k in range(3):  # past the capacity of 2: grows
        assert tracker.visit_rows(both, np.array([0.0, 5.0 + k]), np.zeros(2), np.zeros(2)).tolist() == [2 + k, 0]
    tracker.reset(np.array([0]))
    assert tracker.visit_rows(both, np.zeros(2), np.zeros(2), np.zeros(2)).tolist() == [0, 1]
