"""The sampling options that `sample`, `eval` and the training previews share, each defined
once: which sampler, its time grid, the guidance scales and interval, the objective of an
official file, and the network's precision."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from ditforge.config import PRECISIONS
from ditforge.diffusion.sampling import DEFAULT_SPACING, SPACINGS
from ditforge.flags import flag
from ditforge.objectives import OBJECTIVES, default_sampler, samplers_of


ALL_SAMPLERS = tuple(name for kind in OBJECTIVES for name in samplers_of(kind))
SAMPLE_CFG, EVAL_CFG = 4.0, 1.5  # as the paper: 4.0 makes the clearest pictures, 1.5 gives the best FID


def sampler_option(what: str) -> Any:
    """--sampler, of `sample` and `eval` (the objective's default when not given); `what` begins its help."""
    return field(default=None, metadata=flag(
        "--sampler", f"{what} (default: {default_sampler('diffusion')}; flow: {default_sampler('flow')}; meanflow: "
        f"{default_sampler('meanflow')})", choices=ALL_SAMPLERS))


def spacing_option() -> Any:
    return field(default=DEFAULT_SPACING, metadata=flag(
        "--spacing", "time grid of dpm++2m, dpm++2m-sde and unipc: uniform in log-SNR or in time (DDPM / DDIM: ADM's respacing)",
        choices=SPACINGS))


def interval_text(cfg_interval: tuple[float, float] | list[float] | None) -> str:
    """How a report line names a guidance interval: ", guided for t/T in [LO, HI]", or "" without one."""
    return "" if cfg_interval is None else f", guided for t/T in [{cfg_interval[0]:g}, {cfg_interval[1]:g}]"


def cfg_interval_option() -> Any:
    return field(default=None, metadata=flag(
        "--cfg-interval", "guide only while the noise level is in [LO, HI] (0 = data, 1 = noise); elsewhere the "
        "conditional model alone (default: guide at every step)", metavar=("LO", "HI")))


def cfg_option(usual: float, what: str) -> Any:
    """--cfg of `sample` (`usual` 4.0) and `eval` (1.5): None until the model is known, then
    `objectives.default_cfg` (a MeanFlow model trained with --train-cfg W: W)."""
    return field(default=None, metadata=flag(
        "--cfg", f"classifier-free guidance scale; 1 = none ({what})",
        shown=f"{usual}; a MeanFlow model trained with --train-cfg W: W, the only scale it samples at"))


def objective_option() -> Any:
    return field(default=None, metadata=flag(
        "--objective", "what an official .pt file was trained with: diffusion (DiT) or flow (SiT) (default: what the "
        "run recorded; .pt files: diffusion, or flow for a SiT-* --model)", choices=("diffusion", "flow")))


def precision_option() -> Any:
    return field(default="auto", metadata=flag(
        "--precision", "autocast precision of the network; auto = bf16 on GPU, fp32 on CPU (as train)", choices=PRECISIONS))


