"""Which sampler draws the samples: one name, one object, for every caller.

A :class:`Sampler` names a sampler and its steps; calling it with a denoise function (the
guided model, ``guidance.py``) and the starting noise gives x_0:

    sampler = Sampler("dpm++2m", 20, noise_schedule="linear", diffusion_steps=1000, spacing="logsnr")
    x0 = sampler(denoise, noise, generator=gen)     # (N, C, H, W), 20 model evaluations

``sampling/``, ``evaluation/`` and the training previews hold only this
object, so a new solver (the flow objective's Euler and Heun, say) is one more entry in
``SAMPLERS`` and one more branch in ``Sampler.__call__``, with no caller changed.

* ``ddpm``, ``ddim``: the loops of ``samplers.py`` on the chain respaced to ``steps`` steps
  (exactly as before this module existed).
* ``dpm++2m`` (``solvers/dpm_solver.py``), ``unipc`` (``solvers/unipc.py``): ODE solvers on the
  continuous schedule (``solvers/vp_schedule.py``) with the time grid ``spacing``;
  ``dpm++2m-sde`` (``solvers/dpm_solver.py``) solves the reverse SDE on the same grid.

In every case ``steps`` is the number of model evaluations a sample costs (twice that many
forward rows with guidance on).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
from torch import Tensor

from .gaussian import GaussianDiffusion, create_diffusion
from .samplers import ddim_sample, ddpm_sample
from .solvers import SPACINGS, VPSchedule, dpm_solver_pp_2m, dpm_solver_pp_2m_sde, unipc

__all__ = ["SAMPLERS", "SOLVERS", "SPACINGS", "DEFAULT_SPACING", "Sampler"]

SOLVERS = {"dpm++2m": dpm_solver_pp_2m, "unipc": unipc, "dpm++2m-sde": dpm_solver_pp_2m_sde}
SAMPLERS = ("ddpm", "ddim", *SOLVERS)
#: The solvers' time grid unless told otherwise (benchmarks/README.md, "Fast samplers", measured both).
DEFAULT_SPACING = "logsnr"


@dataclass(frozen=True)
class Sampler:
    """A named sampler with its step count and schedule; ``__call__`` draws x_0 from noise."""

    name: str
    steps: int
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    learn_sigma: bool = True
    spacing: str = DEFAULT_SPACING  # the solvers' time grid; DDPM / DDIM use ADM's respacing

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r}; choose one of: {', '.join(SAMPLERS)}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown time spacing {self.spacing!r}; choose one of: {', '.join(SPACINGS)}")
        if not isinstance(self.steps, int) or not 0 < self.steps <= self.diffusion_steps:
            raise ValueError(f"steps must be between 1 and {self.diffusion_steps}, got {self.steps!r}")

    @cached_property
    def diffusion(self) -> GaussianDiffusion:
        """The chain respaced to ``steps`` (DDPM, DDIM), or the full chain (the solvers)."""
        respacing = str(self.steps) if self.name in ("ddpm", "ddim") else ""
        return create_diffusion(respacing, self.noise_schedule, self.learn_sigma, self.diffusion_steps)

    @cached_property
    def schedule(self) -> VPSchedule:
        return VPSchedule(self.diffusion.alphas_cumprod)

    @property
    def nfe(self) -> int:
        """Model evaluations a sample costs: one a step for every diffusion sampler here."""
        return self.steps

    def guidance_times(self, interval: tuple[float, float] | None) -> tuple[float, float] | None:
        """A guidance interval in fractions of the noise level (0 = data, 1 = noise) -> model timesteps."""
        return None if interval is None else (interval[0] * self.diffusion_steps, interval[1] * self.diffusion_steps)

    @staticmethod
    def guidance_scale(cfg: float) -> float:
        """The classifier-free guidance scale applied at sampling for ``--cfg`` ``cfg``: ``cfg``."""
        return cfg

    @staticmethod
    def guidance_input(cfg: float) -> None:
        """The scale fed to the network as an input: none (only iMF models take one)."""
        return None

    def describe(self) -> str:
        """E.g. ``50 DDPM steps`` or ``20 DPM++2M steps (logsnr spacing)``."""
        text = f"{self.steps} {self.name.upper()} steps"
        return text + (f" ({self.spacing} spacing)" if self.name in SOLVERS else "")

    def __call__(
        self,
        denoise: Callable[[Tensor, Tensor], Tensor],
        noise: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Tensor:
        """x_0 (N, C, H, W) from ``noise`` (N, C, H, W); ``generator`` feeds DDPM's noise."""
        if self.name == "ddpm":
            return ddpm_sample(self.diffusion, denoise, noise, generator=generator, progress=progress)
        if self.name == "ddim":
            return ddim_sample(self.diffusion, denoise, noise, generator=generator, progress=progress)
        noise_kw = {"generator": generator} if self.name == "dpm++2m-sde" else {}  # the stochastic solver
        return SOLVERS[self.name](self.schedule, denoise, noise, self.steps, spacing=self.spacing, progress=progress, **noise_kw)

