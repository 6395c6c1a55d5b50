"""GTMM with a Neural Turing Machine memory (Graves et al. 2014, sec. 3; Gemici et al. 2017).

Slots are split as everywhere in this package: M_t(n) = [address part (A), content part (C)]. Keys come from addr_t
and are matched against the address part; reads return the content part. Each head (R read heads, 1 write head)
turns its key into weights w_t over the N slots by the NTM's four stages:

    w^c   = softmax_n(beta * cos(k, M_{t-1}^addr(n)))                       content addressing   (eq. 5, 6)
    w^g   = g w^c + (1 - g) w_{t-1}                                         interpolation        (eq. 7)
    w~(n) = sum_j w^g(j) s(n - j)   (circular, shifts -S..S)                convolutional shift  (eq. 8)
    w(n)  = w~(n)^gamma / sum_j w~(j)^gamma,  gamma >= 1                     sharpening           (eq. 9)

    read   r = sum_n w^r(n) M^content(n), gated as in ``ReadGate``                              (eq. 2)
    write  M~ = M_{t-1} (1 - w^w e^T),  M_t = M~ + w^w v^T,  v = [addr_t, c_t], e = sigmoid(.)  (eq. 3, 4)

Gates g, shifts s, gamma, erase e come from h_t. At initialisation the read heads address by content (g ~ 1, no
shift) and the write head moves one slot forward each step (g ~ 0, shift +1): the memory starts out as a ring
buffer of (address, latent) read by address, and learning can make the write head overwrite the slot of a
revisited place instead (content-addressed write, g -> 1).

Write attribution (``worldmodel.memory.base``): rho_t(n) = 1 - w^w_t(n) mean_c e_t(c), the erase averaged over the
content part.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gtmm.cli import UserError
from worldmodel.memory.base import (
    Memory, ReadGate, ReadKeys, State, check_step_inputs, content_address_layer, content_keys_layer, content_weights,
    cosine_similarity, gated_read, inverse_softplus, mark_written, slot_address, small_linear, with_content_match,
)


class LocationHead(nn.Module):
    """Per-head interpolation gate g in (0, 1), shift distribution s over -S..S, sharpening gamma >= 1, from h_t.
    ``name`` prefixes its layers' outputs in the memory's ``pre`` dict (``<name>.g``, ``<name>.s``, ``<name>.gamma``)."""

    def __init__(self, *, h_dim: int, heads: int, shift_range: int, interpolate: float, shift: int, gamma: float,
                 name: str):
        super().__init__()
        self.heads, self.shifts = heads, 2 * shift_range + 1
        self.names = (f"{name}.g", f"{name}.s", f"{name}.gamma")
        self.interpolation = small_linear(h_dim, heads, bias=torch.logit(torch.tensor(interpolate)))
        shift_bias = torch.full((self.shifts,), -3.0)
        shift_bias[shift + shift_range] = 3.0  # most of the mass on the chosen initial shift
        self.shift = small_linear(h_dim, heads * self.shifts, bias=shift_bias.repeat(heads))
        self.sharpening = small_linear(h_dim, heads, bias=inverse_softplus(gamma - 1.0))

    def h_linears(self) -> dict[str, nn.Linear]:
        """Its three layers on h_t by name: interpolation g, shift s and sharpening gamma."""
        return dict(zip(self.names, (self.interpolation, self.shift, self.sharpening)))

    def from_pre(self, pre: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """g (B, R) in (0, 1), s (B, R, 2S+1) summing to 1 and gamma (B, R) >= 1 from ``pre``."""
        g_name, s_name, gamma_name = self.names
        shift = pre[s_name]  # (B, R*(2S+1))
        g = torch.sigmoid(pre[g_name])  # (B, R)
        s = torch.softmax(shift.view(shift.shape[0], self.heads, self.shifts), dim=-1)  # (B, R, 2S+1)
        gamma = 1.0 + F.softplus(pre[gamma_name])  # (B, R)
        return g, s, gamma

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """g, s and gamma from h (B, H), layer by layer."""
        return self.from_pre({name: layer(h) for name, layer in self.h_linears().items()})


def ntm_weights(w_content: Tensor, w_prev: Tensor, g: Tensor, s: Tensor, gamma: Tensor) -> Tensor:
    """NTM eq. 7-9 from the content weights (B, R, N) and the head's previous weights (B, R, N)."""
    w_g = g.unsqueeze(-1) * w_content + (1.0 - g.unsqueeze(-1)) * w_prev  # (B, R, N)   eq. 7
    shift_range = (s.shape[-1] - 1) // 2
    # eq. 8, w~(n) = sum_k s(k) w^g(n - k + S), as one product of the circularly padded windows of w^g with the
    # flipped shift distribution: window n of the padded weights holds w^g(n - S .. n + S)
    padded = torch.cat([w_g[..., -shift_range:], w_g, w_g[..., :shift_range]], dim=-1)  # (B, R, N + 2S)
    windows = padded.unfold(-1, s.shape[-1], 1)  # (B, R, N, 2S+1)
    w_s = torch.matmul(windows, s.flip(-1).unsqueeze(-1)).squeeze(-1)  # (B, R, N)
    # eq. 9; the clamp keeps d/dgamma (w^gamma log w) finite where a weight underflowed to 0
    w_sharp = w_s.clamp_min(1e-12) ** gamma.unsqueeze(-1)  # (B, R, N)
    return w_sharp / w_sharp.sum(-1, keepdim=True)


class NTMMemory(Memory):
    """NTM memory of N (address, content) slots: R content+location read heads, one erase/add write head."""

    def __init__(self, *, z_dim: int, h_dim: int, addr_dim: int, slots: int = 64, heads: int = 2,
                 store_h: bool = False, key_from_h: bool = False, init_sharpness: float = 10.0, shift_range: int = 1,
                 content_address: bool = False, content_keys: bool = False):
        super().__init__()
        if slots < 2 or heads < 1 or shift_range < 1:
            raise UserError(f"ntm memory: expected slots >= 2, heads >= 1, shift_range >= 1, got slots={slots}, "
                             f"heads={heads}, shift_range={shift_range}")
        self.z_dim, self.h_dim, self.addr_dim = z_dim, h_dim, addr_dim
        self.slots, self.heads, self.store_h = slots, heads, store_h
        self.content_dim = z_dim + (h_dim if store_h else 0)
        self.read_dim = heads * self.content_dim
        width = addr_dim + self.content_dim
        self.keys = ReadKeys(addr_dim=addr_dim, h_dim=h_dim, heads=heads, use_h=key_from_h, init_sharpness=init_sharpness)
        self.read_location = LocationHead(h_dim=h_dim, heads=heads, shift_range=shift_range, interpolate=0.95,
                                          shift=0, gamma=1.5, name="read")
        self.write_key = ReadKeys(addr_dim=addr_dim, h_dim=h_dim, heads=1, use_h=key_from_h, init_sharpness=init_sharpness,
                                  name="write_key")
        self.write_location = LocationHead(h_dim=h_dim, heads=1, shift_range=shift_range, interpolate=0.05,
                                           shift=1, gamma=3.0, name="write")
        self.erase = small_linear(h_dim, width, bias=3.0)  # e ~ 0.95: a write mostly replaces the slot
        self.gate = ReadGate(h_dim=h_dim, heads=heads)
        self.content_address = content_address_layer(content_address, z_dim, addr_dim)  # W_c, or None
        self.content_keys = content_keys_layer(content_keys, h_dim, heads, z_dim)  # V (content read keys), or None

    def init_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> State:
        """Empty slots and every head on slot 0, for ``batch`` sequences."""
        N, R = self.slots, self.heads
        first_slot = torch.zeros(batch, 1, N, device=device, dtype=dtype)
        first_slot[..., 0] = 1.0  # heads start on slot 0 (the write head's first shift then moves it to slot 1)
        return {
            "addr": torch.zeros(batch, N, self.addr_dim, device=device, dtype=dtype),  # (B, N, A)
            "content": torch.zeros(batch, N, self.content_dim, device=device, dtype=dtype),  # (B, N, C)
            "written": torch.zeros(batch, N, device=device, dtype=dtype),  # (B, N) soft occupancy
            "read_weights": first_slot.expand(batch, R, N).clone(),  # (B, R, N) w^r_{t-1}
            "write_weights": first_slot.clone(),  # (B, 1, N) w^w_{t-1}
            "write_retain": torch.ones(batch, N, device=device, dtype=dtype),  # (B, N) rho_{t-1}, diagnostics
        }

    def check_inputs(self, h: Tensor, addr: Tensor, z: Tensor | None = None) -> None:
        """Shape asserts of h (B, H), addr (B, A) and z (B, Z) for the NTM's step API."""
        check_step_inputs("ntm", h, addr, self.h_dim, self.addr_dim, z, self.z_dim)

    def h_linears(self) -> dict[str, nn.Linear]:
        """Every layer on h_t by name: read keys, read and write location heads, write key, erase, gate."""
        return {**self.keys.h_linears(), **self.read_location.h_linears(), **self.write_key.h_linears(),
                **self.write_location.h_linears(), "erase": self.erase, **self.gate.h_linears(),
                **(self.content_keys.h_linears() if self.content_keys is not None else {})}

    def addr_linears(self) -> dict[str, nn.Linear]:
        """The read and write key projections of addr_t, by name."""
        return {**self.keys.addr_linears(), **self.write_key.addr_linears()}

    def _address(self, state: State, pre: dict[str, Tensor]) -> dict[str, Tensor]:
        """The R read heads' and the write head's weights of this step (NTM eq. 5-9), as R+1 heads in one chain:
        both depend on M_{t-1}, h_t and addr_t only (z_t enters the write as its value), so one similarity
        product, one softmax and one shift/sharpen serve both. -> weights (B, R, N), similarity (B, R, N) of the
        reads, write_weights (B, 1, N)."""
        R = self.heads
        read_keys, read_beta = self.keys.from_pre(pre)  # (B, R, A), (B, R)
        write_key, write_beta = self.write_key.from_pre(pre)  # (B, 1, A), (B, 1)
        read_g, read_s, read_gamma = self.read_location.from_pre(pre)
        write_g, write_s, write_gamma = self.write_location.from_pre(pre)
        similarity = cosine_similarity(torch.cat([read_keys, write_key], dim=1), state["addr"])  # (B, R+1, N)
        similarity = with_content_match(similarity, self.content_keys, pre, state["content"])  # the read keys only
        w_content = content_weights(similarity, torch.cat([read_beta, write_beta], dim=1),
                                    occupancy=state["written"])  # (B, R+1, N)
        weights = ntm_weights(w_content, torch.cat([state["read_weights"], state["write_weights"]], dim=1),
                              torch.cat([read_g, write_g], dim=1), torch.cat([read_s, write_s], dim=1),
                              torch.cat([read_gamma, write_gamma], dim=1))  # (B, R+1, N)
        return {"weights": weights[:, :R], "similarity": similarity[:, :R], "write_weights": weights[:, R:]}

    def _attend(self, state: State, h: Tensor, addr: Tensor, pre: dict[str, Tensor]) -> dict[str, Tensor]:
        heads = self._address(state, pre)
        out = gated_read(self.gate, pre, heads["weights"], heads["similarity"], state["content"], state["written"],
                         self.read_dim)
        out["write_weights"] = heads["write_weights"]  # for this step's write
        return out

    def _write(self, state: State, h: Tensor, addr: Tensor, z: Tensor, pre: dict[str, Tensor],
               attention: dict[str, Tensor] | None) -> State:
        # the weights of this step's heads (the attend of the same step computed them); the read heads' are kept
        # as w^r_{t-1} for the next step's interpolation (eq. 7)
        heads = attention if attention is not None else self._address(state, pre)
        read_weights, write_weights = heads["weights"], heads["write_weights"]  # (B, R, N), (B, 1, N)
        w = write_weights[:, 0].unsqueeze(-1)  # (B, N, 1)

        content = torch.cat([z, h], dim=-1) if self.store_h else z  # (B, C)
        value = torch.cat([slot_address(self.content_address, addr, z), content], dim=-1).unsqueeze(1)  # (B, 1, A+C)   v_t
        erase = torch.sigmoid(pre["erase"]).unsqueeze(1)  # (B, 1, A+C)   e_t
        memory = torch.cat([state["addr"], state["content"]], dim=-1)  # (B, N, A+C)
        memory = memory * (1.0 - w * erase) + w * value  # eq. 3, 4
        # attribution: the share of each slot's earlier content this write keeps (mean erase of the content part)
        retain = 1.0 - write_weights[:, 0] * erase[:, 0, self.addr_dim :].mean(-1, keepdim=True)  # (B, N)
        return {
            "addr": memory[..., : self.addr_dim],
            "content": memory[..., self.addr_dim :],
            "written": mark_written(state["written"], write_weights[:, 0]),
            "read_weights": read_weights,
            "write_weights": write_weights,
            "write_retain": retain,
        }

    def write_record(self, state: State) -> dict[str, Tensor]:
        """The write weights (B, N) of the single write head and the retain factors (B, N)."""
        return {"write_weights": state["write_weights"][:, 0], "write_retain": state["write_retain"]}  # (B, N) each
