"""Reward tasks of our envs (issue 15): opt-in through the env argument ``task``, so that dreams have something an
agent can learn from. Without it (``task=None``, the default) every env stays the reward-free world-model data source
it always was: same rewards (0), same random draws, byte-identical collections.

| ``task``         | envs                                     | reward of a step                            | episode end  |
|------------------|------------------------------------------|---------------------------------------------|--------------|
| ``None``         | all                                      | 0 (a stock MiniWorld env: the stock task's)  | the env's    |
| ``"coverage"``   | ``MnistMap-v0``, ``MiniWorldRevisit-v0``, ``miniworld:<Id>`` | 1.0 if the step enters a place not visited earlier this episode (``info["visit_count"] == 0``), else 0 | the env's |
| ``"find_digit"`` | ``MnistMap-v0``                          | 1.0 on the step whose window is centred on a cell holding the digit class ``info["target"]``, else 0 | terminated on that step |

*Coverage* rewards exploration, and predicting it needs memory: whether a place is new depends on the whole episode so
far, not on the current frame. "Place" is the env's own revisit rule (a lattice position on the MNIST map; a pose
within ``revisit_radius`` and ``revisit_angle`` in MiniWorld, so facing a new direction is a new place). The reset
frame is never rewarded (no step led to it).

*Find digit* is a goal task: the reset draws a target class from the digits on this episode's map (with the env's own
generator, after the map), and the first step that centres the window on a cell holding that class ends the episode
with reward 1. "Centred" is defined in ``goal_cells``: the window's centre is less than a quarter of a digit from the
cell's centre along both axes, so the window shows mostly that digit (with the defaults: the 9 positions where the
window covers exactly one digit). The target is drawn among the cells some window position is centred on and, when
the start is centred on a cell, among the cells of another class, so the start frame never shows the goal. There is no
step cost: the discount alone makes shorter searches pay more.

The functions work on batches (arrays with a leading env axis), so a scalar env and its native vector env call the
same code (STYLE rule 5).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gtmm.cli import UserError

TASKS = ("coverage", "find_digit")


def check_task(task: object, allowed: Sequence[str]) -> str | None:
    """``task`` if it is None or one of ``allowed``; else one UserError line listing the accepted values."""
    if task is None or (isinstance(task, str) and task in allowed):
        return task
    expected = ", ".join(["None", *(repr(name) for name in allowed)])
    raise UserError(f"task {task!r}: expected one of {expected}")


def coverage_reward(visit_count: np.ndarray) -> np.ndarray:
    """The coverage reward of a step: 1.0 where it reached a place not visited earlier this episode, else 0.0;
    ``visit_count`` (N,) -> (N,) float32."""
    return (np.asarray(visit_count) == 0).astype(np.float32)


def goal_cells(position_pixels: np.ndarray, window: int, digit_shape: tuple[int, int], grid: int,
               border: str) -> np.ndarray:
    """The map cell each window position is centred on, or -1: position pixels (P, 2) -> cell ids (P,), cell id =
    grid_row * grid + grid_col (the order of a map's digits).

    The window whose top-left pixel is ``(r, c)`` is centred on cell ``(i, j)`` when its centre ``(r + window/2,
    c + window/2)`` is less than a quarter of a digit (``h/4``, ``w/4``) from the cell's centre ``(i*h + h/2,
    j*w + w/2)`` along each axis; under ``border="wrap"`` distances are taken around the torus."""
    digit = np.asarray(digit_shape, dtype=np.float64)  # (2,) h, w
    centre = np.asarray(position_pixels, dtype=np.float64) + window / 2.0  # (P, 2) window centres in map pixels
    size = digit * grid  # (2,) map height and width
    if border == "wrap":
        centre = centre % size
    cell = np.clip(np.floor(centre / digit), 0, grid - 1)  # (P, 2) the cell holding the centre
    offset = np.abs(centre - (cell * digit + digit / 2.0))  # (P, 2) at most h/2, w/2 from the cell's own centre
    centred = (offset < digit / 4.0).all(axis=1)  # (P,)
    ids = (cell[:, 0] * grid + cell[:, 1]).astype(np.int64)
    return np.where(centred, ids, -1)


class FindDigitTask:
    """The ``find_digit`` task of ``num_envs`` maps: their targets, and the reward and termination of a step.

    Args:
        num_envs: maps stepped together (1 for a single env).
        goal_cell: (P,) the cell each position id is centred on, or -1 (``goal_cells``).
        what: the env's name, for the error message.
    """

    def __init__(self, num_envs: int, goal_cell: np.ndarray, what: str = "MnistMap"):
        self.goal_cell = np.asarray(goal_cell, dtype=np.int64)  # (P,)
        self.reachable = np.unique(self.goal_cell[self.goal_cell >= 0])  # cells some window is centred on
        if len(self.reachable) == 0:
            raise UserError(f"{what}: task 'find_digit' needs window positions centred on a digit, and no position "
                            "of this map is (the window's centre must come within a quarter digit of a digit's "
                            "centre): use a step that divides the digit size, e.g. step 14 for 28 px digits")
        self.targets = np.full(num_envs, -1, dtype=np.int64)  # (N,) target digit class of each map
        self.cell_labels = np.zeros((num_envs, 0), dtype=np.int64)  # (N, grid*grid) class of each cell
        self._arange = np.arange(num_envs)

    def reset(self, env_ids: np.ndarray, rngs: Sequence[np.random.Generator], cell_labels: np.ndarray,
              start: np.ndarray) -> None:
        """Draw the targets of maps ``env_ids`` (M,), one uniform from each map's own generator: cell labels
        (M, grid*grid) are the classes of their new maps' digits, ``start`` (M,) their start position ids."""
        if self.cell_labels.shape[1] != cell_labels.shape[1]:
            self.cell_labels = np.zeros((len(self.targets), cell_labels.shape[1]), dtype=np.int64)
        self.cell_labels[env_ids] = cell_labels
        for j, (rng, labels) in enumerate(zip(rngs, cell_labels)):
            start_cell = self.goal_cell[start[j]]
            # a target the start frame already shows would be found without a step: draw among the other classes
            others = self.reachable if start_cell < 0 else self.reachable[labels[self.reachable] != labels[start_cell]]
            cells = others if len(others) else self.reachable  # a map of one class only: no way around it
            cell = cells[min(int(rng.random() * len(cells)), len(cells) - 1)]
            self.targets[env_ids[j]] = labels[cell]

    def step(self, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reward (N,) float32 and terminated (N,) bool of windows now at position ids ``position`` (N,)."""
        cell = self.goal_cell[position]  # (N,) -1 where the window is centred on no cell
        label = self.cell_labels[self._arange, np.maximum(cell, 0)]  # (N,)
        found = (cell >= 0) & (label == self.targets)
        return found.astype(np.float32), found
