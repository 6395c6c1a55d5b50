"""Gymnasium environments whose every step knows whether it *revisits* a place.

Importing this package registers:

| id                      | entry point                         | what                                             |
|-------------------------|-------------------------------------|--------------------------------------------------|
| ``MnistMap-v0``         | ``envs.mnist_map:MnistMapEnv``      | a window moved over a map of MNIST digits (5.6)  |
| ``MiniWorldRevisit-v0`` | ``envs.miniworld:MiniWorldRevisitEnv`` | a 3D room re-coloured every episode (5.7)     |
| ``Dream-v0``            | ``worldmodel.dream:DreamEnv``       | a trained world model standing in for an env     |

Their kwargs (each env's docstring, ``## Arguments``, says more):

- ``MnistMap-v0``: ``grid``, ``window``, ``step``, ``border`` (``clip``/``wrap``), ``allow_stay``, ``max_steps``,
  ``split``, ``source``, ``render_mode``, ``task`` (None, ``coverage``, ``find_digit``).
- ``MiniWorldRevisit-v0``: ``obs_size``, ``num_rows``, ``num_cols``, ``room_size``, ``num_objects``, ``turn_step``,
  ``move_step``, ``max_steps``, ``revisit_radius``, ``revisit_angle``, ``render_mode``, ``render_size``, ``task``
  (None, ``coverage``); ``miniworld:<Id>`` takes the same wrapper kwargs plus the stock env's own.
- ``Dream-v0``: ``checkpoint``, ``data`` or ``env``, ``env_kwargs``, ``context``, ``temperature``, ``max_steps``,
  ``shadow``, ``integrate_pose``, ``context_agent``, ``device``, ``threads``, ``render_mode``.

Contract shared by all our envs (what ``agents/``, ``rollouts/`` and ``worldmodel/`` rely on):

- ``info["pose"]``: ``np.ndarray`` float32 of shape ``(pose_dim,)``, at ``reset`` and every ``step``:
  the map position ``(row, col)`` of the window's top-left pixel (MNIST map) or ``(x, z, heading)`` (MiniWorld).
- ``info["revisit"]``: ``bool``, the current observation shows a place already seen earlier this episode.
- ``info["visit_count"]``: ``int``, how many earlier steps of this episode were at this place (0 on a first visit).
- ``env.unwrapped.inverse_actions``: ``tuple[int, ...]``, ``inverse_actions[a]`` is the action that undoes ``a``
  (used by agents that retrace their path).
- ``env.unwrapped.action_effects`` (optional; absent = unknown): what each action does to ``info["pose"]``, as a
  JSON-ready dict ``{"kind": ..., "moves": [one entry per action id], "exact": bool}``:

  | kind          | ``moves[a]``                                                  | units           | env       |
  |---------------|---------------------------------------------------------------|-----------------|-----------|
  | ``translate`` | ``[d_row, d_col]`` added to the pose (stay = ``[0, 0]``)      | pixels          | MNIST map |
  | ``se2``       | ``[turn, forward]``: turn (left positive), then step ahead    | radians, metres | MiniWorld |

  ``exact`` is False when a move can be blocked (a ``clip`` border, a wall), so the moves are what an action does
  when it is not blocked. ``extent`` (optional, ``translate``): the pose's range per axis, ``[0, extent]``, when
  moves are blocked exactly at its ends (the MNIST map's ``clip`` border: map side minus window, in pixels); the
  ``lattice`` address reasons over where in that range a walk started. ``period`` (optional): the pose's period per
  axis where it wraps, ``null`` where it does not (the MNIST map's ``wrap`` border: the map's side, in pixels;
  MiniWorld: ``[null, null, 2 pi]``, the heading), which ``worldmodel.train --path-weight`` uses to unwrap a move
  across the seam. ``rollouts.collect`` records
  ``inverse_actions`` and ``action_effects`` in the manifest's ``env`` entry, and ``worldmodel.train --address
  auto`` chooses the model's address from them (``translate``: an additive path integrator tied by
  ``inverse_actions``, or the ``lattice`` filter where an ``extent`` is declared; ``se2``: the SE(2) integrator;
  other or unknown effects: the GRU integrator).
- Vector envs report the same keys as arrays with a leading ``num_envs`` axis.
- Dead reckoning (``odometry`` below): for envs of ours that declare ``action_effects``, a pose-and-revisit tracker
  that needs no simulator (``envs.mnist_map.LatticeOdometry``, ``envs.miniworld.SE2Odometry``): it integrates poses
  from actions and counts visits by the env's own revisit rule. ``Dream-v0`` uses it once a dream's actions leave
  the recorded episode.

Rewards (``envs/rewards.py``): every env is reward-free by default (a stock MiniWorld env keeps its stock task's
reward). The kwarg ``task`` turns on a reward task, recorded with the other kwargs in a rollout manifest:

| ``task``         | envs                                                 | reward per step, episode end                      |
|------------------|------------------------------------------------------|---------------------------------------------------|
| ``None``         | all (default)                                        | 0; never terminates                               |
| ``"coverage"``   | ``MnistMap-v0``, ``MiniWorldRevisit-v0``, ``miniworld:<Id>`` | 1.0 on entering a place not visited earlier this episode (``visit_count == 0``); the env's own end |
| ``"find_digit"`` | ``MnistMap-v0``                                      | 1.0 and ``terminated`` when the window is centred on a cell of the class ``info["target"]`` |

Time limits: ``MnistMap-v0`` and ``MiniWorldRevisit-v0`` truncate themselves after ``max_steps`` steps (so a native
vector env agrees with the single env), and their registered specs carry the same default as ``max_episode_steps``
(128 and 256), so ``gym.make``'s ``TimeLimit`` fires on the same step, never on another one, with the defaults.
``make`` below passes ``max_episode_steps=max_steps`` whenever ``max_steps`` is given, so ``max_steps`` alone decides;
with ``gym.make`` itself give both (the earlier of the two ends an episode). ``Dream-v0`` has no spec limit yet: its
vector entry point would be handed ``max_episode_steps``, which ``DreamVectorEnv`` does not take.

Short names used by every command line (``--env``): ``mnist_map``, ``mnist_map_test`` (held-out test digits),
``miniworld`` (our ``MiniWorldRevisit-v0``), ``miniworld:<AnyMiniWorldId>`` (a stock MiniWorld env wrapped to report
pose and revisits), ``dream`` (needs ``checkpoint=``), or any registered Gymnasium id.

``make`` and ``make_vec`` check the kwargs against the env's constructor first (``check_kwargs``): an unknown or
missing argument is one ``UserError`` listing the accepted names, not a ``TypeError`` traceback from deep inside
Gymnasium (or, worse, from a worker process).
"""

from __future__ import annotations

import inspect
from typing import Any

import gymnasium as gym

from gtmm.cli import UserError

_REGISTRATIONS: dict[str, dict[str, Any]] = {
    # max_episode_steps = the env's default max_steps: the env truncates itself there (so the vector env agrees) and
    # gym.make's TimeLimit on the same step (see "Time limits" above)
    "MnistMap-v0": dict(
        entry_point="envs.mnist_map:MnistMapEnv",
        vector_entry_point="envs.mnist_map:MnistMapVectorEnv",
        max_episode_steps=128,
    ),
    "MiniWorldRevisit-v0": dict(entry_point="envs.miniworld:MiniWorldRevisitEnv", max_episode_steps=256),
    "Dream-v0": dict(entry_point="worldmodel.dream:DreamEnv", vector_entry_point="worldmodel.dream:DreamVectorEnv"),
}

for _id, _kw in _REGISTRATIONS.items():
    if _id not in gym.registry:
        gym.register(id=_id, **{k: v for k, v in _kw.items() if v is not None})

# short name -> (registered id, default kwargs)
SHORT_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "mnist_map": ("MnistMap-v0", {}),
    "mnist_map_test": ("MnistMap-v0", {"split": "test"}),
    "miniworld": ("MiniWorldRevisit-v0", {}),
    "dream": ("Dream-v0", {}),
}


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """Turn a command-line env name into ``(gymnasium id, default kwargs)``.

    ``miniworld:<Id>`` wraps a stock MiniWorld env (``envs.miniworld:make_stock``) so it reports pose and revisits.
    """
    if name in SHORT_NAMES:
        env_id, kwargs = SHORT_NAMES[name]
        return env_id, dict(kwargs)
    if name.startswith("miniworld:"):
        stock_id = name.split(":", 1)[1]
        if not stock_id:
            raise UserError(f"env name {name!r}: expected 'miniworld:<MiniWorld id>', e.g. 'miniworld:MiniWorld-Hallway-v0'")
        return "envs.miniworld:make_stock", {"env_id": stock_id}
    if name in gym.registry:
        return name, {}
    known = ", ".join(sorted(SHORT_NAMES)) + ", miniworld:<MiniWorld id>"
    raise UserError(f"unknown env {name!r}: expected one of {known}, or a registered Gymnasium id")


# gym.make's own keyword arguments, accepted beside the env constructor's
_MAKE_KWARGS = ("max_episode_steps", "disable_env_checker")


def _creator(env_id: str, vector: bool) -> Any:
    """The callable that ``make`` (or ``make_vec``) passes the kwargs to, or None if it cannot be loaded here."""
    if env_id == "envs.miniworld:make_stock":
        from envs.miniworld import StockRevisitEnv  # no OpenGL at import: only making one touches it

        return StockRevisitEnv
    if env_id not in gym.registry:
        return None
    spec = gym.registry[env_id]
    entry_point = spec.vector_entry_point if vector else spec.entry_point
    if entry_point is None:
        return None
    try:
        return gym.envs.registration.load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
    except (ImportError, AttributeError, ModuleNotFoundError):
        return None  # gym.make will report it with its own message


def check_kwargs(name: str, kwargs: dict[str, Any], vector: bool = False, where: str = "") -> None:
    """UserError if ``kwargs`` (defaults of the short name included) has a name the env's constructor does not take,
    or lacks one it requires; the message lists the accepted names. ``where`` (e.g. ``"--env-kwargs"``) prefixes it.

    Constructors that take ``**kwargs`` pass them on (a stock MiniWorld env's own arguments): those names are
    checked where they are used (``envs.miniworld.StockRevisitEnv``)."""
    env_id, defaults = resolve(name)
    given = {**defaults, **kwargs}
    creator = _creator(env_id, vector)
    if creator is None:
        return
    try:
        parameters = inspect.signature(creator).parameters
    except (TypeError, ValueError):
        return
    skip = {"self", "num_envs", "max_episode_steps"} if vector else {"self"}
    params = {n: p for n, p in parameters.items() if n not in skip
              and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    # gym's own time-limit and checker arguments are accepted but not advertised (a vector env may take the limit)
    gym_own = set(_MAKE_KWARGS) if not vector else {"max_episode_steps"} & set(parameters)
    accepted = set(params) | gym_own
    listed = ", ".join(sorted(params))  # gym.make's own extras are accepted but not advertised
    prefix = f"{where}: " if where else ""
    if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(given) - accepted)
        if unknown:
            names = ", ".join(repr(n) for n in unknown)
            raise UserError(f"{prefix}env {name!r} ({env_id}) has no argument{'s' if len(unknown) > 1 else ''} "
                             f"{names}; it accepts {listed}")
    missing = sorted(n for n, p in params.items() if p.default is p.empty and n not in given)
    if missing:
        raise UserError(f"{prefix}env {name!r} ({env_id}) needs the argument{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(repr(n) for n in missing)}; it accepts {listed}")


def _time_limit(env_id: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus ``max_episode_steps=max_steps`` for a registered id with a spec time limit, when ``max_steps``
    is given and ``max_episode_steps`` is not: the env's own limit then decides, not the spec's default."""
    spec = gym.registry.get(env_id)
    if spec is None or spec.max_episode_steps is None or "max_episode_steps" in kwargs:
        return kwargs
    steps = kwargs.get("max_steps")
    if type(steps) is not int or steps < 1:  # absent, or wrong: the env's own check names max_steps
        return kwargs
    return {**kwargs, "max_episode_steps": steps}


def odometry(env_id: str, env_kwargs: dict[str, Any], action_effects: dict[str, Any] | None,
             num_envs: int) -> Any:
    """Dead reckoning for ``num_envs`` walks of the env a rollout manifest names (its ``id``, ``kwargs`` and
    ``action_effects``): an object with ``integrate(pose (N, D), actions (N,)) -> pose (N, D)``, ``reset(rows)`` and
    ``visit(pose (M, D), rows (M,)) -> visit_count (M,)`` (the env's own revisit rule). None when the env declares no
    action effects, or is not one of ours (then its bounds and revisit rule are unknown here)."""
    if not action_effects:
        return None
    kind = action_effects.get("kind")
    if env_id == "MnistMap-v0" and kind == "translate":
        from envs.mnist_map import LatticeOdometry, map_geometry

        return LatticeOdometry(num_envs, map_geometry(env_kwargs), action_effects)
    if env_id in ("MiniWorldRevisit-v0", "envs.miniworld:make_stock") and kind == "se2":
        from envs.miniworld import SE2Odometry  # no OpenGL: only making an env touches it

        return SE2Odometry(num_envs, action_effects, env_kwargs.get("revisit_radius"), env_kwargs.get("revisit_angle"))
    return None


def make(name: str, **kwargs: Any) -> gym.Env:
    """Make a single env from a short name or id; ``kwargs`` override the short name's defaults. A given
    ``max_steps`` also sets gym.make's ``max_episode_steps`` (see "Time limits" above)."""
    check_kwargs(name, kwargs)
    env_id, defaults = resolve(name)
    defaults.update(kwargs)
    if env_id == "envs.miniworld:make_stock":
        from envs.miniworld import make_stock

        return make_stock(**defaults)
    return gym.make(env_id, **_time_limit(env_id, defaults))


def make_vec(name: str, num_envs: int, **kwargs: Any) -> gym.vector.VectorEnv:
    """A batched env: the native numpy vector env where one exists (MNIST map), else a sync vector env."""
    env_id, defaults = resolve(name)
    native = env_id in gym.registry and gym.registry[env_id].vector_entry_point is not None
    check_kwargs(name, kwargs, vector=native)
    defaults.update(kwargs)
    if native:
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point",
                            **_time_limit(env_id, defaults))
    return gym.vector.SyncVectorEnv([lambda: make(name, **kwargs) for _ in range(num_envs)])
