"""MnistMap-v0: the Gymnasium checks every registered env gets, the revisit contract, and vector == single envs."""

from __future__ import annotations

import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
import envs.mnist_map as mnist_map
from envs.digits import load_digits
from envs.mnist_map import INVERSE_ACTIONS, MnistMapEnv, MnistMapVectorEnv, sample_without_replacement

UP, DOWN, LEFT, RIGHT, STAY = range(5)


def expected_window(env: MnistMapEnv, pose: np.ndarray) -> np.ndarray:
    """The crop of ``env.map`` at ``pose`` computed independently of the env: np.roll makes the torus explicit."""
    row, col = (int(v) for v in pose)
    w = env.window
    if env.border == "wrap":
        return np.roll(env.map, (-row, -col), axis=(0, 1))[:w, :w]
    assert 0 <= row <= env.map.shape[0] - w and 0 <= col <= env.map.shape[1] - w, pose
    return env.map[row : row + w, col : col + w]


@pytest.mark.parametrize("kwargs", [{}, {"border": "wrap"}, {"allow_stay": True, "render_mode": "rgb_array"}])
def test_check_env(kwargs):
    with warnings.catch_warnings():
        # Expected notes, not problems: a bare env has no spec to re-make with other render modes, and gym.make
        # adds wrappers (checking through them is the point of the second call).
        warnings.filterwarnings("ignore", message=".*alternative render modes.*")
        warnings.filterwarnings("ignore", message=".*different from the unwrapped version.*")
        check_env(MnistMapEnv(**kwargs))
        check_env(gym.make("MnistMap-v0", **kwargs))


def test_registration_and_short_names():
    env = envs.make("mnist_map_test", max_steps=5)
    assert isinstance(env.unwrapped, MnistMapEnv) and env.unwrapped.core.split == "test"
    assert env.unwrapped.pose_dim == 2 and env.unwrapped.inverse_actions == (1, 0, 3, 2)
    venv = envs.make_vec("mnist_map", 3)
    assert isinstance(venv, MnistMapVectorEnv) and venv.num_envs == 3
    obs, info = venv.reset(seed=0)
    assert obs.shape == (3, 28, 28, 1) and info["pose"].shape == (3, 2)


def rollout(env: gym.Env, seed: int, actions: list[int]) -> tuple[list, list, np.ndarray]:
    obs, info = env.reset(seed=seed)
    observations, infos = [obs], [info]
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        assert reward == 0.0 and not terminated
        observations.append(obs)
        infos.append(info)
    return observations, infos, env.unwrapped.map.copy()


def assert_same_rollouts(a, b):
    obs_a, infos_a, map_a = a
    obs_b, infos_b, map_b = b
    np.testing.assert_array_equal(map_a, map_b)
    for o1, o2, i1, i2 in zip(obs_a, obs_b, infos_a, infos_b, strict=True):
        np.testing.assert_array_equal(o1, o2)
        assert i1.keys() == i2.keys()
        np.testing.assert_array_equal(i1["pose"], i2["pose"])
        assert (i1["visit_count"], i1["revisit"]) == (i2["visit_count"], i2["revisit"])


@pytest.mark.parametrize("border", ["clip", "wrap"])
def test_same_seed_same_episode(border):
    actions = np.random.default_rng(1).integers(0, 4, 40).tolist()
    first = rollout(gym.make("MnistMap-v0", border=border), 7, actions)
    second = rollout(gym.make("MnistMap-v0", border=border), 7, actions)
    assert_same_rollouts(first, second)
    other = rollout(gym.make("MnistMap-v0", border=border), 8, actions)
    assert not np.array_equal(first[2], other[2]), "another seed must draw another map"
    # A new episode of the same env draws a new map (maps are drawn afresh at every reset).
    env = MnistMapEnv(border=border)
    env.reset(seed=7)
    map_0 = env.map.copy()
    env.reset()
    assert not np.array_equal(map_0, env.map)


@pytest.mark.parametrize("border", ["clip", "wrap"])
def test_pickle_round_trip_mid_episode(border):
    env = MnistMapEnv(border=border, render_mode="rgb_array")
    env.reset(seed=3)
    for action in (RIGHT, DOWN, LEFT):
        env.step(action)
    clone = pickle.loads(pickle.dumps(env))
    np.testing.assert_array_equal(clone.map, env.map)
    for action in (UP, UP, RIGHT, RIGHT, RIGHT, DOWN):
        obs_a, _, _, trunc_a, info_a = env.step(action)
        obs_b, _, _, trunc_b, info_b = clone.step(action)
        np.testing.assert_array_equal(obs_a, obs_b)
        np.testing.assert_array_equal(info_a["pose"], info_b["pose"])
        assert (info_a["visit_count"], trunc_a) == (info_b["visit_count"], trunc_b)
    np.testing.assert_array_equal(clone.render(), env.render())
    # The next episode too: the generator state travelled with the pickle.
    np.testing.assert_array_equal(env.reset()[0], clone.reset()[0])
    np.testing.assert_array_equal(clone.map, env.map)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("kwargs", [{}, {"border": "wrap"}, {"border": "wrap", "step": 10, "window": 20}, {"grid": 2, "step": 5, "window": 16}])
def test_observation_is_the_map_crop_at_pose(kwargs, use_cache, monkeypatch):
    monkeypatch.setattr(mnist_map, "WINDOW_CACHE_BYTES", 2**30 if use_cache else 0)
    env = MnistMapEnv(max_steps=300, **kwargs)
    # The cache is only built when an episode can visit every position on average (P <= max_steps).
    assert (env.core.window_cache is not None) == (use_cache and env.geometry.n_positions <= 300)
    obs, info = env.reset(seed=0)
    rng = np.random.default_rng(0)
    rows, cols = set(), set()
    for t in range(300):
        assert obs.shape == (env.window, env.window, 1) and obs.dtype == np.uint8
        assert info["pose"].dtype == np.float32 and info["pose"].shape == (2,)
        np.testing.assert_array_equal(obs[..., 0], expected_window(env, info["pose"]))
        rows.add(int(info["pose"][0]))
        cols.add(int(info["pose"][1]))
        obs, _, _, _, info = env.step(int(rng.integers(4)))
    # Poses lie on the lattice of the step (clip) or of gcd(step, map size) (wrap) and the walk covers it.
    unit = env.geometry.unit
    assert all(r % unit[0] == 0 for r in rows) and all(c % unit[1] == 0 for c in cols)
    if max(env.geometry.lattice_shape) <= 6:
        assert len(rows) == env.geometry.lattice_shape[0] and len(cols) == env.geometry.lattice_shape[1]


def test_hand_made_path_revisits_on_the_torus():
    """On the 6x6 torus of the default wrap map (84 px, step 14) no move is blocked, so the path is exact."""
    env = MnistMapEnv(border="wrap")
    _, info = env.reset(seed=5)
    start = info["pose"].copy()
    assert (info["visit_count"], info["revisit"]) == (0, False)
    path = [RIGHT, LEFT, DOWN, UP, RIGHT, RIGHT, RIGHT, RIGHT, RIGHT, RIGHT, UP, DOWN]
    expected = [0, 1, 0, 2, 1, 0, 0, 0, 0, 3, 0, 4]  # back at the start after: left, up, 6 rights (a full lap), down
    offsets = {RIGHT: (0, 14), LEFT: (0, -14), DOWN: (14, 0), UP: (-14, 0)}
    pose = start.copy()
    for action, count in zip(path, expected, strict=True):
        _, _, _, _, info = env.step(action)
        pose = (pose + offsets[action]) % 84
        np.testing.assert_array_equal(info["pose"], pose)
        assert info["visit_count"] == count and info["revisit"] == (count > 0), (action, info)
    np.testing.assert_array_equal(pose, start)


def test_blocked_moves_and_stay_are_revisits():
    env = MnistMapEnv(allow_stay=True)  # clip: 5x5 lattice of 14 px
    _, info = env.reset(seed=0)
    for count in (1, 2):
        _, _, _, _, info = env.step(STAY)
        assert info["visit_count"] == count and info["revisit"]
    for _ in range(5):  # more than the lattice height: the last moves are blocked at the top
        _, _, _, _, info = env.step(UP)
    assert info["pose"][0] == 0 and info["revisit"]
    blocked = info["visit_count"]
    _, _, _, _, info = env.step(UP)
    assert info["pose"][0] == 0 and info["visit_count"] == blocked + 1


@pytest.mark.parametrize("border", ["clip", "wrap"])
def test_inverse_actions_undo_moves(border):
    env = MnistMapEnv(border=border, allow_stay=True)
    assert env.inverse_actions == INVERSE_ACTIONS
    env.reset(seed=2)
    for action in [UP] * 5 + [LEFT] * 5 + [DOWN, RIGHT]:
        env.step(action)  # to (14, 14): one move from the corner, so under clip no move below is blocked
    for action in range(5):
        before = env.core.pixel[0].copy()
        env.step(action)
        _, _, _, _, info = env.step(env.inverse_actions[action])
        np.testing.assert_array_equal(info["pose"], before)


def test_truncation_at_max_steps():
    env = gym.make("MnistMap-v0", max_steps=6)
    env.reset(seed=0)
    flags = [env.step(RIGHT)[3] for _ in range(6)]
    assert flags == [False] * 5 + [True]


def test_split_maps_use_disjoint_digit_sets():
    train_set = {image.tobytes() for image in load_digits("train")[0]}
    test_set = {image.tobytes() for image in load_digits("test")[0]}
    for split, own, other in (("train", train_set, test_set), ("test", test_set, train_set)):
        env = MnistMapEnv(split=split)
        env.reset(seed=0)
        for _ in range(20):
            tiles = env.map.reshape(3, 28, 3, 28).transpose(0, 2, 1, 3).reshape(9, 28, 28)
            assert all(tile.tobytes() in own and tile.tobytes() not in other for tile in tiles)
            assert len({tile.tobytes() for tile in tiles}) == 9, "a map never shows the same digit twice"
            env.reset()


def test_sample_without_replacement_is_uniform():
    uniforms = np.random.default_rng(0).random((30000, 4))
    ids = sample_without_replacement(uniforms, 6)
    assert all(len(set(row)) == 4 for row in ids[:2000]) and ids.min() == 0 and ids.max() == 5
    for j in range(4):  # every slot is uniform over the 6 ids: 5000 expected each, 5 sigma ~ 320
        assert np.abs(np.bincount(ids[:, j], minlength=6) - 5000).max() < 350


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"grid": 1, "window": 29}, "window 29 is larger than the map 28x28"),
        ({"step": 0}, "step must be an int > 0"),
        ({"step": -14}, "step must be an int > 0"),
        ({"split": "val"}, "unknown split 'val'"),
        ({"border": "bounce"}, "unknown border mode 'bounce'"),
        ({"grid": 0}, "grid must be an int >= 1"),
        ({"max_steps": 0}, "max_steps must be an int >= 1"),
        ({"window": 0}, "window must be an int > 0"),
        ({"render_mode": "human"}, "unknown render_mode 'human'"),
        ({"grid": 70}, "needs 4900 distinct digits"),
    ],
)
def test_bad_parameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MnistMapEnv(**kwargs)
    with pytest.raises(ValueError, match=message):
        MnistMapVectorEnv(num_envs=2, **kwargs)


def test_asserts_on_misuse():
    env = MnistMapEnv()
    with pytest.raises(AssertionError, match="reset"):
        env.step(0)
    env.reset(seed=0)
    with pytest.raises(AssertionError):
        env.step(4)  # stay is not an action unless allow_stay=True
    venv = MnistMapVectorEnv(num_envs=2)
    with pytest.raises(AssertionError, match="reset"):
        venv.step(np.zeros(2, dtype=np.int64))


@pytest.mark.parametrize("border", ["clip", "wrap"])
def test_render_draws_map_window_and_path(border):
    env = MnistMapEnv(border=border, render_mode="rgb_array")
    _, info = env.reset(seed=0)
    for action in (RIGHT, DOWN, DOWN):
        _, _, _, _, info = env.step(action)
    frame = env.render()
    assert frame.shape == (84 * 4, 84 * 4, 3) and frame.dtype == np.uint8
    row, col = (int(v) * 4 for v in info["pose"])
    np.testing.assert_array_equal(frame[row, col], [0, 255, 0])  # the window's top-left corner is outlined in green
    assert (np.all(frame == [255, 140, 0], axis=-1)).sum() > 20  # the path
    grey = frame[..., 0] == frame[..., 1]
    assert frame[grey].max() > 0  # the digits are there, dimmed


# ---------------------------------------------------------------------------------------------------------------------
# The vector env


def run_singles_like_vector(n: int, seed: int, actions: np.ndarray, **kwargs) -> list[dict[str, np.ndarray]]:
    """What a NEXT_STEP vector env must return, built from N single envs that call reset() after each episode."""
    singles = [MnistMapEnv(**kwargs) for _ in range(n)]
    first = [env.reset(seed=seed + i) for i, env in enumerate(singles)]
    records = [
        dict(obs=np.stack([o for o, _ in first]), pose=np.stack([i["pose"] for _, i in first]),
             visit=np.array([i["visit_count"] for _, i in first]), trunc=np.zeros(n, bool),
             maps=np.stack([env.map for env in singles]))
    ]
    needs_reset = [False] * n
    for batch in actions:
        step = dict(obs=[], pose=[], visit=[], trunc=[], maps=[])
        for i, env in enumerate(singles):
            if needs_reset[i]:
                obs, info = env.reset()
                truncated = False
            else:
                obs, _, _, truncated, info = env.step(int(batch[i]))
            needs_reset[i] = truncated
            for key, value in zip(step, (obs, info["pose"], info["visit_count"], truncated, env.map.copy())):
                step[key].append(value)
        records.append({key: np.array(value) for key, value in step.items()})
    return records


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("kwargs", [{}, {"border": "wrap", "allow_stay": True}])
def test_vector_equals_single_envs_across_autoreset(kwargs, use_cache, monkeypatch):
    monkeypatch.setattr(mnist_map, "WINDOW_CACHE_BYTES", 2**30 if use_cache else 0)
    n, seed, max_steps = 5, 100, 40  # max_steps >= the 25 or 36 positions, so the window cache is used when allowed
    n_actions = 5 if kwargs.get("allow_stay") else 4
    actions = np.random.default_rng(0).integers(0, n_actions, (125, n))  # crosses three autoresets
    expected = run_singles_like_vector(n, seed, actions, max_steps=max_steps, **kwargs)
    venv = gym.make_vec("MnistMap-v0", num_envs=n, vectorization_mode="vector_entry_point", max_steps=max_steps, **kwargs)
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    assert (venv.unwrapped.core.window_cache is not None) == use_cache
    obs, info = venv.reset(seed=seed)
    got = [dict(obs=obs, pose=info["pose"], visit=info["visit_count"], trunc=np.zeros(n, bool), maps=venv.unwrapped.maps.copy())]
    for batch in actions:
        obs, reward, terminated, truncated, info = venv.step(batch)
        assert obs.shape == (n, 28, 28, 1) and reward.shape == (n,) and not reward.any() and not terminated.any()
        assert info["pose"].shape == (n, 2) and info["pose"].dtype == np.float32
        assert info["_pose"].all() and info["_revisit"].all() and info["_visit_count"].all()
        np.testing.assert_array_equal(info["revisit"], info["visit_count"] > 0)
        got.append(dict(obs=obs, pose=info["pose"], visit=info["visit_count"], trunc=truncated, maps=venv.unwrapped.maps.copy()))
    for t, (g, e) in enumerate(zip(got, expected, strict=True)):
        for key in e:
            np.testing.assert_array_equal(g[key], e[key], err_msg=f"step {t}, {key}")
    assert sum(r["trunc"].sum() for r in got) == 3 * n


def test_vector_next_step_autoreset_ignores_the_action():
    venv = MnistMapVectorEnv(num_envs=2, max_steps=2, border="wrap")
    venv.reset(seed=0)
    venv.step(np.array([RIGHT, RIGHT]))
    _, _, _, truncated, _ = venv.step(np.array([RIGHT, RIGHT]))
    assert truncated.all()
    old_maps = venv.maps.copy()
    reference = MnistMapEnv(max_steps=2, border="wrap")
    reference.reset(seed=0)
    for _ in range(2):
        reference.step(RIGHT)
    reset_obs, reset_info = reference.reset()  # the second episode of sub-env 0
    obs, reward, terminated, truncated, info = venv.step(np.array([DOWN, UP]))  # actions to be ignored
    np.testing.assert_array_equal(obs[0], reset_obs)
    np.testing.assert_array_equal(info["pose"][0], reset_info["pose"])
    assert not truncated.any() and not terminated.any() and not reward.any() and not info["revisit"].any()
    assert not np.array_equal(old_maps, venv.maps)


def test_vector_reset_options():
    venv = MnistMapVectorEnv(num_envs=3)
    with pytest.raises(ValueError, match="first reset must reset every env"):
        venv.reset(seed=0, options={"reset_mask": np.array([True, False, True])})
    venv.reset(seed=[10, 20, 30])
    single = MnistMapEnv()
    single.reset(seed=20)
    np.testing.assert_array_equal(venv.maps[1], single.map)
    before = venv.maps.copy()
    obs, info = venv.reset(options={"reset_mask": np.array([False, True, False])})
    np.testing.assert_array_equal(venv.maps[[0, 2]], before[[0, 2]])
    single.reset()
    np.testing.assert_array_equal(venv.maps[1], single.map)
    np.testing.assert_array_equal(obs[1], single.core.observe()[0])
    with pytest.raises(ValueError, match="reset_mask"):
        venv.reset(options={"reset_mask": np.array([True, False])})
    with pytest.raises(ValueError, match="2 seeds for 3 envs"):
        venv.reset(seed=[1, 2])


def test_vector_env_pickles_and_renders():
    venv = MnistMapVectorEnv(num_envs=2, render_mode="rgb_array")
    venv.reset(seed=0)
    clone = pickle.loads(pickle.dumps(venv))
    actions = np.array([RIGHT, DOWN])
    for _ in range(3):
        np.testing.assert_array_equal(venv.step(actions)[0], clone.step(actions)[0])
    frames = venv.render()
    assert len(frames) == 2 and frames[0].shape == (336, 336, 3)


def test_map_from_an_idx_folder_of_other_sized_digits(tmp_path):
    """Any IDX digit set works: 16x16 images give a 48x48 map; the labels of the map follow the tiles."""
    from envs.digits import write_idx

    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (20, 16, 16), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(20, dtype=np.uint8))
    env = MnistMapEnv(source=str(tmp_path), window=16, step=8)
    obs, info = env.reset(seed=0)
    assert env.map.shape == (48, 48) and obs.shape == (16, 16, 1) and env.geometry.lattice_shape == (5, 5)
    images, labels = load_digits("train", tmp_path)
    for r in range(3):
        for c in range(3):
            tile = env.map[16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)]
            np.testing.assert_array_equal(tile, images[env.map_labels[r, c]])  # label i is image i in this set
    np.testing.assert_array_equal(obs[..., 0], expected_window(env, info["pose"]))
    with pytest.raises(ValueError, match="window 49 is larger than the map 48x48"):
        MnistMapEnv(source=str(tmp_path), window=49)


@pytest.mark.parametrize("kwargs", [{}, {"border": "wrap"}, {"border": "wrap", "grid": 4, "step": 7, "window": 20}])
def test_lattice_odometry_follows_the_env_without_a_map(kwargs):
    """Dead reckoning for dreams (``LatticeOdometry``, built from the kwargs and ``action_effects`` alone): integrated
    poses and visit counts equal the env's on long random walks, blocked moves at a clip border included."""
    env = MnistMapEnv(max_steps=300, **kwargs)
    _, info = env.reset(seed=4)
    odometry = envs.odometry("MnistMap-v0", kwargs, env.action_effects, num_envs=2)
    rows = np.array([1])  # walk 1 of 2: rows are independent
    pose = info["pose"][None].astype(np.float64)
    assert odometry.visit(pose, rows).tolist() == [0]
    rng = np.random.default_rng(0)
    for action in rng.integers(4, size=300):
        _, _, _, _, info = env.step(int(action))
        pose = odometry.integrate(pose, np.array([action]))
        np.testing.assert_array_equal(pose[0], info["pose"])
        assert odometry.visit(pose, rows).tolist() == [info["visit_count"]]
    assert not odometry.visits[0].any()  # walk 0 never moved
    odometry.reset(rows)
    assert not odometry.visits.any()
