"""GTMM with a Differentiable Neural Computer memory (Graves et al. 2016, Nature, Methods; Gemici et al. 2017).

Slots are [address part (A), content part (C)]; keys come from addr_t and match the address part, reads return the
content part. With our step order (read of step t before its write of step t) the DNC's "previous read weights"
for the free gates are this step's reads, and the temporal links used by a read are those of M_{t-1}:

  Read (R heads), from the state after step t-1:
    c^r   = softmax_n(beta cos(k_r, M^addr(n)))                        content weighting  ("Content-based addressing")
    f_r   = L w^r_{prev},  b_r = L^T w^r_{prev}                        forward / backward ("Temporal memory linkage")
    w^r   = pi_b b_r + pi_c c^r + pi_f f_r,  pi = softmax(.)            read modes          ("Read weighting")
    r     = sum_n w^r(n) M^content(n), gated as in ``ReadGate``

  Write:
    psi   = prod_r (1 - f^free_r w^r_r)                                retention           ("Dynamic memory allocation")
    u_t   = (u_{t-1} + w^w_{t-1} - u_{t-1} w^w_{t-1}) psi               usage
    a[phi_j] = (1 - u[phi_j]) prod_{i<j} u[phi_i],  phi = argsort(u)    allocation (freest slot first)
    c^w   = softmax_n(beta^w cos(k^w, M^addr(n)))
    w^w   = g^w (g^a a + (1 - g^a) c^w)                                 write weighting
    M_t   = M_{t-1} (1 - w^w e^T) + w^w v^T,  v = [addr_t, c_t]         erase and write
    L_t[i,j] = (1 - w^w_i - w^w_j) L_{t-1}[i,j] + w^w_i p_{t-1}[j],  L_t[i,i] = 0
    p_t   = (1 - sum_n w^w_n) p_{t-1} + w^w                             precedence

At initialisation writes go to freshly allocated slots (g^w, g^a ~ 0.98) and reads address by content (pi_c ~ 0.9).
The link matrix is (B, N, N): keep N modest (tens of slots).

Write attribution (``worldmodel.memory.base``): rho_t(n) = 1 - w^w_t(n) mean_c e_t(c), the erase averaged over the
content part.
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

BACKWARD, CONTENT, FORWARD = 0, 1, 2  # read-mode order in pi


def allocation_weights(usage: Tensor, eps: float = 1e-6) -> Tensor:
    """DNC allocation a (B, N): the least-used slot gets 1 - u, the next gets (1 - u) times the usage before it, ...

    Usage is nudged into [eps, 1] (as the reference implementation does) so the products stay differentiable; the
    stable sort makes ties (an empty memory) allocate the lowest index first.
    """
    usage = eps + (1.0 - eps) * usage  # (B, N)
    sorted_usage, order = torch.sort(usage, dim=-1, stable=True)  # (B, N) ascending: freest first
    # exclusive cumulative product prod_{i<j} u[phi_i]
    ones = torch.ones_like(sorted_usage[:, :1])
    before = torch.cumprod(torch.cat([ones, sorted_usage[:, :-1]], dim=-1), dim=-1)  # (B, N)
    sorted_allocation = (1.0 - sorted_usage) * before  # (B, N)
    return torch.zeros_like(usage).scatter(-1, order, sorted_allocation)  # back to slot order


class DNCMemory(Memory):
    """DNC memory of N (address, content) slots: R read heads with content/forward/backward modes, one write head
    with usage-based allocation, and a temporal link matrix."""

    def __init__(self, *, z_dim: int, h_dim: int, addr_dim: int, slots: int = 32, heads: int = 2,
                 store_h: bool = False, key_from_h: bool = False, init_sharpness: float = 10.0,
                 content_address: bool = False, content_keys: bool = False):
        super().__init__()
        if slots < 2 or heads < 1:
            raise UserError(f"dnc memory: expected slots >= 2 and heads >= 1, got slots={slots}, heads={heads}")
        self.z_dim, self.h_dim, self.addr_dim = z_dim, h_dim, addr_dim
        self.slots, self.heads, self.store_h = slots, heads, store_h
        self.content_dim = z_dim + (h_dim if store_h else 0)
        self.read_dim = heads * self.content_dim
        width = addr_dim + self.content_dim
        self.keys = ReadKeys(addr_dim=addr_dim, h_dim=h_dim, heads=heads, use_h=key_from_h, init_sharpness=init_sharpness)
        mode_bias = torch.zeros(3)
        mode_bias[CONTENT] = 3.0  # softmax([0, 3, 0]) ~ (0.04, 0.91, 0.04): content reads at first
        self.read_modes = small_linear(h_dim, heads * 3, bias=mode_bias.repeat(heads))
        self.free_gates = small_linear(h_dim, heads, bias=-3.0)  # rarely free what was just read, at first
        self.write_key = ReadKeys(addr_dim=addr_dim, h_dim=h_dim, heads=1, use_h=key_from_h, init_sharpness=init_sharpness,
                                  name="write_key")
        self.write_gate = small_linear(h_dim, 1, bias=4.0)  # g^w ~ 0.98: write every step
        self.allocation_gate = small_linear(h_dim, 1, bias=4.0)  # g^a ~ 0.98: to a free slot
        self.erase = small_linear(h_dim, width, bias=3.0)  # e ~ 0.95: a write mostly replaces the slot
        self.gate = ReadGate(h_dim=h_dim, heads=heads)
        self.content_address = content_address_layer(content_address, z_dim, addr_dim)  # W_c, or None
        self.content_keys = content_keys_layer(content_keys, h_dim, heads, z_dim)  # V (content read keys), or None

    def init_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> State:
        """Empty slots, zero usage, precedence, links and weights (retain 1) for ``batch`` sequences."""
        N, R = self.slots, self.heads
        zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
        return {
            "addr": zeros(batch, N, self.addr_dim),  # (B, N, A)
            "content": zeros(batch, N, self.content_dim),  # (B, N, C)
            "usage": zeros(batch, N),  # (B, N) u_{t-1}
            "written": zeros(batch, N),  # (B, N) soft occupancy, for the read gate
            "precedence": zeros(batch, N),  # (B, N) p_{t-1}
            "link": zeros(batch, N, N),  # (B, N, N) L_{t-1}[i, j]: i was written right after j
            "read_weights": zeros(batch, R, N),  # (B, R, N) w^r of the previous step
            "write_weights": zeros(batch, N),  # (B, N) w^w_{t-1}
            "write_retain": torch.ones(batch, N, device=device, dtype=dtype),  # (B, N) rho_{t-1}, diagnostics
        }

    def check_inputs(self, h: Tensor, addr: Tensor, z: Tensor | None = None) -> None:
        """Shape asserts of h (B, H), addr (B, A) and z (B, Z) for the DNC's step API."""
        check_step_inputs("dnc", h, addr, self.h_dim, self.addr_dim, z, self.z_dim)

    def h_linears(self) -> dict[str, nn.Linear]:
        """Every layer on h_t by name: keys, read modes, free gates, write key and gates, erase, gate."""
        return {**self.keys.h_linears(), "read_modes": self.read_modes, "free_gates": self.free_gates,
                **self.write_key.h_linears(), "write_gate": self.write_gate, "allocation_gate": self.allocation_gate,
                "erase": self.erase, **self.gate.h_linears(),
                **(self.content_keys.h_linears() if self.content_keys is not None else {})}

    def addr_linears(self) -> dict[str, nn.Linear]:
        """The read and write key projections of addr_t, by name."""
        return {**self.keys.addr_linears(), **self.write_key.addr_linears()}

    def _address(self, state: State, pre: dict[str, Tensor]) -> dict[str, Tensor]:
        """The read weights of this step and the write key's content weights, whose lookups (one similarity
        product and one softmax for R+1 keys against M_{t-1}) run together. -> weights, similarity (B, R, N) of the
        reads, write_content (B, N)."""
        R = self.heads
        read_keys, read_beta = self.keys.from_pre(pre)  # (B, R, A), (B, R)
        write_key, write_beta = self.write_key.from_pre(pre)  # (B, 1, A), (B, 1)
        B = read_keys.shape[0]
        similarity = cosine_similarity(torch.cat([read_keys, write_key], dim=1), state["addr"])  # (B, R+1, N)
        similarity = with_content_match(similarity, self.content_keys, pre, state["content"])  # the read keys only
        lookup = content_weights(similarity, torch.cat([read_beta, write_beta], dim=1),
                                 occupancy=state["written"])  # (B, R+1, N)
        content = lookup[:, :R]  # (B, R, N)
        previous = state["read_weights"]  # (B, R, N)
        link = state["link"]  # (B, N, N)
        forward = torch.bmm(previous, link.transpose(1, 2))  # (B, R, N)  f = L w
        backward = torch.bmm(previous, link)  # (B, R, N)  b = L^T w
        pi = torch.softmax(pre["read_modes"].view(B, R, 3), dim=-1)  # (B, R, 3)
        weights = (pi[..., BACKWARD : BACKWARD + 1] * backward + pi[..., CONTENT : CONTENT + 1] * content
                   + pi[..., FORWARD : FORWARD + 1] * forward)  # (B, R, N)
        return {"weights": weights, "similarity": similarity[:, :R], "write_content": lookup[:, R]}

    def _attend(self, state: State, h: Tensor, addr: Tensor, pre: dict[str, Tensor]) -> dict[str, Tensor]:
        heads = self._address(state, pre)
        out = gated_read(self.gate, pre, heads["weights"], heads["similarity"], state["content"], state["written"],
                         self.read_dim)
        out["write_content"] = heads["write_content"]  # for this step's write
        return out

    def _write(self, state: State, h: Tensor, addr: Tensor, z: Tensor, pre: dict[str, Tensor],
               attention: dict[str, Tensor] | None) -> State:
        # this step's reads and write-key lookup (the attend of the same step computed them)
        heads = attention if attention is not None else self._address(state, pre)
        read_weights = heads["weights"]  # (B, R, N)

        # Dynamic memory allocation: free what was just read (if the free gates say so), then allocate
        free = torch.sigmoid(pre["free_gates"]).unsqueeze(-1)  # (B, R, 1)
        retention = torch.prod(1.0 - free * read_weights, dim=1)  # (B, N) psi
        previous_write = state["write_weights"]  # (B, N)
        usage = (state["usage"] + previous_write - state["usage"] * previous_write) * retention  # (B, N) u_t
        allocation = allocation_weights(usage)  # (B, N)

        # Write weighting: allocation or content lookup of the write key (update the slot of a known address)
        write_content = heads["write_content"]  # (B, N)
        g_write = torch.sigmoid(pre["write_gate"])  # (B, 1)
        g_alloc = torch.sigmoid(pre["allocation_gate"])  # (B, 1)
        write_weights = g_write * (g_alloc * allocation + (1.0 - g_alloc) * write_content)  # (B, N)

        # Erase and write
        w = write_weights.unsqueeze(-1)  # (B, N, 1)
        content = torch.cat([z, h], dim=-1) if self.store_h else z  # (B, C)
        value = torch.cat([slot_address(self.content_address, addr, z), content], dim=-1).unsqueeze(1)  # (B, 1, A+C)
        erase = torch.sigmoid(pre["erase"]).unsqueeze(1)  # (B, 1, A+C)
        memory = torch.cat([state["addr"], state["content"]], dim=-1)  # (B, N, A+C)
        memory = memory * (1.0 - w * erase) + w * value  # (B, N, A+C)
        # attribution: the share of each slot's earlier content this write keeps (mean erase of the content part)
        retain = 1.0 - write_weights * erase[:, 0, self.addr_dim :].mean(-1, keepdim=True)  # (B, N)

        # Temporal memory linkage
        w_i, w_j = write_weights.unsqueeze(2), write_weights.unsqueeze(1)  # (B, N, 1), (B, 1, N)
        link = (1.0 - w_i - w_j) * state["link"] + w_i * state["precedence"].unsqueeze(1)  # (B, N, N)
        link = link * (1.0 - torch.eye(self.slots, device=link.device, dtype=link.dtype))  # no self-links
        precedence = (1.0 - write_weights.sum(-1, keepdim=True)) * state["precedence"] + write_weights  # (B, N)
        return {
            "addr": memory[..., : self.addr_dim],
            "content": memory[..., self.addr_dim :],
            "usage": usage,
            "written": mark_written(state["written"], write_weights),
            "precedence": precedence,
            "link": link,
            "read_weights": read_weights,
            "write_weights": write_weights,
            "write_retain": retain,
        }
