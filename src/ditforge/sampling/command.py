"""The `sample` command: a run, checkpoint or exported model -> a labelled PNG grid
(`sample_grid`), or many samples in an .npz (`bulk.py`); `SampleOptions` are its options."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ditforge.flags import flag
from ditforge.objectives import default_cfg, default_sampler, default_steps
from ditforge.sampling.generate import preview_classes, sample_picture
from ditforge.sampling.load import SamplingModel, load_decoder, load_for_sampling
from ditforge.sampling.options import (
    SAMPLE_CFG, cfg_interval_option, cfg_option, interval_text, objective_option, precision_option, sampler_option,
    spacing_option,
)


@dataclass
class SampleOptions:
    """What `ditforge sample` asks for, each field its option; `out` ending in .npz means many
    samples (`bulk.sample_npz`)."""

    checkpoint: str = field(metadata=flag(
        "checkpoint", "run folder (latest checkpoint), checkpoint folder, or official DiT / SiT .pt file"))
    classes: list[int] | None = field(default=None, metadata=flag(  # grid rows
        "--classes", "class ids, one grid row each (default: all classes, at most 10 spread over the range)", nargs="+"))
    per_class: int = field(default=8, metadata=flag("--per-class", "samples per class (grid columns)"))
    cfg: float | None = cfg_option(SAMPLE_CFG, "the paper: 4.0 for pictures, 1.5 for FID")
    legacy_three_channel: bool = field(default=False, metadata=flag(
        "--legacy-three-channel-guidance", "guide only the first 3 channels, as the original DiT code did", action="store_true"))
    steps: int | None = field(default=None, metadata=flag(  # None: the objective's default
        "--steps", f"sampling steps: model evaluations (diffusion: respaced from the training steps), or intervals for "
        f"flow solvers (Heun: 2 evaluations each) or MeanFlow jumps (1 evaluation each) (default: "
        f"{default_steps('diffusion')}; flow: {default_steps('flow')}; meanflow: {default_steps('meanflow')})"))
    sampler: str | None = sampler_option(
        "diffusion: DDPM ancestral sampling, deterministic DDIM, the fast ODE solvers DPM-Solver++(2M) and UniPC; flow: "
        "Euler, Heun, Adams-Bashforth 2 (ODE) or SiT's Euler-Maruyama SDE; meanflow: jumps along the average velocity")
    spacing: str = spacing_option()
    cfg_interval: tuple[float, float] | None = cfg_interval_option()
    objective: str | None = objective_option()  # None: recorded / from the name
    compile: bool = field(default=False, metadata=flag(
        "--compile", "torch.compile the model first (pays off for many samples)", action="store_true"))
    seed: int = field(default=0, metadata=flag("--seed", "seed of the noise: same seed, same picture"))
    raw_weights: bool = field(default=False, metadata=flag(
        "--raw-weights", "sample the raw weights instead of the EMA", action="store_true"))
    model_name: str | None = field(default=None, metadata=flag(
        "--model", "model name, required for an official .pt file (e.g. DiT-XL/2)"))
    vae: str | None = field(default=None, metadata=flag(  # overrides the autoencoder the checkpoint records
        "--vae", "decode latents with this VAE (hub id, 'ema'/'mse', or a save_pretrained folder) instead of the one "
        "the checkpoint records (default: the recorded one; official .pt: stabilityai/sd-vae-ft-ema)"))
    out: str = field(default="samples.png", metadata=flag(
        "--out", "PNG grid, or .npz for many samples in the ADM evaluator's format"))
    num_samples: int | None = field(default=None, metadata=flag(
        "--num-samples", "with --out X.npz: how many samples (default: 50000)"))
    balanced: bool = field(default=False, metadata=flag(
        "--balanced", "with .npz: equal counts per class instead of uniform random classes", action="store_true"))
    batch_size: int = field(default=64, metadata=flag("--batch-size", "samples per forward batch"))
    shard_size: int = field(default=1024, metadata=flag(
        "--shard-size", "with .npz: samples per resumable shard (a multiple of --batch-size)"))
    precision: str = precision_option()

    @property
    def use_ema(self) -> bool:
        return not self.raw_weights

    def for_model(self, sm: SamplingModel) -> "SampleOptions":
        """These options with the sampler, steps and guidance scale the model's objective picks where
        none were given."""
        return replace(
            self,
            sampler=self.sampler or default_sampler(sm.objective),
            steps=self.steps if self.steps is not None else default_steps(sm.objective),
            cfg=self.cfg if self.cfg is not None else default_cfg(sm.objective, SAMPLE_CFG),
        )


@dataclass
class Sampling:
    """A checkpoint ready to sample on this process's device."""

    sm: SamplingModel
    model: torch.nn.Module  # sm.model on the device, compiled when asked
    decode: Callable[[torch.Tensor], torch.Tensor] | None  # latents -> pictures; None in pixel space
    precision: str


def prepare_sampling(sm: SamplingModel, opts: SampleOptions, device: torch.device) -> Sampling:
    """Model on `device` (compiled if asked), the decoder (`opts.vae` over the recorded one), precision."""
    from ditforge.train.device import enable_tf32, resolve_precision

    precision = resolve_precision(opts.precision, device)
    enable_tf32()
    model = sm.model.to(device)
    if opts.compile:
        model = torch.compile(model)
    decode = load_decoder(sm.autoencoder, device, vae=opts.vae)  # --vae: other weights, the recorded normalisation
    return Sampling(sm, model, decode, precision)


@dataclass
class GridResult:
    out: Path
    classes: list[int]
    opts: SampleOptions
    precision: str
    device: str
    is_main: bool = True  # every rank writes the grid (the same one) and reports it

    def line(self) -> str:
        o = self.opts
        return (f"wrote {self.out}: classes {self.classes}, {o.per_class} each, cfg {o.cfg:g}, {o.steps} {o.sampler.upper()} "
                f"steps{interval_text(o.cfg_interval)}, seed {o.seed}, {self.precision} on {self.device}")


def sample_grid(opts: SampleOptions) -> GridResult:
    """`opts.per_class` samples of each class in `opts.classes` as a labelled PNG grid at `opts.out`."""
    from ditforge.pictures import save_png_atomic
    from ditforge.train import distributed

    sm = load_for_sampling(opts.checkpoint, opts.model_name, use_ema=opts.use_ema, objective=opts.objective)
    opts = opts.for_model(sm)
    d = distributed.init()
    try:
        s = prepare_sampling(sm, opts, d.device)
        classes = opts.classes if opts.classes is not None else preview_classes(s.model.num_classes)
        picture = sample_picture(
            s.model, classes, sm.class_names, opts.per_class, opts.cfg, opts.steps, opts.sampler, opts.seed,
            sm.objective, s.decode, legacy_three_channel=opts.legacy_three_channel, batch_size=opts.batch_size,
            progress=True, spacing=opts.spacing, cfg_interval=opts.cfg_interval, precision=s.precision,
        )
        out = save_png_atomic(picture, Path(opts.out))
        return GridResult(out, classes, opts, s.precision, d.device.type)
    finally:
        distributed.shutdown()
