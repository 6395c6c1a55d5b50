"""No external memory: the VRNN-style baseline (Chung et al. 2015), the paper's "no memory" comparison.

The controller LSTM is the only thing that carries the past; ``read`` returns an empty (B, 0) vector so the model
code is the same for every memory (a concatenation with a (B, 0) tensor is a no-op). Its read weights are (B, 0, 0)
(no heads, no slots) and its write attribution is (B, S, 0): diagnostics see "no memory", not an empty one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from worldmodel.memory.base import Memory, State


class NoMemory(Memory):
    """No memory: reads are (B, 0), writes keep the empty state; the controller alone carries the past."""
    read_dim = 0

    def __init__(self, **_: object):
        super().__init__()

    def init_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> State:
        """No state: an empty dict."""
        return {}

    def _attend(self, state: State, h: Tensor, addr: Tensor, pre: dict[str, Tensor]) -> dict[str, Tensor]:
        B = h.shape[0]
        empty = h.new_zeros(B, 0)
        return {"read": empty, "weights": h.new_zeros(B, 0, 0), "gate": empty}

    def _write(self, state: State, h: Tensor, addr: Tensor, z: Tensor, pre: dict[str, Tensor],
               attention: dict[str, Tensor] | None) -> State:
        return state

    def write_record(self, state: State) -> dict[str, Tensor]:
        """Nothing to attribute: an empty dict."""
        return {}

    def attribute(self, coefficients: Tensor, record: dict[str, Tensor]) -> Tensor:
        """No slots: (B, S, 0) -> (B, S+1, 0)."""
        B, S, N = coefficients.shape
        return coefficients.new_zeros(B, S + 1, N)
