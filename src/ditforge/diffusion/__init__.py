"""Gaussian diffusion (DDPM / Improved DDPM), samplers and classifier-free guidance."""

from .gaussian import GaussianDiffusion, create_diffusion
from .guidance import guided_denoiser
from .samplers import ddim_sample, ddpm_sample

__all__ = ["GaussianDiffusion", "create_diffusion", "ddpm_sample", "ddim_sample", "guided_denoiser"]
