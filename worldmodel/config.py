"""Configs of the world model and its training run, and the named presets.

`ModelConfig` is everything needed to rebuild a model from a checkpoint; `TrainConfig` is the command line of
`python -m worldmodel.train` (each field's docstring is its `--help`). A preset is a `TrainConfig` whose fields
become the defaults that explicit flags then override (DreamerV3's `debug`, nanoGPT's `shakespeare_char`).
`RESUME_MAY_CHANGE` names the fields a resumed run may change; every other field is the run's definition.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from gtmm.cli import UserError, parse_json_object


@dataclass
class ModelConfig:
    """Sizes and choices of one GTMM world model."""

    obs_shape: tuple[int, int, int] = (28, 28, 1)
    """frame shape (H, W, C), taken from the data"""
    num_actions: int = 0
    """number of discrete actions A (0 for action-free sequence tasks)"""
    pose_dim: int = 0
    """size D of the env's pose (0 when there is none)"""
    memory: str = "introspective"
    """external memory: none, introspective, ntm, lru, dnc"""
    address: str = "hidden"
    """where a memory slot's address comes from: hidden (LSTM state), actions (a recurrent path integrator), pose"""
    z_dim: int = 32
    """latent size Z"""
    h_dim: int = 128
    """LSTM controller size"""
    addr_dim: int = 32
    """size of a slot's address part"""
    slots: int = 48
    """memory slots N (the FIFO length L for introspective)"""
    heads: int = 2
    """read heads R"""
    embed_dim: int = 128
    """frame embedding size e_t"""
    channels: int = 32
    """channels of the first conv layer (doubling each layer)"""
    hidden_dim: int = 128
    """hidden size of the prior/posterior MLPs"""
    obs_model: Literal["bernoulli", "gaussian"] = "bernoulli"
    """p(x|z): bernoulli (BCE on pixels in [0, 1]) or gaussian (fixed std 0.1 on pixels in [0, 1])"""
    reward_head: bool = False
    """predict each step's reward and termination from [h_t, r_t, z_t] (worldmodel.reward), for dreams"""
    write_latent: Literal["sample", "mean"] = "sample"
    """what step (7) stores: the latent z_t that drove the step (the paper's), or the mean of its distribution"""
    prior_skip: bool = False
    """the prior also maps the read r_t linearly to its output (copying a read latent exactly, whatever its size)"""
    prior_outlier: float = 0.0
    """eps of the robust prior (1 - eps) N(mu_p, sigma_p) + eps N(0, I) (nets.outlier_kl; 0 = the plain Gaussian);
    dreams and open-loop predictions use its main component"""
    memory_kwargs: dict[str, Any] = field(default_factory=dict)
    """extra arguments of the memory class (e.g. store_h)"""
    address_kwargs: dict[str, Any] = field(default_factory=dict)
    """extra arguments of the address pathway (e.g. integrator, inverse_actions, pose_scale)"""
    path_head: bool = False
    """a linear head reads the displacement since the window's first frame from h_t (worldmodel.path)"""
    path_period: list[Optional[float]] = field(default_factory=list)
    """the path head's period of each pose axis (null: the axis does not wrap; empty: none wraps)"""
    path_target: Literal["pose", "actions", "moves"] = "pose"
    """what the path head reads: the displacement from the recorded poses, the centred action counts (P2'), or those
    of the moves that changed the view (P2'')"""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """The config of a saved dict (e.g. a checkpoint's); UserError naming any unknown field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"model config: unknown fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        d = dict(d)
        if "obs_shape" in d:
            d["obs_shape"] = tuple(int(x) for x in d["obs_shape"])
        return cls(**d)


@dataclass
class TrainConfig:
    """Train a GTMM world model on recorded rollouts (--data) or a sequence task (--task)."""

    data: Optional[str] = None
    """folder of recorded rollouts (python -m rollouts.collect); exclusive with --task"""
    task: Optional[str] = None
    """action-free sequence task from envs.sequences.TASKS; exclusive with --data"""
    augment_shift: int = 0
    """--task only: move each training image by up to this many pixels (the same move where it repeats; 0 = off),
    standing in for the paper's full MNIST (mnist5k has 400 exemplars a class); validation images never move"""
    task_kwargs: str = "{}"
    """--task only: JSON object of the task's fields for the training batches, over those that fit --seq-len (e.g.
    '{"prefix": "even"}', parity's curriculum); validation and evaluation sequences are the plain task's"""
    preset: str = "mnist_cpu"
    """named preset giving the defaults: debug, mnist_cpu, gpu, miniworld"""
    out: str = "runs/default"
    """run folder: config.json, ckpt.pt, TensorBoard logs"""
    resume: bool = False
    """continue the run in --out from its ckpt.pt exactly (optimiser, step, RNG, data position); only --steps,
    --threads, --device, --progress and the --*-every intervals may differ from the run's saved config"""
    init_from: Optional[str] = None
    """start this new run from the model weights of a checkpoint (a run folder, a ckpt.pt or pretrained:NAME) with
    a fresh optimizer at step 0: fine-tuning, e.g. with another loss (--open-loop-weight); this run's flags must
    build a model of the same parameter shapes. A --resume of such a run continues from its own checkpoint"""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N"""
    seed: int = 0
    """seed of the model init, the data order and the latent samples"""
    threads: int = 1
    """torch CPU threads (0 = torch's default, all cores); 1 by default in every command: small recurrent steps gain little from more, and more threads than free cores slow them a lot"""
    compile: Literal["auto", "on", "off"] = "auto"
    """compile the recurrent step with torch.compile (CUDA: as CUDA graphs); auto = on for CUDA, off for CPU, where
    it only pays for the slot memories (ntm/dnc ~1.3-1.8x) and costs 20-60 s of compilation"""
    cuda_graphs: bool = True
    """with the compiled step on CUDA, replay it as CUDA graphs (torch.compile's reduce-overhead mode);
    --no-cuda-graphs compiles the kernels only (one launch per fused kernel); ignored on the CPU"""
    precision: Literal["auto", "bf16", "bf16-convs", "fp32"] = "auto"
    """arithmetic of the training step: bf16 (autocast: matrix products in bfloat16, losses in float32),
    bf16-convs (only the frame encoder and decoder in bf16; cell, memory and losses in fp32) or fp32; auto = bf16 on
    CUDA and bf16-convs on a CPU with bf16 in hardware (AVX512-BF16/AMX; ~1.1-1.25x faster steps), for rollouts;
    fp32 for the paper's sequence tasks (--task) and elsewhere. Small models gain nothing from bf16 on a GPU
    (launch-bound) and can lose the learning of reads to it (README, the paper's tasks on the GPU)"""

    # model
    memory: str = "introspective"
    """external memory: none, introspective, ntm, lru, dnc"""
    address: str = "auto"
    """slot address: auto (chosen from what the data's env declares, see config.auto_address), hidden (the paper's:
    from the LSTM state), actions (learned path integrator over actions), pose (env pose, a ceiling)"""
    z_dim: int = 32
    """latent size Z"""
    h_dim: int = 128
    """LSTM controller size"""
    addr_dim: int = 32
    """size of a slot's address part"""
    slots: int = 0
    """memory slots (0 = the sequence length, so the FIFO holds the whole window)"""
    heads: int = 2
    """memory read heads"""
    embed_dim: int = 128
    """frame embedding size"""
    channels: int = 32
    """channels of the first conv layer"""
    hidden_dim: int = 128
    """hidden size of the prior/posterior MLPs"""
    obs_model: Literal["bernoulli", "gaussian"] = "bernoulli"
    """observation likelihood p(x|z)"""
    write_latent: Literal["sample", "mean"] = "sample"
    """what a memory slot stores: the sampled latent z_t (the paper's) or the mean of its distribution (a recall
    then need not pay for the noise of one earlier draw: ~Z/2 log 2 nats, see docs/paper_ablation.md)"""
    prior_skip: bool = False
    """a linear path from the memory read to the prior's output beside its MLP, so the prior can copy a stored latent
    exactly (a GELU MLP copies only the sizes it was trained on; see docs/paper_ablation.md)"""
    prior_outlier: float = 0.0
    """robust prior: (1 - eps) N(mu_p, sigma_p) + eps N(0, I), its KL bounded (nets.outlier_kl), so a confident prior
    that recalls the wrong frame pays about -log eps + a new frame's KL, not without bound (0 = off)"""
    memory_kwargs: str = "{}"
    """JSON object of extra memory arguments, e.g. '{"store_h": true}'"""
    address_kwargs: str = "{}"
    """JSON object of extra address arguments, e.g. '{"integrator": "additive", "inverse_actions": [1, 0, 3, 2]}'
    (with --address auto: merged over the chosen ones, yours win)"""

    # optimisation
    steps: int = 3000
    """training steps (optimizer updates); with --resume, the step the run goes to (default: the saved one)"""
    batch: int = 16
    """sequences per batch (per process under torchrun)"""
    seq_len: int = 48
    """frames per training sequence"""
    lr: float = 1e-3
    """Adam learning rate"""
    address_lr_scale: float = 3.0
    """learning-rate multiplier for the address pathway (helps the learned address converge before z's drift)"""
    grad_clip: float = 100.0
    """clip the global gradient norm to this"""
    free_nats: float = 0.0
    """free bits: the KL of a step counts only above this many nats (0 = off)"""
    kl_balance: float = 0.5
    """KL balancing (DreamerV3): weight of the prior-training term; 0.5 = the plain ELBO gradient"""
    reward_head: bool = False
    """learn the recorded rewards and terminations too (a reward head: dreams then report predicted rewards)"""
    reward_weight: float = 1.0
    """weight of the reward heads' loss (squared reward error + termination cross-entropy per step)"""
    gate_aux: float = 1.0
    """weight of the blocked-move gate's auxiliary loss (an action address with '{"gate": true}': predict from the
    frames whether each move happened, labelled by the recorded pose; 0 = learn it from the ELBO alone); with the
    lattice filter's place evidence it also weighs the place head's loss and the filter's score of the true place,
    which trains the evidence's weight"""
    open_loop_weight: float = 0.0
    """weight of the open-loop loss (0 = off): after the first --open-loop-context frames of each window, the NLL of
    every later frame decoded from the prior's mean with no frame seen (what evaluation measures), so the
    controller must learn to follow the actions without frames; the ELBO is trained as always beside it"""
    open_loop_context: int = 8
    """frames seen before the open-loop part of each training window (--open-loop-weight > 0)"""
    path_weight: float = 0.0
    """weight of the path-integration loss (0 = off; worldmodel.path): a linear head on the controller state h_t
    predicts the displacement since the window's first frame, from the recorded poses (or the actions: --path-target),
    so the controller (and the `hidden` address's keys, linear in it) knows where the agent is without a frame"""
    path_period: str = ""
    """the pose's period per axis as a JSON list, null for an axis that does not wrap (e.g. '[84, 84]' on a torus
    map); empty = what the data's env declares (action_effects.period), else no axis wraps"""
    path_target: Literal["pose", "actions", "moves"] = "pose"
    """what the path head predicts: 'pose' (the displacement, from the recorded poses), 'actions' (the count of each
    action taken since the window's first frame, centred over the actions: no label beyond the actions; the
    displacement itself where moves add and are never blocked, e.g. a torus map) or 'moves' (the same count of only
    the actions whose next frame differs from the last: a blocked move changes no view, so the displacement under a
    clipping border too)"""
    read_weight: float = 0.0
    """weight of the read loss (0 = off; worldmodel.read_target; --memory introspective): on a revisit, the negative
    log read mass on the memory slots written at the same place, so the keys learn to find it; training only
    (evaluation and dreams run the model unchanged)"""
    read_open_loop: bool = False
    """with --read-weight and --open-loop-weight: ask the read loss of the open-loop branch's reads too, which find the
    place from the actions alone (no frame since the context), so the controller learns to know where it is"""
    read_target: Literal["pose", "frame"] = "pose"
    """what marks a slot as written at the same place for --read-weight: 'pose' (the recorded poses are equal; needs
    --data with poses) or 'frame' (the views are equal: no label beyond the observations, also for --task)"""
    curriculum_start: int = 0
    """sequence-length curriculum: start at this many frames (0 = off, always --seq-len)"""
    curriculum_steps: int = 1000
    """steps over which the curriculum grows linearly to --seq-len"""
    val_fraction: float = 0.05  # = rollouts.dataset.VAL_FRACTION (config stays import-light)
    """fraction of episodes held out by rollouts.dataset for validation (never trained on)"""

    # validation
    val_every: int = 250
    """steps between validations on held-out episodes (0 = off); the best one is kept as best.pt"""
    val_windows: int = 32
    """held-out windows in the fixed validation set (episode starts of the val split, or task sequences)"""

    # bookkeeping
    log_every: int = 50
    """steps between TensorBoard scalars and, off a terminal or with --no-progress, a plain log line"""
    image_every: int = 500
    """steps between TensorBoard image grids and per-step KL curves"""
    ckpt_every: int = 500
    """steps between (atomic) checkpoints"""
    open_loop_context: int = 8
    """context frames before open-loop prediction (image grids and validation)"""
    progress: bool = True
    """show a tqdm progress bar on a terminal (plain log lines otherwise)"""

    def resolve_address(self, env: Optional[dict[str, Any]], num_actions: int) -> tuple["TrainConfig", str]:
        """`(config, why)`: this config with `--address auto` replaced by what `auto_address` chooses from `env`
        (the data manifest's `env` entry; None for a sequence task), the chosen kwargs merged under the user's own
        `--address-kwargs`. An explicit address comes back unchanged (why = ''). What a run records (config.json,
        checkpoints) is the resolved config, so resume and evaluate see concrete values."""
        if self.address == "pose" and env:
            return self._resolve_pose(env, num_actions)
        if self.address != AUTO:
            return self, ""
        address, chosen, why = auto_address(env, num_actions, self.memory)
        given = parse_json_object(self.address_kwargs, "address_kwargs")
        kwargs = {**chosen, **given} if address == "actions" else given  # yours win; hidden takes none of ours
        if kwargs.get("gate") is False:
            kwargs.pop("gate_walls", None)  # '{"gate": false}': the plain integrator, with nothing of the gate's
            if kwargs.get("integrator") == "lattice" and "integrator" not in given:
                # on declared edges too: the plain additive integrator (the lattice filter needs the gate)
                inverse = _inverse_of(env or {}, num_actions)
                kwargs = {"integrator": "additive", **({"inverse_actions": inverse} if inverse is not None else {}),
                          **given}
        return dataclasses.replace(self, address=address, address_kwargs=json.dumps(kwargs)), why

    def _resolve_pose(self, env: dict[str, Any], num_actions: int) -> tuple["TrainConfig", str]:
        """`--address pose` on data whose actions are `se2` (a pose (x, z, heading)): the periodic SE(2) encoding of
        the pose with the integrator's kernel scales (half a step, half a turn), unless `--address-kwargs` says."""
        effects = _effects_of(env, num_actions)
        given = parse_json_object(self.address_kwargs, "address_kwargs")
        if effects is None or effects["kind"] != "se2" or "se2" in given:
            return self, ""
        moves = effects["moves"]
        chosen = {"se2": True, "pose_scale": 0.5 * max(abs(float(m[1])) for m in moves) or 1.0,
                  "heading_scale": 0.5 * max(abs(float(m[0])) for m in moves) or 0.25}
        why = "the pose is (x, z, heading): encoded with a periodic heading (se2), kernel scales half a step and turn"
        return dataclasses.replace(self, address_kwargs=json.dumps({**chosen, **given})), why

    def resolved_precision(self, device_type: str) -> str:
        """The arithmetic of the training step on a device of type ``device_type`` ("cuda", "cpu"): "bf16" (autocast
        over the step), "bf16-convs" (`GTMM.set_conv_bf16`) or "fp32". `auto`: bf16 on CUDA and bf16-convs on a CPU
        that multiplies bf16 in hardware, for world models of rollouts; fp32 on other CPUs and for the paper's
        sequence tasks (`--task`): their models are small enough that bf16 buys nothing, and on an H100 the compiled
        bf16 step kept introspective from ever learning to read on similarity-cued recall in 6 of 7 runs, where fp32
        learnt in 14 of 14 (README, the paper's tasks on the GPU)."""
        if self.precision != "auto":
            return self.precision
        if self.task is not None:
            return "fp32"
        if device_type == "cuda":
            return "bf16"
        from worldmodel.nets import cpu_has_native_bf16  # torch: not at the import of the config

        return "bf16-convs" if device_type == "cpu" and cpu_has_native_bf16() else "fp32"

    def uses_bf16(self, device_type: str) -> bool:
        """Whether the whole training step runs under bf16 autocast on a device of type ``device_type``."""
        return self.resolved_precision(device_type) == "bf16"

    def model_config(self, obs_shape: tuple[int, int, int], num_actions: int, pose_dim: int) -> ModelConfig:
        """The model of this run for data of these shapes (`--address auto` resolved as for data that declares no
        action effects: the trainer resolves it from the data's manifest first)."""
        if self.address == AUTO:
            return self.resolve_address(None, num_actions)[0].model_config(obs_shape, num_actions, pose_dim)
        return ModelConfig(
            obs_shape=tuple(obs_shape), num_actions=num_actions, pose_dim=pose_dim, memory=self.memory,
            address=self.address, z_dim=self.z_dim, h_dim=self.h_dim, addr_dim=self.addr_dim,
            slots=self.slots or self.seq_len, heads=self.heads, embed_dim=self.embed_dim, channels=self.channels,
            hidden_dim=self.hidden_dim, obs_model=self.obs_model, reward_head=self.reward_head,
            write_latent=self.write_latent, prior_skip=self.prior_skip, prior_outlier=self.prior_outlier,
            memory_kwargs=parse_json_object(self.memory_kwargs, "memory_kwargs"),
            address_kwargs=parse_json_object(self.address_kwargs, "address_kwargs"),
            path_head=self.path_weight > 0, path_period=self.parsed_path_period(pose_dim),
            path_target=self.path_target,
        )

    def parsed_path_period(self, pose_dim: int) -> list[Optional[float]]:
        """`--path-period` as one float or None per pose axis ([] when empty); UserError on a bad value."""
        from worldmodel.path import parse_period  # torch: not at the import of the config

        return parse_period(self.path_period, pose_dim, "--path-period")

    def to_json(self) -> str:
        """The config as indented JSON with sorted keys (the run folder's config.json)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """The config of a saved dict (config.json); UserError naming any unknown field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"train config: unknown fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)


# -- --address auto: the address chosen from what the data's env declares ---------------------------------------------

AUTO = "auto"


def _manifest_problem(field: str, value: Any, expected: str) -> UserError:
    return UserError(f"the data's manifest: field 'env.{field}' is {value!r}, expected {expected}")


def _inverse_of(env: dict[str, Any], num_actions: int) -> Optional[list[int]]:
    """The manifest's `env.inverse_actions`, checked (an untrusted file); None when it is not recorded."""
    inverse = env.get("inverse_actions")
    if inverse is None:
        return None
    ok = (isinstance(inverse, list) and len(inverse) == num_actions
          and all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < num_actions for a in inverse))
    if not ok or any(inverse[a] != i for i, a in enumerate(inverse)):
        raise _manifest_problem("inverse_actions", inverse, f"{num_actions} action ids forming an involution "
                                "(inverse[inverse[a]] == a)")
    return list(inverse)


def _effects_of(env: dict[str, Any], num_actions: int) -> Optional[dict[str, Any]]:
    """The manifest's `env.action_effects`, checked; None when it is not recorded (an older manifest: unknown)."""
    effects = env.get("action_effects")
    if effects is None:
        return None
    if not (isinstance(effects, dict) and isinstance(effects.get("kind"), str)):
        raise _manifest_problem("action_effects", effects, 'an object {"kind": ..., "moves": [...]}')
    moves = effects.get("moves")
    ok = (isinstance(moves, list) and len(moves) == num_actions
          and all(isinstance(m, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in m)
                  for m in moves))
    if not ok:
        raise _manifest_problem("action_effects.moves", moves, f"{num_actions} lists of numbers (one per action)")
    return effects


def auto_address(env: Optional[dict[str, Any]], num_actions: int, memory: str) -> tuple[str, dict[str, Any], str]:
    """What `--address auto` becomes: `(address, address_kwargs, why)`, from the `env` entry of the data's manifest
    (None for a sequence task) and what the env declared there (the `action_effects` contract, envs/__init__.py):

    - no actions (the paper's sequence tasks): `hidden`, the paper's address from the LSTM state;
    - memory `none`: `hidden` (no memory reads an address; the cheapest one keeps the baseline the paper's);
    - `translate` moves (MNIST map): `actions` with the additive integrator, tied by `inverse_actions` so that an
      out-and-back path returns to its start address exactly (0.215x the `none` baseline's open-loop error on
      revisits of context places in the README's results, level with the pose oracle);
    - `se2` moves (MiniWorld): `actions` with the SE(2) integrator (turn, then step along the heading) driven by
      the declared moves, tied by `inverse_actions`;
    - any other kind, or no declared effects (an older manifest): `actions` with the GRU integrator, which can
      learn any dynamics;
    - moves that can be blocked (`exact` False: a `clip` border, walls): the blocked-move gate too (`gate`: the
      model learns from the frames whether each move happened, `worldmodel.gate`);
    - `translate` moves blocked at a declared `extent` (the MNIST map's clip border): the lattice integrator, a
      Bayes filter over where the walk started, with the frames' place evidence (`place_evidence`); older
      manifests without `extent`: the additive integrator with the gate's wall features (`gate_walls`).

    `why` is one line for the run's log."""
    if num_actions == 0:
        return "hidden", {}, "the data has no actions (a sequence task): the paper's hidden-state address"
    if memory == "none":
        return "hidden", {}, "memory none reads no address: hidden, the cheapest"
    env = env or {}
    effects = _effects_of(env, num_actions)
    inverse = _inverse_of(env, num_actions)
    blocked = effects is not None and effects.get("exact") is False
    gate_why = " and a gate that sees in the frames whether each move happened (they can be blocked)" if blocked else ""
    if effects is not None and effects["kind"] in ("translate", "se2"):
        kwargs: dict[str, Any] = {"integrator": "additive"}
        why = "the env's actions translate the view: an additive path integrator over the actions"
        if effects["kind"] == "se2":
            moves = [[float(x) for x in m] for m in effects["moves"]]
            if any(len(m) != 2 for m in moves):
                raise _manifest_problem("action_effects.moves", effects["moves"], "[turn, forward] per action (se2)")
            kwargs = {"integrator": "se2", "moves": moves}
            why = "the env's actions turn and step ahead: the SE(2) path integrator over its declared moves"
        if inverse is not None:
            kwargs["inverse_actions"] = inverse
        if blocked:
            kwargs["gate"] = True
            extent = effects.get("extent")
            if effects["kind"] == "translate" and extent is not None:
                ok = (isinstance(extent, list) and len(extent) == len(effects["moves"][0])
                      and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in extent))
                if not ok:
                    raise _manifest_problem("action_effects.extent", extent, "a positive number per pose axis")
                # where the edges are is declared: reason over where the walk started (address.py, lattice)
                kwargs = {"integrator": "lattice", "moves": effects["moves"], "extent": extent, "gate": True,
                          "place_evidence": True}
                return "actions", kwargs, ("the env's actions translate the view on a map with declared edges: a "
                                           "Bayes filter over where the walk started, with the gate and the frames' "
                                           "place evidence")
            if effects["kind"] == "translate":
                kwargs["gate_walls"] = True  # a map's borders: no frame shows them, the walk does (address.py)
        return "actions", kwargs, why + gate_why
    if effects is None:
        why = "the data's manifest declares no action effects (an older collect): the GRU path integrator"
    else:
        why = f"the env's actions are {effects['kind']!r} moves: the GRU path integrator (no exact integrator for them)"
    return "actions", {"integrator": "gru", **({"gate": True} if blocked else {})}, why + gate_why


# What `--resume` may change: how long and where the run goes, and how it reports. Everything else defines the run
# (model, data, optimisation): a resumed run that changed it would no longer be the run its checkpoint describes.
# `--data` is special: it may name a moved copy of the same dataset (checked by the episodes' checksums).
RESUME_MAY_CHANGE = ("steps", "threads", "device", "compile", "cuda_graphs", "precision", "progress", "log_every", "image_every", "ckpt_every", "val_every")


PRESETS: dict[str, TrainConfig] = {
    # Seconds on a CPU: what the tests use.
    "debug": TrainConfig(
        preset="debug", z_dim=8, h_dim=32, addr_dim=8, heads=1, embed_dim=32, channels=8, hidden_dim=32,
        steps=20, batch=4, seq_len=8, log_every=5, image_every=10, ckpt_every=10, open_loop_context=3,
        address_lr_scale=1.0, val_every=10, val_windows=8,
    ),
    # 3x3-digit MNIST maps, 28px window, 48-step walks, on one or two CPU cores (~0.5 s/step).
    "mnist_cpu": TrainConfig(
        preset="mnist_cpu", z_dim=32, h_dim=128, addr_dim=32, heads=2, embed_dim=128, channels=16, hidden_dim=128,
        steps=3000, batch=16, seq_len=48, lr=1e-3, address_lr_scale=3.0, free_nats=1.0, kl_balance=0.8,
        log_every=25, image_every=250, ckpt_every=250, val_every=250,
    ),
    # MiniWorld on one or two CPU cores: 32x32x3 frames (collect with --env-kwargs '{"obs_size": 32}'), 48-step
    # windows of 96-step loop walks; the mnist_cpu sizes (~0.3 s/step on one free core, 3000 steps in ~15-25 min).
    "miniworld_cpu": TrainConfig(
        preset="miniworld_cpu", z_dim=32, h_dim=128, addr_dim=32, heads=2, embed_dim=128, channels=16, hidden_dim=128,
        steps=3000, batch=16, seq_len=48, lr=1e-3, address_lr_scale=3.0, free_nats=1.0, kl_balance=0.8,
        log_every=25, image_every=250, ckpt_every=250, val_every=250,
    ),
    # One modern GPU: bigger model, longer sequences, bigger batches (bf16 autocast).
    "gpu": TrainConfig(
        preset="gpu", z_dim=64, h_dim=256, addr_dim=64, heads=4, embed_dim=256, channels=32, hidden_dim=256,
        steps=50_000, batch=64, seq_len=64, lr=6e-4, address_lr_scale=3.0, free_nats=1.0, kl_balance=0.8,
        curriculum_start=16, curriculum_steps=5000, log_every=100, image_every=2000, ckpt_every=2000, val_every=2000,
    ),
    # 64x64x3 MiniWorld frames on a GPU.
    "miniworld": TrainConfig(
        preset="miniworld", z_dim=64, h_dim=256, addr_dim=64, heads=4, embed_dim=512, channels=32, hidden_dim=256,
        steps=100_000, batch=32, seq_len=64, lr=3e-4, address_lr_scale=3.0, free_nats=1.0, kl_balance=0.8,
        curriculum_start=16, curriculum_steps=10_000, log_every=100, image_every=2000, ckpt_every=2000,
        val_every=2000,
    ),
}


def preset(name: str) -> TrainConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
