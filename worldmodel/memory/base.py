"""The contract every GTMM memory keeps, and the addressing pieces the slot memories share.

A memory is read and written once per model step (Gemici et al. 2017, sec. 3; x_t frame, a_{t-1} action):

    h_t    = LSTM(h_{t-1}, [z_{t-1}, a_{t-1}, read_{t-1}])
    addr_t = address.step(addr_state, h_t, a_{t-1}, pose_t)        # where am I?            (B, addr_dim)
    read_t = memory.read(M_{t-1}, h_t, addr_t)                      # what did I see here?   (B, read_dim)
    p_t = prior(h_t, read_t); q_t = posterior(enc(x_t), h_t, read_t); z_t ~ q_t
    M_t    = memory.write(M_{t-1}, h_t, addr_t, z_t)

Every slot holds an ADDRESS part (written from addr_t) and a CONTENT part (z_t, optionally also h_t). Read keys are
computed from addr_t (and optionally h_t) and matched against the address part only, and the content is returned:
to recall *what was seen at this place* the read must find the slot by where the agent was, not by what it saw.
The read of step t happens before the write of step t, so the memory never contains z_t itself.
With ``content_address=True`` (every slot memory's option) the address part is written as addr_t + W_c z_t, so a
key can also find a slot by what was seen there (the paper's sequence tasks cue recalls by content:
``content_address_layer``). With ``content_keys=True`` a read head can match the slot's latent instead, by a
key of its own whose length says how much (``ContentKeys``): a content read that leaves the address part alone.

State is a flat ``dict[str, Tensor]``; ``read`` and ``write`` are pure functions of their inputs (no in-place
updates, no ``.item()``, no Python branching on tensor values), so a step loop can be compiled or captured as a
CUDA graph, and truncated BPTT is ``{k: v.detach() for k, v in state.items()}``.

Shapes: B batch, N slots, R read heads, A = addr_dim, C = content size (Z, or Z + H when h_t is stored).

Write attribution (for retrieval diagnostics, ``worldmodel.retrieval``): which earlier steps' writes does slot n
hold? Every write of our memories is linear in the written value v_s = [addr_s, c_s]:

    M_t(n) = sum_{s <= t} a_t[s, n] v_s          (plus what the initial zeros became, which is zero)

and ``attribute`` carries the coefficients a_t (B, S, N) from one step to the next. For the soft memories it is

    a_t[s, n] = a_{t-1}[s, n] * rho_t[n]   (s < t),     a_t[t, n] = w_t[n]
    i.e.  a_t[s, n] = w_s[n] * prod_{s < s' <= t} rho_s'[n]

with w_t the write weighting and rho_t the share of each slot's earlier content that the write of step t keeps:
rho = 1 - w * mean(e) for an erase/add write (NTM, DNC: the erase vector's mean over the content part stands in
for its per-dimension values, exact when e is the same in every dimension, as at initialisation), rho = 0 on the
slot an LRU write zeroes and 1 elsewhere. The FIFO's coefficients are exact 0/1: slot n after the write of step t
holds step t - N + 1 + n. ``slot_shares`` turns coefficients into shares of a slot's content (each in [0, 1], at
most 1 per slot). To feed it, a memory's ``write`` keeps w_t and rho_t in the state it returns under the keys
``write_weights`` (B, N) and ``write_retain`` (B, N) (both present from ``init_state`` on, so the state's
structure never changes between steps), and ``write_record(state)`` returns them: views of tensors the write
computed anyway, so the step stays pure and costs nothing extra.

Fast path (``GTMM.observe(..., diagnostics=False)``, what training runs): a step is launch- and dispatch-bound, not
math-bound (a few dozen (B, 128) x (128, k) products per step), so the model
  - applies every linear layer that reads h_t alone (``h_linears``: sharpness, gates, location heads, erase ...)
    as ONE matrix product per step, fused with the address and the prior/posterior, and hands the memory the
    pre-activations as ``pre`` (a dict name -> (B, out)); the layers that read addr_t alone (``addr_linears``, the
    key projections) likewise, once for the whole sequence when the address does not depend on h_t;
  - passes the attention of the read to the write of the same step, which NTM/LRU/DNC would otherwise recompute;
  - lets a memory precompute per sequence what does not depend on the recurrence (``scan_prepare``; the FIFO's
    similarities to every slot address when the addresses are known up front) and carry less than its full state
    through the loop (``scan_read``/``scan_write``/``scan_finish``).
The public ``attend``/``write`` are the same math through the same code (``_attend``/``_write``) with ``pre``
computed layer by layer: the straightforward reference the fast path is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gtmm.cli import UserError

State = dict[str, Tensor]


class Memory(nn.Module):
    """Base class: an external memory read by address, returning content.

    Subclasses implement ``init_state``, ``_attend`` and ``_write`` (and list their per-step linear layers in
    ``h_linears`` / ``addr_linears``). ``read`` is ``attend(...)["read"]``; ``attend`` also returns the diagnostics
    that plots and tests need:
        read     (B, read_dim)  the gated read vector fed to the prior, posterior and next LSTM input
        weights  (B, R, N)      read attention over slots
        gate     (B, R)         the per-head gate in [0, 1] (0 = memory ignored)
    """

    read_dim: int = 0
    slots: int = 0  # N, the number of slots (0: no memory)

    def init_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> State:
        """The empty memory M_{-1} for ``batch`` sequences, every tensor (B, ...) on ``device``/``dtype``."""
        raise NotImplementedError

    # -- the per-step linear layers, by name (the fast path fuses them; see the module docstring) --------------------

    def h_linears(self) -> dict[str, nn.Linear]:
        """The layers applied to h_t (B, H) at every step, by the name ``_attend``/``_write`` read in ``pre``."""
        return {}

    def addr_linears(self) -> dict[str, nn.Linear]:
        """The layers applied to addr_t (B, A) at every step (key projections), by name."""
        return {}

    def pre_activations(self, h: Tensor, addr: Tensor) -> dict[str, Tensor]:
        """``pre`` computed layer by layer: {name: layer(h) or layer(addr)} (the reference of the fused products)."""
        pre = {name: layer(h) for name, layer in self.h_linears().items()}
        pre.update({name: layer(addr) for name, layer in self.addr_linears().items()})
        return pre

    # -- the public step API -----------------------------------------------------------------------------------------

    def check_inputs(self, h: Tensor, addr: Tensor, z: Tensor | None = None) -> None:
        """Shape asserts of the public step API (the fast path, which the model drives, skips them)."""

    def attend(self, state: State, h: Tensor, addr: Tensor) -> dict[str, Tensor]:
        """Read memory ``state`` (M_{t-1}) for controller ``h`` (B, H) at ``addr`` (B, A): read, weights, gate."""
        self.check_inputs(h, addr)
        return self._attend(state, h, addr, self.pre_activations(h, addr))

    def read(self, state: State, h: Tensor, addr: Tensor) -> Tensor:
        """The read vector (B, read_dim) of memory ``state`` (M_{t-1}) for controller ``h`` (B, H) at ``addr`` (B, A)."""
        return self.attend(state, h, addr)["read"]

    def read_weights(self, state: State, h: Tensor, addr: Tensor) -> Tensor:
        """Read attention (B, R, N) over slots, for plots and tests."""
        return self.attend(state, h, addr)["weights"]

    def write(self, state: State, h: Tensor, addr: Tensor, z: Tensor,
              attention: dict[str, Tensor] | None = None) -> State:
        """The next memory state M_t after writing latent ``z`` (B, Z) at ``addr`` (B, A). ``attention``: this step's
        ``attend`` output, whose read weights the NTM/LRU/DNC writes reuse instead of recomputing them."""
        self.check_inputs(h, addr, z)
        return self._write(state, h, addr, z, self.pre_activations(h, addr), attention)

    def _attend(self, state: State, h: Tensor, addr: Tensor, pre: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _write(self, state: State, h: Tensor, addr: Tensor, z: Tensor, pre: dict[str, Tensor],
               attention: dict[str, Tensor] | None) -> State:
        raise NotImplementedError

    # -- the sequence loop of the fast path (defaults: the step API on the full state) -------------------------------

    def scan_prepare(self, state: State, addr: Tensor | None, pre_addr: dict[str, Tensor]
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Work done once per sequence before the step loop, from M_{-1} ``state`` and, when the address does not
        depend on h_t, every step's address ``addr`` (T, B, A) and addr-linear outputs ``pre_addr`` (T, B, ...).
        Returns (constants, per-step tensors with time first (T, B, ...)); the loop hands step t their [t] slices."""
        return {}, {}

    def scan_carry(self, state: State, const: dict[str, Tensor]) -> State:
        """What the loop carries from step to step (default: the whole state)."""
        return state

    def scan_read(self, carry: State, h: Tensor, addr: Tensor, pre: dict[str, Tensor], const: dict[str, Tensor],
                  step: dict[str, Tensor]) -> dict[str, Tensor]:
        """The read of one step (an ``attend``-like dict; its ``read`` (B, read_dim) feeds the model)."""
        return self._attend(carry, h, addr, pre)

    def scan_write(self, carry: State, h: Tensor, addr: Tensor, z: Tensor, pre: dict[str, Tensor],
                   attention: dict[str, Tensor], const: dict[str, Tensor], step: dict[str, Tensor]) -> State:
        """The write of one step: the next carry."""
        return self._write(carry, h, addr, z, pre, attention)

    def scan_finish(self, carry: State, const: dict[str, Tensor]) -> State:
        """The memory state M_{T-1} after the loop, in ``init_state``'s layout."""
        return carry

    # -- write attribution -------------------------------------------------------------------------------------------

    def write_record(self, state: State) -> dict[str, Tensor]:
        """What the write that produced ``state`` did, for ``attribute``: ``write_weights`` w_t (B, N) and
        ``write_retain`` rho_t (B, N) (module docstring). Only views of the state: the model's cell returns them
        every step at no cost. The FIFO and ``none`` need nothing and return {}."""
        return {"write_weights": state["write_weights"], "write_retain": state["write_retain"]}

    def attribute(self, coefficients: Tensor, record: dict[str, Tensor]) -> Tensor:
        """Write attribution one step on: ``coefficients`` a_{t-1} (B, S, N), the part of slot n's content that is
        the value written at each of the S earlier steps, and ``record`` (``write_record`` of M_t) -> a_t
        (B, S+1, N), whose last row is this step's write. Soft memories: a_{t-1} * rho_t, then w_t appended."""
        weights, retain = record["write_weights"], record["write_retain"]  # (B, N) each
        return torch.cat([coefficients * retain.unsqueeze(1), weights.unsqueeze(1)], dim=1)  # (B, S+1, N)


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y (y > 0), to initialise a bias so that a softplus output starts at y."""
    return y + math.log(-math.expm1(-y))


def cosine_similarity(keys: Tensor, slots: Tensor, eps: float = 1e-6, slots_unit: bool = False) -> Tensor:
    """K(k, M_n) = k . M_n / (|k| |M_n|) for every head and slot (NTM eq. 6); an all-zero slot scores 0.

    ``slots_unit``: the slots were stored already normalised (a FIFO writes each address once, so normalising it
    at the write saves re-normalising all N slots at every read).
    keys (B, R, A), slots (B, N, A) -> (B, R, N)
    """
    slots = slots if slots_unit else F.normalize(slots, dim=-1, eps=eps)
    # bmm rather than einsum: the same product without einsum's per-call parsing (this runs every step)
    return torch.bmm(F.normalize(keys, dim=-1, eps=eps), slots.transpose(1, 2))


def content_weights(similarity: Tensor, beta: Tensor, valid: Tensor | None = None,
                    occupancy: Tensor | None = None) -> Tensor:
    """w_n = softmax_n(beta * K(k, M_n)) (NTM eq. 5), restricted to the slots that hold something.

    ``valid`` (B, N) in {0, 1} is a hard mask (a FIFO knows exactly which slots are filled). Invalid slots get the
    dtype's lowest finite logit rather than -inf: if no slot is valid the softmax is uniform (finite, and the gate
    zeroes it) instead of NaN, with no Python branch on the data.
    ``occupancy`` (B, N) in [0, 1] is the soft version for memories with soft writes: w_n ~ o_n exp(beta K_n).
    Without it, cosine similarity (blind to scale) would rank a slot that received a 1e-4 sliver of one soft write
    as high as the slot that received the write itself.
    similarity (B, R, N), beta (B, R) -> (B, R, N)
    """
    logits = beta.unsqueeze(-1) * similarity  # (B, R, N)
    if valid is not None:  # a branch on an argument's presence, not on data
        logits = logits.masked_fill((valid < 0.5).unsqueeze(1), torch.finfo(logits.dtype).min)
    if occupancy is not None:
        logits = logits + occupancy.clamp_min(1e-6).log().unsqueeze(1)
    return torch.softmax(logits, dim=-1)


class ReadKeys(nn.Module):
    """R read keys k_r = W_r addr_t (+ U_r h_t) and sharpnesses beta_r = 1 + softplus(v_r . h_t + b_r) >= 1.

    W_r starts near the identity, so that before any training a read already finds the slot written at the same
    address (keys live in the address space: the address part of a slot is addr_t itself). U_r starts at zero and
    is only built with ``use_h``: letting h_t move the key helps the hidden-state address of the paper but would
    leak "what I see" into "where I am" for the action/pose addresses.
    ``name`` prefixes the names of its layers' outputs in a memory's ``pre`` dict (``<name>.addr``, ``<name>.h``,
    ``<name>.beta``).
    """

    def __init__(self, *, addr_dim: int, h_dim: int, heads: int, use_h: bool = False, init_sharpness: float = 10.0,
                 name: str = "keys"):
        super().__init__()
        if init_sharpness <= 1.0:
            raise UserError(f"init_sharpness: expected > 1 (beta = 1 + softplus(.)), got {init_sharpness}")
        self.heads, self.addr_dim = heads, addr_dim
        self.addr_name, self.h_name, self.beta_name = f"{name}.addr", f"{name}.h", f"{name}.beta"
        self.from_addr = nn.Linear(addr_dim, heads * addr_dim, bias=False)
        with torch.no_grad():  # identity per head plus a little noise so the heads can specialise
            eye = torch.eye(addr_dim).repeat(heads, 1)  # (R*A, A)
            self.from_addr.weight.copy_(eye + 0.05 * torch.randn_like(eye) / math.sqrt(addr_dim))
        self.from_h = nn.Linear(h_dim, heads * addr_dim, bias=False) if use_h else None
        if self.from_h is not None:
            nn.init.zeros_(self.from_h.weight)
        self.sharpness = nn.Linear(h_dim, heads)
        with torch.no_grad():
            self.sharpness.weight.mul_(0.1)
            self.sharpness.bias.fill_(inverse_softplus(init_sharpness - 1.0))

    def h_linears(self) -> dict[str, nn.Linear]:
        """The layers on h_t by name: the sharpness beta, and the key's h part when keys read h."""
        layers = {self.beta_name: self.sharpness}
        if self.from_h is not None:
            layers[self.h_name] = self.from_h
        return layers

    def addr_linears(self) -> dict[str, nn.Linear]:
        """The key projection of addr_t, by name."""
        return {self.addr_name: self.from_addr}

    def from_pre(self, pre: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """keys (B, R, A) and beta (B, R) from the layers' outputs in ``pre``."""
        keys = pre[self.addr_name]  # (B, R*A)
        if self.from_h is not None:
            keys = keys + pre[self.h_name]
        beta = 1.0 + F.softplus(pre[self.beta_name])  # (B, R), >= 1
        return keys.view(keys.shape[0], self.heads, self.addr_dim), beta

    def forward(self, h: Tensor, addr: Tensor) -> tuple[Tensor, Tensor]:
        """keys (B, R, A) and beta (B, R) from h (B, H) and addr (B, A), layer by layer."""
        pre = {name: layer(h) for name, layer in self.h_linears().items()}
        pre.update({name: layer(addr) for name, layer in self.addr_linears().items()})
        return self.from_pre(pre)


class ReadGate(nn.Module):
    """g_r = sigmoid(v_r . h_t + s_r * match_r + b_r) * written_r: how much of head r's read reaches the model.

    ``match`` (B, R) is the attention-weighted cosine similarity (how well the key matched where it looked), so a
    head that finds nothing at this address can be switched off; ``written`` (B, R) is the attention mass on slots
    that hold a write, so reading an empty memory gives exactly zero with no branch on data. Its one layer's output
    is ``pre["gate"]``.
    """

    name = "gate"

    def __init__(self, *, h_dim: int, heads: int):
        super().__init__()
        self.from_h = nn.Linear(h_dim, heads)
        self.match_scale = nn.Parameter(torch.full((heads,), 4.0))
        with torch.no_grad():
            self.from_h.weight.mul_(0.1)
            self.from_h.bias.zero_()

    def h_linears(self) -> dict[str, nn.Linear]:
        """The gate's one layer on h_t, by name."""
        return {self.name: self.from_h}

    def from_pre(self, pre: dict[str, Tensor], match: Tensor, written: Tensor) -> Tensor:
        """The gate (B, R) in [0, 1]: sigmoid(layer output + scale * match), zero where nothing is written."""
        return torch.sigmoid(pre[self.name] + self.match_scale * match) * written  # (B, R)

    def forward(self, h: Tensor, match: Tensor, written: Tensor) -> Tensor:
        """The gate (B, R) from h (B, H), ``match`` (B, R) and ``written`` (B, R)."""
        return self.from_pre({self.name: self.from_h(h)}, match, written)


def gated_read(gate: ReadGate, pre: dict[str, Tensor], weights: Tensor, similarity: Tensor, content: Tensor,
               occupied: Tensor, read_dim: int) -> dict[str, Tensor]:
    """r_t = concat_r g_r * sum_n w_rn content_n: the read every slot memory returns, and its diagnostics.

    weights, similarity (B, R, N); content (B, N, C); occupied (B, N), 1 where a slot holds a write; ``pre`` holds
    the gate layer's output.
    """
    heads_read = torch.bmm(weights, content)  # (B, R, C)
    match = (weights * similarity).sum(-1)  # (B, R) expected cosine of what was attended
    written = (weights * occupied.unsqueeze(1)).sum(-1)  # (B, R) 0 for an empty memory
    g = gate.from_pre(pre, match, written)  # (B, R)
    read = (g.unsqueeze(-1) * heads_read).reshape(weights.shape[0], read_dim)  # (B, R*C)
    return {"read": read, "weights": weights, "gate": g}


def content_address_layer(enabled: bool, z_dim: int, addr_dim: int) -> nn.Linear | None:
    """W_c (Z -> A) of content addressing, or None: with it a write stores a_t = addr_t + W_c z_t as the slot's
    address, so a key can find a slot by *what* was written there, not only by where (``slot_address``).

    Why: the ``hidden`` address addr_t = P h_t is computed before x_t is seen, so without W_c a slot's address
    says nothing about its own frame, and no key can pick "the stored image of the cue's class" (issue 14:
    introspective on similarity-cued recall put 0.25 of its read on the stored image after 600 CPU steps, chance
    0.22, and 0.64 after 2,000; with W_c 0.90, recall KL / other 0.79 -> 0.54). The paper's memories are read by
    content for the same reason.
    W_c starts at zero: the memory starts as the address-only one and learns how much content its keys match."""
    if not enabled:
        return None
    layer = nn.Linear(z_dim, addr_dim, bias=False)
    nn.init.zeros_(layer.weight)
    return layer


class ContentKeys(nn.Module):
    """Read keys on what a slot holds, beside the address keys (``content_keys``, every slot memory's option):

        K_rn <- K_rn + c_r . z_n / |z_n|,      c_r = V_r h_t  (B, R, Z)

    with z_n the latent part of slot n's content. The key's length is its weight: a head with c_r = 0 reads by
    address alone, so each head, at each step, chooses whether content matters. V_r starts at zero: the memory
    starts as the address-only one.

    Why beside ``content_address``: that one writes addr_t + W_c z_t as the slot's address, so the content also
    moves every *positional* match, and for images unlike the training ones it moved them enough to misread
    (issue 14: one-shot recall of unseen classes put the read on the neighbouring slot in the costliest recalls;
    recall / reference 0.29 with it, 0.16 without; docs/paper_ablation.md). Its one layer's output is
    ``pre["content_keys"]``."""

    name = "content_keys"

    def __init__(self, *, h_dim: int, heads: int, z_dim: int):
        super().__init__()
        self.heads, self.z_dim = heads, z_dim
        self.from_h = nn.Linear(h_dim, heads * z_dim, bias=False)
        nn.init.zeros_(self.from_h.weight)

    def h_linears(self) -> dict[str, nn.Linear]:
        """The content keys' one layer on h_t, by name."""
        return {self.name: self.from_h}

    def match(self, pre: dict[str, Tensor], content: Tensor) -> Tensor:
        """c_r . z_n / |z_n| (B, R, N) of the keys in ``pre`` against the latents of ``content`` (B, N, C)."""
        keys = pre[self.name].view(content.shape[0], self.heads, self.z_dim)  # (B, R, Z)
        latents = F.normalize(content[..., : self.z_dim], dim=-1, eps=1e-6)  # (B, N, Z); an empty slot scores 0
        return torch.bmm(keys, latents.transpose(1, 2))  # (B, R, N)


def content_keys_layer(enabled: bool, h_dim: int, heads: int, z_dim: int) -> ContentKeys | None:
    """The memory's ``ContentKeys``, or None."""
    return ContentKeys(h_dim=h_dim, heads=heads, z_dim=z_dim) if enabled else None


def with_content_match(similarity: Tensor, keys: ContentKeys | None, pre: dict[str, Tensor], content: Tensor
                       ) -> Tensor:
    """``similarity`` (B, R', N) of the R read keys (first) and any write keys after them, with the read keys'
    content match added (``ContentKeys``); unchanged without content keys."""
    if keys is None:
        return similarity
    match = keys.match(pre, content)  # (B, R, N)
    R = match.shape[1]
    return similarity + match if similarity.shape[1] == R else torch.cat([similarity[:, :R] + match, similarity[:, R:]], 1)


def slot_address(layer: nn.Linear | None, addr: Tensor, z: Tensor) -> Tensor:
    """The address a write stores: addr_t (B, A), plus W_c z_t with content addressing (``layer``). (B, A)"""
    return addr if layer is None else addr + layer(z)


def check_step_inputs(name: str, h: Tensor, addr: Tensor, h_dim: int, addr_dim: int, z: Tensor | None = None,
                      z_dim: int = 0) -> None:
    """Shape asserts (internal invariants: the model, not the user, calls the memory)."""
    assert h.dim() == 2 and h.shape[1] == h_dim, f"{name}: h must be (B, {h_dim}), got {tuple(h.shape)}"
    assert addr.shape == (h.shape[0], addr_dim), f"{name}: addr must be (B, {addr_dim}), got {tuple(addr.shape)}"
    if z is not None:
        assert z.shape == (h.shape[0], z_dim), f"{name}: z must be (B, {z_dim}), got {tuple(z.shape)}"


def small_linear(in_dim: int, out_dim: int, bias: float | Tensor = 0.0, weight_scale: float = 0.1) -> nn.Linear:
    """A linear layer whose output starts near ``bias``: small weights, so a gate or mode starts where we put it
    (e.g. "write to the next slot") and training moves it from there."""
    layer = nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        layer.weight.mul_(weight_scale)
        layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype).expand(out_dim))
    return layer


def mark_written(written: Tensor, write_weights: Tensor) -> Tensor:
    """Soft occupancy o_n <- o_n + w_n (1 - o_n) = 1 - prod_t (1 - w_n,t): how much slot n holds any write.
    Used by the gate so that attention on never-written slots counts as reading nothing. (B, N) -> (B, N)"""
    return written + write_weights * (1.0 - written)


def slot_shares(coefficients: Tensor) -> Tensor:
    """The share of slot n's content that came from each step: a[s, n] / max(1, sum_s a[s, n]), (B, S, N).

    Coefficients can sum above 1 (an LRU slot that takes two soft writes holds 0.6 v_1 + 0.6 v_2; an erase below 1
    leaves some of the old value under the new one), so they are scaled down there; a sum below 1 means part of the
    slot is still empty (its initial zeros), which no step wrote. Shares are in [0, 1], at most 1 per slot.
    """
    return coefficients / coefficients.sum(1, keepdim=True).clamp_min(1.0)


def reset_state(state: State, fresh: State, is_first: Tensor) -> State:
    """Start a new episode in the rows where ``is_first`` (B,) bool is set: those rows take ``fresh``'s values
    (e.g. ``memory.init_state(B, device)``), the others keep theirs. Works for address-path states too; a
    ``torch.where`` per entry, so there is no branch on data. (B, ...) -> (B, ...)"""
    return {k: torch.where(is_first.view(-1, *([1] * (v.dim() - 1))), fresh[k], v) for k, v in state.items()}
