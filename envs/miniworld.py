"""3D first-person MiniWorld envs that know, at every step, whether the agent is back at a pose it saw before.

Two ways in, one set of dynamics (``_MiniWorldRevisitBase``):

- ``MiniWorldRevisitEnv`` (registered as ``MiniWorldRevisit-v0``, short name ``miniworld``): our memory task, a small
  grid of rooms whose wall/floor/ceiling textures, doors and objects are re-drawn every episode, so what a revisit
  shows can only be predicted from memory of this episode (the 3D setting of GTMM, Gemici et al. 2017, 5.7).
- ``make_stock(env_id)`` (short name ``miniworld:<StockId>``): any stock MiniWorld env, e.g.
  ``MiniWorld-Hallway-v0``, seen through the same action space, observation size and ``info`` contract.

Both render headless by default: pyglet is switched to its EGL "headless" mode before ``miniworld`` is imported (Mesa's
llvmpipe renders on the CPU, no display or GPU needed). ``miniworld`` is imported lazily, on the first env made, so
importing this module never touches OpenGL. Set ``PYGLET_HEADLESS=0`` to render through an X display instead (e.g.
under ``xvfb-run -a``). OpenGL does not survive ``fork``: run MiniWorld envs in worker processes started with
``spawn``/``forkserver`` (``gymnasium.vector.AsyncVectorEnv(fns, context="spawn")``); a forked child that tries gets a
``RuntimeError`` saying so (pyglet would hang).

Actions (both envs): ``0`` turn left, ``1`` turn right, ``2`` move forward, ``3`` move back, by exactly ``turn_step``
degrees / ``move_step`` metres: MiniWorld's domain-randomisation noise on steps is removed, so undoing an action
(``inverse_actions = (1, 0, 3, 2)``) returns to exactly the same pose and the same frame. ``action_effects`` says what
each action does for programs (the contract in ``envs/__init__.py``): ``{"kind": "se2", "moves": [[turn, forward],
...], "exact": False}``, a turn in radians (positive = left) and a step along the heading in metres per action; not
exact because walls and objects block moves.

Rewards: none by default (our env; a stock env keeps its stock task's reward). ``task="coverage"`` replaces it by 1.0
for every step that reaches a place not visited earlier this episode (``visit_count == 0``: a pose outside the revisit
thresholds of every earlier one, so facing a new direction counts), see ``envs/rewards.py``. ``SE2Odometry`` is this
env's dead reckoning for dreams (poses from ``action_effects``, revisits by the same ``RevisitTracker``).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import math
import os
import sys
from types import ModuleType
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import EzPickle

from gtmm.cli import UserError
from envs.rewards import check_task, coverage_reward

ACTION_NAMES = ("turn_left", "turn_right", "move_forward", "move_back")
# inverse_actions[a] undoes a: left <-> right, forward <-> back (exact, since steps carry no noise).
INVERSE_ACTIONS = (1, 0, 3, 2)
POSE_DIM = 3  # (x, z, heading)
TASKS = ("coverage",)  # reward tasks of these envs (envs/rewards.py); None = the env's own reward

# Debian/Ubuntu packages that give pyglet an EGL + software GL to render into without a display.
GL_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri libgles2"

# Texture palettes for MiniWorldRevisit-v0 (names of files shipped in miniworld/textures/). Walls are the main memory
# cue, so only textures that look clearly different from each other at 64x64 are used; see-through ones
# (picket_fence), signs (logo_mila) and doors are left out.
WALL_TEXTURES = (
    "brick_wall", "cinder_blocks", "concrete", "drywall", "marble", "metal_grill", "rock", "stucco",
    "wood", "wood_planks", "cardboard", "slime", "lava", "water", "grass", "airduct_grate",
)
FLOOR_TEXTURES = ("floor_tiles_bw", "asphalt", "wood_planks", "concrete_tiles", "marble", "grass", "cardboard")
CEILING_TEXTURES = ("ceiling_tiles", "ceiling_tile_noborder", "concrete_tiles", "wood", "drywall")
# (mesh name, height in metres); "{color}" is filled with one of MiniWorld's six colour names. "box" is a plain box.
# MiniWorld's balls are left out: 5,192 faces each, they doubled the software rendering time of a frame.
OBJECT_KINDS = (
    ("box", 0.0), ("key_{color}", 0.35), ("barrel", 1.0), ("cone", 0.7), ("duckie", 0.5), ("medkit", 0.4),
    ("office_chair", 1.0), ("office_desk", 0.8), ("potion", 0.4),
)
# Besides the doors of a random spanning tree (every room reachable), each other wall between neighbouring rooms gets
# a door with this probability: loops let the agent come back to a room from another side.
EXTRA_DOOR_PROB = 0.5
GAP = 0.25  # wall thickness between neighbouring rooms (as MiniWorld's Maze), in metres


# --------------------------------------------------------------------------------------------------------------------
# Importing miniworld headless
# --------------------------------------------------------------------------------------------------------------------

_GL_PID: int | None = None  # the process that opened pyglet's GL context (importing miniworld does)


def import_miniworld() -> ModuleType:
    """Import ``miniworld``, rendering headless through EGL unless ``PYGLET_HEADLESS`` is set.

    Raises ``gymnasium.error.DependencyNotInstalled`` naming what to install when no GL context can be made.
    """
    global _GL_PID
    if _GL_PID is not None and _GL_PID != os.getpid():
        # A forked child inherits the parent's EGL display and contexts, and pyglet hangs on them instead of failing.
        raise RuntimeError(
            "MiniWorld's OpenGL state was created in a parent process, which was then forked; OpenGL cannot be used "
            "across fork. Start worker processes with 'spawn' or 'forkserver', e.g. "
            "gymnasium.vector.AsyncVectorEnv(env_fns, context='spawn') (it makes one env in the parent to read the "
            "spaces), or make no MiniWorld env before forking."
        )
    if "miniworld" in sys.modules:  # imported already, by us or by the user
        _install_fast_texture_loader(sys.modules["miniworld"])
        _GL_PID = os.getpid()
        return sys.modules["miniworld"]
    try:
        import pyglet
    except ModuleNotFoundError as err:
        raise gym.error.DependencyNotInstalled('MiniWorld needs pyglet 1.5: pip install "pyglet>=1.5,<2" miniworld') from err
    # pyglet reads PYGLET_HEADLESS itself when it is imported; an explicit setting (e.g. PYGLET_HEADLESS=0 under
    # xvfb-run) wins. The option only matters before pyglet.gl is imported: miniworld imports it at module level, and
    # pyglet.gl creates its hidden "shadow window" (the first GL context) right then.
    if "PYGLET_HEADLESS" not in os.environ and "pyglet.gl" not in sys.modules:
        pyglet.options["headless"] = True
    try:
        import miniworld
    except ModuleNotFoundError as err:
        if err.name not in ("miniworld", "pyglet"):
            raise
        raise gym.error.DependencyNotInstalled('MiniWorld is not installed: pip install "miniworld>=2.1" "pyglet>=1.5,<2"') from err
    except Exception as err:  # pyglet raises many types here (ImportError, NoSuchConfigException, ValueError, ...)
        mode = "headless EGL" if pyglet.options["headless"] else "an X display"
        raise gym.error.DependencyNotInstalled(
            f"MiniWorld could not create an OpenGL context through {mode} ({type(err).__name__}: {err}). "
            f"Install Mesa's EGL and GL drivers (Debian/Ubuntu: apt-get install {GL_PACKAGES}), "
            "or run under a virtual X display with PYGLET_HEADLESS=0 xvfb-run -a <command>."
        ) from err
    _install_fast_texture_loader(miniworld)
    _GL_PID = os.getpid()
    return miniworld


def _install_fast_texture_loader(miniworld: ModuleType) -> None:
    """Replace ``miniworld.opengl.Texture.load`` by one that uploads the very same pixels ~25x faster.

    MiniWorld's loader asks pyglet for the PNG as bottom-up RGBA rows, which pyglet converts with a per-pixel regular
    expression: 0.7-1.2 s per 512x512 texture on our 2-core machine (4 s at 1024x1024), and our env draws new
    textures every episode. Decoding is cheap (pyglet gives top-down RGB/RGBA rows in ~10 ms); we reorder the rows and
    add alpha with numpy and upload exactly what the original uploads (same glTexImage2D call, mipmaps and filters):
    0.04 s per 512x512 texture, and bit-identical frames (checked on FourRooms; tests/test_miniworld.py checks the
    bytes against pyglet's own conversion). Textures are cached per process, so this is a one-off cost per file.
    """
    from pyglet import gl
    from pyglet import image as pyglet_image

    texture_cls = miniworld.opengl.Texture
    if getattr(texture_cls.load, "__gtmm_fast__", False):
        return

    def load(cls: type, tex_path: str) -> Any:
        rgba = texture_rgba_bottom_up(tex_path)  # (H, W, 4) uint8, first row = bottom of the image
        height, width = rgba.shape[:2]
        tex_id = gl.GLuint()
        gl.glGenTextures(1, tex_id)
        tex = pyglet_image.Texture(width, height, gl.GL_TEXTURE_2D, tex_id.value)
        gl.glEnable(tex.target)
        gl.glBindTexture(tex.target, tex.id)
        gl.glTexImage2D(gl.GL_TEXTURE_2D, 0, gl.GL_RGB, width, height, 0, gl.GL_RGBA, gl.GL_UNSIGNED_BYTE,
                        rgba.ctypes.data_as(ctypes.POINTER(gl.GLubyte)))
        gl.glHint(gl.GL_GENERATE_MIPMAP_HINT, gl.GL_NICEST)
        gl.glGenerateMipmap(gl.GL_TEXTURE_2D)
        gl.glTexParameteri(gl.GL_TEXTURE_2D, gl.GL_TEXTURE_MAG_FILTER, gl.GL_LINEAR)
        gl.glTexParameteri(gl.GL_TEXTURE_2D, gl.GL_TEXTURE_MIN_FILTER, gl.GL_LINEAR_MIPMAP_LINEAR)
        gl.glBindTexture(gl.GL_TEXTURE_2D, 0)
        return tex

    load.__gtmm_fast__ = True  # type: ignore[attr-defined]
    texture_cls.load = classmethod(load)


def texture_rgba_bottom_up(path: str) -> np.ndarray:
    """A PNG as (H, W, 4) uint8 RGBA with the bottom row first: what ``get_data("RGBA", W * 4)`` returns in pyglet."""
    from pyglet import image as pyglet_image

    data = pyglet_image.load(path).get_image_data()
    fmt, pitch = data.format, data.pitch  # pitch < 0: rows stored top to bottom
    raw = np.frombuffer(data.get_data(fmt, pitch), dtype=np.uint8).reshape(data.height, abs(pitch))
    pixels = raw[:, : data.width * len(fmt)].reshape(data.height, data.width, len(fmt))  # (H, W, len(fmt))
    if pitch < 0:
        pixels = pixels[::-1]
    rgba = np.full((data.height, data.width, 4), 255, dtype=np.uint8)
    if fmt in ("L", "LA"):
        rgba[..., :3] = pixels[..., :1]
        if fmt == "LA":
            rgba[..., 3] = pixels[..., 1]
    else:
        for channel, name in enumerate("RGBA"):
            if name in fmt:
                rgba[..., channel] = pixels[..., fmt.index(name)]
    return rgba


# --------------------------------------------------------------------------------------------------------------------
# Revisit ground truth
# --------------------------------------------------------------------------------------------------------------------


def wrap_angle(angle: float) -> float:
    """An angle in radians mapped to [-pi, pi)."""
    return (angle + math.pi) % (2.0 * math.pi) - math.pi


def revisit_thresholds(turn_step: float, move_step: float, radius: float | None,
                       angle: float | None) -> tuple[float, float]:
    """(revisit radius in metres, revisit angle in degrees): the given ones, else half a step and half a turn.

    Headings only ever differ by whole multiples of turn_step, so any angle below turn_step separates "same heading"
    from "one turn away", and half of it is the widest margin. Positions are not on a lattice once the agent walks at
    angles, so the radius says how close counts as the same view: at half a (default 0.4 m) step, the wall 2 m ahead
    shifts by at most ~atan(0.2/2) = 6 degrees, ~6 px of the 64 px, 60-degree-wide frame, while one full step or turn
    away changes it clearly. The env and dreams of it (``SE2Odometry``) both take their thresholds from here."""
    return (0.5 * move_step if radius is None else radius), (0.5 * turn_step if angle is None else angle)


class RevisitTracker:
    """The poses of this episode of ``num_envs`` walks, and the test "is the current pose within ``radius`` metres
    and ``angle`` degrees of an earlier one of its walk?", vectorised over the walks and all their earlier poses (a
    handful of numpy calls per step, no Python loop). The env is walk 0 of a tracker of one (``visit``); dreams of the
    env track all their walks in one (``visit_rows``, ``SE2Odometry``), by the same test."""

    def __init__(self, radius: float, angle: float, capacity: int = 256, num_envs: int = 1):
        if not radius >= 0.0:
            raise UserError(f"revisit_radius: expected metres >= 0, got {radius!r}")
        if not 0.0 <= angle <= 180.0:
            raise UserError(f"revisit_angle: expected degrees in [0, 180], got {angle!r}")
        # Tiny slack so that thresholds of 0 still mean "the same pose up to float rounding": turning 360 degrees in
        # 24 steps of 15 gives a heading that differs from the start in the last bits.
        self.radius = radius + 1e-9
        self.cos_angle = math.cos(math.radians(angle)) - 1e-9
        # Earlier poses as complex numbers: position x + iz and heading e^(i heading). Then the distance is one
        # abs() and the cosine of the heading difference is Re(u1 * conj(u2)), with no angle wrapping: half the numpy
        # calls of working on x, z, cos and sin separately, which is most of the cost at these sizes.
        self._positions = np.empty((num_envs, capacity), dtype=np.complex128)  # (N, capacity)
        self._headings = np.empty((num_envs, capacity), dtype=np.complex128)  # (N, capacity)
        self._counts = np.zeros(num_envs, dtype=np.int64)  # (N,) poses recorded this episode

    def reset(self, rows: np.ndarray | None = None) -> None:
        """Forget the poses of the previous episode (of walks ``rows``; all by default)."""
        self._counts[slice(None) if rows is None else rows] = 0

    def visit(self, x: float, z: float, heading: float) -> tuple[bool, int]:
        """Record a pose of walk 0; return (revisit, how many earlier poses of this episode it matches)."""
        visit_count = int(self.visit_rows(np.zeros(1, dtype=np.int64), np.array([x]), np.array([z]),
                                          np.array([heading]))[0])
        return visit_count > 0, visit_count

    def visit_rows(self, rows: np.ndarray, x: np.ndarray, z: np.ndarray, heading: np.ndarray) -> np.ndarray:
        """Record one pose for each walk ``rows`` (M,) (distinct), at ``x``, ``z``, ``heading`` (M,) each; return
        how many earlier poses of its episode each matches (M,) int64."""
        n = self._counts[rows]  # (M,)
        width = int(n.max()) if len(n) else 0  # only the columns some walk has filled
        position = np.asarray(x, dtype=np.float64) + 1j * np.asarray(z, dtype=np.float64)  # (M,)
        direction = np.cos(heading) + 1j * np.sin(heading)  # (M,)
        near = np.abs(self._positions[rows, :width] - position[:, None]) <= self.radius  # (M, width)
        facing = (self._headings[rows, :width] * direction.conj()[:, None]).real >= self.cos_angle  # (M, width)
        filled = np.arange(width) < n[:, None]  # (M, width) a walk's own poses only
        visit_count = np.count_nonzero(near & facing & filled, axis=1).astype(np.int64)  # (M,)
        if width == self._positions.shape[1]:  # stock envs run up to 1500+ steps: grow by doubling
            self._positions = np.concatenate([self._positions, np.empty_like(self._positions)], axis=1)
            self._headings = np.concatenate([self._headings, np.empty_like(self._headings)], axis=1)
        self._positions[rows, n] = position
        self._headings[rows, n] = direction
        self._counts[rows] = n + 1
        return visit_count


class SE2Odometry:
    """Dead reckoning for ``num_envs`` walks from the declared ``action_effects`` (kind ``se2``), without a simulator:
    what a dream of a MiniWorld env (``worldmodel/dream.py``) uses to know where it is once its actions leave the
    recorded episode. Revisits are the env's own rule (``RevisitTracker``, thresholds from ``revisit_thresholds``).

    An action turns the heading by ``turn`` (left positive, wrapped to [-pi, pi)), then moves ``forward`` metres along
    it: x += forward cos(heading), z -= forward sin(heading), MiniWorld's convention (its ``dir_vec`` is (cos, 0,
    -sin)). Walls and objects are unknown here: a blocked move is integrated as if it had happened.
    """

    knows_blocked_moves = False  # walls are unknown here: a dream's model must guess whether a move happened

    def __init__(self, num_envs: int, action_effects: dict[str, Any], revisit_radius: float | None = None,
                 revisit_angle: float | None = None):
        moves = np.asarray(action_effects["moves"], dtype=np.float64)  # (A, 2) [turn radians, forward metres]
        if action_effects.get("kind") != "se2" or moves.ndim != 2 or moves.shape[1] != 2:
            raise ValueError(f"SE2Odometry: expected se2 action effects with [turn, forward] moves, got {action_effects}")
        self.turn, self.forward = moves[:, 0], moves[:, 1]  # (A,), (A,)
        turn_step, move_step = math.degrees(float(np.abs(self.turn).max())), float(np.abs(self.forward).max())
        radius, angle = revisit_thresholds(turn_step, move_step, revisit_radius, revisit_angle)
        self.tracker = RevisitTracker(radius, angle, num_envs=num_envs)

    def integrate(self, pose: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Poses (N, 3) (x, z, heading) after ``actions`` (N,), in float64."""
        heading = (pose[:, 2] + self.turn[actions] + math.pi) % (2.0 * math.pi) - math.pi  # (N,) as wrap_angle
        forward = self.forward[actions]  # (N,)
        return np.stack([pose[:, 0] + forward * np.cos(heading), pose[:, 1] - forward * np.sin(heading), heading], 1)

    def reset(self, rows: np.ndarray) -> None:
        """Forget the walks ``rows``' earlier poses (a new episode)."""
        self.tracker.reset(rows)

    def visit(self, pose: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Record poses (M, 3) of walks ``rows`` (M,); their visit counts (M,) int64 (earlier matching poses)."""
        return self.tracker.visit_rows(rows, pose[:, 0], pose[:, 1], pose[:, 2])


# --------------------------------------------------------------------------------------------------------------------
# The env around a MiniWorld simulator
# --------------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UserError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, low: float, high: float, unit: str, low_inclusive: bool = False) -> float:
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not is_number or not (low <= value if low_inclusive else low < value) or not value <= high:
        interval = f"{'[' if low_inclusive else '('}{low}, {high}]"
        raise UserError(f"{name}: expected {unit} in {interval}, got {value!r}")
    return float(value)


def _check_revisit(radius: Any, angle: Any) -> tuple[float | None, float | None]:
    """Validate revisit thresholds before any GL work (None = the default, derived from the step sizes)."""
    if radius is not None:
        radius = _check_float("revisit_radius", radius, 0.0, 100.0, "metres", low_inclusive=True)
    if angle is not None:
        angle = _check_float("revisit_angle", angle, 0.0, 180.0, "degrees", low_inclusive=True)
    return radius, angle


def action_effects(turn_step: float, move_step: float) -> dict[str, Any]:
    """The contract's ``action_effects`` (``envs/__init__.py``) of our four actions: an SE(2) motion per action,
    ``[turn in radians (left positive), step along the heading in metres]``. Not exact: a wall or an object blocks a
    move (the pose stays), which no integrator over actions alone can know. ``period`` ``[null, null, 2 pi]``: the
    pose's heading is wrapped to [-pi, pi), so a turn across the seam shows as a jump of 2 pi less the turn
    (``worldmodel.path`` unwraps it); x and z do not wrap."""
    turn = math.radians(turn_step)
    moves = [[turn, 0.0], [-turn, 0.0], [0.0, float(move_step)], [0.0, -float(move_step)]]  # ACTION_NAMES order
    return {"kind": "se2", "moves": moves, "exact": False, "period": [None, None, 2.0 * math.pi]}


class _MiniWorldRevisitBase(gym.Env):
    """Actions, observations, ``info`` and rendering shared by our env and wrapped stock envs.

    Subclasses build ``self.sim`` (a ``miniworld.MiniWorldEnv``) and call ``_setup``. The simulator is owned, not
    wrapped, so that ``env.unwrapped`` is this object and carries ``inverse_actions``/``pose_dim`` (the contract in
    ``envs/__init__.py``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}
    sim: Any = None  # the miniworld.MiniWorldEnv; None before construction finishes and after close()
    inverse_actions: tuple[int, ...] = INVERSE_ACTIONS
    pose_dim: int = POSE_DIM
    action_names: tuple[str, ...] = ACTION_NAMES

    def _make_sim(self, make: Any, obs_size: int, render_size: int, render_mode: str | None) -> Any:
        """Create the simulator with ``make(**size_kwargs)``, silencing its "Falling back to num_samples=4" prints."""
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise UserError(f"render_mode: expected None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        import_miniworld()
        with contextlib.redirect_stdout(io.StringIO()):
            return make(obs_width=obs_size, obs_height=obs_size, window_width=render_size, window_height=render_size,
                        render_mode=render_mode)

    def _setup(self, sim: Any, turn_step: float, move_step: float, revisit_radius: float | None,
               revisit_angle: float | None, render_mode: str | None, task: str | None = None) -> None:
        if not isinstance(sim.observation_space, spaces.Box):
            sim.shadow_window.close()
            raise UserError(
                f"{type(sim).__name__}: expected an image observation space (Box), got {sim.observation_space}; "
                "only image-observation MiniWorld envs can be wrapped"
            )
        self.sim = sim
        # Remove the step noise: with min == max, MiniWorld's sampler returns exactly the default even when
        # domain randomisation is on, so poses come back exactly after inverse actions. The simulator reads these at
        # every reset/step, so replacing them after its constructor's first reset is enough.
        params = sim.params.copy()
        params.set("forward_step", move_step)
        params.set("forward_drift", 0.0)
        params.set("turn_step", turn_step)
        sim.params = params
        self.turn_step, self.move_step = turn_step, move_step
        self.action_effects: dict[str, Any] = action_effects(turn_step, move_step)
        # Default thresholds: half a turn and half a step (see revisit_thresholds for why).
        self.revisit_radius, self.revisit_angle = revisit_thresholds(turn_step, move_step, revisit_radius, revisit_angle)
        self._tracker = RevisitTracker(self.revisit_radius, self.revisit_angle)
        self.task = task
        self._needs_reset = True
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(len(ACTION_NAMES))
        self.observation_space = sim.observation_space

    # -- the Gymnasium API ---------------------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        # New textures are uploaded during reset, into whichever GL context is current: make it ours (another env may
        # have closed its own since).
        self.sim.shadow_window.switch_to()
        obs, _ = self.sim.reset(seed=seed)  # the simulator's own np_random draws the world: same seed, same world
        self._tracker.reset()
        self._needs_reset = False
        return obs, self._info()

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not (type(action) is int and 0 <= action < 4):  # plain ints skip the general check (~1 us of ~10 us here)
            assert self.action_space.contains(action), f"{action!r} ({type(action)}) is not an action of {self.action_space}"
        if self._needs_reset:
            raise gym.error.ResetNeeded("call reset() before step(), and after an episode ends")
        # Our action ids are MiniWorld's own (turn_left=0, turn_right=1, move_forward=2, move_back=3).
        obs, reward, terminated, truncated, _ = self.sim.step(int(action))
        self._needs_reset = terminated or truncated
        info = self._info()
        if self.task == "coverage":  # replaces the simulator's reward (0 for ours, the stock task's for stock envs)
            reward = coverage_reward(info["visit_count"])
        return obs, float(reward), terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """The first-person view at ``render_size`` x ``render_size`` (for videos); see ``render_top_view`` for plots."""
        if self.render_mode is None:
            gym.logger.warn("render() called with render_mode=None: make the env with render_mode='rgb_array'")
            return None
        return self.sim.render_obs(self.sim.vis_fb)

    def render_top_view(self, render_agent: bool = True) -> np.ndarray:
        """The whole map seen from above, (render_size, render_size, 3) uint8, the agent drawn as a red triangle."""
        return self.sim.render_top_view(self.sim.vis_fb, render_agent=render_agent)

    def close(self) -> None:
        # MiniWorld's close() leaves its hidden window (a GL context with two frame buffers) open; close it too, so
        # that making and closing envs in a loop does not leak contexts. Textures live on: they are shared with
        # pyglet's own shadow window and cached for the next env.
        if self.sim is not None:
            self.sim.close()
            self.sim.shadow_window.close()
            self.sim = None

    # -- pose and revisits ---------------------------------------------------------------------------------------------

    @property
    def pose(self) -> np.ndarray:
        """(x, z, heading) float32, as in ``info["pose"]``: metres on the floor plan and radians in [-pi, pi).
        Moving forward adds ``move_step * (cos heading, -sin heading)`` to (x, z); turning left adds ``turn_step``
        (MiniWorld's conventions)."""
        return np.array(self._pose(), dtype=np.float32)

    def _pose(self) -> tuple[float, float, float]:
        x, _, z = self.sim.agent.pos
        return float(x), float(z), wrap_angle(float(self.sim.agent.dir))

    def _info(self) -> dict[str, Any]:
        x, z, heading = self._pose()
        revisit, visit_count = self._tracker.visit(x, z, heading)
        return {"pose": np.array((x, z, heading), dtype=np.float32), "revisit": revisit, "visit_count": visit_count}


class StockRevisitEnv(_MiniWorldRevisitBase, EzPickle):
    """A stock MiniWorld env (``MiniWorld-<Name>-v0``) with our 4 actions, square observations and revisit ``info``.

    Reward, termination and truncation are the stock task's (e.g. Hallway: reach the red box, 250 steps); with
    ``task="coverage"`` the reward is coverage's instead (``envs/rewards.py``), termination stays the stock task's.
    Prefer ``make_stock``, which also accepts a short ``<Name>``.
    """

    def __init__(self, env_id: str, obs_size: int = 64, turn_step: float | None = None,
                 move_step: float | None = None, revisit_radius: float | None = None,
                 revisit_angle: float | None = None, render_mode: str | None = None, render_size: int = 256,
                 task: str | None = None, **env_kwargs: Any):
        EzPickle.__init__(self, env_id, obs_size, turn_step, move_step, revisit_radius, revisit_angle, render_mode,
                          render_size, task, **env_kwargs)
        task = check_task(task, TASKS)
        obs_size = _check_int("obs_size", obs_size, 8)
        render_size = _check_int("render_size", render_size, 8)
        if turn_step is not None:
            turn_step = _check_float("turn_step", turn_step, 0.0, 180.0, "degrees")
        if move_step is not None:
            move_step = _check_float("move_step", move_step, 0.0, 10.0, "metres")
        revisit_radius, revisit_angle = _check_revisit(revisit_radius, revisit_angle)
        self.env_id = env_id = _stock_id(env_id)
        ours = {"obs_width": "obs_size", "obs_height": "obs_size", "window_width": "render_size",
                "window_height": "render_size"}
        for key in env_kwargs.keys() & ours.keys():
            raise UserError(f"{key}: set by this wrapper, pass {ours[key]}= instead")

        _check_stock_kwargs(env_id, env_kwargs)

        def make(**sizes: Any) -> Any:
            return gym.make(env_id, disable_env_checker=True, **sizes, **env_kwargs).unwrapped

        sim = self._make_sim(make, obs_size, render_size, render_mode)
        # Keep the stock env's own step sizes unless asked (15 degrees / 0.15 m for most; 45 / 0.7 for *Fast).
        turn_step = float(sim.params.params["turn_step"].default) if turn_step is None else turn_step
        move_step = float(sim.params.params["forward_step"].default) if move_step is None else move_step
        self._setup(sim, turn_step, move_step, revisit_radius, revisit_angle, render_mode, task)


def _stock_id(env_id: str) -> str:
    """Validate a stock id; ``Hallway`` is accepted for ``MiniWorld-Hallway-v0``."""
    import_miniworld()  # registers the MiniWorld-* ids
    stock = sorted(i for i in gym.registry if i.startswith("MiniWorld-"))
    if not isinstance(env_id, str):
        raise UserError(f"env_id: expected a MiniWorld id string, got {env_id!r}")
    if env_id in stock:
        return env_id
    if f"MiniWorld-{env_id}-v0" in stock:
        return f"MiniWorld-{env_id}-v0"
    raise UserError(f"env_id: {env_id!r} is not a stock MiniWorld env; expected one of {', '.join(stock)}")


def _check_stock_kwargs(env_id: str, env_kwargs: dict[str, Any]) -> None:
    """UserError listing the accepted names if the stock env's constructor does not take one of ``env_kwargs``
    (instead of a TypeError from inside MiniWorld). Stock envs pass ``**kwargs`` up to ``MiniWorldEnv``: the accepted
    names are those of every ``__init__`` up the class chain until one that takes no ``**kwargs``."""
    import inspect

    entry_point = gym.registry[env_id].entry_point
    try:
        cls = gym.envs.registration.load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
    except (ImportError, AttributeError):
        return
    accepted: set[str] = set()
    for klass in getattr(cls, "__mro__", (cls,)):
        init = klass.__dict__.get("__init__") if isinstance(klass, type) else klass
        if init is None:
            continue
        try:
            parameters = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return
        accepted |= {n for n, p in parameters.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            break
    else:
        return  # every constructor passes **kwargs on: nothing to check against
    unknown = sorted(set(env_kwargs) - accepted)
    if unknown:
        ours = "obs_size, turn_step, move_step, revisit_radius, revisit_angle, render_mode, render_size, task"
        raise UserError(f"{env_id}: no argument {', '.join(repr(n) for n in unknown)}; it accepts "
                        f"{', '.join(sorted(accepted - {'obs_width', 'obs_height', 'window_width', 'window_height'}))} "
                        f"(and this wrapper's {ours})")


def make_stock(env_id: str, **kwargs: Any) -> StockRevisitEnv:
    """Any stock MiniWorld env with our action space, observation size and ``info`` contract.

    ``kwargs``: ``obs_size`` (64), ``turn_step``/``move_step`` (default: the stock env's own, without noise),
    ``revisit_radius``/``revisit_angle`` (default: half a step / half a turn), ``render_mode``, ``render_size``,
    ``task`` (None: the stock reward; ``"coverage"``);
    anything else goes to the stock env's constructor (e.g. ``length=`` for Hallway).
    """
    return StockRevisitEnv(env_id, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Our memory env
# --------------------------------------------------------------------------------------------------------------------


class MiniWorldRevisitEnv(_MiniWorldRevisitBase, EzPickle):
    """
    ## Description

    A first-person walk through a small grid of rooms (2x2 by default) that is redrawn every episode: each room's
    wall, floor and ceiling textures, which walls have doors (a random spanning tree plus extra doors that make
    loops), where along the wall each door is, and a handful of objects (coloured boxes, balls, keys, barrels,
    cones, ...) with their places. Nothing seen in one episode says anything about the next, so when the agent comes
    back to a place, its view can only be predicted from memory of this episode: the 3D memory task of GTMM
    (Gemici et al. 2017, section 5.7). ``info`` gives the ground truth of revisits for every frame.

    ## Action Space

    ``Discrete(4)``, without noise (undoing an action returns to exactly the same pose):

    | Num | Action       | Effect                                            |
    |-----|--------------|---------------------------------------------------|
    | 0   | turn left    | heading += ``turn_step`` degrees                  |
    | 1   | turn right   | heading -= ``turn_step`` degrees                  |
    | 2   | move forward | ``move_step`` metres ahead, unless a wall/object blocks it |
    | 3   | move back    | ``move_step`` metres back, unless blocked         |

    ``env.unwrapped.inverse_actions == (1, 0, 3, 2)``; ``env.unwrapped.action_effects == {"kind": "se2", "moves":
    [[t, 0], [-t, 0], [0, move_step], [0, -move_step]], "exact": False}`` with ``t = radians(turn_step)``: what
    ``worldmodel.train --address auto`` reads from the rollout manifest (an action path integrator).

    ## Observation Space

    | Observation       | Shape                        | dtype | Min | Max |
    |-------------------|------------------------------|-------|-----|-----|
    | first-person RGB  | ``(obs_size, obs_size, 3)``  | uint8 | 0   | 255 |

    rendered directly at that size (60 degree field of view, 4x multisampled), not resized. ``info`` at ``reset``
    and every ``step``: ``pose`` float32 ``(3,)`` = (x, z, heading in [-pi, pi)); ``revisit`` bool, within
    ``revisit_radius`` metres and ``revisit_angle`` degrees of a pose earlier this episode; ``visit_count`` int, how
    many earlier steps were.

    ## Rewards

    By default (``task=None``) always 0: the env is for collecting trajectories to train world models, not a task.
    ``task="coverage"``: 1.0 for a step that reaches a place not visited earlier this episode (``visit_count == 0``,
    a pose beyond ``revisit_radius`` / ``revisit_angle`` of every earlier one: turning to face a new direction counts),
    else 0; the reset frame is not rewarded (``envs/rewards.py``).

    ## Starting State

    The agent stands at a uniformly random free place of a random room, facing a uniformly random direction.

    ## Episode End

    No termination. Truncation after ``max_steps`` steps (256 by default: long enough to leave a room and come back),
    counted by the simulator. The registered spec's ``max_episode_steps`` is 256 too, so ``gym.make``'s ``TimeLimit``
    ends the episode on the same step; when the two differ the earlier one wins (``envs.make("miniworld",
    max_steps=N)`` passes ``max_episode_steps=N`` along, so ``max_steps`` alone decides).

    ## Arguments

    ```python
    import envs, gymnasium as gym
    env = gym.make("MiniWorldRevisit-v0", obs_size=64, num_rows=2, num_cols=2, room_size=4.0, num_objects=6,
                   turn_step=30.0, move_step=0.4, max_steps=256, revisit_radius=None, revisit_angle=None,
                   render_mode=None, render_size=256, task=None)
    ```

    - ``obs_size``: side of the square observation, in pixels.
    - ``num_rows``, ``num_cols``, ``room_size``: the grid of square rooms, and their side in metres.
    - ``num_objects``: objects scattered over the rooms.
    - ``turn_step`` (degrees), ``move_step`` (metres): the action sizes.
    - ``max_steps``: truncation.
    - ``revisit_radius`` (metres), ``revisit_angle`` (degrees): revisit thresholds, by default half a step and half
      a turn (see ``_MiniWorldRevisitBase._setup`` for why).
    - ``render_mode``: ``None`` or ``"rgb_array"`` (``render()`` gives the first-person view at ``render_size``);
      ``render_top_view()`` gives the map from above in any mode.
    - ``task``: ``None`` (no reward) or ``"coverage"`` (see Rewards); recorded with the other kwargs in a manifest.

    ## Version History

    - v0: initial version; the opt-in ``task`` added later (without it, the same episodes).
    """

    def __init__(self, obs_size: int = 64, num_rows: int = 2, num_cols: int = 2, room_size: float = 4.0,
                 num_objects: int = 6, turn_step: float = 30.0, move_step: float = 0.4, max_steps: int = 256,
                 revisit_radius: float | None = None, revisit_angle: float | None = None,
                 render_mode: str | None = None, render_size: int = 256, task: str | None = None):
        EzPickle.__init__(self, obs_size, num_rows, num_cols, room_size, num_objects, turn_step, move_step, max_steps,
                          revisit_radius, revisit_angle, render_mode, render_size, task)
        task = check_task(task, TASKS)
        obs_size = _check_int("obs_size", obs_size, 8)
        render_size = _check_int("render_size", render_size, 8)
        layout = dict(
            num_rows=_check_int("num_rows", num_rows, 1),
            num_cols=_check_int("num_cols", num_cols, 1),
            # The agent (radius 0.4 m) must fit through a door with margin on both sides of it.
            room_size=_check_float("room_size", room_size, 2.0, 50.0, "metres"),
            num_objects=_check_int("num_objects", num_objects, 0),
        )
        turn_step = _check_float("turn_step", turn_step, 0.0, 180.0, "degrees")
        move_step = _check_float("move_step", move_step, 0.0, 0.5 * layout["room_size"], "metres")
        max_steps = _check_int("max_steps", max_steps, 1)
        revisit_radius, revisit_angle = _check_revisit(revisit_radius, revisit_angle)
        # Objects are placed by rejection sampling, which never ends if they cannot fit: allow about one per 2 m^2.
        if layout["num_objects"] > 2 * layout["num_rows"] * layout["num_cols"] * (layout["room_size"] // 2) ** 2:
            raise UserError(f"num_objects: {num_objects} will not fit in {num_rows}x{num_cols} rooms of {room_size} m")
        world_cls = _revisit_world_class()
        sim = self._make_sim(lambda **sizes: world_cls(max_episode_steps=max_steps, **layout, **sizes),
                             obs_size, render_size, render_mode)
        self.max_steps = max_steps
        self._setup(sim, turn_step, move_step, revisit_radius, revisit_angle, render_mode, task)


_REVISIT_WORLD: type | None = None


def _revisit_world_class() -> type:
    """The MiniWorld simulator of ``MiniWorldRevisitEnv``; defined on first use since subclassing ``MiniWorldEnv``
    needs ``import miniworld``, which opens a GL context."""
    global _REVISIT_WORLD
    if _REVISIT_WORLD is not None:
        return _REVISIT_WORLD
    miniworld = import_miniworld()
    from miniworld.entity import COLOR_NAMES, Box, MeshEnt
    from miniworld.miniworld import MiniWorldEnv

    class StaticBox(Box):
        @property
        def is_static(self) -> bool:
            return True

    class RevisitWorld(MiniWorldEnv):
        """Rooms, doors, textures and objects drawn from ``self.np_random`` at every reset."""

        def __init__(self, num_rows: int, num_cols: int, room_size: float, num_objects: int, **kwargs: Any):
            self.num_rows, self.num_cols, self.room_size, self.num_objects = num_rows, num_cols, room_size, num_objects
            # Our own copy of the parameters: _setup replaces the step sizes, other envs keep theirs.
            super().__init__(params=miniworld.params.DEFAULT_PARAMS.no_random(), **kwargs)

        def _gen_world(self) -> None:
            rng = self.np_random
            rows, cols, size = self.num_rows, self.num_cols, self.room_size
            num_rooms = rows * cols
            # Different wall textures for different rooms whenever the palette allows: each room is a distinct place.
            walls = rng.choice(len(WALL_TEXTURES), size=num_rooms, replace=num_rooms > len(WALL_TEXTURES))
            rooms = {}
            for k, (j, i) in enumerate((j, i) for j in range(rows) for i in range(cols)):
                min_x, min_z = i * (size + GAP), j * (size + GAP)
                rooms[j, i] = self.add_rect_room(
                    min_x=min_x, max_x=min_x + size, min_z=min_z, max_z=min_z + size,
                    wall_tex=WALL_TEXTURES[walls[k]],
                    floor_tex=FLOOR_TEXTURES[rng.integers(len(FLOOR_TEXTURES))],
                    ceil_tex=CEILING_TEXTURES[rng.integers(len(CEILING_TEXTURES))],
                )
            for (j, i), (nj, ni) in self._doors(rng):
                room, neighbour = rooms[j, i], rooms[nj, ni]
                # A 1.2 m door (agent: 0.8 m wide) at a random place along the wall, 0.3 m clear of each corner.
                half = 0.6
                centre = rng.uniform(0.3 + half, size - 0.3 - half)
                if nj == j:  # neighbours along x: the door spans z
                    self.connect_rooms(room, neighbour, min_z=room.min_z + centre - half, max_z=room.min_z + centre + half)
                else:  # neighbours along z: the door spans x
                    self.connect_rooms(room, neighbour, min_x=room.min_x + centre - half, max_x=room.min_x + centre + half)
            for _ in range(self.num_objects):
                self.place_entity(self._random_object(rng))
            self.place_agent()

        def _doors(self, rng: np.random.Generator) -> list[tuple[tuple[int, int], tuple[int, int]]]:
            """Pairs of neighbouring rooms joined by a door: a random spanning tree (randomised depth-first search, as
            MiniWorld's Maze) so every room is reachable, plus each other wall with probability EXTRA_DOOR_PROB."""
            rows, cols = self.num_rows, self.num_cols
            tree, seen, stack = [], {(0, 0)}, [(0, 0)]
            while stack:
                j, i = stack[-1]
                options = [(j + dj, i + di) for dj, di in ((0, 1), (0, -1), (1, 0), (-1, 0))
                           if 0 <= j + dj < rows and 0 <= i + di < cols and (j + dj, i + di) not in seen]
                if not options:
                    stack.pop()
                    continue
                nxt = options[rng.integers(len(options))]
                tree.append(((j, i), nxt))
                seen.add(nxt)
                stack.append(nxt)
            in_tree = {frozenset(pair) for pair in tree}
            others = [((j, i), (j + dj, i + di)) for j in range(rows) for i in range(cols) for dj, di in ((0, 1), (1, 0))
                      if j + dj < rows and i + di < cols and frozenset(((j, i), (j + dj, i + di))) not in in_tree]
            extra = [pair for pair in others if rng.random() < EXTRA_DOOR_PROB]
            return tree + extra

        @staticmethod
        def _random_object(rng: np.random.Generator) -> Any:
            mesh, height = OBJECT_KINDS[rng.integers(len(OBJECT_KINDS))]
            color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
            # Static objects go into the display list compiled once per episode, instead of being re-sent to GL by
            # Python every frame (nothing here moves: there is no pick-up action).
            if mesh == "box":
                return StaticBox(color=color, size=float(rng.uniform(0.5, 0.9)))
            return MeshEnt(mesh_name=mesh.format(color=color), height=height, static=True)

    _REVISIT_WORLD = RevisitWorld
    return RevisitWorld
