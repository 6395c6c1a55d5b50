"""The action-conditioned Generative Temporal Model with Memory (Gemici et al. 2017, arXiv 1702.04649).

One step of the model (the cell, `GTMMCell`), with x_t the frame and a_{t-1} the action that led to it:

    (1) h_t        = LSTM(h_{t-1}, [z_{t-1}, a_{t-1}, r_{t-1}])          controller
    (2) addr_t     = address.step(h_t, a_{t-1}, pose_t)                  where this step lives in memory
    (3) r_t        = memory.read(M_{t-1}, h_t, addr_t)                    recall, keyed by the address
    (4) p(z_t)     = N(mu_p, sigma_p) = prior(h_t, r_t)                   what the model expects to see
    (5) q(z_t|x_t) = N(mu_q, sigma_q) = posterior(e_t, h_t, r_t)          with e_t = enc(x_t)
    (6) z_t        ~ q (teacher forcing) or p (open loop / dreams)
    (7) M_t        = memory.write(M_{t-1}, h_t, addr_t, z_t)             store the latent (or its mean) under its address
    (8) p(x_t|z_t) = dec(z_t)                                             observation model

    ELBO = sum_t E_q[log p(x_t | z_t)] - KL(q(z_t) || p(z_t))             (paper eq. 1; we report both terms per step)

An action address with the blocked-move gate (`worldmodel.gate`) scales step (2)'s integration by m_t, the
probability that a_{t-1} took effect: from the frames (x_{t-1}, x_t) when they are observed (computed for all steps
up front), from z_{t-1} and a_{t-1} in open loop and dreams (inside the step). Training adds the gate's auxiliary
loss (`forward`'s `gate_aux`).

The sequence wrapper (`GTMM`) encodes (5) and decodes (8) all time steps in one batched call; only (1)-(7), the
recurrence and the memory, run step by step: either through `GTMMCell.forward`, layer by layer with every memory
diagnostic (the reference, `diagnostics=True`), or on the fast path that training runs (`GTMMCell.scan_*`: what
does not depend on the recurrence hoisted out of the loop, the per-step layers fused, optionally compiled by
`GTMM.compile_step`), the same numbers within float rounding (tests/test_fast_path.py).
Axis legend: see `worldmodel/__init__.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gtmm.cli import UserError
from worldmodel.address import build_address
from worldmodel.config import ModelConfig
from worldmodel.gate import loss as gate_loss_fn
from worldmodel.reward import RewardHead, loss as reward_loss_fn
from worldmodel.memory import build_memory
from worldmodel.memory.introspective import IntrospectiveMemory
from worldmodel.nets import ActionEmbedding, Decoder, Encoder, GaussianHead, outlier_kl
from worldmodel.path import PathHead
from worldmodel.read_target import fifo_targets, read_loss

GAUSSIAN_PIXEL_STD = 0.1  # fixed std of the "gaussian" observation model, on pixels in [0, 1]


@dataclass
class ModelState:
    """The recurrent state carried from step t-1 to step t (everything the next step needs)."""

    h: torch.Tensor  # (B, H) LSTM output h_{t-1}
    c: torch.Tensor  # (B, H) LSTM cell
    z: torch.Tensor  # (B, Z) latent z_{t-1}
    read: torch.Tensor  # (B, read_dim) memory read r_{t-1}
    memory: dict[str, torch.Tensor]  # M_{t-1}, the memory's own tensors
    address: dict[str, torch.Tensor]  # the address pathway's recurrent state

    @property
    def batch_size(self) -> int:
        """Number of sequences (B)."""
        return self.h.shape[0]

    def detach(self) -> "ModelState":
        """The same state with every tensor detached from the autograd graph."""
        return ModelState(
            h=self.h.detach(), c=self.c.detach(), z=self.z.detach(), read=self.read.detach(),
            memory={k: v.detach() for k, v in self.memory.items()},
            address={k: v.detach() for k, v in self.address.items()},
        )


def frames_to_float(obs: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, C) -> float (B, T, C, H, W) in [0, 1]."""
    return obs.permute(0, 1, 4, 2, 3).float().div(255.0)


# the batch contract of `worldmodel/__init__.py`: key -> dtype
BATCH_DTYPES = {"obs": torch.uint8, "prev_action": torch.int64, "revisit": torch.bool, "pose": torch.float32}
# optional keys (the reward heads train on them when present): the reward received on arriving at frame t, and
# whether the episode terminated there (B, T)
OPTIONAL_DTYPES = {"reward": torch.float32, "terminated": torch.bool}


def batch_to_torch(batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The batch contract's numpy arrays (or tensors) as tensors on `device`, dtypes checked."""
    out = {}
    for key, dtype in BATCH_DTYPES.items():
        if key not in batch:
            raise UserError(f"batch: missing key {key!r}; expected obs, prev_action, revisit, pose")
        out[key] = torch.as_tensor(batch[key]).to(device=device, dtype=dtype, non_blocking=True)
    for key, dtype in OPTIONAL_DTYPES.items():
        if key in batch:
            out[key] = torch.as_tensor(batch[key]).to(device=device, dtype=dtype, non_blocking=True)
    return out


class GTMMCell(nn.Module):
    """One step of the GTMM, equations (1)-(7) of the module docstring.

    Two ways to run it, the same math:
      - `forward`: one step, layer by layer, with every diagnostic (the reference; dreams and diagnostics use it);
      - the fast path, `scan_prepare` once per sequence, then `scan_step` per step (what training runs, and what
        `GTMM.compile_step` compiles): everything that does not depend on the recurrence is computed for all T
        steps up front (the action's share of the LSTM gates, the frame's share of the posterior, the addresses
        when they do not read h_t, the FIFO's similarities; with frames, the prior, which then feeds nothing in
        the loop), and the layers that read h_t alone (the address, the memory's gates and keys, the h_t columns
        of the head that drives z_t) are ONE matrix product per step. A step is launch/dispatch-bound (a few dozen
        small products), so op count is what costs.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.action_embed = ActionEmbedding(cfg.num_actions)
        self.memory = build_memory(cfg.memory, z_dim=cfg.z_dim, h_dim=cfg.h_dim, addr_dim=cfg.addr_dim,
                                   slots=cfg.slots, heads=cfg.heads, **cfg.memory_kwargs)
        self.address = build_address(cfg.address, h_dim=cfg.h_dim, num_actions=cfg.num_actions,
                                     pose_dim=cfg.pose_dim, addr_dim=cfg.addr_dim, embed_dim=cfg.embed_dim,
                                     z_dim=cfg.z_dim, **cfg.address_kwargs)
        self.gate = getattr(self.address, "gate", None)  # the blocked-move gate of an action address, or None
        read_dim = self.memory.read_dim
        self.lstm = nn.LSTMCell(cfg.z_dim + self.action_embed.dim + read_dim, cfg.h_dim)
        self.prior = GaussianHead(cfg.h_dim + read_dim, cfg.hidden_dim, cfg.z_dim,
                                  skip_dim=read_dim if cfg.prior_skip else 0)
        self.posterior = GaussianHead(cfg.embed_dim + cfg.h_dim + read_dim, cfg.hidden_dim, cfg.z_dim)
        # the fast path's layout of its fused products
        self.write_mean = cfg.write_latent == "mean"  # step (7) stores the distribution's mean, not the draw
        self._has_memory = self.memory.slots > 0  # with no memory the address feeds nothing: the fast path skips it
        h_layers = self._h_layers()
        # column blocks of the fused product on h_t: each layer's, then "heads" (the driving head's first layer)
        self._h_names = (*h_layers, "heads")
        self._h_widths = [layer.out_features for layer in h_layers.values()]
        self._h_width = sum(self._h_widths)  # the columns before the heads
        addr_layers = self.memory.addr_linears() if self._has_memory else {}
        self._addr_names = tuple(addr_layers)
        self._addr_widths = [layer.out_features for layer in addr_layers.values()]

    def _h_layers(self) -> dict[str, nn.Linear]:
        """The address's and the memory's layers on h_t (the fast path fuses them with the driving head's)."""
        if not self._has_memory:
            return {}
        layers = {**self.address.h_linears(), **self.memory.h_linears()}
        assert len(layers) == len(self.address.h_linears()) + len(self.memory.h_linears()), "duplicate layer names"
        return layers

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> ModelState:
        """The state before the first frame: zero h, c, z and read, and empty memory and address path."""
        zeros = lambda n: torch.zeros(batch, n, device=device, dtype=dtype)  # noqa: E731
        return ModelState(
            h=zeros(self.cfg.h_dim), c=zeros(self.cfg.h_dim), z=zeros(self.cfg.z_dim),
            read=zeros(self.memory.read_dim),
            memory=self.memory.init_state(batch, device, dtype),
            address=self.address.init_state(batch, device, dtype),
        )

    def forward(
        self,
        state: ModelState,
        prev_action: torch.Tensor,
        pose: torch.Tensor,
        embed: Optional[torch.Tensor] = None,
        sample: bool = True,
        noise: Optional[torch.Tensor] = None,
        moved: Optional[torch.Tensor] = None,
    ) -> tuple[dict[str, torch.Tensor], ModelState]:
        """One step. prev_action (B,) int64 (-1 = none); pose (B, D); embed (B, E) = enc(x_t), or None to run open
        loop from the prior. `sample=False` takes the mean of whichever distribution drives z_t; `noise` (B, Z) is
        the standard normal draw of a sample (default: drawn here). `moved` (B,): the blocked-move gate's m_t
        from the frames (`GTMM.observe` computes it); None with a gate = its open-loop guess from z_{t-1}.

        `out` holds prior_mean/std (and post_mean/std with `embed`), z, h, addr, read, and the memory diagnostics
        that `worldmodel.retrieval` reads (tensors the step computed anyway): `read_weights` (B, R, N) the read
        attention over the slots of M_{t-1}, `read_gate` (B, R), and for soft-write memories the write record
        `write_weights`, `write_retain` (B, N) of `Memory.write_record`. The `none` memory gives (B, 0, 0) and (B, 0).
        """
        B = state.batch_size
        assert prev_action.shape == (B,), f"prev_action: expected ({B},), got {tuple(prev_action.shape)}"
        assert pose.shape == (B, self.cfg.pose_dim), f"pose: expected ({B}, {self.cfg.pose_dim}), got {tuple(pose.shape)}"

        # (1) controller: the previous latent, the action that led here and the previous read
        action = self.action_embed(prev_action).to(state.z.dtype)  # (B, A+1)
        h, c = self.lstm(torch.cat([state.z, action, state.read], dim=-1), (state.h, state.c))  # (B, H) each

        # (2) address of this step (gated: did a_{t-1} move us?); (3) read the memory written at earlier steps
        if self.gate is not None and moved is None and self.address.guesses_moves:
            moved = self.move_guess(state, prev_action)  # (B,) (G2): open loop
        addr, address_state = self.address.step(state.address, h, prev_action, pose, moved, embed)  # (B, addr_dim)
        places = self.address.hypotheses(address_state) if embed is None and self._has_memory else None
        if places is None:
            attention = self.memory.attend(state.memory, h, addr)  # one attend: the read and its diagnostics
        else:  # open loop, unsure where it is: E_places[read at the place], by the address's probabilities
            attention = self._attend_mixture(state.memory, h, *places)
        read = attention["read"]  # (B, read_dim)

        # (4) prior and (5) posterior
        prior_mean, prior_std = self.prior(torch.cat([h, read], dim=-1))  # (B, Z) each
        out = {"prior_mean": prior_mean, "prior_std": prior_std}
        if places is not None:
            # (4') the prior's mean were the agent at each likely place: a forecast can hedge over the places' frames
            # (`GTMM.imagine(hedge=True)`), where the read above hedges over their latents
            place_reads = attention.pop("place_read")  # (B, P, read_dim)
            h_rows = h.unsqueeze(1).expand(-1, place_reads.shape[1], -1)  # (B, P, H)
            out["place_mean"] = self.prior(torch.cat([h_rows, place_reads], dim=-1))[0]  # (B, P, Z)
            out["place_prob"] = places[1]  # (B, P)
        if embed is not None:
            assert embed.shape == (B, self.cfg.embed_dim), f"embed: expected ({B}, {self.cfg.embed_dim}), got {tuple(embed.shape)}"
            post_mean, post_std = self.posterior(torch.cat([embed, h, read], dim=-1))  # (B, Z) each
            out.update(post_mean=post_mean, post_std=post_std)
            mean, std = post_mean, post_std
        else:
            mean, std = prior_mean, prior_std

        # (6) the latent, reparameterised so gradients flow into mean and std
        if sample:
            z = mean + std * (torch.randn_like(std) if noise is None else noise.to(std.dtype))  # (B, Z)
        else:
            z = mean

        # (7) write z_t (or its mean) under addr_t (reusing the read's attention, which NTM/LRU/DNC writes need again)
        written = mean if self.write_mean else z  # (B, Z)
        memory = self.memory.write(state.memory, h, addr, written, attention=attention)
        out.update(z=z, h=h, addr=addr, read=read, read_weights=attention["weights"], read_gate=attention["gate"])
        out.update(self.memory.write_record(memory))  # write_weights, write_retain (soft memories), for attribution
        return out, ModelState(h=h, c=c, z=z, read=read, memory=memory, address=address_state)

    def _attend_mixture(self, memory: dict[str, torch.Tensor], h: torch.Tensor, addrs: torch.Tensor,
                        prob: torch.Tensor) -> dict[str, torch.Tensor]:
        """The memory's attend at each of H places (addrs (B, H, A), prob (B, H)), every output the probability-
        weighted mean over them (the read, its weights and gates): one attend on B*H rows."""
        B, H = prob.shape
        rows = {k: v.repeat_interleave(H, dim=0) for k, v in memory.items()}  # (B*H, ...)
        out = self.memory.attend(rows, h.repeat_interleave(H, dim=0), addrs.reshape(B * H, -1))
        w = prob.reshape(B * H).to(h.dtype)
        mixed = {k: (v * w.view(-1, *[1] * (v.dim() - 1))).view(B, H, *v.shape[1:]).sum(1) for k, v in out.items()}
        mixed["place_read"] = out["read"].view(B, H, -1)  # (B, H, read_dim) each place's own read
        return mixed

    def move_guess(self, state: ModelState, prev_action: torch.Tensor) -> torch.Tensor:
        """The gate's open-loop belief (G2) that a_{t-1} (B,) moves the agent from where `state` is: (B,) in [0, 1],
        from z_{t-1} and the walls the address's walk has met (`ActionAddress.gate_features`)."""
        extra = self.address.gate_features(state.address)
        return torch.sigmoid(self.gate.predicted_logits(state.z, prev_action, extra))

    # -- fast path ---------------------------------------------------------------------------------------------------

    def scan_prepare(self, state: ModelState, prev_action: torch.Tensor, pose: torch.Tensor,
                     embed: Optional[torch.Tensor], noise: Optional[torch.Tensor], moved: Optional[torch.Tensor] = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The per-sequence work of the fast path: prev_action (B, T), pose (B, T, D), embed (B, T, E) or None
        (open loop), noise (T, B, Z) or None (means), moved (B, T) the gate's m_t from the frames (or None).

        Returns (constants, per-step tensors (T, B, ...), the address state after the last step). Constants are
        the fused weights: `lstm.w` (4H, Z+R+H) on [z_{t-1}, r_{t-1}, h_{t-1}]; `h.w` (F, H) the layers on h_t;
        `read.w` the r_t columns of the driving head's first layer; `addr.w` the key projections when addr_t is
        only known inside the step. Under autocast they are cast once here, not at every step.
        """
        cfg = self.cfg
        B, T = prev_action.shape
        H, Z, E, A1 = cfg.h_dim, cfg.z_dim, cfg.embed_dim, self.action_embed.dim
        dtype = _autocast_dtype(prev_action.device)
        cast = (lambda x: x) if dtype is None else (lambda x: x.to(dtype))  # noqa: E731
        const: dict[str, torch.Tensor] = {}
        steps: dict[str, torch.Tensor] = {}

        # (1) LSTM: the action's columns of W_ih are a lookup (a one-hot input), done for all steps at once
        w_ih = self.lstm.weight_ih  # (4H, Z + A+1 + R)
        const["lstm.w"] = cast(torch.cat([w_ih[:, :Z], w_ih[:, Z + A1:], self.lstm.weight_hh], dim=1))  # (4H, Z+R+H)
        action_w = w_ih[:, Z:Z + A1].t()  # (A+1, 4H)
        steps["lstm.x"] = cast(F.embedding(prev_action.t() + 1, action_w) + (self.lstm.bias_ih + self.lstm.bias_hh))

        # (2)-(5) the layers on h_t, fused: [address and memory layers | the h_t columns of the head that drives z_t]:
        # the posterior with frames (the prior feeds nothing in the loop then: `GTMM._scan` runs it on all steps
        # at once afterwards), the prior in open loop
        head = (self.posterior if embed is not None else self.prior).net[0]  # Linear([e,] h, r -> hidden)
        h_cols = E if embed is not None else 0  # where the h_t columns start
        layers = self._h_layers()
        weights = [layer.weight for layer in layers.values()] + [head.weight[:, h_cols:h_cols + H]]
        biases = [layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
                  for layer in layers.values()] or [head.bias[:0]]  # none: an empty block
        const["h.w"] = cast(torch.cat(weights, dim=0))  # (F, H)
        if embed is not None:
            # the frame's share of the posterior's first layer, all steps in one product
            frame = F.linear(embed.transpose(0, 1), head.weight[:, :E], head.bias)  # (T, B, hidden)
            steps["h.bias"] = cast(torch.cat([torch.cat(biases).expand(T, B, -1), frame], dim=-1))  # (T, B, F)
        else:
            const["h.b"] = cast(torch.cat(biases + [head.bias]))  # (F,)
        if self.memory.read_dim > 0:
            const["read.w"] = cast(head.weight[:, h_cols + H:])  # (hidden, R): the r_t columns

        # (2) the address, and the memory's per-sequence work
        address_state = state.address
        if self._has_memory:
            addr_layers = self.memory.addr_linears()
            addr_w = torch.cat([layer.weight for layer in addr_layers.values()], dim=0)  # (Fa, A)
            pre_addr: dict[str, torch.Tensor] = {}
            addr_seq = None
            if self.address.uses_h:
                const["addr.w"] = cast(addr_w)
            else:
                addr, address_state = self.address.sequence(state.address, prev_action, pose, moved, embed)  # (B, T, A)
                addr_seq = addr.transpose(0, 1)  # (T, B, A)
                keys = F.linear(addr_seq, addr_w)  # (T, B, Fa), every step's key projections at once
                pre_addr = dict(zip(self._addr_names, keys.split(self._addr_widths, dim=-1)))
                steps["addr"] = addr_seq
                steps.update(pre_addr)
            memory_const, memory_steps = self.memory.scan_prepare(state.memory, addr_seq, pre_addr)
            assert not (set(memory_const) & set(const)) and not (set(memory_steps) & set(steps)), "name clash"
            const.update(memory_const)
            steps.update(memory_steps)
        if noise is not None:
            steps["noise"] = noise
        return const, steps, address_state

    def scan_carry(self, state: ModelState, const: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What the fast path's loop carries from step to step."""
        memory = self.memory.scan_carry(state.memory, const) if self._has_memory else {}
        return {"h": state.h, "c": state.c, "z": state.z, "read": state.read, "memory": memory}

    def scan_step(self, const: dict[str, torch.Tensor], x: dict[str, torch.Tensor], carry: dict[str, Any]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """One step of the fast path: (1)-(7) from the carry of step t-1 and step t's slices `x` of the per-step
        tensors. A pure function of tensors (no asserts, no `.item()`, no branch on data): `torch.compile` captures
        it whole. Returns `head` (B, 2Z), the raw output of the head that drove z_t (the posterior with frames, else
        the prior), `z`, `h`, `read` (and `addr`, `read_weights`)."""
        # (1) controller: gates = [action share, precomputed] + W [z_{t-1}, r_{t-1}, h_{t-1}]
        gates = torch.addmm(x["lstm.x"], torch.cat([carry["z"], carry["read"], carry["h"]], dim=-1),
                            const["lstm.w"].t())  # (B, 4H)
        i, f, g, o = gates.chunk(4, dim=-1)  # nn.LSTMCell's gate order
        c = torch.sigmoid(f) * carry["c"].to(gates.dtype) + torch.sigmoid(i) * torch.tanh(g)  # (B, H)
        h = torch.sigmoid(o) * torch.tanh(c)  # (B, H)

        # every layer on h_t in one product: address/memory pre-activations, then the driving head's first layer
        fused = torch.addmm(x["h.bias"] if "h.bias" in x else const["h.b"], h, const["h.w"].t())  # (B, F)
        out: dict[str, torch.Tensor] = {}
        read, memory = carry["read"], carry["memory"]
        if self._has_memory:
            # (2) address; (3) read M_{t-1}. One split (one backward node) rather than a slice per layer.
            widths = [*self._h_widths, fused.shape[-1] - self._h_width]
            pre = dict(zip(self._h_names, fused.split(widths, dim=-1)))
            addr = x["addr"] if "addr" in x else self.address.from_pre(pre)  # (B, addr_dim)
            if "addr.w" in const:
                keys = addr @ const["addr.w"].t()  # (B, Fa)
                pre.update(zip(self._addr_names, keys.split(self._addr_widths, dim=-1)))
            else:
                pre.update({name: x[name] for name in self._addr_names})
            attention = self.memory.scan_read(memory, h, addr, pre, const, x)
            read = attention["read"]  # (B, read_dim)
            out["addr"] = addr
            out["read_weights"] = attention["weights"]  # (B, R, N): what the read loss (P5) supervises
            hidden = pre.pop("heads")  # (B, hidden)
        else:
            hidden = fused  # (B, hidden)

        # (5) with frames, else (4): the head that drives z_t; first layer = its fused h_t columns + r_t columns
        if "read.w" in const:
            hidden = torch.addmm(hidden, read, const["read.w"].t())
        head = self.posterior if "h.bias" in x else self.prior  # teacher forcing: the posterior
        out["head"] = F.linear(F.gelu(hidden), head.net[2].weight, head.net[2].bias)  # (B, 2Z)
        if head.skip is not None:  # the prior's linear path from the read (`prior_skip`)
            out["head"] = torch.addmm(out["head"], read, head.skip.weight.t())
        mean, std = head.split(out["head"])  # (B, Z) each

        # (6) the latent; (7) the write
        z = mean + std * x["noise"].to(std.dtype) if "noise" in x else mean  # (B, Z)
        if self._has_memory:
            memory = self.memory.scan_write(memory, h, addr, mean if self.write_mean else z, pre, attention, const, x)
        out.update(z=z, h=h, read=read)
        return out, {"h": h, "c": c, "z": z, "read": read, "memory": memory}

    def scan_finish(self, carry: dict[str, Any], const: dict[str, torch.Tensor], state: ModelState,
                    address_state: dict[str, torch.Tensor]) -> ModelState:
        """The recurrent state after the loop (`state` is the one it started from). With no memory the address
        path feeds nothing and the fast path does not run it: its state is returned as it came in."""
        memory = self.memory.scan_finish(carry["memory"], const) if self._has_memory else state.memory
        return ModelState(h=carry["h"], c=carry["c"], z=carry["z"], read=carry["read"], memory=memory,
                          address=address_state)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The lower-precision dtype of an active autocast region on `device`'s type, else None."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class GTMM(nn.Module):
    """The sequence model: batched encoder/decoder around the step-by-step `GTMMCell`.

    Public API (used by training, evaluation and `worldmodel.dream`):
      - `init_state(batch, device)`                          -> ModelState
      - `observe(obs, prev_action, pose, state=None)`        -> dict of per-step nll, kl, z, ... and the final state
      - `imagine(state, prev_action, pose=None)`             -> open-loop frames from the prior, and the final state
        (both with `diagnostics=False`: the fast path, without the memory diagnostics)
      - `step_prior(state, action, pose=None)`               -> one dreamed frame (for a Gymnasium env)
      - `decode_mean(z)`                                     -> frames in [0, 1], (..., H, W, C)
      - `forward(batch, free_nats, kl_balance)`              -> training loss dict (what DDP wraps), fast path
      - `compile_step(mode)`                                 -> compile the fast path's step (torch.compile)
      - `set_conv_bf16(on)`                                  -> encoder and decoder in bf16 (training)
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.obs_shape, cfg.embed_dim, cfg.channels)
        self.cell = GTMMCell(cfg)
        self.decoder = Decoder(cfg.obs_shape, cfg.z_dim, cfg.channels)
        # (R1), (R2): reward and termination from [h_t, r_t, z_t] (`worldmodel.reward`), when the config asks
        self.reward_head = (RewardHead(cfg.h_dim + self.cell.memory.read_dim + cfg.z_dim, cfg.hidden_dim)
                            if cfg.reward_head else None)
        # (P3): the displacement read from h_t (`worldmodel.path`), when the config asks
        self.path_head = (PathHead(cfg.h_dim, cfg.pose_dim, cfg.path_period, cfg.path_target, cfg.num_actions)
                          if cfg.path_head else None)
        self._compiled_step: Any = None  # `compile_step`: the compiled `cell.scan_step` (not a submodule: no weights)
        self._compile_mode: Optional[str] = None

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.parameters()).device

    def set_conv_bf16(self, on: bool) -> None:
        """Run the frame encoder and decoder (their convolutions: most of a small model's CPU step) in bf16 autocast,
        their outputs back in fp32; the recurrent cell, the memory and every loss stay fp32 (`--precision
        bf16-convs`, the `auto` choice on CPUs that multiply bf16 in hardware: `nets.cpu_has_native_bf16`). A setting
        of the run, not of the weights: checkpoints do not carry it, and a loaded model starts in fp32."""
        self.encoder.bf16 = self.decoder.bf16 = bool(on)

    def init_state(self, batch: int, device: torch.device | str | None = None) -> ModelState:
        """The state before the first frame for ``batch`` sequences, on the model's device by default."""
        return self.cell.init_state(batch, device if device is not None else self.device)

    # -- observation model (8) ---------------------------------------------------------------------------------------

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, T, Z) -> logits / means of p(x|z), (B, T, C, H, W), all steps in one call."""
        B, T, Z = z.shape
        return self.decoder(z.reshape(B * T, Z)).view(B, T, *self._chw)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """The mean frame of p(x|z) in [0, 1]: z (..., Z) -> (..., H, W, C) float."""
        lead = z.shape[:-1]
        flat = self.decoder(z.reshape(-1, z.shape[-1]))  # (N, C, H, W)
        return self.mean_frames(flat).reshape(*lead, *self.cfg.obs_shape)

    def mean_frames(self, logits: torch.Tensor) -> torch.Tensor:
        """The mean frames of decoder outputs already computed: logits (..., C, H, W) -> (..., H, W, C) in [0, 1]."""
        mean = torch.sigmoid(logits) if self.cfg.obs_model == "bernoulli" else logits.clamp(0.0, 1.0)
        return mean.movedim(-3, -1).contiguous()

    def frame_nll(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-log p(x_t | z_t) per frame in nats: logits, target (B, T, C, H, W) -> (B, T)."""
        if self.cfg.obs_model == "bernoulli":
            # Bernoulli-style likelihood on pixel intensities in [0, 1] (as the paper does for MNIST/Omniglot).
            per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:
            per_pixel = 0.5 * ((target - logits) / GAUSSIAN_PIXEL_STD) ** 2 + math.log(
                GAUSSIAN_PIXEL_STD * math.sqrt(2 * math.pi))
        return per_pixel.flatten(2).sum(-1)

    @property
    def _chw(self) -> tuple[int, int, int]:
        H, W, C = self.cfg.obs_shape
        return (C, H, W)

    # -- sequence wrapper --------------------------------------------------------------------------------------------

    def _check_inputs(self, obs: Optional[torch.Tensor], prev_action: torch.Tensor, pose: torch.Tensor) -> None:
        B, T = prev_action.shape
        if obs is not None:
            want = (B, T, *self.cfg.obs_shape)
            assert tuple(obs.shape) == want, f"obs: expected {want} (B, T, H, W, C), got {tuple(obs.shape)}"
        want_pose = (B, T, self.cfg.pose_dim)
        assert tuple(pose.shape) == want_pose, f"pose: expected {want_pose}, got {tuple(pose.shape)}"

    def observe(
        self,
        obs: torch.Tensor,
        prev_action: torch.Tensor,
        pose: torch.Tensor,
        state: Optional[ModelState] = None,
        sample: bool = True,
        diagnostics: bool = True,
        gate_grad: bool = True,
    ) -> dict[str, Any]:
        """Teacher forcing: run the posterior over real frames.

        obs uint8 (B, T, H, W, C); prev_action int64 (B, T); pose (B, T, D). Returns per-step `nll` and `kl` (B, T)
        in nats, `z`, `prior_mean/std`, `post_mean/std` (B, T, Z), `h` (B, T, H), `read` (B, T, read_dim), `logits`
        (B, T, C, H, W) and `state`, the recurrent state after the last frame (to continue with `imagine` or
        `step_prior`). With `diagnostics` (the default) the steps run one by one through `GTMMCell.forward` and the
        output also holds `addr` and the cell's memory diagnostics stacked over time (`read_weights` (B, T, R, N),
        `read_gate` (B, T, R), `write_*` (B, T, N)); `diagnostics=False` takes the fast path (what training runs,
        see `GTMMCell`), the same figures within float rounding. Both draw the latent noise of all steps up front
        (one (T, B, Z) normal draw), so a seed gives the same samples either way. `gate_grad=False` stops the ELBO's
        gradient at the blocked-move gate's output (training with pose labels: see `forward`).
        """
        self._check_inputs(obs, prev_action, pose)
        B, T = prev_action.shape
        state = self.init_state(B) if state is None else state

        # (5) encode every frame at once
        target = frames_to_float(obs)  # (B, T, C, H, W)
        embed = self.encoder(target.flatten(0, 1)).view(B, T, -1)  # (B, T, E)
        noise = torch.randn(T, B, self.cfg.z_dim, device=embed.device) if sample else None  # (T, B, Z)
        # the blocked-move gate sees the frames: did each a_{t-1} change the view? (G1), all steps at once
        gate_logits = None if self.cell.gate is None else self.cell.gate.observed_logits(target, embed, prev_action)
        moved = None if gate_logits is None else torch.sigmoid(gate_logits if gate_grad else gate_logits.detach())

        # (1)-(7) step by step
        if diagnostics:
            seq, state = self._step_by_step(state, prev_action, pose, embed, noise, moved)
        else:
            seq, state = self._scan(state, prev_action, pose, embed, noise, moved)
        if gate_logits is not None:
            seq["gate_logits"] = gate_logits  # (B, T)
        seq["embed"] = embed  # (B, T, E): the lattice address's place loss reads it

        # (8) decode every latent at once; per-step ELBO terms
        logits = self.decode_logits(seq["z"])  # (B, T, C, H, W)
        seq["logits"] = logits
        seq["nll"] = self.frame_nll(logits.float(), target)  # (B, T)
        seq["kl"] = outlier_kl(seq["post_mean"].float(), seq["post_std"].float(), seq["prior_mean"].float(),
                               seq["prior_std"].float(), self.cfg.prior_outlier)  # (B, T)
        seq["state"] = state
        return seq

    def imagine(
        self,
        state: ModelState,
        prev_action: torch.Tensor,
        pose: Optional[torch.Tensor] = None,
        sample: bool = False,
        diagnostics: bool = True,
        hedge: bool = False,
    ) -> dict[str, Any]:
        """Open loop: from `state`, take the actions prev_action (B, T) and predict frames from the prior alone.

        `pose` (B, T, D) is only read by the `pose` address; it may be None otherwise. Returns `z` (B, T, Z),
        `frames` (B, T, H, W, C) mean decodes in [0, 1], `logits` and the final `state`; `diagnostics` as in
        `observe`, except that a gated action address always runs step by step (its gate reads z_{t-1}, known
        only inside the loop).

        `hedge=True`, for an address that keeps several likely places in open loop (the lattice filter): `frames`
        is the probability-weighted mean of the frames decoded at each place (`place_mean`, `place_prob`), the
        expected frame, rather than the one frame decoded from the mean read (the run and `z` are the same).
        Without such places it changes nothing.
        """
        B, T = prev_action.shape
        if pose is None:
            if self.cfg.address == "pose":
                raise UserError("imagine: the 'pose' address needs the pose of every step; got pose=None")
            pose = torch.zeros(B, T, self.cfg.pose_dim, device=prev_action.device)
        self._check_inputs(None, prev_action, pose)
        noise = torch.randn(T, B, self.cfg.z_dim, device=prev_action.device) if sample else None  # (T, B, Z)
        if diagnostics or self.cell.gate is not None:
            seq, state = self._step_by_step(state, prev_action, pose, None, noise)
        else:
            seq, state = self._scan(state, prev_action, pose, None, noise)
        seq["logits"] = self.decode_logits(seq["z"])  # (B, T, C, H, W)
        if hedge and "place_mean" in seq:
            # E_places[frame at the place] (B, T, H, W, C): the forecast that minimises the expected squared error
            per_place = self.decode_mean(seq["place_mean"])  # (B, T, P, H, W, C)
            weight = seq["place_prob"].to(per_place.dtype)[..., None, None, None]  # (B, T, P, 1, 1, 1)
            seq["frames"] = (per_place * weight).sum(2)
        else:
            seq["frames"] = self.mean_frames(seq["logits"])  # the decoder ran once, for the logits
        seq["state"] = state
        return seq

    def _step_by_step(self, state: ModelState, prev_action: torch.Tensor, pose: torch.Tensor,
                      embed: Optional[torch.Tensor], noise: Optional[torch.Tensor],
                      moved: Optional[torch.Tensor] = None) -> tuple[dict[str, torch.Tensor], ModelState]:
        """(1)-(7) through `GTMMCell.forward`, every output stacked over time (B, T, ...)."""
        steps = []
        T = prev_action.shape[1]
        embeds = [None] * T if embed is None else embed.unbind(1)  # one backward node, not T
        moves = [None] * T if moved is None else moved.unbind(1)
        for t in range(T):
            out, state = self.cell(state, prev_action[:, t], pose[:, t], embeds[t], sample=noise is not None,
                                   noise=None if noise is None else noise[t], moved=moves[t])
            steps.append(out)
        return {k: torch.stack([s[k] for s in steps], dim=1) for k in steps[0]}, state

    def _scan(self, state: ModelState, prev_action: torch.Tensor, pose: torch.Tensor,
              embed: Optional[torch.Tensor], noise: Optional[torch.Tensor],
              moved: Optional[torch.Tensor] = None) -> tuple[dict[str, torch.Tensor], ModelState]:
        """(1)-(7) on the fast path: `GTMMCell.scan_prepare` once, then `scan_step` (compiled by `compile_step`)
        per step; returns z, h, read, prior_mean/std (and post_mean/std) stacked over time, and the final state."""
        T = prev_action.shape[1]
        const, steps, address_state = self.cell.scan_prepare(state, prev_action, pose, embed, noise, moved)
        carry = self.cell.scan_carry(state, const)
        # the compiled step serves training (grad mode); evaluation's no-grad passes, other batch sizes and the open
        # loop would each add graphs (and CUDA-graph pools) for little gain, so they run the same step eagerly
        compiled = self._compiled_step is not None and torch.is_grad_enabled()
        step = self._compiled_step if compiled else self.cell.scan_step
        if compiled and self._compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new pass through the T captured steps
        # unbind, not v[t]: one backward node per tensor that stacks the T gradients, where T selects would each
        # scatter into a zero (T, B, ...) buffer (O(T^2) copies)
        per_step = {k: v.unbind(0) for k, v in steps.items()}
        outs = []
        for t in range(T):
            out, carry = step(const, {k: v[t] for k, v in per_step.items()}, carry)
            outs.append(out)
        seq = {k: torch.stack([o[k] for o in outs], dim=1) for k in outs[0]}  # each (B, T, ...)
        if compiled and self._compile_mode == "reduce-overhead":
            # the carry lives in the CUDA graphs' memory pool, which the next pass overwrites
            carry = {k: ({n: v.clone() for n, v in x.items()} if isinstance(x, dict) else x.clone())
                     for k, x in carry.items()}
        if embed is not None:
            seq["post_mean"], seq["post_std"] = self.cell.posterior.split(seq.pop("head"))
            # (4) the prior fed nothing in the loop: all steps in one batched call
            seq["prior_mean"], seq["prior_std"] = self.cell.prior(torch.cat([seq["h"], seq["read"]], dim=-1))
        else:
            seq["prior_mean"], seq["prior_std"] = self.cell.prior.split(seq.pop("head"))
        return seq, self.cell.scan_finish(carry, const, state, address_state)

    def compile_step(self, mode: Optional[str] = None, backend: Optional[str] = "inductor",
                     fullgraph: bool = False) -> None:
        """Compile the fast path's step with `torch.compile` for training (grad mode): one graph for the first
        step of a window and one for the others, reused at every step; the first training steps pay the
        compilation (tens of seconds, less from a warm cache). `mode="reduce-overhead"` also captures the step as
        CUDA graphs (CUDA only: one replay per step instead of a hundred kernel launches). The weights, their
        checkpoints and the results are those of the eager step. `fullgraph=True` fails on a graph break instead
        of running the broken part eagerly (the tests use it: the step has none). `backend=None` goes back to
        eager."""
        if backend is None:
            self._compiled_step, self._compile_mode = None, None
            return
        self._compiled_step = torch.compile(self.cell.scan_step, mode=mode, backend=backend, fullgraph=fullgraph,
                                            dynamic=False)
        self._compile_mode = mode

    def reward(self, state: ModelState) -> tuple[torch.Tensor, torch.Tensor]:
        """(R1), (R2) of the step that produced `state`: (predicted reward (B,), termination probability (B,)).
        UserError for a model trained without `--reward-head`."""
        if self.reward_head is None:
            raise UserError("this model has no reward head: train it with --reward-head on rollouts with rewards")
        reward, done_logit = self.reward_head(torch.cat([state.h, state.read, state.z], dim=-1))
        return reward, torch.sigmoid(done_logit)

    @torch.no_grad()
    def step_prior(
        self, state: ModelState, action: torch.Tensor, pose: Optional[torch.Tensor] = None, sample: bool = True
    ) -> tuple[torch.Tensor, ModelState]:
        """Dream one step: action (B,) int64 -> (frame (B, H, W, C) float in [0, 1], next state)."""
        B = action.shape[0]
        if pose is None:
            if self.cfg.address == "pose":
                raise UserError("step_prior: the 'pose' address needs the pose; got pose=None")
            pose = torch.zeros(B, self.cfg.pose_dim, device=action.device)
        out, state = self.cell(state, action, pose, None, sample=sample)
        return self.decode_mean(out["z"]), state

    def warmup(self, obs: torch.Tensor, prev_action: torch.Tensor, pose: torch.Tensor) -> ModelState:
        """The recurrent state after teacher-forcing the context frames (posterior means), ready to dream."""
        with torch.no_grad():
            return self.observe(obs, prev_action, pose, sample=False, diagnostics=False)["state"]

    @torch.no_grad()
    def predict_open_loop(self, obs: torch.Tensor, prev_action: torch.Tensor, pose: torch.Tensor,
                          context: int, hedge: bool = False) -> dict[str, torch.Tensor]:
        """See frames [0, K) (posterior means), then only the actions; predict frames [K, T) from the prior means
        (`hedge`: as `imagine`'s, the expected frame over the address's likely places).

        Returns `pred` (B, T-K, H, W, C) open-loop mean frames in [0, 1], `recon` (B, T, H, W, C) the posterior-mean
        reconstruction of every frame (the floor a perfect recall can reach), and the teacher-forced `nll`, `kl` (B, T).
        """
        T = prev_action.shape[1]
        if not 0 < context < T:
            raise UserError(f"open-loop context {context}: expected 0 < context < T = {T}")
        seen = self.observe(obs, prev_action, pose, sample=False, diagnostics=False)
        ctx = self.observe(obs[:, :context], prev_action[:, :context], pose[:, :context], sample=False,
                           diagnostics=False)
        dream = self.imagine(ctx["state"], prev_action[:, context:], pose[:, context:], sample=False,
                             diagnostics=False, hedge=hedge)
        recon = self.mean_frames(seen["logits"])  # (B, T, H, W, C): the decoder already ran for the logits
        return {"pred": dream["frames"], "recon": recon, "nll": seen["nll"], "kl": seen["kl"]}

    # -- training objective ------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor], free_nats: float = 0.0, kl_balance: float = 0.5,
                gate_aux: float = 1.0, reward_weight: float = 1.0, open_loop_weight: float = 0.0,
                open_loop_context: int = 8, path_weight: float = 1.0, read_weight: float = 0.0,
                read_target: str = "pose", read_open_loop: bool = False) -> dict[str, Any]:
        """Negative ELBO per step, averaged over batch and time, with optional free bits and KL balancing, plus
        `gate_aux` times the blocked-move gate's auxiliary loss when the address has a gate (`worldmodel.gate`),
        plus `reward_weight` times the reward heads' loss when the model has them and the batch has `reward`.

        KL balancing (Hafner et al. 2021, DreamerV2 sec. 2): alpha * KL(sg(q) || p) + (1 - alpha) * KL(q || sg(p));
        at alpha = 0.5 it has the plain KL's value and gradient. alpha > 0.5 trains the prior (and with it the memory
        read that feeds it) faster than it pulls the posterior towards the prior. Free bits (Kingma et al. 2016)
        stop pushing a step's KL below `free_nats`, so the posterior keeps information early in training.

        `open_loop_weight` > 0 adds that weight times the open-loop loss (O1): see the first `open_loop_context`
        frames, then predict each later frame from the prior's mean alone (`imagine`, as evaluation does) and pay
        its NLL. Teacher forcing never asks the controller to know where it is without a frame; this does.
        With a path head, plus `path_weight` times its loss (P3): the displacement since the first frame read
        linearly from h_t, which asks the same of the controller from the recorded poses (or, pose-free, the
        centred counts of the actions taken since, P2').
        `read_weight` > 0 (the FIFO memory only) adds that weight times the read loss (P5, `worldmodel.read_target`):
        on a revisit, the negative log read mass on the slots written at this pose (`read_target` "pose", P4) or
        that hold a step showing this view ("frame", P4'); with `read_open_loop` and the open-loop loss on, also on
        the open-loop branch's reads (P6), where only the actions since the context can say where the agent is.
        """
        # With labels for the gate (a pose), the ELBO must not train it: closing the gate keeps the address where the
        # last frame was written, and reading that slot back (copy the last frame) lowers the ELBO of a view that
        # barely changes, so the ELBO's gradient teaches the gate to say "blocked" for moves that happened (seen:
        # observed-gate accuracy 0.56 after 500 MiniWorld steps with it, vs the label's 1.0 separability).
        labelled = self.cell.gate is not None and gate_aux > 0 and self.cfg.pose_dim > 0
        seq = self.observe(batch["obs"], batch["prev_action"], batch["pose"], sample=True, diagnostics=False,
                           gate_grad=not labelled)
        sg = lambda x: x.detach().float()  # noqa: E731
        pm, ps = seq["prior_mean"].float(), seq["prior_std"].float()
        qm, qs = seq["post_mean"].float(), seq["post_std"].float()
        eps = self.cfg.prior_outlier
        kl_prior = outlier_kl(sg(qm), sg(qs), pm, ps, eps)  # (B, T) trains the prior
        kl_post = outlier_kl(qm, qs, sg(pm), sg(ps), eps)  # (B, T) trains the posterior
        if free_nats > 0:
            kl_prior, kl_post = kl_prior.clamp(min=free_nats), kl_post.clamp(min=free_nats)
        kl_loss = kl_balance * kl_prior + (1.0 - kl_balance) * kl_post  # (B, T)
        loss = (seq["nll"] + kl_loss).mean()
        if self.cell.gate is not None:
            # (G2) on every step, from the z_{t-1} the loop produced (z_{-1} = the start state's zeros)
            z_prev = torch.cat([torch.zeros_like(seq["z"][:, :1]), seq["z"][:, :-1]], dim=1)  # (B, T, Z)
            walls = self.cell.address.gate_feature_sequence(  # what the walk knew before each step, as observe ran it
                self.cell.address.init_state(z_prev.shape[0], z_prev.device), batch["prev_action"],
                torch.sigmoid(seq["gate_logits"].detach()))  # (B, T, 3A) or (B, T, 0)
            predicted = self.cell.gate.predicted_logits(z_prev, batch["prev_action"], walls)  # (B, T)
            seq.update(gate_loss_fn(seq["gate_logits"], predicted, batch["pose"], batch["prev_action"],
                                    has_pose=self.cfg.pose_dim > 0))
            if getattr(self.cell.address, "place_head", None) is not None and self.cfg.pose_dim > 0:
                # the lattice filter's place evidence learns where a frame is from the recorded pose (a label)
                seq["place_loss"] = self.cell.address.place_loss(seq["embed"], batch["pose"])
                # and how much to trust that evidence: the filter's own log-probability of the true place
                seq["start_loss"] = self.cell.address.start_loss(
                    batch["prev_action"], torch.sigmoid(seq["gate_logits"].detach()), seq["embed"].detach(),
                    batch["pose"])
                seq["gate_loss"] = seq["gate_loss"] + seq["place_loss"] + seq["start_loss"]
            loss = loss + gate_aux * seq["gate_loss"]
        if self.reward_head is not None and "reward" in batch:
            # (R1), (R2) on the teacher-forced state of every step; the reward's gradient also shapes h, r and z
            features = torch.cat([seq["h"], seq["read"], seq["z"]], dim=-1).float()  # (B, T, H+R+Z)
            reward, done_logit = self.reward_head(features)  # (B, T) each
            terminated = batch.get("terminated", torch.zeros_like(batch["reward"], dtype=torch.bool))
            seq.update(reward_loss_fn(reward, done_logit, batch["reward"], terminated))
            seq["reward_pred"] = reward.detach()
            loss = loss + reward_weight * seq["reward_loss"]
        if self.path_head is not None:
            seq["path_loss"] = self.path_head.loss(seq["h"], batch["pose"], batch["prev_action"],
                                                  batch["obs"])  # (P3)
            loss = loss + path_weight * seq["path_loss"]
        if read_weight > 0:
            if not isinstance(self.cell.memory, IntrospectiveMemory):  # (P4) reads the FIFO's slot order
                raise UserError(f"read_weight > 0: expected the FIFO memory (introspective), got {self.cfg.memory}")
            held = fifo_targets(batch, self.cell.memory.slots, read_target)  # (P4) or (P4') (B, T, N)
            seq["read_loss"] = read_loss(seq["read_weights"], held)  # (P5)
            loss = loss + read_weight * seq["read_loss"]
        if open_loop_weight > 0:
            # (O1) -log p(x_t | z_t = prior mean), t >= K, after K teacher-forced frames; one value per frame
            K = open_loop_context
            seen = self.observe(batch["obs"][:, :K], batch["prev_action"][:, :K], batch["pose"][:, :K], sample=True,
                                diagnostics=False)
            dream = self.imagine(seen["state"], batch["prev_action"][:, K:], batch["pose"][:, K:], sample=False,
                                 diagnostics=False)
            target = frames_to_float(batch["obs"][:, K:])  # (B, T-K, C, H, W)
            seq["open_loop_nll"] = self.frame_nll(dream["logits"].float(), target).mean()
            loss = loss + open_loop_weight * seq["open_loop_nll"]
            if read_weight > 0 and read_open_loop:
                # (P6) (P5) on the imagined steps' reads; their memory holds the same steps' writes as the
                # teacher-forced one (the dream writes its own latents), so (P4)'s slots are the place's here too
                seq["read_loss_open_loop"] = read_loss(dream["read_weights"], held[:, K:])
                loss = loss + read_weight * seq["read_loss_open_loop"]
        seq["loss"] = loss
        seq["elbo_per_step"] = -(seq["nll"] + seq["kl"]).detach()  # (B, T)
        return seq


def param_groups(model: GTMM, lr: float, address_lr_scale: float) -> list[dict[str, Any]]:
    """Optimizer groups: the address pathway gets `lr * address_lr_scale`, everything else `lr`."""
    address_ids = {id(p) for p in model.cell.address.parameters()}
    address = [p for p in model.parameters() if id(p) in address_ids]
    rest = [p for p in model.parameters() if id(p) not in address_ids]
    groups = [{"params": rest, "lr": lr, "name": "model"}]
    if address:
        groups.append({"params": address, "lr": lr * address_lr_scale, "name": "address"})
    return groups
