"""A window moved over a map of MNIST digits: the navigation task of GTMM (Gemici et al. 2017, Section 5.6).

One place for the dynamics (STYLE rule 5): ``MnistMapCore`` holds the state of N maps as numpy arrays and is the only
code that draws maps, moves windows and counts visits. ``MnistMapEnv`` is its N=1 case, ``MnistMapVectorEnv`` its
batched case, so a vector env seeded ``s`` walks exactly like N single envs seeded ``s, s+1, ...``.

Positions live on a lattice so that places really repeat: the window's top-left pixel is ``lattice_index * unit``
per axis, where
- ``border="clip"``: ``unit = step`` and the index runs over ``0 .. (map - window) // step``; a move that would leave
  the map is blocked (the window stays where it is).
- ``border="wrap"``: the map is a torus, ``unit = gcd(step, map)`` and the index runs over ``0 .. map // unit - 1``;
  a move adds ``step // unit`` indices modulo that count, and windows that cross an edge show the opposite side.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from numpy.lib.stride_tricks import sliding_window_view

from gtmm.cli import UserError
from envs.digits import SPLITS, load_digits
from envs.rewards import FindDigitTask, check_task, coverage_reward, goal_cells

ACTION_NAMES = ("up", "down", "left", "right", "stay")
# (d_row, d_col) in lattice moves for each action, indexed by the action id.
ACTION_DELTAS = np.array([[-1, 0], [1, 0], [0, -1], [0, 1], [0, 0]], dtype=np.int64)
INVERSE_ACTIONS = (1, 0, 3, 2, 4)  # up<->down, left<->right, stay->stay
STAY = 4
BORDERS = ("clip", "wrap")
POSE_DIM = 2
TASKS = ("coverage", "find_digit")  # reward tasks of this env (envs/rewards.py); None = reward-free


# --------------------------------------------------------------------------------------------------------------------
# Geometry: the lattice of window positions, shared by every env of a batch


@dataclass(frozen=True)
class MapGeometry:
    """Sizes of the map and its lattice of window positions (see the module docstring)."""

    grid: int
    digit_shape: tuple[int, int]
    window: int
    step: int
    border: str

    @property
    def map_shape(self) -> tuple[int, int]:
        """(height, width) of the whole map in pixels: ``grid`` digits along each side."""
        return self.grid * self.digit_shape[0], self.grid * self.digit_shape[1]

    @property
    def unit(self) -> np.ndarray:
        """Pixels per lattice index, per axis (2,)."""
        if self.border == "clip":
            return np.array([self.step, self.step], dtype=np.int64)
        return np.array([math.gcd(self.step, size) for size in self.map_shape], dtype=np.int64)

    @property
    def lattice_shape(self) -> tuple[int, int]:
        """Number of window positions per axis."""
        if self.border == "clip":
            return tuple((size - self.window) // self.step + 1 for size in self.map_shape)  # type: ignore[return-value]
        return tuple(size // int(u) for size, u in zip(self.map_shape, self.unit))  # type: ignore[return-value]

    @property
    def stride(self) -> np.ndarray:
        """Lattice indices per move, per axis (2,)."""
        return self.step // self.unit

    @property
    def extent(self) -> tuple[int, int]:
        """The window corner's range per axis in pixels, [0, map - window] (the pose's range under ``clip``)."""
        return self.map_shape[0] - self.window, self.map_shape[1] - self.window

    @property
    def n_positions(self) -> int:
        """Number of places the window can stand at (the lattice's rows times columns)."""
        return self.lattice_shape[0] * self.lattice_shape[1]

    def validate(self, n_digits: int) -> None:
        """UserError naming the first bad parameter: its type, then its value against the map it moves on.

        Every step size the lattice cannot use is refused rather than silently accepted: under ``clip`` a step
        larger than ``map - window`` leaves a single position (the window never moves); under ``wrap`` a step of a
        whole map side goes around the torus back to where it was, and one of more than half a side lands where
        ``side - step`` the other way would (the window moves the wrong way)."""
        for name in ("grid", "window", "step"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise UserError(f"MnistMap: {name} must be an int, got {value!r} ({type(value).__name__})")
        if self.grid < 1:
            raise UserError(f"MnistMap: grid must be an int >= 1 (digits per map side), got {self.grid!r}")
        if self.step <= 0:
            raise UserError(f"MnistMap: step must be an int > 0 (pixels per move), got {self.step!r}")
        if self.window <= 0:
            raise UserError(f"MnistMap: window must be an int > 0 (pixels per side), got {self.window!r}")
        if not isinstance(self.border, str) or self.border not in BORDERS:
            raise UserError(f"MnistMap: unknown border mode {self.border!r}: expected one of {BORDERS}")
        Hm, Wm = self.map_shape
        where = f"the map {Hm}x{Wm} (grid {self.grid} x digits {self.digit_shape[0]}x{self.digit_shape[1]})"
        if self.window > min(self.map_shape):
            raise UserError(f"MnistMap: window {self.window} is larger than {where}: use a smaller window or a larger grid")
        if self.grid * self.grid > n_digits:
            raise UserError(f"MnistMap: a {self.grid}x{self.grid} map needs {self.grid**2} distinct digits, the digit set has {n_digits}")
        for side in sorted(set(self.map_shape)):
            if self.border == "clip":
                room = side - self.window  # pixels the window can travel along this axis
                if room == 0:
                    raise UserError(f"MnistMap: window {self.window} fills {where} under border 'clip': it can never "
                                    "move; use a smaller window, a larger grid or border 'wrap'")
                if self.step > room:
                    raise UserError(f"MnistMap: step {self.step} is larger than the {room} px the window {self.window} "
                                    f"can travel on {where} under border 'clip': it would never move; "
                                    f"expected step <= {room}")
            elif self.step >= side:
                raise UserError(f"MnistMap: step {self.step} is a whole side of {where} or more: under border 'wrap' a "
                                f"move goes around the torus and the window never moves; expected step <= {side // 2}")
            elif 2 * self.step > side:
                raise UserError(f"MnistMap: step {self.step} is more than half a side of {where}: under border 'wrap' "
                                f"it lands where {side - self.step} px the other way would (the window moves the "
                                f"wrong way); expected step <= {side // 2}")


def action_effects(step: int, n_actions: int, border: str, extent: Sequence[int] | None = None,
                   map_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """What each action does to the pose, as the env contract's ``action_effects`` (``envs/__init__.py``):
    ``{"kind": "translate", "moves": [[d_row, d_col], ...], "exact": border == "wrap"}``, one move per action in
    pixels (the pose's unit), ``[0, 0]`` for stay. Under ``clip`` a move into the border is blocked, so the moves are
    not exact there: a path integrator over actions alone drifts at the edges (``worldmodel`` reads this to choose
    its address, ``--address auto``). Under ``clip``, ``extent`` (map side minus window, per axis: the pose runs
    over [0, extent]) is declared too: where the edges are, for an address that reasons about them. Under ``wrap``,
    ``period`` (the map's side per axis, given ``map_shape``): the pose wraps there, a move across the seam shows
    as a jump of a side less a step (``worldmodel.path`` unwraps it)."""
    moves = (ACTION_DELTAS[:n_actions] * int(step)).tolist()  # (A, 2) lattice deltas times pixels per move
    effects: dict[str, Any] = {"kind": "translate", "moves": moves, "exact": border == "wrap"}
    if border == "clip" and extent is not None:
        effects["extent"] = [int(e) for e in extent]
    if border == "wrap" and map_shape is not None:
        effects["period"] = [int(m) for m in map_shape]
    return effects


# --------------------------------------------------------------------------------------------------------------------
# The dynamics: pure numpy functions on batches, the only place where maps are drawn and windows move


def draw_uniforms(rng: np.random.Generator, geometry: MapGeometry) -> np.ndarray:
    """All random numbers of one episode from one env's generator, in a single call: (grid*grid + 2,) in [0, 1).

    One call per env keeps batched resets cheap, and ``episode_from_uniforms`` turns a whole batch of them into
    maps and starts at once; the single env goes through the same two functions.
    """
    return rng.random(geometry.grid * geometry.grid + 2)


def sample_without_replacement(uniforms: np.ndarray, n: int) -> np.ndarray:
    """Distinct ids in ``0..n-1`` from uniforms (M, k), k <= n: id j is the ``floor(u_j * (n - j))``-th smallest id not
    yet chosen (sequential sampling without replacement, so every k-subset and order is equally likely)."""
    M, k = uniforms.shape
    ids = np.empty((M, k), dtype=np.int64)
    for j in range(k):
        rank = np.minimum((uniforms[:, j] * (n - j)).astype(np.int64), n - j - 1)  # (M,) guard u*(n-j) rounding to n-j
        for chosen in np.sort(ids[:, :j], axis=1).T:  # ascending: skip every chosen id at or below the rank
            rank += chosen <= rank
        ids[:, j] = rank
    return ids


def episode_from_uniforms(uniforms: np.ndarray, n_digits: int, geometry: MapGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Uniforms (M, grid*grid + 2) -> digit ids (M, grid*grid) and start position ids (M,).

    Digits are drawn without replacement so that no image appears twice on a map: a revisit is then a return to a
    place, never a look-alike elsewhere. The start is uniform over the lattice.
    """
    k = geometry.grid * geometry.grid
    digit_ids = sample_without_replacement(uniforms[:, :k], n_digits)  # (M, k)
    n_rows, n_cols = geometry.lattice_shape
    start_row = np.minimum((uniforms[:, k] * n_rows).astype(np.int64), n_rows - 1)  # (M,)
    start_col = np.minimum((uniforms[:, k + 1] * n_cols).astype(np.int64), n_cols - 1)  # (M,)
    return digit_ids, start_row * n_cols + start_col


def assemble_maps(digits: np.ndarray, digit_ids: np.ndarray, grid: int) -> np.ndarray:
    """Tile digits (D, h, w) picked by ``digit_ids`` (M, grid*grid), row-major, into maps (M, grid*h, grid*w)."""
    M = digit_ids.shape[0]
    h, w = digits.shape[1:]
    tiles = digits[digit_ids].reshape(M, grid, grid, h, w)  # (M, grid_row, grid_col, h, w)
    return tiles.transpose(0, 1, 3, 2, 4).reshape(M, grid * h, grid * w)  # (M, Hm, Wm)


def pad_maps(maps: np.ndarray, geometry: MapGeometry) -> np.ndarray:
    """Maps (M, Hm, Wm) -> the array windows are cut from: itself for ``clip``; for ``wrap``, the map extended by
    its own first ``window - 1`` rows and columns, so that a window crossing an edge is a plain slice."""
    if geometry.border == "clip":
        return maps
    extra = geometry.window - 1
    return np.pad(maps, ((0, 0), (0, extra), (0, extra)), mode="wrap")  # (M, Hm + w - 1, Wm + w - 1)


def move(lattice: np.ndarray, actions: np.ndarray, geometry: MapGeometry) -> np.ndarray:
    """The motion model: lattice indices (N, 2) after ``actions`` (N,), blocked at the border (``clip``) or around
    the torus (``wrap``)."""
    target = lattice + ACTION_DELTAS[actions] * geometry.stride  # (N, 2)
    n = np.asarray(geometry.lattice_shape)
    if geometry.border == "clip":
        return np.clip(target, 0, n - 1)
    return target % n


def count_visits(visits: np.ndarray, rows: np.ndarray, position: np.ndarray) -> np.ndarray:
    """The revisit rule of the map: a place is a lattice position. Record walks ``rows`` (M,) at position ids
    ``position`` (M,) in the visit table ``visits`` (N, P) (in place) and return how many earlier steps of their
    episodes stood there (M,): 0 on a first visit. Used by the env and by dreams (``LatticeOdometry``)."""
    visit_count = visits[rows, position]  # (M,) a copy: the count *before* this step
    visits[rows, position] = visit_count + 1
    return visit_count


def transition_table(geometry: MapGeometry) -> np.ndarray:
    """``move`` tabulated once: next position id (P, A) for every position id and action, so that a batched step is
    a single gather. Position id = row_index * n_cols + col_index."""
    n_rows, n_cols = geometry.lattice_shape
    P, A = n_rows * n_cols, len(ACTION_DELTAS)
    lattice = np.stack(np.divmod(np.repeat(np.arange(P), A), n_cols), axis=1)  # (P*A, 2), row-major ids
    target = move(lattice, np.tile(np.arange(A), P), geometry)  # (P*A, 2)
    return (target[:, 0] * n_cols + target[:, 1]).reshape(P, A)


def position_pixels(geometry: MapGeometry) -> np.ndarray:
    """(P, 2) top-left (row, col) in map pixels of every position id."""
    n_rows, n_cols = geometry.lattice_shape
    lattice = np.stack(np.divmod(np.arange(n_rows * n_cols), n_cols), axis=1)  # (P, 2)
    return lattice * geometry.unit


def crop(windows: np.ndarray, env_ids: np.ndarray, pixel: np.ndarray) -> np.ndarray:
    """Gather windows: ``windows`` is the (N, Hp-w+1, Wp-w+1, w, w) sliding view, ``env_ids`` (M,) the maps to cut
    from, ``pixel`` (M, ..., 2) the top-left corners; one fancy index, a single copy -> (M, ..., w, w).
    (Never ``windows[env_ids]`` first: that would materialise every window of those maps.)"""
    env = env_ids.reshape((-1,) + (1,) * (pixel.ndim - 2))  # (M, 1, ...) broadcasts against pixel[..., 0]
    return windows[env, pixel[..., 0], pixel[..., 1]]


# Cutting 28x28 windows out of a strided view copies 28 bytes at a time; when every window of every lattice position
# fits in this many bytes, each reset cuts them all once into a contiguous (N, P, w, w) array and a step copies whole
# windows from it (several times faster). Otherwise steps crop from the view directly. Both give identical frames.
WINDOW_CACHE_BYTES = 512 * 2**20


class MnistMapCore:
    """State of ``num_envs`` MNIST maps and their windows, as arrays with a leading env axis.

    Both env classes drive this object and nothing else touches the state. Randomness comes from the generators
    the caller passes to ``reset`` (one per env), so batching never changes what a given seed does.
    """

    def __init__(self, num_envs: int, geometry: MapGeometry, split: str, source: str, max_steps: int,
                 task: str | None = None):
        self.task = check_task(task, TASKS)
        if not isinstance(split, str) or split not in SPLITS:
            raise UserError(f"MnistMap: unknown split {split!r}: expected one of {SPLITS}")
        if not isinstance(source, str):
            raise UserError(f"MnistMap: source must be a string ('mnist5k', 'fashion' or a folder), got {source!r}")
        for name, value in (("max_steps", max_steps), ("num_envs", num_envs)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
                raise UserError(f"MnistMap: {name} must be an int >= 1, got {value!r}")
        self.num_envs, self.split, self.source, self.max_steps = int(num_envs), split, str(source), int(max_steps)
        self.digits, self.labels = load_digits(split, source)
        self.geometry = MapGeometry(geometry.grid, tuple(self.digits.shape[1:]), geometry.window, geometry.step, geometry.border)
        self.geometry.validate(len(self.digits))
        N, (Hm, Wm) = self.num_envs, self.geometry.map_shape
        self.next_position = transition_table(self.geometry)  # (P, A)
        self.position_pixels = position_pixels(self.geometry)  # (P, 2)
        self.maps = np.zeros((N, Hm, Wm), dtype=np.uint8)  # (N, Hm, Wm)
        self.digit_ids = np.zeros((N, self.geometry.grid**2), dtype=np.int64)  # (N, grid*grid) rows of the digit set
        self.position = np.zeros(N, dtype=np.int64)  # (N,) position id of each window
        self.visits = np.zeros((N, self.geometry.n_positions), dtype=np.int32)  # (N, P) visits this episode
        self.steps = np.zeros(N, dtype=np.int64)  # (N,) steps taken this episode
        self._arange = np.arange(N)
        P, w = self.geometry.n_positions, self.geometry.window
        # Only worth it when an episode is long enough to look at a position more than once on average.
        self.use_window_cache = N * P * w * w <= WINDOW_CACHE_BYTES and P <= max_steps
        self._build_windows()
        self.goal: FindDigitTask | None = None
        if self.task == "find_digit":
            cells = goal_cells(self.position_pixels, w, self.geometry.digit_shape, self.geometry.grid, self.geometry.border)
            self.goal = FindDigitTask(N, cells)

    def _build_windows(self) -> None:
        """The derived arrays windows are read from: the padded maps, their sliding view, the window cache."""
        self.padded = pad_maps(self.maps, self.geometry) if self.geometry.border == "wrap" else self.maps
        w = self.geometry.window
        self.windows = sliding_window_view(self.padded, (w, w), axis=(1, 2))  # (N, Hp-w+1, Wp-w+1, w, w), a view
        self.window_cache = None
        if self.use_window_cache:
            self.window_cache = self._cut_all_windows(self._arange)  # (N, P, w, w)

    def _cut_all_windows(self, env_ids: np.ndarray) -> np.ndarray:
        """(M, P, w, w): the window at every position of the maps ``env_ids``."""
        pixel = np.broadcast_to(self.position_pixels, (len(env_ids),) + self.position_pixels.shape)  # (M, P, 2)
        return crop(self.windows, env_ids, pixel)

    # Derived arrays and the shared digit set are not state: rebuild them instead of pickling copies.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("digits", "labels", "padded", "windows", "window_cache"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.digits, self.labels = load_digits(self.split, self.source)
        self._build_windows()

    @property
    def pixel(self) -> np.ndarray:
        """(N, 2) top-left (row, col) of each window in map pixels."""
        return self.position_pixels[self.position]

    def reset(self, env_ids: np.ndarray, rngs: Sequence[np.random.Generator]) -> None:
        """Start a new episode in envs ``env_ids`` (M,): a fresh map and start from each env's own generator."""
        env_ids = np.asarray(env_ids, dtype=np.int64)
        uniforms = np.stack([draw_uniforms(rng, self.geometry) for rng in rngs])  # (M, grid*grid + 2)
        digit_ids, start = episode_from_uniforms(uniforms, len(self.digits), self.geometry)
        self.digit_ids[env_ids] = digit_ids
        self.position[env_ids] = start
        maps = assemble_maps(self.digits, digit_ids, self.geometry.grid)  # (M, Hm, Wm)
        self.maps[env_ids] = maps
        if self.geometry.border == "wrap":
            self.padded[env_ids] = pad_maps(maps, self.geometry)
        if self.window_cache is not None:
            self.window_cache[env_ids] = self._cut_all_windows(env_ids)
        self.steps[env_ids] = 0
        self.visits[env_ids] = 0
        self.visits[env_ids, start] = 1  # the first observation is a visit: coming back to it is a revisit
        if self.goal is not None:  # after the map's draws: the default task-free env draws exactly what it always did
            self.goal.reset(env_ids, rngs, self.labels[digit_ids], start)

    def step(self, actions: np.ndarray) -> np.ndarray:
        """Move every window by ``actions`` (N,); returns each new position's earlier visits this episode (N,)."""
        self.position = self.next_position[self.position, actions]  # (N,)
        visit_count = count_visits(self.visits, self._arange, self.position)
        self.steps += 1
        return visit_count

    def rewards(self, visit_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reward (N,) float32 and terminated (N,) bool of the step that just led to ``visit_count`` (N,), by the
        task (``envs/rewards.py``): zeros and never terminated without one."""
        if self.task == "coverage":
            return coverage_reward(visit_count), np.zeros(self.num_envs, dtype=bool)
        if self.goal is not None:
            return self.goal.step(self.position)
        return np.zeros(self.num_envs, dtype=np.float32), np.zeros(self.num_envs, dtype=bool)

    def observe(self) -> np.ndarray:
        """(N, w, w, 1) uint8: the window under each agent."""
        if self.window_cache is not None:
            return self.window_cache[self._arange, self.position][..., None]  # whole contiguous windows
        return crop(self.windows, self._arange, self.pixel)[..., None]


# --------------------------------------------------------------------------------------------------------------------
# Dead reckoning: where a walk is from its actions alone (for dreams of this env, worldmodel/dream.py)


def map_geometry(env_kwargs: dict[str, Any]) -> MapGeometry:
    """The geometry of the maps an env made with ``env_kwargs`` walks on (absent kwargs take the env's defaults),
    without drawing a map: the digits of the built-in sources (``mnist5k``, ``fashion``) are 28x28 by their format, so
    no digit file is read for them (a GPU machine that dreams from a rollout folder need not have them); a folder's
    digits are read for their size."""
    defaults = {name: p.default for name, p in inspect.signature(MnistMapEnv.__init__).parameters.items()
                if p.default is not p.empty}
    kw = {**defaults, **env_kwargs}
    source = str(kw["source"])
    digit_shape = (28, 28) if source in ("mnist5k", "fashion") else tuple(load_digits(kw["split"], source)[0].shape[1:])
    geometry = MapGeometry(kw["grid"], digit_shape, kw["window"], kw["step"], kw["border"])  # type: ignore[arg-type]
    geometry.validate(geometry.grid**2)
    return geometry


class LatticeOdometry:
    """Dead reckoning on the map for ``num_envs`` walks, with no map and no frame: poses from the declared
    ``action_effects`` (kind ``translate``), visits by the env's own rule (``count_visits`` on lattice positions).
    What a dream of this env uses to know where it is once its actions leave the recorded episode.

    A move adds its ``[d_row, d_col]`` (pixels) to the pose; under ``clip`` the pose is clamped to the lattice's
    last position, which is exactly the env's blocked move (every move is one lattice step), and under ``wrap`` it is
    taken modulo the map size (the torus). So on the MNIST map the integrated pose is the real one, in both modes.
    """

    knows_blocked_moves = True  # the clamp at a clip border IS the env's blocked move: a dream may trust it

    def __init__(self, num_envs: int, geometry: MapGeometry, action_effects: dict[str, Any]):
        moves = np.asarray(action_effects["moves"], dtype=np.float64)  # (A, 2) pixels
        if action_effects.get("kind") != "translate" or moves.ndim != 2 or moves.shape[1] != POSE_DIM:
            raise ValueError(f"LatticeOdometry: expected translate action effects with [d_row, d_col] moves, "
                             f"got {action_effects}")
        self.geometry, self.moves = geometry, moves
        self.unit = geometry.unit.astype(np.float64)  # (2,) pixels per lattice index
        self.n_cols = geometry.lattice_shape[1]
        self.high = (np.asarray(geometry.lattice_shape) - 1) * self.unit  # (2,) the last position's pixels (clip)
        self.period = np.asarray(geometry.map_shape, dtype=np.float64)  # (2,) the torus (wrap)
        self.visits = np.zeros((num_envs, geometry.n_positions), dtype=np.int32)  # (N, P) visits this episode

    def integrate(self, pose: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Poses (N, 2) (top-left row, col in pixels) after ``actions`` (N,), float64."""
        target = pose + self.moves[actions]  # (N, 2)
        if self.geometry.border == "clip":
            return np.clip(target, 0.0, self.high)
        return target % self.period

    def reset(self, rows: np.ndarray) -> None:
        """Forget the walks ``rows``' visits (a new episode)."""
        self.visits[rows] = 0

    def visit(self, pose: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Record poses (M, 2) of walks ``rows`` (M,); their visit counts (M,) int64 (earlier steps at that place)."""
        lattice = np.rint(pose / self.unit).astype(np.int64)  # (M, 2) exact: poses are lattice pixels
        return count_visits(self.visits, rows, lattice[:, 0] * self.n_cols + lattice[:, 1]).astype(np.int64)


def _check_render_mode(render_mode: str | None, allowed: Sequence[str]) -> None:
    if render_mode is not None and render_mode not in allowed:
        raise UserError(f"MnistMap: unknown render_mode {render_mode!r}: expected None or one of {tuple(allowed)}")


def _check_allow_stay(allow_stay: Any) -> bool:
    # bool("no") is True: only a real boolean (or numpy's) says whether to add the stay action
    if not isinstance(allow_stay, (bool, np.bool_)):
        raise UserError(f"MnistMap: allow_stay must be true or false, got {allow_stay!r}")
    return bool(allow_stay)


def render_map(map_: np.ndarray, path: np.ndarray, window: int, step: int, border: str, scale: int = 4) -> np.ndarray:
    """RGB (Hm*scale, Wm*scale, 3) uint8: the map in grey, the path of window centres so far in orange, the current
    window (``path[-1]``, top-left (row, col)) outlined in green; with ``wrap`` the outline continues across edges."""
    import cv2  # only needed for rendering

    Hm, Wm = map_.shape
    frame = np.repeat(np.repeat(map_, scale, axis=0), scale, axis=1)
    frame = np.ascontiguousarray(np.stack([frame // 2] * 3, axis=-1))  # dim the digits so the overlay stands out
    centre = (np.asarray(path, dtype=np.int64) + window / 2) * scale  # (T, 2) (row, col)
    for (r0, c0), (r1, c1) in zip(centre[:-1], centre[1:]):
        if abs(r1 - r0) <= step * scale and abs(c1 - c0) <= step * scale:  # skip the jumps of a wrap
            cv2.line(frame, (int(c0), int(r0)), (int(c1), int(r1)), (255, 140, 0), max(1, scale // 2))
    for r, c in centre:
        cv2.circle(frame, (int(c), int(r)), max(1, scale), (255, 140, 0), -1)
    top, left = (int(v) for v in path[-1])
    # Under wrap a window may cross the edges: draw it also shifted by one map size, cv2 clips what falls outside.
    shifts = [(0, 0)] if border == "clip" else [(0, 0), (-Hm, 0), (0, -Wm), (-Hm, -Wm)]
    for dr, dc in shifts:
        r, c = (top + dr) * scale, (left + dc) * scale
        cv2.rectangle(frame, (c, r), (c + window * scale - 1, r + window * scale - 1), (0, 255, 0), max(1, scale // 2))
    return frame


# --------------------------------------------------------------------------------------------------------------------
# The Gymnasium env (N = 1) and the batched vector env


class MnistMapEnv(gym.Env[np.ndarray, int]):
    """
    ## Description

    Experiment 5.6 of *Generative Temporal Models with Memory* (Gemici et al. 2017): an agent looks at a large map
    made of MNIST digits through a small window and moves that window around. A new map is drawn from the digit set
    at every reset, so a model can only predict what it will see at a place it has already visited this episode by
    remembering it. Every step reports whether the window is back at an earlier position (``info["revisit"]``).

    The map is ``grid`` x ``grid`` digits (3x3 -> 84x84 pixels by default), drawn without replacement from the
    train digits (``split="train"``) or the held-out test digits (``split="test"``).

    ## Action Space

    ``Discrete(4)``, or ``Discrete(5)`` with ``allow_stay=True``; each move shifts the window by ``step`` pixels:

    | Num | Action | Inverse |
    |-----|--------|---------|
    | 0   | up     | 1       |
    | 1   | down   | 0       |
    | 2   | left   | 3       |
    | 3   | right  | 2       |
    | 4   | stay   | 4       |

    With ``border="clip"`` a move that would leave the map is blocked; with ``border="wrap"`` the map is a torus.
    ``env.unwrapped.inverse_actions[a]`` undoes ``a`` (except a move blocked at a ``clip`` border).
    ``env.unwrapped.action_effects`` says the same for programs (the contract in ``envs/__init__.py``):
    ``{"kind": "translate", "moves": [[-step, 0], [step, 0], [0, -step], [0, step](, [0, 0])], "exact": border ==
    "wrap"}``, each move a ``(d_row, d_col)`` change of the pose in pixels; ``exact`` is False under ``clip``, where a
    move into the border is blocked. ``worldmodel.train --address auto`` reads it (recorded in the rollout manifest)
    and gives models of these maps an additive path integrator over the actions.

    ## Observation Space

    The window under the agent, ``Box(0, 255, (window, window, 1), uint8)``:

    | Index         | Observation                                                          | Min | Max |
    |---------------|----------------------------------------------------------------------|-----|-----|
    | ``[r, c, 0]`` | grey level of map pixel ``pose + (r, c)`` (modulo the map size under wrap) | 0   | 255 |

    ``info`` at reset and every step:

    | Key             | Type         | Meaning                                                           |
    |-----------------|--------------|-------------------------------------------------------------------|
    | ``pose``        | float32 (2,) | (row, col) of the window's top-left pixel in the map              |
    | ``visit_count`` | int          | earlier steps of this episode at this position (0 = first visit)  |
    | ``revisit``     | bool         | ``visit_count > 0``                                               |
    | ``target``      | int          | only with ``task="find_digit"``: the digit class to find          |

    Positions lie on a lattice (multiples of ``step`` under clip, of ``gcd(step, map size)`` under wrap). Under clip,
    if ``map - window`` is not a multiple of ``step``, the last few rows/columns of the map are never shown.

    ## Rewards

    By default (``task=None``) always 0: this is a world-model task, the signal to learn is the observation stream,
    not a return. A reward task is opt-in (``envs/rewards.py``); it draws nothing from the generator unless chosen, so
    task-free episodes stay exactly as they were:

    | ``task``         | reward of a step                                                                  |
    |------------------|-----------------------------------------------------------------------------------|
    | ``"coverage"``   | 1.0 if the window reaches a lattice position not visited earlier this episode (``visit_count == 0``), else 0 |
    | ``"find_digit"`` | 1.0 if the window is now centred on a cell holding the class ``info["target"]``, else 0 (no step cost) |

    "Centred on a cell" (``envs.rewards.goal_cells``): the window's centre is less than a quarter of a digit from the
    cell's centre along both axes (around the torus under wrap). With the defaults these are the 9 positions where the
    window shows exactly one digit. The target is drawn at reset, after the map, from the env's generator: the class
    of a uniformly chosen cell that some position is centred on, among those of another class than the start's cell,
    so the reset frame never shows the goal. The reset frame is never rewarded.

    ## Starting State

    A random lattice position (see ``envs/mnist_map.py``) on a freshly drawn map, from the env's seeded generator.

    ## Episode End

    Terminates only with ``task="find_digit"``, on the step that finds the target. Truncates after ``max_steps`` steps: the env counts them itself, so the native vector env (which
    has no wrappers) agrees with it. The registered spec's ``max_episode_steps`` is 128, the default ``max_steps``, so
    ``gym.make``'s ``TimeLimit`` truncates on the same step. When the two differ the earlier one ends the episode
    (``gym.make("MnistMap-v0", max_steps=500)`` still stops at 128): give both, or use ``envs.make("mnist_map",
    max_steps=500)``, which passes ``max_episode_steps=max_steps`` for you. The vector env takes
    ``max_episode_steps`` (Gymnasium's ``make_vec`` passes it) and applies the same rule.

    ## Arguments

    ```python
    import gymnasium as gym, envs
    env = gym.make("MnistMap-v0", grid=3, window=28, step=14, border="clip", allow_stay=False,
                   max_steps=128, split="train", source="mnist5k", render_mode=None, task=None)
    venv = gym.make_vec("MnistMap-v0", num_envs=1024, vectorization_mode="vector_entry_point")
    ```

    - ``grid``: digits per map side. ``window``: observation size in pixels. ``step``: pixels per move (14 = half a
      digit, so windows land on a lattice and places really repeat).
    - ``border``: ``"clip"`` or ``"wrap"``. ``allow_stay``: add action 4, stay. ``max_steps``: truncation length.
    - ``split``: ``"train"`` or ``"test"`` digits. ``source``: ``"mnist5k"`` (embedded), ``"fashion"`` or a folder of
      IDX files (``envs.digits.load_digits``).
    - ``render_mode="rgb_array"``: the whole map, the path so far and the current window.
    - ``task``: ``None`` (reward-free, the default), ``"coverage"`` or ``"find_digit"`` (see Rewards); recorded with
      the other kwargs in a rollout manifest, so a dataset says which task it was.

    Stable-Baselines3: the 28x28 window is smaller than the 36x36 that SB3's default CNN (NatureCNN) needs, so use
    ``PPO("CnnPolicy", env, policy_kwargs=agents.sb3.policy_kwargs_for())`` (a small CNN that fits any size).

    Every argument is checked (a ``UserError`` names it): ints must be ints (``True`` is not a grid size), the
    window must fit the map and leave it room to move, and ``step`` must move it: at most ``map - window`` under
    clip, at most half a map side under wrap (more would land where a shorter move the other way does).

    ## Version History

    - v0: initial version; ``action_effects``, the spec's ``max_episode_steps=128`` and the opt-in ``task`` added
      later (same dynamics; without a task, the same episodes).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        grid: int = 3,
        window: int = 28,
        step: int = 14,
        border: str = "clip",
        allow_stay: bool = False,
        max_steps: int = 128,
        split: str = "train",
        source: str = "mnist5k",
        render_mode: str | None = None,
        task: str | None = None,
    ):
        _check_render_mode(render_mode, self.metadata["render_modes"])
        allow_stay = _check_allow_stay(allow_stay)
        self.render_mode = render_mode
        self.core = MnistMapCore(1, MapGeometry(grid, (0, 0), window, step, border), split, source, max_steps, task)
        self.task = self.core.task
        self.geometry = self.core.geometry
        self.window, self.step_size, self.border, self.max_steps = window, step, border, max_steps
        self.allow_stay = bool(allow_stay)
        n_actions = 5 if self.allow_stay else 4
        self.action_space = spaces.Discrete(n_actions)
        self.observation_space = spaces.Box(0, 255, (window, window, 1), dtype=np.uint8)
        self.inverse_actions: tuple[int, ...] = INVERSE_ACTIONS[:n_actions]
        self.action_effects: dict[str, Any] = action_effects(step, n_actions, border, self.core.geometry.extent,
                                                             self.core.geometry.map_shape)
        self.pose_dim = POSE_DIM
        self._path: list[np.ndarray] = []  # window top-lefts this episode, for render()
        self._has_reset = False

    @property
    def map(self) -> np.ndarray:
        """The current map (Hm, Wm) uint8, a view that the next reset overwrites: copy it to keep it."""
        return self.core.maps[0]

    @property
    def map_labels(self) -> np.ndarray:
        """The class of each digit of the current map (grid, grid) int64, for plots and probes."""
        return self.core.labels[self.core.digit_ids[0]].reshape(self.geometry.grid, self.geometry.grid)

    def _info(self, visit_count: int) -> dict[str, Any]:
        info = {
            "pose": self.core.pixel[0].astype(np.float32),
            "visit_count": int(visit_count),
            "revisit": bool(visit_count > 0),
        }
        if self.core.goal is not None:
            info["target"] = int(self.core.goal.targets[0])
        return info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode on a fresh random map and start; returns the first window and its info."""
        super().reset(seed=seed)
        self.core.reset(np.zeros(1, dtype=np.int64), [self.np_random])
        self._has_reset = True
        if self.render_mode is not None:  # the path is only kept for render()
            self._path = [self.core.pixel[0]]  # pixel is a fresh array every call: no copy needed
        return self.core.observe()[0], self._info(0)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Move the window by ``action``; the reward is the task's (0 without one), the episode truncates after
        ``max_steps`` (and, with ``task="find_digit"``, terminates when the target is found)."""
        # Space.contains costs ~10 us (it builds np.iinfo); a plain in-range int needs no such check.
        if not (type(action) is int and 0 <= action < self.action_space.n):
            assert self.action_space.contains(action), f"{action!r} ({type(action)}) is not in {self.action_space}"
        assert self._has_reset, "Call reset before using step."
        visits = self.core.step(np.array([action], dtype=np.int64))  # (1,)
        reward, terminated = 0.0, False
        if self.task is not None:
            rewards, ends = self.core.rewards(visits)
            reward, terminated = float(rewards[0]), bool(ends[0])
        if self.render_mode is not None:
            self._path.append(self.core.pixel[0])
        truncated = bool(self.core.steps[0] >= self.max_steps)
        return self.core.observe()[0], reward, terminated, truncated, self._info(visits[0])

    def render(self) -> np.ndarray | None:
        """The map with this episode's path drawn on it (RGB), or None without a ``render_mode``."""
        if self.render_mode is None:
            gym.logger.warn("MnistMap: render() called without a render_mode; use gym.make(..., render_mode='rgb_array')")
            return None
        assert self._has_reset, "Call reset before using render."
        return render_map(self.map, np.stack(self._path), self.window, self.step_size, self.border)


class MnistMapVectorEnv(VectorEnv):
    """``num_envs`` MNIST maps stepped together in single numpy operations (see ``MnistMapEnv`` for the task).

    Sub-env ``i`` owns generator ``i``: ``reset(seed=s)`` seeds it with ``s + i``, so the batch reproduces, step for
    step, ``num_envs`` single ``MnistMapEnv`` seeded ``s, s+1, ...`` that call ``reset()`` when an episode ends.

    Autoreset is Gymnasium 1.x ``NEXT_STEP``: the step after an episode ends returns that env's reset observation
    and reset info, reward 0, ``terminated = truncated = False``, and ignores its action. Infos are arrays with a
    leading ``num_envs`` axis (``pose`` (N, 2), ``visit_count`` (N,), ``revisit`` (N,), ``target`` (N,) with
    ``task="find_digit"``) plus Gymnasium's ``_key`` masks (always all True). Rewards and terminations are the
    task's (``MnistMapEnv``'s Rewards), computed for all maps at once; a terminated map restarts on the next step as a
    truncated one does. ``reset(options={"reset_mask": mask})`` resets only the envs where ``mask`` is True.

    ``max_episode_steps`` is Gymnasium's name for a time limit (``gym.make_vec`` passes the registered spec's 128):
    an episode ends after ``min(max_steps, max_episode_steps)`` steps, where a single env under ``gym.make``'s
    ``TimeLimit`` ends too, so both agree. ``inverse_actions`` and ``action_effects`` are the single env's.

    Memory: the maps (N x 84 x 84 bytes by default) plus, when it fits in ``WINDOW_CACHE_BYTES``, every window of
    every position (N x 25 x 28 x 28 bytes: 80 MB for N = 4096), which makes a step a copy of whole windows.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        grid: int = 3,
        window: int = 28,
        step: int = 14,
        border: str = "clip",
        allow_stay: bool = False,
        max_steps: int = 128,
        split: str = "train",
        source: str = "mnist5k",
        render_mode: str | None = None,
        task: str | None = None,
        max_episode_steps: int | None = None,
    ):
        _check_render_mode(render_mode, self.metadata["render_modes"])
        allow_stay = _check_allow_stay(allow_stay)
        if max_episode_steps is not None:
            if (isinstance(max_episode_steps, (bool, np.bool_)) or not isinstance(max_episode_steps, (int, np.integer))
                    or max_episode_steps < 1):
                raise UserError(f"MnistMap: max_episode_steps must be an int >= 1 or None, got {max_episode_steps!r}")
            if isinstance(max_steps, (int, np.integer)) and not isinstance(max_steps, (bool, np.bool_)):
                max_steps = min(int(max_steps), int(max_episode_steps))  # what a single env under TimeLimit does
        self.render_mode = render_mode
        self.core = MnistMapCore(num_envs, MapGeometry(grid, (0, 0), window, step, border), split, source, max_steps,
                                 task)
        self.task = self.core.task
        self.geometry = self.core.geometry
        self.num_envs = self.core.num_envs
        self.window, self.step_size, self.border, self.max_steps = window, step, border, self.core.max_steps
        self.allow_stay = bool(allow_stay)
        n_actions = 5 if self.allow_stay else 4
        self.single_action_space = spaces.Discrete(n_actions)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.single_observation_space = spaces.Box(0, 255, (window, window, 1), dtype=np.uint8)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.inverse_actions: tuple[int, ...] = INVERSE_ACTIONS[:n_actions]
        self.action_effects: dict[str, Any] = action_effects(step, n_actions, border, self.core.geometry.extent,
                                                             self.core.geometry.map_shape)
        self.pose_dim = POSE_DIM
        self._rngs: list[np.random.Generator] | None = None
        self._needs_reset = np.zeros(self.num_envs, dtype=bool)  # (N,) episode ended last step -> reset on this one

    @property
    def maps(self) -> np.ndarray:
        """The current maps (N, Hm, Wm) uint8."""
        return self.core.maps

    def _infos(self, visit_count: np.ndarray) -> dict[str, Any]:
        N = self.num_envs
        infos = {
            "pose": self.core.pixel.astype(np.float32),  # (N, 2)
            "visit_count": visit_count.astype(np.int64),  # (N,)
            "revisit": visit_count > 0,  # (N,)
            "_pose": np.ones(N, dtype=bool),
            "_visit_count": np.ones(N, dtype=bool),
            "_revisit": np.ones(N, dtype=bool),
        }
        if self.core.goal is not None:
            infos["target"] = self.core.goal.targets.copy()  # (N,)
            infos["_target"] = np.ones(N, dtype=bool)
        return infos

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every env, or those in ``options["reset_mask"]``; returns windows (N, H, W, C) and infos."""
        N = self.num_envs
        mask = np.ones(N, dtype=bool)
        if options is not None and "reset_mask" in options:
            mask = np.asarray(options["reset_mask"])
            if mask.shape != (N,) or mask.dtype != np.bool_:
                raise UserError(f"MnistMapVectorEnv.reset: options['reset_mask'] must be a bool array of shape ({N},), got {mask.dtype} {mask.shape}")
        if isinstance(seed, (int, np.integer)):
            seeds: list[int | None] = [int(seed) + i for i in range(N)]
        elif seed is None:
            seeds = [None] * N
        else:
            seeds = [None if s is None else int(s) for s in seed]  # numpy ints too: seeding wants plain ints
            if len(seeds) != N:
                raise UserError(f"MnistMapVectorEnv.reset: got {len(seeds)} seeds for {N} envs")
        if isinstance(seed, (int, np.integer)):
            super().reset(seed=int(seed))
        if self._rngs is None:
            if not mask.all():
                raise UserError("MnistMapVectorEnv.reset: the first reset must reset every env (reset_mask all True)")
            self._rngs = [seeding.np_random(s)[0] for s in seeds]  # unseeded envs get fresh entropy, once
        else:
            for i in np.flatnonzero(mask):
                if seeds[i] is not None:
                    self._rngs[i] = seeding.np_random(seeds[i])[0]
        env_ids = np.flatnonzero(mask)
        self.core.reset(env_ids, [self._rngs[i] for i in env_ids])
        self._needs_reset[env_ids] = False
        return self.core.observe(), self._infos(np.zeros(N, dtype=np.int64))

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step all envs with ``actions`` (N,); envs whose episode ended last step restart (NEXT_STEP)."""
        assert self._rngs is not None, "Call reset before using step."
        actions = np.asarray(actions)
        assert self.action_space.contains(actions), f"{actions!r} ({type(actions)}) is not in {self.action_space}"
        visit_count = self.core.step(actions.astype(np.int64, copy=False))  # (N,)
        # NEXT_STEP autoreset: envs whose episode ended on the previous step start a new one now; their move above is
        # overwritten by the reset, which is how their action gets ignored.
        restarting = self._needs_reset
        if restarting.any():
            env_ids = np.flatnonzero(restarting)
            self.core.reset(env_ids, [self._rngs[i] for i in env_ids])
            visit_count[env_ids] = 0
        rewards, terminated = self.core.rewards(visit_count)  # (N,), (N,) zeros without a task
        rewards[restarting], terminated[restarting] = 0.0, False  # a reset step has no reward and does not end
        truncated = self.core.steps >= self.max_steps  # (N,) restarted envs have steps == 0
        self._needs_reset = truncated | terminated
        return self.core.observe(), rewards, terminated, truncated, self._infos(visit_count)

    def render(self) -> tuple[np.ndarray, ...] | None:
        """One RGB frame per env: its map with the current window outlined (the path is drawn by the single env only)."""
        if self.render_mode is None:
            gym.logger.warn("MnistMapVectorEnv: render() called without a render_mode")
            return None
        assert self._rngs is not None, "Call reset before using render."
        pixel = self.core.pixel
        return tuple(
            render_map(self.core.maps[i], pixel[i : i + 1], self.window, self.step_size, self.border) for i in range(self.num_envs)
        )
