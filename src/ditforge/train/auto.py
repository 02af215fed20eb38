"""Defaults that fit the device and the data: the model, precision, objective, blocks, batch,
learning rate and step count `train` picks when the user leaves them out.

Only the `tiny` preset on the user's own data (an image folder or a latent store) or the built-in
`mnist` is adapted. The paper's presets keep the paper's recipe, the built-in demo (`ditforge
train`, the digits) keeps its recorded one, and a flag the user gives always wins. `choose_defaults` is a pure
function of the device, the data shape, the flags and (on a CPU) the measured time of a step, so
the choices are tested exactly.

The rules (measured on the project's machines, 2 cores of an AMD EPYC with AVX512-BF16 and 2 of
one without AVX-512; README "Train on your own images"):

1. model: the tiny size (DiT-Ti: depth 6, hidden 192) with the smallest patch that keeps the
   token count T = (H / p)^2 at most 64 on a CPU (256 on a GPU). Attention and the MLPs cost
   about T times the hidden size per block, so at 28x28 DiT-Ti/4 (49 tokens) takes 0.83 GFLOP
   per training image against 3.66 for DiT-Ti/2 (196 tokens).
2. precision: bf16 autocast on a CPU with native bf16 (AVX512-BF16 or AMX), where DiT-Ti/4 at
   28x28 trained 1.9-2.3x faster than fp32; otherwise `auto` (fp32 on CPU, bf16 on GPUs).
3. objective: SiT's flow matching with SD3's logit-normal training times (``--objective flow
   --time-dist logit-normal``) instead of DiT's diffusion. At equal steps it learns the classes
   far sooner: on the built-in digits it drew the asked class 95% of the time after 250 steps,
   where DiT managed 36% after 400; on a 28x28 MNIST folder after the same 800 steps of DiT-Ti/4
   (README "Train on your own images") flow drew recognisable digits of every class where DiT's
   samples were still speckle.
4. blocks: the modern ones, RMSNorm, SwiGLU, 2-D RoPE and qk-norm (`MODERN_BLOCKS`, the demo's
   and LightningDiT's), the largest single gain of the recipe ladder on both data sets it was
   measured on: on a 28x28 MNIST folder flow + logit-normal reached FID 187.9 at 400 steps
   without them and 129.2 with them (56.5 at 800), on the built-in digits 21.80 against 21.51 at
   400 steps and 27.91 against 23.94 at 250 (README "Measured", `benchmarks/recipe_curve.py`).
   Each block flag given (`--norm`, `--mlp`, `--rope / --no-rope`, `--qk-norm / --no-qk-norm`)
   wins over its choice.
5. batch: `CPU_BATCH` (64) on a CPU, the preset's 128 on a GPU. On the 2-core AMD EPYC without
   AVX-512 a DiT-Ti/4 step at 28x28 with the modern blocks took 0.93-1.15 s at batch 64 and
   2.1-2.45 s at 128 (more than twice: the larger batch's activations likely fall out of the
   caches), so the same minutes
   give 2.2x the updates and 1.1x the images. On the fashion folder (README "Train on your own
   images") batch 64 with the measured steps reached a judge ratio of 0.90 in 12.5 minutes, batch
   128 with 500 steps 0.81 in 18 minutes of steps. Where a step of 64 affords fewer than
   `SLOW_CPU_STEPS` (1,000) steps in the budget (fp32 on a CPU without AVX-512: about 700), the
   batch is `SLOW_CPU_BATCH` (32) and its step is measured again: 1,500 steps of 32 against 750
   of 64 (the same images; about the same minutes there) raised the judge ratio from 0.46 to 0.71
   on the letters folder and from 0.92 to 1.00 on fashion (both pairs trained in bf16 on the CPU
   with native bf16, at the slow CPU's step counts). Where the 2,000-step cap binds (bf16 on a CPU
   with native bf16: about 0.3 s a step of 64), 64 stays: half the batch would see half the
   images in the same steps (not compared).
6. steps: as many as fit `BUDGET_S`, rounded down to 50 and kept within [MIN_STEPS, MAX_STEPS].
   On a CPU the time of a step is measured (`measure_step_seconds`: a warm-up and two real steps
   of the run's model, batch, precision, blocks and objective, a few seconds): an analytic rate
   was 2x off on a CPU without AVX-512 (1.06 s a step expected at batch 128, 2.2 s measured),
   where 500 steps then took 18 minutes instead of 9. On a GPU the analytic FLOP count of
   `bench.train_flops_per_image` at `GPU_RATE` is kept (a tiny DiT's step is milliseconds there;
   `MAX_STEPS` decides). The budget leaves one to two minutes of a 15-minute goal for loading,
   the preview and the checkpoints.
7. learning rate: `CPU_LR` (2e-3) on a CPU, twice the tiny preset's 1e-3 (AdamW, constant, no
   warm-up). Measured on the letters folder at both CPU budgets, 2,000 steps of 64 (the bf16
   CPU's) judge ratio 0.918 -> 0.962 and 1,500 of 32 (the slow CPU's) 0.71 -> 0.84, and on
   fashion at 1,500 of 32, 1.00 -> 1.02 (one seed each, 2026-12-03). On a GPU the preset's
   1e-3 stays (not compared there). `--lr` wins.
8. optimizer: AdamW, the preset's, unless `--optimizer` is given; the measured step of rule 6 is
   the given optimizer's (Muon's Newton-Schulz steps add 50-140 ms a step of DiT-Ti/4 here: a
   Muon run whose steps were fitted to AdamW's step took 862 s of training, not the 11 minutes
   planned, a few of them beside tests). Muon was measured as a default on this CPU and not
   taken (benchmarks/README, "Muon from scratch at equal time"): at equal time it learned MNIST
   far sooner (flow, fp32, batch 128: a 20-step distance of 4.47 against 6.88) and the letters
   folder after 600 steps of 64 (judge ratio 0.81 against 0.62) and at the slow CPU's budget
   (one thread, fp32: 0.91 against 0.87), but the whole no-flag letters run (2,000 steps of 64 in
   bf16) read the same 0.962 as AdamW's in 862 s against 545 s, and its bfloat16 Newton-Schulz
   steps were not timed on a CPU without native bf16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ditforge.errors import UserError

DEMO_DATA = "digits"  # the built-in demo's set: it keeps the tiny preset's recorded recipe
TINY_SIZE = "Ti"
MAX_TOKENS = {"cpu": 64, "cuda": 256}
BUDGET_S = 720.0  # seconds of training steps
CPU_BATCH = 64  # rule 5
SLOW_CPU_BATCH, SLOW_CPU_STEPS = 32, 1000  # rule 5: the batch where CPU_BATCH affords fewer steps than this
CPU_LR = 2e-3  # rule 7
RATE_PER_CORE = {"fp32": 50e9, "bf16": 80e9}  # sustained FLOP/s of a DiT-Ti step per CPU core
GPU_RATE = {"fp32": 50e12, "bf16": 100e12, "fp16": 100e12}
MIN_STEPS, MAX_STEPS = 200, 2000
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: The block options chosen for a user's data (rule 4): train flag name -> value
MODERN_BLOCKS = {"norm": "rms", "mlp": "swiglu", "rope": True, "qk_norm": True}


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cpu" or "cuda"
    cores: int  # CPU threads torch uses (CPU only)
    native_bf16: bool  # CPU: AVX512-BF16 or AMX; GPU: bf16 supported
    name: str = ""


@dataclass
class Choices:
    """Values for the fields the user left out (None: keep the preset's), and why."""

    model: str | None = None
    precision: str | None = None
    objective: str | None = None
    time_distribution: str | None = None
    steps: int | None = None
    batch: int | None = None
    lr: float | None = None
    blocks: dict[str, object] = field(default_factory=dict)  # of MODERN_BLOCKS, those not given
    reasons: list[str] = field(default_factory=list)
    seconds_per_step: float | None = None  # the estimate the step count came from

    def as_overrides(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.model is not None:
            out["model.name"] = self.model
        if self.precision is not None:
            out["precision"] = self.precision
        if self.steps is not None:
            out["steps"] = self.steps
        if self.batch is not None:
            out["global_batch"] = self.batch
        if self.lr is not None:
            out["optim.lr"] = self.lr
        if self.objective is not None:
            out["objective"] = self.objective
        if self.time_distribution is not None:
            out["flow.time_distribution"] = self.time_distribution
        out.update({f"model.{k}": v for k, v in self.blocks.items()})
        return out


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:  # not Linux: no flags known, so no bf16 claim
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def describe_device(device) -> DeviceInfo:
    import torch

    if device.type == "cuda":
        return DeviceInfo("cuda", os.cpu_count() or 1, torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(device))
    flags = cpu_flags()
    return DeviceInfo("cpu", torch.get_num_threads(), any(f in flags for f in CPU_BF16_FLAGS), "cpu")


def pick_patch(side: int, kind: str, patches: tuple[int, ...]) -> int:
    """Smallest patch of at least 2 (the paper's smallest) dividing `side` with at most
    MAX_TOKENS[kind] tokens, else the largest dividing one (1 when only 1 divides)."""
    fitting = [p for p in sorted(patches) if side % p == 0 and p >= 2] or [1]
    if not fitting:
        raise ValueError(f"no DiT-{TINY_SIZE} patch size {patches} divides the input side {side}")
    small_enough = [p for p in fitting if (side // p) ** 2 <= MAX_TOKENS[kind]]
    return small_enough[0] if small_enough else fitting[-1]


def measure_step_seconds(model_name: str, shape: tuple[int, int, int], num_classes: int, batch: int, precision: str,
                         block_options: dict[str, object], objective: str, optimizer: str = "adamw", steps: int = 2) -> float:
    """Seconds per optimizer step measured on this machine (rule 6 on a CPU): `steps` training
    steps of random inputs of the run's shape, batch, precision, blocks, objective and optimizer
    through `TrainStep` (forward, backward, optimizer), after one untimed warm-up. The global RNG is left
    as it was, so the run's seeding is unchanged."""
    import torch

    from ditforge.bench import time_steps
    from ditforge.config import TrainConfig
    from ditforge.models import create_model
    from ditforge.objectives import model_options
    from ditforge.train import distributed
    from ditforge.train.device import pick_device, resolve_precision
    from ditforge.train.step import TrainStep

    c, h, w = shape
    device = pick_device()
    precision = resolve_precision(precision, device)
    cfg = TrainConfig.from_dict(dict(model=dict(name=model_name, **block_options), global_batch=batch, precision=precision,
                                     objective=objective, optim=dict(optimizer=optimizer)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model(model_name, input_size=h, in_channels=c, num_classes=num_classes,
                             **cfg.model.block_options(), **model_options(objective)).to(device)
        stepper = TrainStep(cfg, model, distributed.Dist(device=device), precision)
        x = torch.randn(batch, c, h, w, device=device)  # (N, C, H, W)
        y = torch.randint(0, num_classes, (batch,), device=device)  # (N,)
        seconds, _ = time_steps(lambda i: stepper(i, [(x, y)], [0]), steps, 1, device)
    return seconds / steps


def step_seconds(model_name: str, shape: tuple[int, int, int], num_classes: int, batch: int, precision: str, device: DeviceInfo) -> float:
    """Estimated seconds per optimizer step: analytic training FLOPs / assumed sustained rate."""
    from ditforge.bench import train_flops_per_image
    from ditforge.models import create_model

    c, h, _ = shape
    flops = train_flops_per_image(create_model(model_name, input_size=h, in_channels=c, num_classes=num_classes)) * batch
    if device.kind == "cuda":
        rate = GPU_RATE["fp32" if precision == "fp32" else "bf16"]
    else:
        rate = RATE_PER_CORE["bf16" if precision == "bf16" else "fp32"] * max(1, device.cores)
    return flops / rate


def choose_defaults(
    device: DeviceInfo,
    shape: tuple[int, int, int],
    num_classes: int,
    batch: int,
    given: dict[str, object],
    preset: str,
    builtin: bool,
    measure: Callable[[str, str, dict[str, object], str, int, str], float] | None = None,
) -> Choices:
    """The model, precision, objective, blocks, batch, learning rate and steps for the fields
    absent from `given` (flag -> value; flags: model, precision, steps, batch, lr, optimizer,
    objective, time_dist and those of MODERN_BLOCKS). `batch` is the configured batch, used where the
    batch is not chosen; the optimizer, measured with the step, is AdamW (the preset's) unless given.

    `measure(model, precision, block options, objective, batch, optimizer)` -> seconds per step on this machine
    (`measure_step_seconds`; `train` passes it on a CPU): the step count then follows the
    measured time, else the analytic estimate of `step_seconds`."""
    from ditforge.models.dit import MODEL_PATCH_SIZES

    ch = Choices()
    if preset != "tiny":
        ch.reasons.append(f"preset {preset} keeps the paper's recipe")
        return ch
    if builtin:
        ch.reasons.append("the built-in demo keeps its recorded recipe (DiT-Ti/2, fp32, 800 steps)")
        return ch
    c, h, w = shape
    if "model" in given:
        model = str(given["model"])
    else:
        p = pick_patch(h, device.kind, MODEL_PATCH_SIZES[TINY_SIZE])
        model = ch.model = f"DiT-{TINY_SIZE}/{p}"
        ch.reasons.append(f"model {model}: {(h // p) ** 2} tokens of {c}x{h}x{w} inputs (at most {MAX_TOKENS[device.kind]} on {device.kind})")
    if "precision" in given:
        precision = str(given["precision"])
    elif device.kind == "cpu" and device.native_bf16:
        precision = ch.precision = "bf16"
        ch.reasons.append("precision bf16: this CPU has native bf16 (AVX512-BF16/AMX), about 2x fp32 for small DiTs")
    else:
        precision = "fp32" if device.kind == "cpu" else ("bf16" if device.native_bf16 else "fp32")
    if "objective" not in given:
        ch.objective = "flow"
        reason = "objective flow"
        if "time_dist" not in given:
            ch.time_distribution = "logit-normal"
            reason += " with logit-normal times"
        ch.reasons.append(f"{reason}: learns the classes in far fewer steps than DiT's diffusion (README: Train on your own images)")
    ch.blocks = {k: v for k, v in MODERN_BLOCKS.items() if k not in given}
    if ch.blocks:
        named = {"norm": "RMSNorm", "mlp": "SwiGLU", "rope": "RoPE", "qk_norm": "qk-norm"}
        ch.reasons.append(
            f"blocks {', '.join(named[k] for k in ch.blocks)}: the recipe's largest gain on MNIST and the digits "
            "(FID 187.9 -> 129.2 at 400 steps on MNIST; README: Measured)")
    if "batch" not in given and device.kind == "cpu":
        batch = ch.batch = CPU_BATCH
        batch_reason = len(ch.reasons)
        ch.reasons.append(f"batch {batch}: on a CPU a step of 64 took less than half the time of one of 128, "
                          "so the same minutes give over twice the updates (README: Train on your own images)")
    if "lr" not in given and device.kind == "cpu":
        ch.lr = CPU_LR
        ch.reasons.append(f"lr {CPU_LR:g}: twice the tiny preset's; on a CPU's step budget it drew the letters folder's "
                          "classes sooner, fashion's as well (README: Train on your own images)")
    optimizer = str(given.get("optimizer", "adamw"))  # rule 8: not chosen, but its step is measured
    objective = str(given.get("objective", ch.objective))
    blocks = {k: given.get(k, ch.blocks.get(k)) for k in MODERN_BLOCKS}
    if "steps" in given:
        return ch
    if measure is not None and device.kind == "cpu":
        ch.seconds_per_step = measure(model, precision, blocks, objective, batch, optimizer)
        how = f"{ch.seconds_per_step:.2f} s a step of batch {batch} measured on {device.cores} CPU cores"
    else:
        ch.seconds_per_step = step_seconds(model, shape, num_classes, batch, precision, device)
        where = f"{device.cores} CPU cores" if device.kind == "cpu" else device.name or "the GPU"
        how = f"about {ch.seconds_per_step:.2f} s a step of batch {batch} expected on {where}"
    fit = int(BUDGET_S / ch.seconds_per_step) // 50 * 50
    if ch.batch == CPU_BATCH and fit < SLOW_CPU_STEPS and measure is not None:
        batch = ch.batch = SLOW_CPU_BATCH
        ch.reasons[batch_reason] = (f"batch {batch}: a step of {CPU_BATCH} took {ch.seconds_per_step:.2f} s here, {fit} steps in "
                          f"{BUDGET_S / 60:.0f} minutes; twice the steps of half the batch learned the classes sooner "
                          "(README: Train on your own images)")
        ch.seconds_per_step = measure(model, precision, blocks, objective, batch, optimizer)
        how = f"{ch.seconds_per_step:.2f} s a step of batch {batch} measured on {device.cores} CPU cores"
        fit = int(BUDGET_S / ch.seconds_per_step) // 50 * 50
    ch.steps = min(MAX_STEPS, max(MIN_STEPS, fit))
    minutes = ch.steps * ch.seconds_per_step / 60 + 1  # the steps, and a minute of loading, previews, checkpoints
    ch.reasons.append(f"steps {ch.steps}: {how}, for a run of about {minutes:.0f} minutes "
                      f"(the steps of {BUDGET_S / 60:.0f} minutes, within {MIN_STEPS}..{MAX_STEPS})")
    return ch


def adapts_to_data(data: str) -> bool:
    """Whether `train` chooses defaults for this data: any built-in set but the demo's digits, and
    any folder (image folder or latent store; other paths fail later with their own message)."""
    from ditforge.data.sources import is_builtin

    return data != DEMO_DATA and (is_builtin(data) or Path(data).is_dir())


def peek_data(data: str, image_size: int | None) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) of the model's input and the class count of a built-in set, an image folder or a
    latent store, read from the store's manifest or from the folder's first image (nothing else
    is loaded)."""
    import json

    from PIL import Image

    from ditforge.data.sources import BUILTIN_SIDES, _list_class_folders

    if data in BUILTIN_SIDES:
        return (1, BUILTIN_SIDES[data], BUILTIN_SIDES[data]), 10
    root = Path(data)
    manifest = root / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        return tuple(int(v) for v in m["latent_shape"]), len(m.get("class_names") or []) or int(m.get("num_classes", 1))
    classes = _list_class_folders(root)
    for _, files in classes:
        for f in files:
            try:
                with Image.open(f) as im:
                    grey = im.mode in ("1", "L", "I;16", "I")
                    side = image_size or im.size[1]
                    return (1 if grey else 3, side, image_size or im.size[0]), len(classes)
            except OSError:  # an unreadable first file: try the next one (training skips it too)
                continue
    raise UserError(f"image folder {data!r}: none of its image files could be read")
