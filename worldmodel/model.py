"""The action-conditioned Generative Temporal Model with Memory (Gemici et al. 2017, arXiv 1702.04649).

One step of the model (the cell, `GTMMCell`), with x_t the frame and a_{t-1} the action that led to it:

    (1) h_t        = LSTM(h_{t-1}, [z_{t-1}, a_{t-1}, r_{t-1}])          controller
    (2) addr_t     = address.step(h_t, a_{t-1}, pose_t)                  where this step lives in memory
    (3) r_t        = memory.read(M_{t-1}, h_t, addr_t)                    recall, keyed by the address
    (4) p(z_t)     = N(mu_p, sigma_p) = prior(h_t, r_t)                   what the model expects to see
    (5) q(z_t|x_t) = N(mu_q, sigma_q) = posterior(e_t, h_t, r_t)          with e_t = enc(x_t)
    (6) z_t        ~ q (teacher forcing) or p (open loop / dreams)
    (7) M_t        = memory.write(M_{t-1}, h_t, addr_t, z_t)             store the latent under its address
    (8) p(x_t|z_t) = dec(z_t)                                             observation model

    ELBO = sum_t E_q[log p(x_t | z_t)] - KL(q(z_t) || p(z_t))             (paper eq. 1; we report both terms per step)

The sequence wrapper (`GTMM`) encodes (5) and decodes (8) all time steps in one batched call; only (1)-(7), the
recurrence and the memory, run step by step. Axis legend: see `worldmodel/__init__.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gtmm.cli import UserError
from worldmodel.address import build_address
from worldmodel.config import ModelConfig
from worldmodel.memory import build_memory
from worldmodel.nets import ActionEmbedding, Decoder, Encoder, GaussianHead, gaussian_kl

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
        return self.h.shape[0]

    def detach(self) -> "ModelState":
        return ModelState(
            h=self.h.detach(), c=self.c.detach(), z=self.z.detach(), read=self.read.detach(),
            memory={k: v.detach() for k, v in self.memory.items()},
            address={k: v.detach() for k, v in self.address.items()},
        )


def frames_to_float(obs: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, C) -> float (B, T, C, H, W) in [0, 1]."""
    return obs.permute(0, 1, 4, 2, 3).float().div(255.0)


def batch_to_torch(batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The batch contract's numpy arrays (or tensors) as tensors on `device`, dtypes checked."""
    out = {}
    for key, dtype in (("obs", torch.uint8), ("prev_action", torch.int64), ("revisit", torch.bool),
                       ("pose", torch.float32)):
        if key not in batch:
            raise UserError(f"batch: missing key {key!r}; expected obs, prev_action, revisit, pose")
        out[key] = torch.as_tensor(batch[key]).to(device=device, dtype=dtype, non_blocking=True)
    return out


class GTMMCell(nn.Module):
    """One step of the GTMM, equations (1)-(7) of the module docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.action_embed = ActionEmbedding(cfg.num_actions)
        self.memory = build_memory(cfg.memory, z_dim=cfg.z_dim, h_dim=cfg.h_dim, addr_dim=cfg.addr_dim,
                                   slots=cfg.slots, heads=cfg.heads, **cfg.memory_kwargs)
        self.address = build_address(cfg.address, h_dim=cfg.h_dim, num_actions=cfg.num_actions,
                                     pose_dim=cfg.pose_dim, addr_dim=cfg.addr_dim, **cfg.address_kwargs)
        read_dim = self.memory.read_dim
        self.lstm = nn.LSTMCell(cfg.z_dim + self.action_embed.dim + read_dim, cfg.h_dim)
        self.prior = GaussianHead(cfg.h_dim + read_dim, cfg.hidden_dim, cfg.z_dim)
        self.posterior = GaussianHead(cfg.embed_dim + cfg.h_dim + read_dim, cfg.hidden_dim, cfg.z_dim)

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> ModelState:
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
    ) -> tuple[dict[str, torch.Tensor], ModelState]:
        """One step. prev_action (B,) int64 (-1 = none); pose (B, D); embed (B, E) = enc(x_t), or None to run open
        loop from the prior. `sample=False` takes the mean of whichever distribution drives z_t.

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

        # (2) address of this step; (3) read the memory written at earlier steps
        addr, address_state = self.address.step(state.address, h, prev_action, pose)  # (B, addr_dim)
        attention = self.memory.attend(state.memory, h, addr)  # one attend: the read and its diagnostics
        read = attention["read"]  # (B, read_dim)

        # (4) prior and (5) posterior
        prior_mean, prior_std = self.prior(torch.cat([h, read], dim=-1))  # (B, Z) each
        out = {"prior_mean": prior_mean, "prior_std": prior_std}
        if embed is not None:
            assert embed.shape == (B, self.cfg.embed_dim), f"embed: expected ({B}, {self.cfg.embed_dim}), got {tuple(embed.shape)}"
            post_mean, post_std = self.posterior(torch.cat([embed, h, read], dim=-1))  # (B, Z) each
            out.update(post_mean=post_mean, post_std=post_std)
            mean, std = post_mean, post_std
        else:
            mean, std = prior_mean, prior_std

        # (6) the latent, reparameterised so gradients flow into mean and std
        z = mean + std * torch.randn_like(std) if sample else mean  # (B, Z)

        # (7) write z_t under addr_t
        memory = self.memory.write(state.memory, h, addr, z)
        out.update(z=z, h=h, addr=addr, read=read, read_weights=attention["weights"], read_gate=attention["gate"])
        out.update(self.memory.write_record(memory))  # write_weights, write_retain (soft memories), for attribution
        return out, ModelState(h=h, c=c, z=z, read=read, memory=memory, address=address_state)


class GTMM(nn.Module):
    """The sequence model: batched encoder/decoder around the step-by-step `GTMMCell`.

    Public API (used by training, evaluation and `worldmodel.dream`):
      - `init_state(batch, device)`                          -> ModelState
      - `observe(obs, prev_action, pose, state=None)`        -> dict of per-step nll, kl, z, ... and the final state
      - `imagine(state, prev_action, pose=None)`             -> open-loop frames from the prior, and the final state
      - `step_prior(state, action, pose=None)`               -> one dreamed frame (for a Gymnasium env)
      - `decode_mean(z)`                                     -> frames in [0, 1], (..., H, W, C)
      - `forward(batch, free_nats, kl_balance)`              -> training loss dict (what DDP wraps)
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.obs_shape, cfg.embed_dim, cfg.channels)
        self.cell = GTMMCell(cfg)
        self.decoder = Decoder(cfg.obs_shape, cfg.z_dim, cfg.channels)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def init_state(self, batch: int, device: torch.device | str | None = None) -> ModelState:
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
        mean = torch.sigmoid(flat) if self.cfg.obs_model == "bernoulli" else flat.clamp(0.0, 1.0)
        return mean.permute(0, 2, 3, 1).reshape(*lead, *self.cfg.obs_shape)

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
    ) -> dict[str, Any]:
        """Teacher forcing: run the posterior over real frames.

        obs uint8 (B, T, H, W, C); prev_action int64 (B, T); pose (B, T, D). Returns per-step `nll` and `kl` (B, T)
        in nats, `z`, `prior_mean/std`, `post_mean/std` (B, T, Z), `logits` (B, T, C, H, W), the cell's memory
        diagnostics stacked over time (`read_weights` (B, T, R, N), `read_gate` (B, T, R), `write_*` (B, T, N); see
        `GTMMCell.forward`) and `state`, the recurrent state after the last frame (to continue with `imagine` or
        `step_prior`).
        """
        self._check_inputs(obs, prev_action, pose)
        B, T = prev_action.shape
        state = self.init_state(B) if state is None else state

        # (5) encode every frame at once
        target = frames_to_float(obs)  # (B, T, C, H, W)
        embed = self.encoder(target.flatten(0, 1)).view(B, T, -1)  # (B, T, E)

        # (1)-(7) step by step
        steps = []
        for t in range(T):
            out, state = self.cell(state, prev_action[:, t], pose[:, t], embed[:, t], sample=sample)
            steps.append(out)
        seq = {k: torch.stack([s[k] for s in steps], dim=1) for k in steps[0]}  # each (B, T, ...)

        # (8) decode every latent at once; per-step ELBO terms
        logits = self.decode_logits(seq["z"])  # (B, T, C, H, W)
        seq["logits"] = logits
        seq["nll"] = self.frame_nll(logits.float(), target)  # (B, T)
        seq["kl"] = gaussian_kl(seq["post_mean"].float(), seq["post_std"].float(),
                                seq["prior_mean"].float(), seq["prior_std"].float())  # (B, T)
        seq["state"] = state
        return seq

    def imagine(
        self,
        state: ModelState,
        prev_action: torch.Tensor,
        pose: Optional[torch.Tensor] = None,
        sample: bool = False,
    ) -> dict[str, Any]:
        """Open loop: from `state`, take the actions prev_action (B, T) and predict frames from the prior alone.

        `pose` (B, T, D) is only read by the `pose` address; it may be None otherwise. Returns `z` (B, T, Z),
        `frames` (B, T, H, W, C) mean decodes in [0, 1], `logits` and the final `state`.
        """
        B, T = prev_action.shape
        if pose is None:
            if self.cfg.address == "pose":
                raise UserError("imagine: the 'pose' address needs the pose of every step; got pose=None")
            pose = torch.zeros(B, T, self.cfg.pose_dim, device=prev_action.device)
        self._check_inputs(None, prev_action, pose)
        steps = []
        for t in range(T):
            out, state = self.cell(state, prev_action[:, t], pose[:, t], None, sample=sample)
            steps.append(out)
        seq = {k: torch.stack([s[k] for s in steps], dim=1) for k in steps[0]}
        seq["logits"] = self.decode_logits(seq["z"])
        seq["frames"] = self.decode_mean(seq["z"])
        seq["state"] = state
        return seq

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
            return self.observe(obs, prev_action, pose, sample=False)["state"]

    @torch.no_grad()
    def predict_open_loop(self, obs: torch.Tensor, prev_action: torch.Tensor, pose: torch.Tensor,
                          context: int) -> dict[str, torch.Tensor]:
        """See frames [0, K) (posterior means), then only the actions; predict frames [K, T) from the prior means.

        Returns `pred` (B, T-K, H, W, C) open-loop mean frames in [0, 1], `recon` (B, T, H, W, C) the posterior-mean
        reconstruction of every frame (the floor a perfect recall can reach), and the teacher-forced `nll`, `kl` (B, T).
        """
        T = prev_action.shape[1]
        if not 0 < context < T:
            raise UserError(f"open-loop context {context}: expected 0 < context < T = {T}")
        seen = self.observe(obs, prev_action, pose, sample=False)
        ctx = self.observe(obs[:, :context], prev_action[:, :context], pose[:, :context], sample=False)
        dream = self.imagine(ctx["state"], prev_action[:, context:], pose[:, context:], sample=False)
        return {"pred": dream["frames"], "recon": self.decode_mean(seen["z"]), "nll": seen["nll"], "kl": seen["kl"]}

    # -- training objective ------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor], free_nats: float = 0.0, kl_balance: float = 0.5) -> dict[str, Any]:
        """Negative ELBO per step, averaged over batch and time, with optional free bits and KL balancing.

        KL balancing (Hafner et al. 2021, DreamerV2 sec. 2): alpha * KL(sg(q) || p) + (1 - alpha) * KL(q || sg(p));
        at alpha = 0.5 it has the plain KL's value and gradient. alpha > 0.5 trains the prior (and with it the memory
        read that feeds it) faster than it pulls the posterior towards the prior. Free bits (Kingma et al. 2016)
        stop pushing a step's KL below `free_nats`, so the posterior keeps information early in training.
        """
        seq = self.observe(batch["obs"], batch["prev_action"], batch["pose"], sample=True)
        sg = lambda x: x.detach().float()  # noqa: E731
        pm, ps = seq["prior_mean"].float(), seq["prior_std"].float()
        qm, qs = seq["post_mean"].float(), seq["post_std"].float()
        kl_prior = gaussian_kl(sg(qm), sg(qs), pm, ps)  # (B, T) trains the prior
        kl_post = gaussian_kl(qm, qs, sg(pm), sg(ps))  # (B, T) trains the posterior
        if free_nats > 0:
            kl_prior, kl_post = kl_prior.clamp(min=free_nats), kl_post.clamp(min=free_nats)
        kl_loss = kl_balance * kl_prior + (1.0 - kl_balance) * kl_post  # (B, T)
        loss = (seq["nll"] + kl_loss).mean()
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
