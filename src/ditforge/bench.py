"""Training throughput: images/s, step time, peak memory, model FLOP/s and MFU.

The FLOP count is analytic, from the architecture (the paper's "Gflops" are multiply-
accumulates: DiT-XL/2 is 118.6 G MACs per forward at 256 px). A training step costs about
3 forwards (backward = 2x forward), and 1 MAC = 2 FLOPs, so model FLOPs per image per step =
6 x forward MACs. MFU = achieved model FLOP/s / the device's dense peak at that precision.
Recomputation (gradient checkpointing) is not counted: MFU measures useful work, and so is
MeanFlow's forward-mode pass (``--objective meanflow``: a JVP without gradient on the rows with
r < t, about two forwards of those rows): compare its step time with a flow step's, not its MFU.
A distillation step (``--mf-velocity teacher``) also runs its frozen teacher, a copy of the model
(its weights do not change the cost), one forward without gradient (of the doubled batch when
guided), not counted either.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from ditforge.config import PRECISIONS, ModelConfig, OptimConfig, TrainConfig
from ditforge.errors import UserError
from ditforge.flags import flag
from ditforge.models import DiT, create_model
from ditforge.models.attention import uses_explicit_attention
from ditforge.models.blocks import swiglu_hidden
from ditforge.meanflow import MeanFlowObjective
from ditforge.objectives import model_options
from ditforge.train.activation_memory import saved_bytes
from ditforge.train import distributed
from ditforge.train.device import enable_tf32, keep_freed_host_memory, pick_device, resolve_precision
from ditforge.train.step import TrainStep

# Dense peak FLOP/s by device name fragment and precision (vendor data sheets, without sparsity).
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},  # SXM; fp32 = TF32 tensor cores
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
}


def forward_macs(model: DiT) -> int:
    """Multiply-accumulates of one forward pass for one image (Peebles & Xie 2022, Table 4).

    Counts the matrix products (patchify, linear layers, attention's two products), as the paper
    and torch's FlopCounterMode do; elementwise work is excluded: norms (LayerNorm, RMSNorm,
    qk-norm), modulation, activations, softmax and the RoPE rotation (O(T d) per block, under
    0.1% of a block's products for every registry model). SwiGLU (``mlp="swiglu"``) counts
    its three matrices at its own hidden width.
    """
    p, c, d = model.patch_size, model.in_channels, model.hidden_size
    tokens = (model.input_size // p) ** 2
    hidden_mlp = int(d * model.mlp_ratio)
    if model.options.mlp == "swiglu":
        mlp = 3 * tokens * d * swiglu_hidden(hidden_mlp)  # w12 (gate and value), w3
    else:
        mlp = 2 * tokens * d * hidden_mlp  # fc1, fc2
    embed = tokens * d * c * p * p + 256 * d + d * d  # patchify conv; timestep MLP
    if model.interval_embedding:
        embed += 256 * d + d * d  # MeanFlow's interval MLP
    if model.guidance_embedding:
        embed += 256 * d + d * d  # iMF's guidance-scale MLP
    per_block = (
        d * 6 * d  # adaLN modulation (once per image)
        + tokens * d * 3 * d  # fused q, k, v
        + 2 * tokens * tokens * d  # Q K^T and attention x V
        + tokens * d * d  # output projection
        + mlp
    )
    final = d * 2 * d + tokens * d * p * p * model.out_channels
    return embed + model.depth * per_block + final


def parameter_count(model: DiT) -> int:
    """Parameter values (trainable or not, pos_embed included) from the hyperparameters alone;
    equal to ``count_parameters(model)`` for every block option (tests/test_modern_blocks.py)."""
    p, c, d, h = model.patch_size, model.in_channels, model.hidden_size, model.num_heads
    tokens = (model.input_size // p) ** 2
    hidden_mlp = int(d * model.mlp_ratio)
    opts = model.options
    rows = model.num_classes + (1 if model.class_dropout_prob > 0 else 0)  # + the null class
    embed = (d * c * p * p + d) + tokens * d + (256 * d + d + d * d + d) + rows * d  # patches, pos, t, y
    if model.interval_embedding:
        embed += 256 * d + d + d * d + d  # MeanFlow's interval MLP, as the timestep MLP
    if model.guidance_embedding:
        embed += 256 * d + d + d * d + d  # iMF's guidance-scale MLP, the same
    if opts.mlp == "swiglu":
        hs = swiglu_hidden(hidden_mlp)
        mlp = (d * 2 * hs + 2 * hs) + (hs * d + d)  # w12, w3
    else:
        mlp = (d * hidden_mlp + hidden_mlp) + (hidden_mlp * d + d)  # fc1, fc2
    gains = d if opts.norm == "rms" else 0  # an RMSNorm's gain; DiT's LayerNorms have none
    per_block = (
        (3 * d * d + 3 * d) + (d * d + d)  # qkv, proj
        + mlp
        + (6 * d * d + 6 * d)  # adaLN modulation
        + 2 * gains  # norm1, norm2
        + (2 * (d // h) if opts.qk_norm else 0)  # q_norm, k_norm gains
    )
    out = p * p * model.out_channels
    final = (d * out + out) + (2 * d * d + 2 * d) + gains
    return embed + model.depth * per_block + final


def train_flops_per_image(model: DiT) -> int:
    return 6 * forward_macs(model)


def device_peak(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def _same_option(config: type, name: str):
    """A field with the default and the command-line option (flag, help, choices) of a config's
    field of that name: one definition for `train` and `bench`."""
    f = next(f for f in fields(config) if f.name == name)
    return field(default=f.default, metadata=f.metadata)


@dataclass
class BenchOptions:
    """What `ditforge bench` asks for, each field its option (`benchmark` runs them)."""

    model: str = field(default="DiT-S/2", metadata=flag("--model", "model name"))
    input_size: int = field(default=32, metadata=flag("--input-size", "input height and width (latents: image size / 8)"))
    channels: int = field(default=4, metadata=flag("--channels", "input channels (4 for SD-VAE latents)"))
    num_classes: int = field(default=1000, metadata=flag("--num-classes", "number of classes"))
    batch: int = field(default=8, metadata=flag("--batch", "batch size"))
    precision: str = field(default="auto", metadata=flag("--precision", "autocast precision", choices=PRECISIONS))
    compile: bool = field(default=False, metadata=flag("--compile", "torch.compile the model", action="store_true"))
    grad_checkpoint: str = _same_option(TrainConfig, "grad_checkpoint")
    objective: str = _same_option(TrainConfig, "objective")  # the step of train's objective (its defaults)
    optimizer: str = _same_option(OptimConfig, "optimizer")  # its update is part of the step
    # MeanFlow's options that change its step's work: the share of rows with a JVP, the forward of
    # guidance (the unconditional velocity), of the model tangent and of a distillation's teacher
    flow_share: float = _same_option(MeanFlowObjective, "flow_share")
    train_cfg: float = _same_option(MeanFlowObjective, "train_cfg")
    train_cfg_kappa: float = _same_option(MeanFlowObjective, "train_cfg_kappa")  # the conditional velocity's forward too
    tangent: str = _same_option(MeanFlowObjective, "tangent")
    velocity: str = _same_option(MeanFlowObjective, "velocity")  # teacher: the step calls a frozen copy of the model
    # The block options of LightningDiT, train's own options (default: the paper's blocks)
    norm: str = _same_option(ModelConfig, "norm")
    mlp: str = _same_option(ModelConfig, "mlp")
    rope: bool = _same_option(ModelConfig, "rope")
    qk_norm: bool = _same_option(ModelConfig, "qk_norm")
    steps: int = field(default=10, metadata=flag("--steps", "timed steps"))
    warmup: int = field(default=3, metadata=flag("--warmup", "untimed steps first"))
    json: str | None = field(default=None, metadata=flag(
        "--json", "also write the result to this JSON file (default: none)"))


@dataclass
class BenchResult:
    model: str
    input_size: int
    channels: int
    batch: int
    precision: str
    compile: bool
    grad_checkpoint: str
    device: str
    images_per_s: float
    step_ms: float
    peak_memory_gb: float | None  # GiB (2**30 bytes), as torch.cuda.max_memory_allocated counts
    model_tflops: float
    mfu: float | None
    attention: str  # the attention kernel that runs
    saved_mb_per_image: float  # activations kept for backward, MB (1e6 bytes) per image, eager
    compile_s: float | None  # first step's time beyond a timed step's, with --compile
    blocks: dict = field(default_factory=dict)  # block options that differ from the paper's (norm, mlp, rope, qk_norm)
    objective: str = "diffusion"  # whose training step was timed
    meanflow: dict = field(default_factory=dict)  # MeanFlow's options that differ from the defaults (objective meanflow)
    optimizer: str = "adamw"

    def line(self) -> str:
        mem = f"{self.peak_memory_gb:.1f} GiB" if self.peak_memory_gb is not None else "n/a"
        mfu = f"{100 * self.mfu:.1f}%" if self.mfu is not None else "n/a (no known peak)"
        opts = [f"{k}={v}" if v is not True else k for k, v in self.blocks.items()]
        opts += ["compile"] if self.compile else []
        opts += [self.optimizer] if self.optimizer != "adamw" else []
        opts += [f"{k.replace('_', '-')}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.meanflow.items()]
        compiled = f", compile {self.compile_s:.1f} s" if self.compile_s is not None else ""
        return (
            f"{self.model} {self.objective} {self.channels}x{self.input_size}x{self.input_size} batch {self.batch} {self.precision}"
            f"{' ' + '+'.join(opts) if opts else ''} grad-checkpoint {self.grad_checkpoint} on {self.device}: "
            f"{self.images_per_s:.1f} images/s, {self.step_ms:.1f} ms/step, peak memory {mem}, "
            f"{self.model_tflops:.2f} model TFLOP/s, MFU {mfu}; attention {self.attention}; "
            f"saved for backward {self.saved_mb_per_image:.1f} MB/image (eager){compiled}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def time_steps(step_fn, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Seconds for `steps` calls of step_fn(i) after `warmup` untimed ones (GPU work included),
    and the seconds of the first call (which compiles, with torch.compile)."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    first = 0.0
    for i in range(warmup):
        t0 = time.perf_counter()
        step_fn(i)
        sync()
        first = first or time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        step_fn(warmup + i)
    sync()
    return time.perf_counter() - t0, first


# The fused attention kernels of F.scaled_dot_product_attention, by their aten names.
SDPA_KERNELS = {
    "_scaled_dot_product_flash_attention": "SDPA flash",
    "_scaled_dot_product_flash_attention_for_cpu": "SDPA flash (CPU)",
    "_scaled_dot_product_efficient_attention": "SDPA memory-efficient",
    "_scaled_dot_product_cudnn_attention": "SDPA cuDNN",
    "_scaled_dot_product_fused_attention_overrideable": "SDPA fused (device backend)",
}


def attention_backend(attention_ops: set[str], model: DiT, precision: str, device: torch.device) -> str:
    """Name of the attention computation that ran, from the fused kernels seen in a forward."""
    names = sorted({SDPA_KERNELS[op] for op in attention_ops if op in SDPA_KERNELS})
    if names:
        return " + ".join(names)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if uses_explicit_attention(torch.empty(0, dtype=dtype, device=device), model.x_embedder.num_patches):
        return "explicit matrix products (CPU bf16)"
    return "SDPA math"


def run_benchmark(
    model_name: str = "DiT-S/2",
    input_size: int = 32,
    channels: int = 4,
    num_classes: int = 1000,
    batch: int = 8,
    precision: str = "auto",
    compile: bool = False,
    grad_checkpoint: str = "none",
    steps: int = 10,
    warmup: int = 3,
    block_options: dict | None = None,
    objective: str = "diffusion",
    meanflow: dict | None = None,
    optimizer: str = "adamw",
) -> BenchResult:
    """Time `steps` training steps (after `warmup`) of random latents through `TrainStep`;
    `block_options`: ModelConfig's norm / mlp / rope / qk_norm (default: the paper's blocks);
    `objective`: train's objective, with its default settings but `meanflow`'s (MeanFlowObjective
    fields: flow_share, train_cfg, train_cfg_kappa, tangent, velocity change what a MeanFlow step computes; with
    velocity 'teacher' the step distils a frozen copy of the model, as train's with --init-from);
    `optimizer`: train's --optimizer, whose update the step includes."""
    if steps <= 0 or warmup < 0:
        raise ValueError(f"steps must be positive and warmup non-negative, got {steps} and {warmup}")
    device = pick_device()
    precision = resolve_precision(precision, device)
    enable_tf32()
    keep_freed_host_memory()
    distils = (meanflow or {}).get("velocity") == "teacher"
    cfg = TrainConfig.from_dict(
        dict(model=dict(name=model_name, **(block_options or {})), global_batch=batch, precision=precision, compile=compile,
             grad_checkpoint=grad_checkpoint, objective=objective, meanflow=dict(meanflow or {}), optim=dict(optimizer=optimizer),
             init_from="bench: a frozen copy of the model" if distils else "")  # (never read: the teacher is made here)
    )
    torch.manual_seed(0)
    model = create_model(model_name, input_size=input_size, in_channels=channels, num_classes=num_classes,
                         **cfg.model.block_options(), **model_options(objective))
    teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False) if distils else None  # as train/init_from.py's
    stepper = TrainStep(cfg, model, distributed.Dist(device=device), precision, teacher=teacher)
    saved = saved_bytes(model, stepper.objective, cfg, precision, device)  # eager, batches 1 and 2
    x = torch.randn(batch, channels, input_size, input_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    seconds, first = time_steps(lambda i: stepper(i, [(x, y)], [0]), steps, warmup, device)
    images_per_s = steps * batch / seconds
    flops = train_flops_per_image(model) * images_per_s
    peak = device_peak(device, precision)
    return BenchResult(
        model_name, input_size, channels, batch, precision, compile, cfg.grad_checkpoint,
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        images_per_s, 1000 * seconds / steps,
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        flops / 1e12, flops / peak if peak else None,
        attention_backend(saved.attention_ops, model, precision, device), saved.per_image / 1e6,
        max(0.0, first - seconds / steps) if compile and warmup else None,
        cfg.model.block_options(),
        objective,
        {k: v for k, v in asdict(cfg.meanflow).items() if objective == "meanflow" and v != getattr(MeanFlowObjective, k)},
        optimizer,
    )


def _flag_of(name: str) -> str:
    """The command-line option of BenchOptions' field `name`."""
    return next(f for f in fields(BenchOptions) if f.name == name).metadata["flag"]["name"]


def benchmark(opts: BenchOptions) -> BenchResult:
    """`run_benchmark` with the options of `ditforge bench`."""
    meanflow = {k: getattr(opts, k) for k in ("flow_share", "train_cfg", "train_cfg_kappa", "tangent", "velocity")
                if getattr(opts, k) != getattr(MeanFlowObjective, k)}
    if meanflow and opts.objective != "meanflow":
        given = " ".join(f"{_flag_of(k)} {v:g}" if isinstance(v, float) else f"{_flag_of(k)} {v}" for k, v in meanflow.items())
        raise UserError(f"{given}: MeanFlow's options; add --objective meanflow (or drop them for --objective {opts.objective})")
    return run_benchmark(
        opts.model, opts.input_size, opts.channels, opts.num_classes, opts.batch, opts.precision,
        opts.compile, opts.grad_checkpoint, opts.steps, opts.warmup,
        ModelConfig(norm=opts.norm, mlp=opts.mlp, rope=opts.rope, qk_norm=opts.qk_norm).block_options(), opts.objective,
        meanflow,
        opts.optimizer,
    )
