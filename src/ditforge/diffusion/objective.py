"""The diffusion objective (DDPM / Improved DDPM, as DiT trains): ``GaussianDiffusion`` behind the
interface that ``objectives.py`` defines, so the training step and the samplers need not know
which objective trained a model.

Times are integer diffusion steps t in [0, T), drawn uniformly (Ho et al. 2020, Alg. 1); the
loss is ``GaussianDiffusion.training_losses`` (L_simple, plus the VB term when sigma is learned).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, ClassVar

import torch
from torch import Tensor

from .gaussian import GaussianDiffusion, create_diffusion

__all__ = ["DiffusionObjective"]


@dataclass(frozen=True)
class DiffusionObjective:
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    learn_sigma: bool = True

    name: ClassVar[str] = "diffusion"

    @cached_property
    def diffusion(self) -> GaussianDiffusion:
        return create_diffusion("", self.noise_schedule, self.learn_sigma, self.diffusion_steps)

    def sample_time(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """(n,) long diffusion steps, uniform in [0, T)."""
        return torch.randint(0, self.diffusion_steps, (n,), generator=generator, device=device)

    def training_losses(
        self, model: Callable[[Tensor, Tensor, Tensor], Tensor], x0: Tensor, t: Tensor, y: Tensor, noise: Tensor,
        drop: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``drop`` (the step's label drops, which `model` applies) does not change the target here."""
        return self.diffusion.training_losses(model, x0, t, y, noise=noise)
