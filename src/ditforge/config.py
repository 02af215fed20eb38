"""Typed configuration: one object per run, validated on construction, written as JSON.

CLI flags -> `TrainConfig` (this module) -> `run_dir/config.json` -> passed down. Every field
has one meaning and one source of truth; nothing below `cli.py` reads `sys.argv`.

Named presets (`PRESETS`) give the defaults of a recipe; flags override single fields:

- `tiny`: the built-in demo. DiT-Ti/2 in pixel space on scikit-learn's 8x8 digits, tuned to
  learn recognisable digits on a 2-core laptop CPU in a few minutes.
- `DiT-{S,B,L,XL}/{2,4,8}`: the paper's ImageNet recipe (Peebles & Xie 2022, Sec. 4): AdamW,
  lr 1e-4 constant, no weight decay, global batch 256, EMA 0.9999 from the first step,
  label dropout 0.1, horizontal flips, linear betas over 1000 steps, learned sigma.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditforge.errors import UserError
from ditforge.flow import FlowObjective

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PREFETCH = ("auto", "on", "off")
PARALLEL = ("ddp", "fsdp")
NOISE_SCHEDULES = ("linear", "cosine")
OBJECTIVES = ("diffusion", "flow")


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def _non_negative_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"{name} must be a non-negative integer (0 turns it off), got {value!r}")


@dataclass
class ModelConfig:
    """Which network: a registry name plus the few choices that are not in the name."""

    name: str = "DiT-Ti/2"
    learn_sigma: bool = True  # output 2C channels: epsilon and the variance interpolation v
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
    # Block options of LightningDiT (models/blocks.py); the defaults are the paper's DiT and keep
    # the official state-dict keys.
    norm: str = "layer"  # "layer" (LayerNorm) or "rms" (RMSNorm with a gain)
    mlp: str = "gelu"  # "gelu" (fc1, fc2) or "swiglu" (three matrices, 2/3 the hidden width)
    rope: bool = False  # 2-D rotary position embedding on q and k (the sin-cos pos_embed stays)
    qk_norm: bool = False  # RMSNorm on q and k of each head

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
    noise_schedule: str = "linear"  # Ho et al. 2020 linear betas 1e-4..0.02, or Nichol & Dhariwal cosine
    diffusion_steps: int = 1000

    def __post_init__(self) -> None:
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise UserError(
                f"unknown noise schedule {self.noise_schedule!r}; choose one of: {', '.join(NOISE_SCHEDULES)}"
            )
        _positive_int("diffusion_steps", self.diffusion_steps)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 turns clipping off (the paper does not clip)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # JSON gives lists back
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"lr must be a positive finite number, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.weight_decay < 0:
            raise UserError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip < 0:
            raise UserError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip!r}")


@dataclass
class TrainConfig:
    """Everything a training run needs; `run_dir/config.json` holds the resolved copy."""

    data: str = "digits"  # a built-in set name or an image folder (one sub-folder a class)
    run_dir: str = "runs/digits"
    image_size: int | None = None  # pixels; None keeps a built-in set's own size
    hflip: bool = False  # random horizontal flips (the paper: yes for ImageNet; digits: no)
    model: ModelConfig = field(default_factory=ModelConfig)
    # what the model learns (objectives.py): DiT's Gaussian diffusion, or SiT's flow matching
    objective: str = "diffusion"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    flow: FlowObjective = field(default_factory=FlowObjective)  # path, prediction, training times (flow only)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 800
    global_batch: int = 128
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)); off = the paper's flat decay
    precision: str = "auto"  # auto: bf16 on GPUs that support it, fp32 on CPU
    grad_accum: int = 1  # micro-batches per optimizer step and process
    parallel: str = "ddp"  # under torchrun: DDP, or FSDP2 (fully_shard) for models too big for one device
    compile: bool = False  # torch.compile the model
    prefetch: str = "auto"  # read the next steps' batches in a background thread; auto: on a GPU (pinned)
    # what blocks keep for backward (models/recompute.py): none | ops | mlp | attn | full [:FRACTION];
    # "ops" recomputes only the cheap ops (half the memory of none, no matrix product twice, but
    # slower on CPU); earlier versions wrote true (= full) or false (= none)
    grad_checkpoint: str = "none"
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 200
    keep_last: int = 2  # checkpoints kept on disk (0 keeps all)
    sample_every: int = 0  # preview grid every N steps (0 = only at the end)
    sample_steps: str = "50"  # respacing of the preview sampler
    sample_cfg: float = 4.0
    # sampler of the previews and --eval-every; "" = the objective's default (ddpm; heun for flows)
    sample_sampler: str = ""
    eval_every: int = 0  # class accuracy (and Frechet distance or FID) every N steps, to TensorBoard
    eval_per_class: int = 20  # samples per class for those evaluations
    eval_fid: bool = False  # image folders, latent stores: also FID/precision/recall (Inception: slow on CPU)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        if isinstance(self.diffusion, dict):
            self.diffusion = DiffusionConfig(**self.diffusion)
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
        if isinstance(self.flow, dict):
            try:
                self.flow = FlowObjective(**self.flow)
            except (TypeError, ValueError) as e:
                raise UserError(f"flow settings: {e}") from None
        if not self.data:
            raise UserError("data must name a built-in data set (e.g. 'digits') or an image folder")
        if self.image_size is not None:
            _positive_int("image_size", self.image_size)
        for name in ("steps", "global_batch", "log_every", "ckpt_every", "grad_accum", "eval_per_class"):
            _positive_int(name, getattr(self, name))
        for name in ("keep_last", "sample_every", "seed", "eval_every"):
            _non_negative_int(name, getattr(self, name))
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1), got {self.ema_decay!r} (the paper uses 0.9999)")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.prefetch not in PREFETCH:
            raise UserError(f"unknown prefetch setting {self.prefetch!r}; choose one of: {', '.join(PREFETCH)}")
        if self.parallel not in PARALLEL:
            raise UserError(f"unknown parallel strategy {self.parallel!r}; choose one of: {', '.join(PARALLEL)}")
        steps = str(self.sample_steps)
        top = self.diffusion.diffusion_steps if self.objective == "diffusion" else None
        if not (steps.isdigit() and 1 <= int(steps) <= (top or int(steps))):
            limit = f"from 1 to diffusion_steps = {top}" if top else "of at least 1"
            raise UserError(f"sample_steps (the previews' sampling steps) must be a whole number {limit}, got {self.sample_steps!r}")
        self.sample_steps = steps
        from ditforge.models.recompute import normalize_spec

        self.grad_checkpoint = normalize_spec(self.grad_checkpoint)
        from ditforge.objectives import default_sampler, samplers_of

        self.sample_sampler = self.sample_sampler or default_sampler(self.objective)
        if self.sample_sampler not in samplers_of(self.objective):
            raise UserError(
                f"sample_sampler {self.sample_sampler!r} does not sample a {self.objective}-objective model; "
                f"choose one of: {', '.join(samplers_of(self.objective))}"
            )
        if self.sample_cfg < 0:
            raise UserError(f"sample_cfg must be >= 0 (1 = no guidance), got {self.sample_cfg!r}")

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
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


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


def preset(name: str) -> dict[str, Any]:
    """The field values of a named preset (a deep copy, safe to modify)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return json.loads(json.dumps(PRESETS[name]))
