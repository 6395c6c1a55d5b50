"""External memories for GTMM (Gemici et al. 2017): each is read by ADDRESS and returns CONTENT.

| name              | what                                                                         |
|-------------------|------------------------------------------------------------------------------|
| ``none``          | no memory: the VRNN-style baseline, read_dim 0                               |
| ``introspective`` | FIFO of the last L (address, z) pairs, R address-keyed heads, gated reads    |
| ``ntm``           | NTM: content + location addressing, erase/add writes (Graves et al. 2014)    |
| ``lru``           | least-recently-used access (Santoro et al. 2016)                             |
| ``dnc``           | DNC: usage-based allocation, temporal links, read modes (Graves et al. 2016) |

Each lives in the module of its name (``worldmodel/memory/<name>.py``).

Contract (``worldmodel.memory.base.Memory``): ``init_state(batch, device, dtype) -> state``,
``read(state, h, addr) -> (B, read_dim)``, ``write(state, h, addr, z) -> state``, ``attend(...)`` for diagnostics
(read weights, gates). ``reset_state(state, fresh, is_first)`` restarts the episodes that begin mid-batch.
Slot memories return reads of size R * C, C = z_dim (+ h_dim with ``store_h=True``).
"""

from __future__ import annotations

from gtmm.cli import UserError
from worldmodel.memory.base import Memory, State, reset_state
from worldmodel.memory.dnc import DNCMemory
from worldmodel.memory.introspective import IntrospectiveMemory
from worldmodel.memory.lru import LRUMemory
from worldmodel.memory.none import NoMemory
from worldmodel.memory.ntm import NTMMemory

MEMORIES = ("none", "introspective", "ntm", "lru", "dnc")

_CLASSES: dict[str, type[Memory]] = {
    "none": NoMemory,
    "introspective": IntrospectiveMemory,
    "ntm": NTMMemory,
    "lru": LRUMemory,
    "dnc": DNCMemory,
}


def build_memory(name: str, *, z_dim: int, h_dim: int, addr_dim: int, slots: int = 64, heads: int = 2, **kw) -> Memory:
    """The memory named ``name`` (one of ``MEMORIES``); ``kw`` go to its class (e.g. store_h=True)."""
    if name not in _CLASSES:
        raise UserError(f"unknown memory {name!r}: expected one of {MEMORIES}")
    if name == "none":
        return NoMemory()
    return _CLASSES[name](z_dim=z_dim, h_dim=h_dim, addr_dim=addr_dim, slots=slots, heads=heads, **kw)


__all__ = ["MEMORIES", "Memory", "State", "build_memory", "reset_state", "NoMemory", "IntrospectiveMemory", "NTMMemory", "LRUMemory",
           "DNCMemory"]
