"""Address pathways: where a GTMM memory slot is written and read ("where am I?").

A memory slot is found by its ADDRESS part (see ``worldmodel.memory.base``). This module computes addr_t, once per
step, from one of three sources:

    hidden   addr_t = W h_t                                   the paper's reading: the controller state is the key
    actions  s_t = f(s_{t-1}, a_{t-1}), addr_t = g(s_t)       a path integrator over actions alone (idea of GTM-SM,
                                                             Fraccaro et al. 2018): it sees no frames, so it can only
                                                             learn "where", never "what"; three integrators: additive
                                                             (translations), se2 (turn, then step ahead), gru (any)
    pose     addr_t = fourier(pose_t / scale)                 the env's odometry: an oracle address, a ceiling

Reads match keys to addresses by cosine similarity, which compares directions. A raw position vector is a poor
address under cosine (two points on one ray from the origin look identical), so positions (the additive integrator,
the pose) are encoded with random Fourier features (Rahimi & Recht 2007): [sin(Omega s), cos(Omega s)] has constant
norm and cos(f(s), f(s')) = mean_k cos(omega_k . (s - s')), a shift-invariant kernel that is 1 at the same place and
about 0 far away.

``prev_action`` is int64 (B,) with -1 meaning "no action" (episode start, action-free tasks): the action path then
stays where it is. State is a ``dict[str, Tensor]``; ``step`` has no Python branching on tensor values.

Blocked moves: ``step``/``sequence`` take ``moved`` in [0, 1] per step (default 1), the probability that a_{t-1}
took effect, and scale the integration step by it. ``ActionAddress(gate=True)`` owns the learned gate that says so
(``worldmodel.gate.MoveGate``, from the frames); the model feeds its output in.

The fast path of the model (``GTMM.observe(..., diagnostics=False)``) uses two more entry points: the ``actions``
and ``pose`` addresses do not read h_t, so ``sequence`` computes all T addresses before the step loop (a cumulative
sum, one batched encoding, or the GRU alone); the ``hidden`` address's projection is one of the layers the model
applies to h_t in one fused product (``h_linears``, read back with ``from_pre``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from gtmm.cli import UserError

ADDRESSES = ("hidden", "actions", "pose")
WALL_UNSEEN = 4.0  # gate_walls: "no wall met in this direction" (steps away; the feature is clamped to +-this)
INTEGRATORS = ("gru", "additive", "se2", "lattice")
IMPOSSIBLE = -1.0e4  # lattice: the log-weight of a start hypothesis the map cannot have (finite: no NaN in softmax)

State = dict[str, Tensor]


class AddressPath(nn.Module):
    """Base class: ``step(state, h, prev_action, pose) -> (addr (B, addr_dim), next state)``."""

    addr_dim: int

    def init_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> State:
        """The path's state at an episode's start for ``batch`` sequences (empty: no state by default)."""
        return {}

    uses_h: bool = True  # addr_t reads h_t: computed inside the step loop (else ``sequence`` before it)

    def step(self, state: State, h: Tensor, prev_action: Tensor, pose: Tensor,
             moved: Tensor | None = None, embed: Tensor | None = None) -> tuple[Tensor, State]:
        """One step: addr_t (B, addr_dim) from h_t (B, H), a_{t-1} (B,), pose (B, D) and, for action paths, the
        probability (B,) that a_{t-1} took effect (None = it did) and the frame's embedding e_t (B, E) where it
        is seen (None in open loop; read by the lattice filter's place evidence), and the next state."""
        raise NotImplementedError

    def h_linears(self) -> dict[str, nn.Linear]:
        """The layers applied to h_t at every step, by name (fused with the memory's by the fast path)."""
        return {}

    def hypotheses(self, state: State) -> tuple[Tensor, Tensor] | None:
        """Where the path may be when it is not sure: (addresses (B, H, addr_dim), probabilities (B, H)) of its H
        most probable places, or None (one address says it all: every path but the lattice filter)."""
        return None

    def from_pre(self, pre: dict[str, Tensor]) -> Tensor:
        """addr_t (B, addr_dim) from the outputs of ``h_linears`` (only for addresses with ``uses_h``)."""
        raise NotImplementedError

    def sequence(self, state: State, prev_action: Tensor, pose: Tensor,
                 moved: Tensor | None = None, embed: Tensor | None = None) -> tuple[Tensor, State]:
        """Every step's address at once (only without ``uses_h``): prev_action (B, T), pose (B, T, D), moved (B, T)
        or None, embed (B, T, E) or None -> (addr (B, T, addr_dim), the state after the last step), the same as T
        calls of ``step``."""
        raise NotImplementedError


def fourier_features(positions: Tensor, frequencies: Tensor) -> Tensor:
    """[sin(s Omega), cos(s Omega)] / sqrt(K): unit norm, cosine between two of them = mean_k cos(omega_k . ds).

    positions (..., P), frequencies (P, K) -> (..., 2K)
    """
    phase = positions @ frequencies  # (..., K)
    return torch.cat([phase.sin(), phase.cos()], dim=-1) / math.sqrt(frequencies.shape[1])


def action_onehot(prev_action: Tensor, num_actions: int, dtype: torch.dtype) -> Tensor:
    """(...,) int64 -> (..., A) one-hot by comparison rather than F.one_hot: -1 ("no action") matches no action id,
    giving zeros, with no value check."""
    return (prev_action.unsqueeze(-1) == torch.arange(num_actions, device=prev_action.device)).to(dtype)


def se2_features(position: Tensor, heading: Tensor, frequencies: Tensor, length_scale: float,
                 heading_scale: float) -> Tensor:
    """An address of a pose in the plane, comparable by cosine: position (..., 2), heading (...,) in radians ->
    fourier([position / length_scale, cos(heading) / heading_scale, sin(heading) / heading_scale]), (..., 2K).

    A frame depends on where the agent stands AND where it looks, so both enter one kernel: the heading as a point
    on a circle (periodic: -pi and pi are the same heading, which a raw angle would break), whose chord between two
    headings ~ their difference for small turns. Poses one length_scale apart, or heading_scale radians apart,
    are about exp(-1/2) similar; a few scales apart nearly orthogonal. frequencies (4, K).
    """
    circle = torch.stack([heading.cos(), heading.sin()], dim=-1) / heading_scale  # (..., 2)
    return fourier_features(torch.cat([position / length_scale, circle], dim=-1), frequencies)


def _reference(state: State) -> Tensor:
    """A tensor of an action address's state, for batch size, dtype and device: the path (B, D), or the lattice
    filter's place table (B, D, L), which has no single path."""
    return state["path"] if "path" in state else state["place"]


def _random_frequencies(in_dim: int, addr_dim: int, seed: int) -> Tensor:
    """Omega (in_dim, addr_dim/2) ~ N(0, 1), from a fixed seed so the same config gives the same encoding."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, addr_dim // 2, generator=generator)


class HiddenAddress(AddressPath):
    """addr_t = W h_t + b: the address is a learned view of the controller state (the paper's setting)."""

    def __init__(self, *, h_dim: int, addr_dim: int):
        super().__init__()
        self.addr_dim = addr_dim
        self.proj = nn.Linear(h_dim, addr_dim)

    def step(self, state: State, h: Tensor, prev_action: Tensor, pose: Tensor,
             moved: Tensor | None = None, embed: Tensor | None = None) -> tuple[Tensor, State]:
        """addr_t = a linear projection of h_t (the paper's address); the state stays empty."""
        return self.proj(h), state  # (B, addr_dim)

    def h_linears(self) -> dict[str, nn.Linear]:
        """The projection of h_t, named ``address`` (fused with the memory's layers by the fast path)."""
        return {"address": self.proj}

    def from_pre(self, pre: dict[str, Tensor]) -> Tensor:
        """addr_t (B, addr_dim): the projection's output in ``pre``."""
        return pre["address"]  # (B, addr_dim)


class ActionAddress(AddressPath):
    """A path integrator over the previous actions only.

    integrator="gru":       s_t = GRUCell(onehot(a_{t-1}), s_{t-1}),  addr_t = LayerNorm(s_t)   (any dynamics,
                            e.g. MiniWorld where a step forward depends on the heading)
    integrator="additive":  s_t = s_{t-1} + E[a_{t-1}],  addr_t = fourier(s_t)                 (exact for
                            translations, e.g. the MNIST map: it only has to learn one vector per action)
    integrator="se2":       theta_t = theta_{t-1} + turn[a],  p_t = p_{t-1} + fwd[a] (cos, sin)(theta_{t-1} + turn[a]/2),
                            addr_t = se2_features(p_t, theta_t)                                 (exact for an agent
                            that turns and steps ahead, e.g. MiniWorld; ``moves`` = the env's declared
                            [turn, forward] per action fixes them, else they are learned)

    integrator="lattice":   a Bayes filter over where the walk started on a bounded lattice (declared ``moves``, axis
                            translations in pose units, and ``extent``, the pose's range per axis): every start
                            hypothesis s walks the actions, blocked at the edges; the frames' m_t weighs each by
                            whether it predicts the move that was seen; addr_t = E_s[fourier(x_t(s) - s)], the
                            expected encoding of the displacement (exact for a `clip` MNIST map; needs the gate)

    Knobs for fast convergence: ``layer_norm`` keeps the GRU address at a fixed scale whatever the gates do;
    ``inverse_actions`` (the env's ``inverse_actions`` table) ties E[inv(a)] = -E[a] so an out-and-back path returns
    exactly to its start address from the first update on; ``step_scale`` sets the initial size of E in units of
    the Fourier kernel width. Start small (coarse to fine): with 0.1 all places begin with similar addresses, reads
    blur over the whole memory, and the gradient pulls E apart until one move gives a new address; at 1.0 every
    move starts out orthogonal and the loss gives E little to follow. (Recall of z by place on a 4x4 random walk,
    introspective memory, 200 Adam steps: revisit MSE 0.013 with 0.1, 0.024 with 0.3, 0.42 with 1.0; the GRU 0.21.)
    The trainer's ``--address-lr-scale`` multiplies this module's learning rate.
    No action (-1) leaves s unchanged. ``gate=True`` adds the blocked-move gate (``worldmodel.gate``; needs
    ``embed_dim`` and ``z_dim``, which the model passes): each step of s is scaled by the gate's ``moved``.
    lattice: the start is one of the lattice's places, uniform at first. The context's frames say whether each move
    happened (the gate's m_t), which rules out the starts that would have been blocked otherwise (and vice versa);
    in open loop nothing is observed and each hypothesis walks on, so an address needs no guess about unseen edges:
    it hedges over them. With ``place_evidence`` each frame also weighs the hypotheses by where it looks like it
    was seen, times a learned weight tau (``start_loss``: the filter's own log-probability of the true place, so
    its probabilities stay calibrated; frames in a row are far from independent evidence, and tau falls to
    0.1-0.2). ``benchmarks/clip_ceiling.py`` gives the best any such address can do. ``length_scale``
    (lattice steps, default 0.5) sets the kernel: neighbouring places nearly orthogonal.
    se2 knobs: ``length_scale`` (pose units; default half the longest declared step, else 1) and ``heading_scale``
    (radians; default half the largest declared turn, else 0.25) set the kernel of ``se2_features``.

    ``gate_walls`` (additive, with the gate): the path also tracks, per action a, how far it has ever reached along
    a's move (``reach``) and where a move a was last blocked (``wall``), both in units of a's step (projections of s
    on E[a]), and hands them to the gate's open-loop guess (``gate_features``). On a map with borders nothing in a
    frame says where the map ends, but the walk does: a border met once is met again at the same projection, and an
    axis explored end to end says where both its ends are. (Issue 13: on the MNIST map with clip borders, 21% of
    open-loop moves are blocked; the z-only guess got 79% of them right, and recall of context places was no better
    than assuming every move happened, 0.115 MSE, against 0.021 with the true moves.)
    """

    uses_h = False

    def __init__(self, *, num_actions: int, addr_dim: int, integrator: str = "gru", path_dim: int = 0,
                 layer_norm: bool = True, inverse_actions: Sequence[int] | None = None, step_scale: float = 0.1,
                 seed: int = 0, moves: Sequence[Sequence[float]] | None = None, length_scale: float = 0.0,
                 heading_scale: float = 0.0, gate: bool = False, embed_dim: int = 0, z_dim: int = 0,
                 gate_walls: bool = False, extent: Sequence[float] | None = None, place_evidence: bool = False):
        super().__init__()
        if num_actions < 1:
            raise UserError(f"address 'actions': needs num_actions >= 1, got {num_actions} (action-free task?)")
        if integrator not in INTEGRATORS:
            raise UserError(f"address 'actions': unknown integrator {integrator!r}, expected one of {INTEGRATORS}")
        self.addr_dim, self.num_actions, self.integrator = addr_dim, num_actions, integrator
        if integrator == "gru":
            self.path_dim = path_dim or addr_dim
            self.cell = nn.GRUCell(num_actions, self.path_dim)
            self.out = nn.LayerNorm(self.path_dim) if layer_norm else nn.Identity()
            self.proj = nn.Linear(self.path_dim, addr_dim) if self.path_dim != addr_dim else nn.Identity()
            # a learned start state: a zero state would give the start place the all-zero address, which cosine
            # similarity can never match (the episode's first slot would be unreadable)
            self.start = nn.Parameter(0.5 * torch.randn(self.path_dim))
        elif integrator == "additive":
            if addr_dim % 2:
                raise UserError(f"address 'actions' (additive): addr_dim must be even (sin and cos halves), got {addr_dim}")
            self.path_dim = path_dim or 8
            self.displacement = nn.Parameter(step_scale * torch.randn(num_actions, self.path_dim))  # E (A, P)
            self.register_buffer("frequencies", _random_frequencies(self.path_dim, addr_dim, seed))  # (P, addr_dim/2)
        elif integrator == "se2":
            self._init_se2(num_actions, addr_dim, moves, length_scale, heading_scale, step_scale, seed)
        else:
            self._init_lattice(num_actions, addr_dim, moves, extent, length_scale, seed)
            if place_evidence:
                if embed_dim < 1:
                    raise UserError("address 'actions' (lattice): place_evidence needs the model's embed_dim >= 1")
                D, L = self.path_dim, int(self.lattice_size.max())
                self.place_head = nn.Linear(embed_dim, D * L)  # e_t -> logits of the place on each axis
                nn.init.zeros_(self.place_head.weight)  # uniform at first: no evidence until the labels teach it
                nn.init.zeros_(self.place_head.bias)
                # log tau, the weight of each frame's place evidence in the filter (tau = 1 at first). Frames in a
                # row overlap and revisits show the same frame again, so adding every frame's evidence as if it
                # were independent makes the filter sure of starts it has no right to be: trained by `start_loss`
                # (the filter's log-probability of the true place, a proper score), the weight falls to 0.1-0.2.
                self.place_log_temperature = nn.Parameter(torch.zeros(()))
            if not gate:
                raise UserError("address 'actions' (lattice): needs the gate (\"gate\": true): the frames' word on "
                                "whether each move happened is what weighs the start hypotheses")
        if moves is not None and integrator not in ("se2", "lattice"):
            raise UserError("address 'actions': moves (declared per action) are for the se2 and lattice integrators")
        if place_evidence and integrator != "lattice":
            raise UserError("address 'actions': place_evidence is for integrator lattice")
        if not (integrator == "lattice" and place_evidence):
            self.place_head = None
        if extent is not None and integrator != "lattice":
            raise UserError("address 'actions': extent (the lattice's range) is for integrator lattice")
        if inverse_actions is not None:
            inverse = torch.as_tensor(list(inverse_actions), dtype=torch.long)
            if inverse.shape != (num_actions,) or bool(((inverse < 0) | (inverse >= num_actions)).any()):
                raise UserError(f"inverse_actions: expected {num_actions} action ids in [0, {num_actions}), got {list(inverse_actions)}")
            if not torch.equal(inverse[inverse], torch.arange(num_actions)):
                raise UserError(f"inverse_actions: must be an involution (inv(inv(a)) = a), got {list(inverse_actions)}")
            if integrator == "gru":
                raise UserError("inverse_actions: only the additive and se2 integrators can tie inverse actions")
            self.register_buffer("inverse", inverse)
        else:
            self.inverse = None
        if gate and (embed_dim < 1 or z_dim < 1):
            raise UserError(f"address 'actions': the blocked-move gate needs embed_dim and z_dim >= 1, got {embed_dim}, {z_dim}")
        if gate_walls and not (gate and integrator == "additive"):
            raise UserError("address 'actions': gate_walls needs the gate and the additive integrator")
        self.gate_walls = bool(gate_walls)
        if gate:
            from worldmodel.gate import MoveGate  # here, not at the top: gate imports this module (action_onehot)

            extra = 3 * num_actions if self.gate_walls else 0
            self.gate = MoveGate(embed_dim=embed_dim, z_dim=z_dim, num_actions=num_actions, extra_dim=extra)
        else:
            self.gate = None

    def _init_se2(self, num_actions: int, addr_dim: int, moves: Sequence[Sequence[float]] | None,
                  length_scale: float, heading_scale: float, step_scale: float, seed: int) -> None:
        """The se2 integrator's (turn, forward) per action: the declared ``moves`` (fixed buffers), else learned
        parameters that start small (coarse to fine, as the additive E does), and its kernel scales."""
        if addr_dim % 2:
            raise UserError(f"address 'actions' (se2): addr_dim must be even (sin and cos halves), got {addr_dim}")
        self.path_dim = 3  # (x, y, heading)
        if moves is not None:
            pairs = isinstance(moves, (list, tuple)) and all(
                isinstance(m, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in m)
                for m in moves)
            table = torch.as_tensor([list(m) for m in moves], dtype=torch.float32) if pairs else None
            if table is None or table.shape != (num_actions, 2) or not bool(torch.isfinite(table).all()):
                raise UserError(f"address 'actions' (se2): moves needs {num_actions} finite [turn, forward] pairs, "
                                f"got {moves!r}")
            self.register_buffer("se2_moves", table)  # (A, 2), exact: not learned
            length_scale = length_scale or 0.5 * float(table[:, 1].abs().max()) or 1.0
            heading_scale = heading_scale or 0.5 * float(table[:, 0].abs().max()) or 0.25
        else:
            self.se2_moves_learned = nn.Parameter(step_scale * torch.randn(num_actions, 2))  # (A, 2) turn, forward
            length_scale, heading_scale = length_scale or 1.0, heading_scale or 0.25
        if length_scale <= 0 or heading_scale <= 0:
            raise UserError(f"address 'actions' (se2): length_scale and heading_scale must be > 0, got "
                            f"{length_scale}, {heading_scale}")
        self.length_scale, self.heading_scale = float(length_scale), float(heading_scale)
        self.register_buffer("frequencies", _random_frequencies(4, addr_dim, seed))  # (4, addr_dim/2)

    def _init_lattice(self, num_actions: int, addr_dim: int, moves: Sequence[Sequence[float]] | None,
                      extent: Sequence[float] | None, length_scale: float, seed: int) -> None:
        """The lattice integrator's moves and sizes in lattice steps (the smallest move along each axis is one step)
        and its kernel."""
        if addr_dim % 2:
            raise UserError(f"address 'actions' (lattice): addr_dim must be even (sin and cos halves), got {addr_dim}")
        try:
            rows = [[float(x) for x in m] for m in moves]  # type: ignore[union-attr]
            table = torch.as_tensor(rows, dtype=torch.float64)
            span = torch.as_tensor([float(x) for x in extent], dtype=torch.float64)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            table = span = None
        D = 0 if span is None else span.numel()
        if (table is None or table.shape != (num_actions, D) or D == 0 or not bool(torch.isfinite(table).all())
                or not bool((span > 0).all())):
            raise UserError(f"address 'actions' (lattice): needs moves, {num_actions} translations of the pose, and "
                            f"extent, the pose's range per axis (> 0, as many axes); got moves={moves!r}, "
                            f"extent={extent!r}")
        unit = torch.stack([col[col != 0].abs().min() if bool((col != 0).any()) else torch.tensor(1.0, dtype=col.dtype)
                            for col in table.t()])  # (D,) one lattice step per axis
        steps, sizes = table / unit, span / unit
        if not (torch.allclose(steps, steps.round(), atol=1e-6) and torch.allclose(sizes, sizes.round(), atol=1e-6)):
            raise UserError(f"address 'actions' (lattice): every move and the extent must be whole multiples of the "
                            f"smallest move per axis ({unit.tolist()}); got moves={moves!r}, extent={extent!r}")
        self.path_dim = D
        self.register_buffer("lattice_moves", steps.round().float())  # (A, D) in lattice steps
        self.register_buffer("lattice_size", sizes.round().float() + 1)  # (D,) places per axis
        self.register_buffer("lattice_unit", unit.float())  # (D,) pose units per lattice step
        length_scale = length_scale or 0.5
        if length_scale <= 0:
            raise UserError(f"address 'actions' (lattice): length_scale must be > 0, got {length_scale}")
        self.register_buffer("frequencies", _random_frequencies(D, addr_dim, seed) / length_scale)  # (D, addr_dim/2)

    def init_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> State:
        # Every episode starts at the origin of its own path: addresses are relative to the start.
        """Every sequence at the origin of its own path: the learned start (gru) or zeros (additive, se2: x, y and
        heading 0)."""
        if self.integrator == "gru":
            return {"path": self.start.to(device=device, dtype=dtype).expand(batch, self.path_dim)}  # (B, P)
        if self.integrator == "lattice":
            # hypothesis s = the start's index on each axis; every valid one equally likely
            L = int(self.lattice_size.max())
            starts = torch.arange(L, device=device, dtype=dtype)  # (L,)
            valid = starts < self.lattice_size.to(device=device, dtype=dtype).unsqueeze(-1)  # (D, L)
            log_w = torch.where(valid, -valid.to(dtype).sum(-1, keepdim=True).log(), IMPOSSIBLE)  # (D, L)
            return {"log_w": log_w.expand(batch, -1, -1).clone(),  # (B, D, L)
                    "place": starts.expand(batch, self.path_dim, L).clone()}  # (B, D, L) where each one is now
        state = {"path": torch.zeros(batch, self.path_dim, device=device, dtype=dtype)}  # (B, P)
        if self.gate_walls:
            state["reach"] = torch.zeros(batch, self.num_actions, device=device, dtype=dtype)  # (B, A)
            state["wall"] = torch.full((batch, self.num_actions), WALL_UNSEEN, device=device, dtype=dtype)  # (B, A)
        return state

    # -- gate_walls: what the walk says about where moves are blocked ----------------------------------------------

    def _projections(self, path: Tensor) -> Tensor:
        """path (..., P) -> (..., A): how many steps of each action's move it lies along that move, from the start
        (no gradient: these are inputs of the gate's guess, trained by its own loss)."""
        E = self.displacements().detach()  # (A, P)
        return (path.detach() @ E.t()) / (E * E).sum(-1).clamp(min=1e-6)

    def _wall_features(self, p_prev: Tensor, reach: Tensor, wall: Tensor) -> Tensor:
        """(..., A) each -> (..., 3A): behind the furthest reach per move; distance to the last wall met per move
        (clamped: unseen = far); the extent explored along each axis (a move and its inverse), or the reach alone."""
        span = reach + reach[..., self.inverse] if self.inverse is not None else reach
        return torch.cat([p_prev - reach, (wall - p_prev).clamp(-WALL_UNSEEN, WALL_UNSEEN), span], dim=-1)

    def gate_features(self, state: State) -> Tensor:
        """The extra inputs of the gate's open-loop guess at the next step, from the state before it: (B, 3A), or
        (B, 0) without ``gate_walls``."""
        if not self.gate_walls:
            return _reference(state).new_zeros(_reference(state).shape[0], 0)
        return self._wall_features(self._projections(state["path"]), state["reach"], state["wall"])

    def _track_walls(self, state: State, paths: Tensor, onehot: Tensor, moved: Tensor | None
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """For a window of steps (paths (B, T, P) after each step, onehot (B, T, A) of a_{t-1}, moved (B, T)):
        (the gate features before each step (B, T, 3A), reach and wall after the last step (B, A) each). A wall is
        recorded where the gate judged a move blocked (moved < 0.5): at the projection it was tried from."""
        B, T, _ = paths.shape
        p_all = self._projections(paths)  # (B, T, A) after each step
        p_prev = torch.cat([self._projections(state["path"]).unsqueeze(1), p_all[:, :-1]], dim=1)  # (B, T, A)
        reach_after = torch.cummax(torch.maximum(p_all, state["reach"].unsqueeze(1)), dim=1).values  # (B, T, A)
        blocked = (moved < 0.5).unsqueeze(-1) if moved is not None else torch.zeros_like(onehot[..., :1], dtype=torch.bool)
        event = (onehot > 0) & blocked  # (B, T, A)
        steps = torch.arange(T, device=paths.device).view(1, T, 1)
        last = torch.where(event, steps, torch.full_like(steps, -1)).cummax(dim=1).values  # (B, T, A) last event
        wall_after = torch.where(last >= 0, p_prev.gather(1, last.clamp(min=0)), state["wall"].unsqueeze(1))
        reach_before = torch.cat([state["reach"].unsqueeze(1), reach_after[:, :-1]], dim=1)
        wall_before = torch.cat([state["wall"].unsqueeze(1), wall_after[:, :-1]], dim=1)
        return self._wall_features(p_prev, reach_before, wall_before), reach_after[:, -1], wall_after[:, -1]

    def gate_feature_sequence(self, state: State, prev_action: Tensor, moved: Tensor | None) -> Tensor:
        """The gate features before every step of a window (B, T, 3A) (teacher forcing: training the guess)."""
        if not self.gate_walls:
            return _reference(state).new_zeros(*prev_action.shape, 0)
        onehot = action_onehot(prev_action, self.num_actions, state["path"].dtype)  # (B, T, A)
        paths = self._additive_paths(state["path"], self._scaled(onehot, moved))  # (B, T, P)
        return self._track_walls(state, paths, onehot, moved)[0]

    def _additive_paths(self, path: Tensor, stepped: Tensor) -> Tensor:
        """s_t = s_{-1} + sum_{t' <= t} m_t' E[a_{t'-1}]: one cumulative sum instead of T additions. path (B, P),
        stepped (B, T, A) the one-hot actions scaled by moved -> (B, T, P)."""
        return path.unsqueeze(1) + torch.cumsum(stepped @ self.displacements(), dim=1)

    def displacements(self) -> Tensor:
        """E (A, P), antisymmetric under the inverse table when one is given: E[inv(a)] = -E[a]."""
        if self.inverse is None:
            return self.displacement
        return 0.5 * (self.displacement - self.displacement[self.inverse])

    def se2_table(self) -> Tensor:
        """(turn, forward) per action (A, 2): the declared moves, or the learned ones (antisymmetric under the
        inverse table when one is given, so an out-and-back path comes home exactly)."""
        if hasattr(self, "se2_moves"):
            return self.se2_moves
        if self.inverse is None:
            return self.se2_moves_learned
        return 0.5 * (self.se2_moves_learned - self.se2_moves_learned[self.inverse])

    def _se2_encode(self, path: Tensor) -> Tensor:
        """path (..., 3) = (x, y, heading) -> addr (..., addr_dim)."""
        return se2_features(path[..., :2], path[..., 2], self.frequencies, self.length_scale, self.heading_scale)

    def place_logits(self, embed: Tensor) -> Tensor:
        """The place head's logits of where on each axis a frame was seen: embed (..., E) -> (..., D, L), places
        beyond an axis's size impossible."""
        D, L = self.lattice_moves.shape[1], int(self.lattice_size.max())
        logits = self.place_head(embed).view(*embed.shape[:-1], D, L)
        valid = torch.arange(L, device=embed.device) < self.lattice_size.unsqueeze(-1)  # (D, L)
        return logits.masked_fill(~valid, IMPOSSIBLE)

    def place_loss(self, embed: Tensor, pose: Tensor) -> Tensor:
        """Cross-entropy of the place head against the recorded pose's place (pose / unit on each axis, the MNIST
        map's window corner from 0): embed (B, T, E), pose (B, T, D) -> scalar. Steps off the lattice are skipped."""
        index = (pose.float() / self.lattice_unit).round().long()  # (B, T, D)
        ok = (index >= 0) & (index < self.lattice_size.long())  # (B, T, D)
        logits = self.place_logits(embed).float()  # (B, T, D, L)
        target = index.clamp(0, logits.shape[-1] - 1)  # off-lattice steps (masked below) still need a valid class
        ce = nn.functional.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none")
        return (ce * ok.flatten()).sum() / ok.sum().clamp(min=1)

    def _lattice_step(self, state: State, onehot: Tensor, moved: Tensor | None, embed: Tensor | None = None,
                      temperature: Tensor | None = None) -> State:
        """One move of every start hypothesis: onehot (B, A) of a_{t-1} (zeros: no action), moved (B,) the
        probability that the pose changed (the frames' m_t), or None (open loop: nothing observed, no reweighing);
        embed (B, E) the frame seen after the move, whose place evidence (with ``place_evidence``) weighs each
        hypothesis by where it now stands, times the learned weight tau (``temperature``: the live parameter for
        ``start_loss``; by default detached, so that the ELBO never trains it). `_lattice_filter` for one step."""
        place, log_w = self._lattice_filter(state, onehot.unsqueeze(1), None if moved is None else moved.unsqueeze(1),
                                            None if embed is None else embed.unsqueeze(1), temperature)
        return {"log_w": log_w[:, 0], "place": place[:, 0]}

    def _lattice_filter(self, state: State, onehot: Tensor, moved: Tensor | None, embed: Tensor | None,
                        temperature: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The filter over a window (`_lattice_step` is its one-step case): onehot (B, T, A), moved (B, T) or None,
        embed (B, T, E) or None -> where each start hypothesis stands after each step and its log-weight, (B, T, D,
        L) each.

        Where the hypotheses stand depends on the actions alone (a walk clipped at the lattice's edges, stepped
        here in a few integer ops per step, no gradient); each step's evidence is then one batched computation, and
        the log-weights are its cumulative sum, normalised per axis: the same numbers as normalising after every
        step (the per-step normalisers are constants of the softmax), with T ops where the step-by-step filter
        spends ~20 per step. The floor at IMPOSSIBLE is applied once at the end: a hypothesis 10^4 nats below
        the best has weight 0 either way."""
        place0, log_w0 = state["place"], state["log_w"]  # (B, D, L) each
        B, T = onehot.shape[:2]
        delta = (onehot @ self.lattice_moves.to(onehot.dtype)).unsqueeze(-1)  # (B, T, D, 1) steps along each axis
        last = (self.lattice_size.to(place0.dtype) - 1).view(-1, 1)  # (D, 1)
        with torch.no_grad():
            targets, now = [], place0
            for t in range(T):  # where each start would go, and where the edges leave it
                target = now + delta[:, t]  # (B, D, L)
                now = torch.minimum(target.clamp(min=0), last)
                targets.append(target)
            target = torch.stack(targets, dim=1)  # (B, T, D, L)
            place = torch.minimum(target.clamp(min=0), last)  # (B, T, D, L)
        evidence = None
        if moved is not None:
            # P(what the frames saw | hypothesis): m_t where it moves, 1 - m_t where the edge blocks it; axes the
            # action does not move along say nothing
            inside = (target >= 0) & (target <= last)  # (B, T, D, L) the move happens from there
            m = moved.to(place.dtype).reshape(B, T, 1, 1).clamp(1e-4, 1 - 1e-4)  # (B, T, 1, 1)
            move_evidence = torch.where(inside, m, 1 - m).log()  # (B, T, D, L)
            evidence = torch.where(delta != 0, move_evidence, torch.zeros_like(move_evidence))
        if embed is not None and self.place_head is not None:
            # the frame's likelihood ratio of each place, log p(place | e_t) - log p(place), at each hypothesis's
            # place (the head's bias stands for the data's marginal, so the same evidence seen again does not pile
            # the marginal up). Trained by the place loss alone (labels), never by the ELBO: detached, like the
            # gate with labels.
            logits = self.place_logits(embed).detach()  # (B, T, D, L)
            marginal = logits.new_zeros(logits.shape[-2:]).masked_fill(logits[0, 0] <= IMPOSSIBLE, IMPOSSIBLE)
            marginal = marginal + self.place_head.bias.detach().view(marginal.shape)  # (D, L)
            ratio = logits.log_softmax(-1) - marginal.log_softmax(-1)  # (B, T, D, L)
            tau = self.place_log_temperature.exp().detach() if temperature is None else temperature  # ()
            place_evidence = tau * ratio.gather(-1, place.long())  # (B, T, D, L)
            evidence = place_evidence if evidence is None else evidence + place_evidence
        if evidence is None:  # open loop without frames: the weights stay as they were
            return place, log_w0.unsqueeze(1).expand(B, T, *log_w0.shape[1:])
        log_w = (log_w0.unsqueeze(1) + evidence.cumsum(dim=1)).log_softmax(-1).clamp(min=IMPOSSIBLE)  # (B, T, D, L)
        return place, log_w

    def start_loss(self, prev_action: Tensor, moved: Tensor, embed: Tensor, pose: Tensor) -> Tensor:
        """-log P(the true place) under the filter, per axis, averaged over steps: the score that trains the
        weight of the place evidence (``place_log_temperature``) and nothing else (the frames' moved (B, T) and
        embed (B, E) come in detached). The filter re-runs from the uniform start on the window's actions
        prev_action (B, T), as the address did; pose (B, T, D) says where the agent truly was (steps off the lattice
        are skipped). A proper score: it is lowest when the filter's probabilities are calibrated."""
        state = self.init_state(prev_action.shape[0], prev_action.device, torch.float32)
        onehot = action_onehot(prev_action, self.num_actions, torch.float32)  # (B, T, A)
        truth = (pose.float() / self.lattice_unit).round()  # (B, T, D) the true place on each axis
        ok = ((truth >= 0) & (truth < self.lattice_size)).float()  # (B, T, D)
        place, log_w = self._lattice_filter(state, onehot, moved.float(), embed.float(),
                                            self.place_log_temperature.exp())  # (B, T, D, L) each
        at_truth = place == truth.unsqueeze(-1)  # (B, T, D, L) the starts that stand there now
        log_p = log_w.masked_fill(~at_truth, IMPOSSIBLE).logsumexp(-1)  # (B, T, D)
        return -(log_p * ok).sum() / ok.sum().clamp(min=1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints from before the learned evidence weight: tau = 1, the filter they were trained with
        key = prefix + "place_log_temperature"
        if getattr(self, "place_head", None) is not None and key not in state_dict:
            state_dict[key] = torch.zeros(())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _lattice_encode(self, state: State) -> Tensor:
        """addr_t = E[fourier(x_t(s) - s)] over the start hypotheses: state of (..., D, L) -> (..., addr_dim) (one
        step (B, D, L), or a window (B, T, D, L)). The axes are independent, so the expectation of e^{i omega . d}
        is the product over axes of each axis's expected e^{i omega_d d_d}."""
        place, weights = state["place"], state["log_w"].softmax(-1)  # (..., D, L) each
        starts = torch.arange(place.shape[-1], device=place.device, dtype=place.dtype)  # (L,)
        phase = (place - starts).unsqueeze(-1) * self.frequencies.to(place.dtype).unsqueeze(1)  # (..., D, L, K)
        real = (weights.unsqueeze(-1) * phase.cos()).sum(-2)  # (..., D, K)
        imag = (weights.unsqueeze(-1) * phase.sin()).sum(-2)  # (..., D, K)
        re, im = real[..., 0, :], imag[..., 0, :]  # (..., K)
        for d in range(1, place.shape[-2]):  # complex product over the axes
            re, im = re * real[..., d, :] - im * imag[..., d, :], re * imag[..., d, :] + im * real[..., d, :]
        return torch.cat([im, re], dim=-1) / math.sqrt(self.frequencies.shape[1])  # (..., addr_dim), as fourier_features

    def hypotheses(self, state: State, top: int = 8) -> tuple[Tensor, Tensor] | None:
        """The lattice filter's most probable displacements from the start (at most ``top``) with their
        probabilities, renormalised: the model reads memory at each and mixes the reads by probability (a sharp
        read of the one expected address would bet on the likeliest place instead). Starts that have walked to
        the same displacement are one place. None for the other integrators."""
        if self.integrator != "lattice":
            return None
        place, weights = state["place"], state["log_w"].softmax(-1)  # (B, D, L) each
        B, D, L = place.shape
        offset = (place - torch.arange(L, device=place.device, dtype=place.dtype)).round().long() + (L - 1)
        per_axis = weights.new_zeros(B, D, 2 * L - 1).scatter_add_(-1, offset, weights)  # (B, D, 2L-1) by displacement
        joint = per_axis[:, 0]  # (B, 2L-1)
        for d in range(1, D):  # the axes are independent: outer products, flattened
            joint = (joint.unsqueeze(-1) * per_axis[:, d].unsqueeze(1)).flatten(1)  # (B, (2L-1)^(d+1))
        prob, index = joint.topk(min(top, joint.shape[-1]), dim=-1)  # (B, H) each
        displacement = torch.stack([(index // (2 * L - 1) ** (D - 1 - d)) % (2 * L - 1) for d in range(D)], dim=-1)
        displacement = (displacement - (L - 1)).to(place.dtype)  # (B, H, D) in lattice steps
        addrs = fourier_features(displacement, self.frequencies.to(place.dtype))  # (B, H, addr_dim)
        return addrs, prob / prob.sum(-1, keepdim=True).clamp(min=1e-12)

    @property
    def guesses_moves(self) -> bool:
        """Whether, with the gate, an open-loop step needs the gate's guess (G2) of m_t: not for the lattice
        filter, whose hypotheses each know whether they are blocked."""
        return self.integrator != "lattice"

    @staticmethod
    def _scaled(onehot: Tensor, moved: Tensor | None) -> Tensor:
        """onehot (..., A) times the probability (...,) that the move happened (None: it did)."""
        return onehot if moved is None else onehot * moved.unsqueeze(-1).to(onehot.dtype)

    def step(self, state: State, h: Tensor, prev_action: Tensor, pose: Tensor,
             moved: Tensor | None = None, embed: Tensor | None = None) -> tuple[Tensor, State]:
        """Integrate a_{t-1} (B,) into the path (B, P), scaled by ``moved`` (B,) (None = 1); -1 (no action)
        leaves it; addr_t is its encoding."""
        assert prev_action.shape == (h.shape[0],), f"prev_action must be (B,), got {tuple(prev_action.shape)}"
        if self.integrator == "lattice":  # a filter over start hypotheses: no single path
            onehot = action_onehot(prev_action, self.num_actions, state["place"].dtype)  # (B, A)
            state = self._lattice_step(state, onehot, moved, embed)
            return self._lattice_encode(state), state
        path = state["path"]  # (B, P)
        acted = (prev_action >= 0).to(path.dtype).unsqueeze(-1)  # (B, 1), 0 for "no action"
        if moved is not None:
            acted = acted * moved.to(path.dtype).unsqueeze(-1)  # (B, 1)
        onehot = action_onehot(prev_action, self.num_actions, path.dtype)  # (B, A)
        if self.integrator == "gru":
            # no action (or a blocked one) -> keep s: a GRU fed zeros would still drift through its biases
            path = acted * self.cell(onehot, path) + (1.0 - acted) * path  # (B, P)
            addr = self.proj(self.out(path))  # (B, addr_dim)
        elif self.integrator == "se2":
            turn, forward = (self._scaled(onehot, moved) @ self.se2_table()).unbind(-1)  # (B,) each; 0: no action
            # half the turn, the step, the other half: for a pure turn or a pure step (MiniWorld's, the contract's
            # "turn, then step ahead") the same; for a learned mix, (-turn, -forward) then undoes it exactly
            mid = path[:, 2] + 0.5 * turn  # (B,)
            heading = path[:, 2] + turn  # (B,)
            position = path[:, :2] + forward.unsqueeze(-1) * torch.stack([mid.cos(), mid.sin()], dim=-1)
            path = torch.cat([position, heading.unsqueeze(-1)], dim=-1)  # (B, 3)
            addr = self._se2_encode(path)  # (B, addr_dim)
        else:
            path = path + self._scaled(onehot, moved) @ self.displacements()  # (B, P), s_t = s_{t-1} + m_t E[a_{t-1}]
            addr = fourier_features(path, self.frequencies)  # (B, addr_dim)
            if self.gate_walls:  # `state` still holds s_{t-1}: the walls are tracked from where the move was tried
                _, reach, wall = self._track_walls(state, path.unsqueeze(1), onehot.unsqueeze(1),
                                                   None if moved is None else moved.unsqueeze(1))
                return addr, {"path": path, "reach": reach, "wall": wall}
        return addr, {"path": path}

    def sequence(self, state: State, prev_action: Tensor, pose: Tensor,
                 moved: Tensor | None = None, embed: Tensor | None = None) -> tuple[Tensor, State]:
        """All T addresses from prev_action (B, T) (and moved (B, T) or None) at once: cumulative sums (additive,
        se2) or the GRU alone."""
        if self.integrator == "lattice":  # the filter over the whole window at once
            onehot = action_onehot(prev_action, self.num_actions, state["place"].dtype)  # (B, T, A)
            place, log_w = self._lattice_filter(state, onehot, moved, embed)  # (B, T, D, L) each
            addrs = self._lattice_encode({"place": place, "log_w": log_w})  # (B, T, addr_dim)
            return addrs, {"log_w": log_w[:, -1], "place": place[:, -1]}
        path = state["path"]  # (B, P)
        onehot = action_onehot(prev_action, self.num_actions, path.dtype)  # (B, T, A), zeros for "no action"
        stepped = self._scaled(onehot, moved)  # the integrators' share of each move (the GRU blends by moved below)
        if self.integrator == "additive":
            paths = self._additive_paths(path, stepped)  # (B, T, P)
        elif self.integrator == "se2":
            # the heading is a cumulative sum of turns; then each step ahead along its heading, a second one
            turn, forward = (stepped @ self.se2_table()).unbind(-1)  # (B, T) each
            heading = path[:, 2:3] + torch.cumsum(turn, dim=1)  # (B, T)
            mid = heading - 0.5 * turn  # (B, T) the heading halfway through each step's turn (see `step`)
            steps = forward.unsqueeze(-1) * torch.stack([mid.cos(), mid.sin()], dim=-1)  # (B, T, 2)
            position = path[:, None, :2] + torch.cumsum(steps, dim=1)  # (B, T, 2)
            paths = torch.cat([position, heading.unsqueeze(-1)], dim=-1)  # (B, T, 3)
        else:
            acted = (prev_action >= 0).to(path.dtype).unsqueeze(-1)  # (B, T, 1)
            if moved is not None:
                acted = acted * moved.to(path.dtype).unsqueeze(-1)
            steps = []
            for t in range(prev_action.shape[1]):  # the GRU alone; its read-out below is batched over time
                path = acted[:, t] * self.cell(onehot[:, t], path) + (1.0 - acted[:, t]) * path  # (B, P)
                steps.append(path)
            paths = torch.stack(steps, dim=1)  # (B, T, P)
        if self.integrator == "gru":
            addr = self.proj(self.out(paths))  # (B, T, addr_dim)
        elif self.integrator == "se2":
            addr = self._se2_encode(paths)  # (B, T, addr_dim)
        else:
            addr = fourier_features(paths, self.frequencies)  # (B, T, addr_dim)
            if self.gate_walls:
                _, reach, wall = self._track_walls(state, paths, onehot, moved)
                return addr, {"path": paths[:, -1], "reach": reach, "wall": wall}
        return addr, {"path": paths[:, -1]}


class PoseAddress(AddressPath):
    """addr_t = fourier(pose_t / pose_scale) with fixed random frequencies: same pose -> same address, exactly.

    ``pose_scale`` (a float, or one per pose dimension) is the kernel's length scale in pose units: poses about one
    scale apart get nearly orthogonal addresses. MiniWorld poses are (x, z, heading) in metres and radians; the
    MNIST map's are (row, col) in pixels. ``se2=True`` reads the pose as (x, y, heading) and encodes it with
    ``se2_features`` (the heading periodic, as the se2 integrator does): ``pose_scale`` is then the position's
    length scale and ``heading_scale`` the heading's (radians).
    """

    uses_h = False

    def __init__(self, *, pose_dim: int, addr_dim: int, pose_scale: float | Sequence[float] = 1.0, seed: int = 0,
                 se2: bool = False, heading_scale: float = 0.25):
        super().__init__()
        if pose_dim < 1:
            raise UserError(f"address 'pose': the data has no pose (pose_dim={pose_dim}); use 'hidden' or 'actions'")
        if addr_dim % 2:
            raise UserError(f"address 'pose': addr_dim must be even (sin and cos halves), got {addr_dim}")
        scale = torch.as_tensor(pose_scale, dtype=torch.float32).flatten()
        if scale.numel() not in (1, pose_dim):
            raise UserError(f"address 'pose': pose_scale needs 1 or {pose_dim} values (one per pose dim), got {pose_scale}")
        scale = scale.expand(pose_dim).clone()
        if bool((scale <= 0).any()):
            raise UserError(f"address 'pose': pose_scale must be > 0, got {pose_scale}")
        self.addr_dim, self.pose_dim, self.se2 = addr_dim, pose_dim, bool(se2)
        if self.se2:
            if pose_dim != 3 or scale.unique().numel() != 1 or heading_scale <= 0:
                raise UserError(f"address 'pose' (se2): needs a (x, y, heading) pose, one pose_scale and heading_scale "
                                f"> 0; got pose_dim={pose_dim}, pose_scale={pose_scale}, heading_scale={heading_scale}")
            self.heading_scale = float(heading_scale)
            # se2_features divides positions by its length scale 1.0: fold pose_scale into the position rows
            freq = _random_frequencies(4, addr_dim, seed)
            freq[:2] /= scale[0]
            self.register_buffer("frequencies", freq)
        else:
            self.register_buffer("frequencies", _random_frequencies(pose_dim, addr_dim, seed) / scale.unsqueeze(-1))

    def _encode(self, pose: Tensor) -> Tensor:
        """pose (..., D) -> addr (..., addr_dim)."""
        pose = pose.to(self.frequencies.dtype)
        if self.se2:
            return se2_features(pose[..., :2], pose[..., 2], self.frequencies, 1.0, self.heading_scale)
        return fourier_features(pose, self.frequencies)

    def step(self, state: State, h: Tensor, prev_action: Tensor, pose: Tensor,
             moved: Tensor | None = None, embed: Tensor | None = None) -> tuple[Tensor, State]:
        """addr_t = Fourier features of the env's pose (B, D); the state stays empty."""
        assert pose.shape == (h.shape[0], self.pose_dim), f"pose must be (B, {self.pose_dim}), got {tuple(pose.shape)}"
        return self._encode(pose).to(h.dtype), state

    def sequence(self, state: State, prev_action: Tensor, pose: Tensor,
                 moved: Tensor | None = None, embed: Tensor | None = None) -> tuple[Tensor, State]:
        """All T addresses (B, T, addr_dim): Fourier features of pose (B, T, D) in one batched call."""
        return self._encode(pose), state  # (B, T, addr_dim)


def build_address(kind: str, *, h_dim: int, num_actions: int, pose_dim: int, addr_dim: int, embed_dim: int = 0,
                  z_dim: int = 0, **kw) -> AddressPath:
    """The address pathway named ``kind`` (one of ``ADDRESSES``); ``kw`` go to its class (e.g. integrator=).
    ``embed_dim`` and ``z_dim`` (the model's) reach the action path's blocked-move gate."""
    if addr_dim < 1:
        raise UserError(f"addr_dim: expected >= 1, got {addr_dim}")
    if kind == "hidden":
        return HiddenAddress(h_dim=h_dim, addr_dim=addr_dim, **kw)
    if kind == "actions":
        return ActionAddress(num_actions=num_actions, addr_dim=addr_dim, embed_dim=embed_dim, z_dim=z_dim, **kw)
    if kind == "pose":
        return PoseAddress(pose_dim=pose_dim, addr_dim=addr_dim, **kw)
    raise UserError(f"unknown address {kind!r}: expected one of {ADDRESSES}")
