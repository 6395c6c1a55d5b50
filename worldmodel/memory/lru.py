"""GTMM with a least-recently-used-access memory (Santoro et al. 2016, "One-shot learning with memory-augmented
neural networks", sec. 3.1; Gemici et al. 2017).

Slots are [address part (A), content part (C)]; reads match keys from addr_t against the address part and return
the content part. With our step order (read of step t before its write), "the last read before this write" is the
read of the same step, which plays the role of the paper's w^r_{t-1}:

    w^r_t    = softmax_n(beta cos(k_t, M_{t-1}^addr(n)))                  read by content on addresses
    w^lu_t   = one_hot(argmin_n u_{t-1}(n))                              the least-used slot
    w^w_t    = sigmoid(alpha) mean_r w^r_t + (1 - sigmoid(alpha)) w^lu_t  write to the slot just recalled, or to
                                                                         the least used one
    M~       = M_{t-1} with the least-used slot zeroed                    (the paper: "prior to writing")
    M_t      = M~ + w^w_t v_t^T,  v_t = [addr_t, c_t]
    u_t      = gamma u_{t-1} + sum_r w^r_t o_{t-1} + w^w_t               usage with decay gamma

One change: reads count towards usage only on slots that hold a write (o = soft occupancy), so never-written slots
stay "least used" and the memory fills its empty slots before it recycles any.
sigmoid(alpha) starts near 0 (a new place gets a fresh slot); the model can learn to raise it to update the slot
of a place it recognises.

Write attribution (``worldmodel.memory.base``): exact, rho_t = 1 - w^lu_t (only the zeroed slot loses its content);
coefficients can sum above 1 on a slot that takes several soft writes (the memory adds, it never erases).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from gtmm.cli import UserError
from worldmodel.memory.base import (
    Memory, ReadGate, ReadKeys, State, check_step_inputs, content_address_layer, content_keys_layer, content_weights,
    cosine_similarity, gated_read, mark_written, slot_address, small_linear, with_content_match,
)


class LRUMemory(Memory):
    """Least-recently-used access memory of N (address, content) slots with R content-addressed read heads."""

    def __init__(self, *, z_dim: int, h_dim: int, addr_dim: int, slots: int = 64, heads: int = 2,
                 store_h: bool = False, key_from_h: bool = False, init_sharpness: float = 10.0,
                 usage_decay: float = 0.95, content_address: bool = False, content_keys: bool = False):
        super().__init__()
        if slots < 1 or heads < 1:
            raise UserError(f"lru memory: expected slots >= 1 and heads >= 1, got slots={slots}, heads={heads}")
        if not 0.0 <= usage_decay <= 1.0:
            raise UserError(f"lru memory: usage_decay (gamma) must be in [0, 1], got {usage_decay}")
        self.z_dim, self.h_dim, self.addr_dim = z_dim, h_dim, addr_dim
        self.slots, self.heads, self.store_h, self.usage_decay = slots, heads, store_h, usage_decay
        self.content_dim = z_dim + (h_dim if store_h else 0)
        self.read_dim = heads * self.content_dim
        self.keys = ReadKeys(addr_dim=addr_dim, h_dim=h_dim, heads=heads, use_h=key_from_h, init_sharpness=init_sharpness)
        self.write_gate = small_linear(h_dim, 1, bias=-5.0)  # alpha: sigmoid ~ 0.007, the least-used slot
        self.gate = ReadGate(h_dim=h_dim, heads=heads)
        self.content_address = content_address_layer(content_address, z_dim, addr_dim)  # W_c, or None
        self.content_keys = content_keys_layer(content_keys, h_dim, heads, z_dim)  # V (content read keys), or None

    def init_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> State:
        """Empty slots, zero usage, occupancy and weights (retain 1) for ``batch`` sequences."""
        N = self.slots
        return {
            "addr": torch.zeros(batch, N, self.addr_dim, device=device, dtype=dtype),  # (B, N, A)
            "content": torch.zeros(batch, N, self.content_dim, device=device, dtype=dtype),  # (B, N, C)
            "usage": torch.zeros(batch, N, device=device, dtype=dtype),  # (B, N) u_{t-1}
            "written": torch.zeros(batch, N, device=device, dtype=dtype),  # (B, N) soft occupancy o_{t-1}
            "read_weights": torch.zeros(batch, self.heads, N, device=device, dtype=dtype),  # (B, R, N) diagnostics
            "write_weights": torch.zeros(batch, N, device=device, dtype=dtype),  # (B, N) w^w_{t-1}, diagnostics
            "write_retain": torch.ones(batch, N, device=device, dtype=dtype),  # (B, N) rho_{t-1}, diagnostics
        }

    def check_inputs(self, h: Tensor, addr: Tensor, z: Tensor | None = None) -> None:
        """Shape asserts of h (B, H), addr (B, A) and z (B, Z) for the LRU's step API."""
        check_step_inputs("lru", h, addr, self.h_dim, self.addr_dim, z, self.z_dim)

    def h_linears(self) -> dict[str, nn.Linear]:
        """The layers on h_t by name: the read keys', the write gate and the read gate."""
        return {**self.keys.h_linears(), "write_gate": self.write_gate, **self.gate.h_linears(),
                **(self.content_keys.h_linears() if self.content_keys is not None else {})}

    def addr_linears(self) -> dict[str, nn.Linear]:
        """The read keys' projection of addr_t, by name."""
        return self.keys.addr_linears()

    def _read_weights(self, state: State, pre: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        keys, beta = self.keys.from_pre(pre)  # (B, R, A), (B, R)
        similarity = with_content_match(cosine_similarity(keys, state["addr"]), self.content_keys, pre,
                                        state["content"])  # (B, R, N)
        return content_weights(similarity, beta, occupancy=state["written"]), similarity

    def _attend(self, state: State, h: Tensor, addr: Tensor, pre: dict[str, Tensor]) -> dict[str, Tensor]:
        weights, similarity = self._read_weights(state, pre)  # (B, R, N)
        return gated_read(self.gate, pre, weights, similarity, state["content"], state["written"], self.read_dim)

    def _write(self, state: State, h: Tensor, addr: Tensor, z: Tensor, pre: dict[str, Tensor],
               attention: dict[str, Tensor] | None) -> State:
        # this step's read, before the write (the attend of the same step computed it already)
        read_weights = attention["weights"] if attention is not None else self._read_weights(state, pre)[0]  # (B, R, N)
        usage = state["usage"]  # (B, N)
        # argmin returns the first minimum: ties (e.g. all-empty slots) resolve to the lowest index, deterministically
        slot_ids = torch.arange(self.slots, device=usage.device)  # (N,)
        least_used = (usage.argmin(dim=-1, keepdim=True) == slot_ids).to(usage.dtype)  # (B, N) one-hot
        alpha = torch.sigmoid(pre["write_gate"])  # (B, 1)
        write_weights = alpha * read_weights.mean(1) + (1.0 - alpha) * least_used  # (B, N)

        content = torch.cat([z, h], dim=-1) if self.store_h else z  # (B, C)
        value = torch.cat([slot_address(self.content_address, addr, z), content], dim=-1).unsqueeze(1)  # (B, 1, A+C)
        retain = 1.0 - least_used  # (B, N) zero the least-used slot before writing
        memory = torch.cat([state["addr"], state["content"]], dim=-1) * retain.unsqueeze(-1)  # (B, N, A+C)
        memory = memory + write_weights.unsqueeze(-1) * value  # (B, N, A+C)
        written = state["written"] * retain  # the zeroed slot no longer holds anything
        return {
            "addr": memory[..., : self.addr_dim],
            "content": memory[..., self.addr_dim :],
            "usage": self.usage_decay * usage + (read_weights.sum(1) * state["written"]) + write_weights,
            "written": mark_written(written, write_weights),
            "read_weights": read_weights,
            "write_weights": write_weights,
            "write_retain": retain,
        }
