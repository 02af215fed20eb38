"""Class-conditional samples with classifier-free guidance: the noise of every sample, one
batch through a guided sampler of the model's objective (`objectives.py`), and the classes and
grid of a preview. What `sample`, `eval` and the trainer's previews all draw with."""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch

from ditforge.diffusion import guided_denoiser
from ditforge.diffusion.sampling import DEFAULT_SPACING, SPACINGS, Sampler
from ditforge.errors import UserError
from ditforge.flow import FlowSampler
from ditforge.models import DiT
from ditforge.objectives import DiffusionObjective, Objective, check_cfg, objective_sampler
from ditforge.pictures import make_grid
from ditforge.train.device import autocast  # device and precision rules live with training's device code


def check_classes(classes: list[int], num_classes: int) -> None:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"class id {bad[0]} is out of range; this model knows classes 0..{num_classes - 1}")


def choose_sampler(
    model: DiT, objective: Objective, steps: int, cfg_scale: float, sampler: str | None,
    spacing: str = DEFAULT_SPACING, cfg_interval: tuple[float, float] | None = None,
) -> Sampler | FlowSampler:
    """The sampler for these arguments (None: the objective's default), after checking them all."""
    if spacing not in SPACINGS:
        raise UserError(f"unknown time spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    if cfg_interval is not None and not (len(cfg_interval) == 2 and 0.0 <= cfg_interval[0] <= cfg_interval[1] <= 1.0):
        raise UserError(f"cfg interval must be LO HI with 0 <= LO <= HI <= 1 (fractions of the noise level: 0 = data, 1 = noise), got {cfg_interval}")
    chosen = objective_sampler(objective, sampler, steps, spacing)
    if cfg_scale < 0:
        raise UserError(f"cfg must be >= 0 (1 = no guidance), got {cfg_scale}")
    check_cfg(objective, cfg_scale)  # a model with its guidance built in samples at that scale only
    if chosen.guidance_scale(cfg_scale) != 1.0 and not model.y_embedder.has_null_class:
        raise UserError(f"cfg {cfg_scale:g} needs a model trained with label dropout (it has no null class); use --cfg 1")
    return chosen


#: What each random stream of sampling is for: the starting noise x_T of a sample, and the noise
#: that stochastic samplers (DDPM, SDE solvers) add at each step of a batch.
NOISE_PURPOSES = ("start", "steps")


def noise_seed(seed: int, index: int, purpose: str) -> int:
    """The seed of one random stream of sampling: the first 63 bits of BLAKE2b over (`seed`,
    `index`, `purpose`), where `index` is the sample (starting noise) or the first sample of the
    batch (step noise) and `purpose` one of `NOISE_PURPOSES`. Distinct triples give unrelated
    streams (seeding the step noise with seed + 1, as before, made it the starting noise of the
    next seed or batch), and the stream is the same in whichever process, batch or order it is
    drawn."""
    if purpose not in NOISE_PURPOSES:
        raise ValueError(f"unknown noise purpose {purpose!r}; choose one of: {', '.join(NOISE_PURPOSES)}")
    digest = hashlib.blake2b(f"{int(seed)}:{int(index)}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63: any device's manual_seed takes it


def start_noise(seed: int, indices: range, shape: tuple[int, ...]) -> torch.Tensor:
    """(len(indices), *shape) starting noise on the CPU, row k that of sample `indices[k]` alone
    (its own generator), so a sample's noise depends neither on its batch nor on the device."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, i, "start"))) for i in indices]
    return torch.stack(rows)  # (N, *shape)


def step_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of the step noise of the batch that begins at sample `index`, on `device`."""
    return torch.Generator(device=device).manual_seed(noise_seed(seed, index, "steps"))


# Samples per forward batch (twice the rows under guidance) where `eval RUN` draws on a CPU. The
# default 500 is for GPUs: on 2 CPU cores a DiT-Ti/4 forward at 28x28 took 10.6 ms an image at
# 1,000 rows (its activations pass malloc's 32 MiB reuse threshold: fresh zeroed pages each call)
# and 5 ms at 128 (benchmarks/README.md, issue 30).
CPU_SAMPLE_BATCH = 64
SAMPLE_BATCH = 500  # `generate`'s default


@torch.no_grad()
def sample_batch(
    model: DiT,
    sampler: Sampler | FlowSampler,
    y: torch.Tensor,  # (B,) on the model's device
    noise: torch.Tensor,  # (B, C, H, W) on the model's device
    generator: torch.Generator,
    cfg_scale: float,
    legacy_three_channel: bool = False,
    progress: bool = False,
    cfg_interval: tuple[float, float] | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """One batch through the guided sampler: (B, C, H, W) samples in data space.
    ``cfg_interval``: guide only at noise levels in [LO, HI] (None: at every step). The network runs
    in `precision` (autocast), the sampler's arithmetic in fp32."""

    scale = sampler.guidance_input(cfg_scale)  # the scale as the network's input (iMF models), else None

    def network(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, **options: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            options = dict(options, guidance=torch.full((x.shape[0],), scale, device=x.device))
        with autocast(precision, x.device):
            return model(x, t, labels, **options).float()  # options: MeanFlow's interval, iMF's scale

    denoise = guided_denoiser(
        network, y, sampler.guidance_scale(cfg_scale), model.num_classes, model.in_channels, legacy_three_channel,
        interval=sampler.guidance_times(cfg_interval),
    )
    return sampler(denoise, noise, generator=generator, progress=progress)


@torch.no_grad()
def generate(
    model: DiT,
    classes: list[int],
    per_class: int,
    cfg_scale: float = 4.0,
    steps: int = 250,
    sampler: str | None = None,
    seed: int = 0,
    objective: Objective = DiffusionObjective(),
    legacy_three_channel: bool = False,
    batch_size: int = SAMPLE_BATCH,
    progress: bool = False,
    *,
    spacing: str = DEFAULT_SPACING,
    cfg_interval: tuple[float, float] | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples (N, C, H, W) in data space and their labels (N,), N = len(classes) * per_class,
    grouped by class in the order given. Deterministic for a seed and batch size.
    ``sampler`` names a sampler of ``objective`` (None: its default); ``spacing`` the diffusion
    solvers' time grid."""
    chosen = choose_sampler(model, objective, steps, cfg_scale, sampler, spacing, cfg_interval)
    if per_class <= 0:
        raise UserError(f"per-class must be a positive number of samples, got {per_class}")
    if batch_size <= 0:
        raise UserError(f"batch size must be a positive number of samples, got {batch_size}")
    check_classes(classes, model.num_classes)
    device = next(model.parameters()).device
    model.eval()
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)  # (N,)
    shape = (labels.numel(), model.in_channels, model.input_size, model.input_size)
    noise = start_noise(seed, range(labels.numel()), shape[1:])  # (N, C, H, W), device-independent
    gen = step_generator(seed, 0, device)  # one stream for the step noise of all batches, in order
    out = []
    for start in range(0, labels.numel(), batch_size):
        y = labels[start : start + batch_size].to(device)
        z = noise[start : start + batch_size].to(device)
        x = sample_batch(model, chosen, y, z, gen, cfg_scale, legacy_three_channel, progress, cfg_interval, precision)
        out.append(x.float().cpu())
    return torch.cat(out), labels




PREVIEW_CLASSES = 10  # grid rows when no classes are named


def preview_classes(num_classes: int) -> list[int]:
    """At most `PREVIEW_CLASSES` class ids spread evenly over `num_classes`, first and last included."""
    if num_classes <= PREVIEW_CLASSES:
        return list(range(num_classes))
    return [round(i * (num_classes - 1) / (PREVIEW_CLASSES - 1)) for i in range(PREVIEW_CLASSES)]


@torch.no_grad()
def sample_picture(
    model: DiT,
    classes: list[int],
    class_names: list[str],
    per_class: int,
    cfg_scale: float,
    steps: int,
    sampler: str | None,
    seed: int,
    objective: Objective,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    legacy_three_channel: bool = False,
    batch_size: int = SAMPLE_BATCH,
    progress: bool = False,
    spacing: str = DEFAULT_SPACING,
    cfg_interval: tuple[float, float] | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """A labelled grid (`pictures.make_grid`): one row of `per_class` samples for each of
    `classes`, named from `class_names` (the id where a name is missing), decoded to pixels by
    `decode` (None: the model works on pixels). The picture of `sample` and of the previews."""
    x, _ = generate(
        model, classes, per_class, cfg_scale, steps, sampler, seed, objective, legacy_three_channel, batch_size,
        progress, spacing=spacing, cfg_interval=cfg_interval, precision=precision,
    )
    if decode is not None:
        x = decode(x.to(next(model.parameters()).device)).cpu()
    names = [class_names[c] if c < len(class_names) else str(c) for c in classes]
    return make_grid(x, names, per_class)
