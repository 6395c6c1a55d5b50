"""Introspective-GTMM (Gemici et al. 2017): the memory is the model's own recent past.

Memory M_t is a first-in-first-out buffer of the last L steps, slot n holding (address, content):

    M_t = [(addr_{t-L+1}, c_{t-L+1}), ..., (addr_t, c_t)],   c_t = z_t   (or [z_t, h_t] with store_h)

so the model "introspects" on latents it has already inferred. Each of R heads reads by content on the ADDRESS part:

    k_r   = W_r addr_t (+ U_r h_t)                               key in address space
    beta_r = 1 + softplus(v_r . h_t + b_r)                        sharpness >= 1
    w_r,n = softmax_n(beta_r * cos(k_r, addr_n))   over filled slots
    r_r   = g_r * sum_n w_r,n c_n                                 read of head r
    g_r   = sigmoid(u_r . h_t + s_r * sum_n w_r,n cos(k_r, addr_n) + e_r) * (mass on filled slots)

The gate g_r lets the model ignore memory when nothing stored matches where it is now (a first visit), and the
written-mass factor makes a read of an empty buffer exactly zero. The read vector is [r_1, ..., r_R] (B, R*C).

``content_address`` (off by default; issue 14, docs/paper_ablation.md): a slot's address is addr_t + W_c z_t
(``base.content_address_layer``), so a key can find the slot of a frame by the frame's content (similarity-cued
recall). W_c starts at zero: the memory starts as the address-only one. ``content_keys`` (every slot memory's
option, ``base.ContentKeys``): read heads also match the stored latents with keys of their own, leaving the
addresses, and so the positional reads, untouched.

Fast path (``Memory.scan_*``): when every step's address is known before the loop (the ``actions`` and ``pose``
addresses, keys without h_t), every slot address the reads will ever see is known too, so the cosine similarities
of all T steps' keys to their N-slot windows are computed in one batched product before the loop, and the loop
carries only the content (a slot's address and fill flag never change once written: the window of step t over the
time-major buffer [M_{-1} addresses, addr_0, ..., addr_{T-1}] is positions t .. t+N-1).

Write attribution is exact: after the write of step t, slot n holds the write of step t - L + 1 + n (nothing while
that is negative), so ``attribute`` shifts the coefficients one slot towards the oldest end and needs no record.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gtmm.cli import UserError
from worldmodel.memory.base import (
    Memory, ReadGate, ReadKeys, State, check_step_inputs, content_address_layer, content_keys_layer, content_weights,
    cosine_similarity, gated_read, slot_address, with_content_match,
)


class IntrospectiveMemory(Memory):
    """FIFO of the last ``slots`` (address, latent) pairs read by R address-keyed attention heads."""

    def __init__(self, *, z_dim: int, h_dim: int, addr_dim: int, slots: int = 64, heads: int = 2,
                 store_h: bool = False, key_from_h: bool = False, init_sharpness: float = 10.0,
                 content_address: bool = False, content_keys: bool = False):
        super().__init__()
        if slots < 1 or heads < 1:
            raise UserError(f"introspective memory: expected slots >= 1 and heads >= 1, got slots={slots}, heads={heads}")
        self.z_dim, self.h_dim, self.addr_dim = z_dim, h_dim, addr_dim
        self.slots, self.heads, self.store_h = slots, heads, store_h
        self.content_dim = z_dim + (h_dim if store_h else 0)
        self.read_dim = heads * self.content_dim
        self.keys = ReadKeys(addr_dim=addr_dim, h_dim=h_dim, heads=heads, use_h=key_from_h, init_sharpness=init_sharpness)
        self.gate = ReadGate(h_dim=h_dim, heads=heads)
        self.content_address = content_address_layer(content_address, z_dim, addr_dim)  # W_c, or None
        self.content_keys = content_keys_layer(content_keys, h_dim, heads, z_dim)  # V (content read keys), or None

    def init_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> State:
        """Empty FIFO slots (addresses, contents, filled flags) for ``batch`` sequences."""
        N = self.slots
        return {
            "addr": torch.zeros(batch, N, self.addr_dim, device=device, dtype=dtype),  # (B, N, A) unit, oldest first
            "content": torch.zeros(batch, N, self.content_dim, device=device, dtype=dtype),  # (B, N, C)
            "filled": torch.zeros(batch, N, device=device, dtype=dtype),  # (B, N), 1 = slot holds a write
        }

    def check_inputs(self, h: Tensor, addr: Tensor, z: Tensor | None = None) -> None:
        """Shape asserts of h (B, H), addr (B, A) and z (B, Z) for the FIFO's step API."""
        check_step_inputs("introspective", h, addr, self.h_dim, self.addr_dim, z, self.z_dim)

    def h_linears(self) -> dict[str, nn.Linear]:
        """The layers on h_t by name: the read keys' and the read gate's."""
        return {**self.keys.h_linears(), **self.gate.h_linears(),
                **(self.content_keys.h_linears() if self.content_keys is not None else {})}

    def addr_linears(self) -> dict[str, nn.Linear]:
        """The read keys' projection of addr_t, by name."""
        return self.keys.addr_linears()

    def _attend(self, state: State, h: Tensor, addr: Tensor, pre: dict[str, Tensor]) -> dict[str, Tensor]:
        keys, beta = self.keys.from_pre(pre)  # (B, R, A), (B, R)
        similarity = cosine_similarity(keys, state["addr"], slots_unit=True)  # (B, R, N)
        similarity = with_content_match(similarity, self.content_keys, pre, state["content"])
        weights = content_weights(similarity, beta, valid=state["filled"])  # (B, R, N)
        return gated_read(self.gate, pre, weights, similarity, state["content"], state["filled"], self.read_dim)

    def _write(self, state: State, h: Tensor, addr: Tensor, z: Tensor, pre: dict[str, Tensor],
               attention: dict[str, Tensor] | None) -> State:
        return {
            # (B, N, A) normalised once, here
            "addr": push(state["addr"], F.normalize(slot_address(self.content_address, addr, z), dim=-1, eps=1e-6)),
            "content": push(state["content"], self._content(h, z)),  # (B, N, C)
            "filled": push(state["filled"], torch.ones_like(state["filled"][:, 0])),  # (B, N)
        }

    def _content(self, h: Tensor, z: Tensor) -> Tensor:
        return torch.cat([z, h], dim=-1) if self.store_h else z  # (B, C)

    # -- fast path: similarities of the whole sequence up front (module docstring) ----------------------------------

    def scan_prepare(self, state: State, addr: Tensor | None, pre_addr: dict[str, Tensor]
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """With h-free keys and addresses: all slot addresses and every step's key similarities before the loop;
        else nothing."""
        if (addr is None or self.keys.from_h is not None or self.content_address is not None
                or self.content_keys is not None):
            return {}, {}  # keys depend on h_t, or slot addresses or matches on z_t: the step-by-step read
        T, B = addr.shape[:2]
        N, R, A = self.slots, self.heads, self.addr_dim
        unit = F.normalize(addr, dim=-1, eps=1e-6).transpose(0, 1)  # (B, T, A) as the writes store them
        slot_addr = torch.cat([state["addr"], unit.to(state["addr"].dtype)], dim=1)  # (B, N+T, A) time-major buffer
        filled = torch.cat([state["filled"], state["filled"].new_ones(B, T)], dim=1)  # (B, N+T)
        keys = F.normalize(pre_addr[self.keys.addr_name].view(T, B, R, A), dim=-1, eps=1e-6)  # (T, B, R, A)
        # every key against every position in one product, then the band each step reads (positions t .. t+N-1)
        # as a strided view: [b, t, r, n] -> all[b, t*R + r, t + n]. (Materialising the T windows first and
        # multiplying them one by one costs more than the T*(N+T) products computed here.)
        all_pairs = torch.bmm(keys.transpose(0, 1).reshape(B, T * R, A),
                              slot_addr.transpose(1, 2).to(keys.dtype)).contiguous()  # (B, T*R, N+T)
        P = N + T
        similarity = all_pairs.as_strided((B, T, R, N), (T * R * P, R * P + 1, P, 1))  # (B, T, R, N)
        window_filled = filled.unfold(1, N, 1)[:, :T]  # (B, T, N)
        steps = {
            "fifo.similarity": similarity.transpose(0, 1),  # (T, B, R, N)
            "fifo.filled": window_filled.transpose(0, 1),  # (T, B, N)
            "fifo.empty": (window_filled < 0.5).transpose(0, 1),  # (T, B, N)
        }
        # after the last write, slot n holds position T + n
        return {"fifo.addr": slot_addr[:, T:], "fifo.final_filled": filled[:, T:]}, steps

    def scan_carry(self, state: State, const: dict[str, Tensor]) -> State:
        """Only the contents when the addresses were precomputed, else the whole state."""
        return {"content": state["content"]} if "fifo.addr" in const else state

    def scan_read(self, carry: State, h: Tensor, addr: Tensor, pre: dict[str, Tensor], const: dict[str, Tensor],
                  step: dict[str, Tensor]) -> dict[str, Tensor]:
        """One step's read, from the precomputed similarities when there are any."""
        if "fifo.addr" not in const:
            return self._attend(carry, h, addr, pre)
        similarity = step["fifo.similarity"]  # (B, R, N)
        beta = 1.0 + F.softplus(pre[self.keys.beta_name])  # (B, R)
        logits = (beta.unsqueeze(-1) * similarity).masked_fill(step["fifo.empty"].unsqueeze(1),
                                                               torch.finfo(similarity.dtype).min)
        weights = torch.softmax(logits, dim=-1)  # (B, R, N), as content_weights(..., valid=filled)
        return gated_read(self.gate, pre, weights, similarity, carry["content"], step["fifo.filled"], self.read_dim)

    def scan_write(self, carry: State, h: Tensor, addr: Tensor, z: Tensor, pre: dict[str, Tensor],
                   attention: dict[str, Tensor], const: dict[str, Tensor], step: dict[str, Tensor]) -> State:
        """One step's write: push the new content (addresses were precomputed), else ``_write``."""
        if "fifo.addr" not in const:
            return self._write(carry, h, addr, z, pre, attention)
        return {"content": push(carry["content"], self._content(h, z))}  # (B, N, C)

    def scan_finish(self, carry: State, const: dict[str, Tensor]) -> State:
        """The state after the loop: the precomputed addresses and fill, with the carried contents."""
        if "fifo.addr" not in const:
            return carry
        return {"addr": const["fifo.addr"], "content": carry["content"], "filled": const["fifo.final_filled"]}

    def write_record(self, state: State) -> dict[str, Tensor]:
        """The FIFO's attribution is fixed by its order: nothing to record."""
        return {}

    def attribute(self, coefficients: Tensor, record: dict[str, Tensor]) -> Tensor:
        """a_{t-1} (B, S, N) -> a_t (B, S+1, N): every earlier write moves one slot towards the oldest end (the
        oldest falls out), this step's write takes the newest slot N-1. Exact 0/1 coefficients."""
        B, S, N = coefficients.shape
        shifted = torch.cat([coefficients[..., 1:], coefficients.new_zeros(B, S, 1)], dim=-1)  # (B, S, N)
        newest = F.one_hot(torch.full((B, 1), N - 1, device=coefficients.device), N).to(coefficients.dtype)  # (B, 1, N)
        return torch.cat([shifted, newest], dim=1)  # (B, S+1, N)


def push(buffer: Tensor, item: Tensor) -> Tensor:
    """FIFO push: drop the oldest slot, append ``item`` (B, ...) as the newest. One concatenation (not an in-place
    roll + assignment) keeps the old state intact for autograd; the O(N) copy is one kernel at these sizes.
    (B, N, ...) -> (B, N, ...)"""
    return torch.cat([buffer[:, 1:], item.unsqueeze(1)], dim=1)
