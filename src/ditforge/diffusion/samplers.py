"""Samplers: ancestral DDPM (Ho et al. 2020) and DDIM (Song et al. 2021).

Both are pure functions of a *denoise function*::

    denoise(x_t, t_model) -> model_output

where ``x_t`` is (N, C, H, W), ``t_model`` (N,) holds ORIGINAL (pre-respacing)
timesteps, and ``model_output`` is shaped like a model's output: (N, 2C, H, W)
(eps and v) when the diffusion learns sigma, else (N, C, H, W). The samplers map
their step index ``t`` to ``diffusion.timestep_map[t]`` before calling it, so a
respaced diffusion drives a model trained on the full chain.

Randomness comes only from ``generator`` (which must live on ``noise``'s
device), so a seed fixes the result.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .gaussian import GaussianDiffusion

__all__ = ["ddpm_sample", "ddim_sample", "DenoiseFn"]

DenoiseFn = Callable[[Tensor, Tensor], Tensor]


def _steps(diffusion: GaussianDiffusion, progress: bool, desc: str):
    indices = range(diffusion.num_timesteps - 1, -1, -1)  # T-1, ..., 0
    if progress:
        from tqdm.auto import tqdm

        return tqdm(indices, desc=desc, total=diffusion.num_timesteps, disable=None)  # off when not a terminal
    return indices


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _model_step(diffusion: GaussianDiffusion, denoise: DenoiseFn, x: Tensor, i: int, clip_denoised: bool):
    """The model at chain index ``i`` for every sample: ((N,) timesteps, ``p_mean_variance``'s dict)."""
    t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)  # (N,)
    return t, diffusion.p_mean_variance(denoise(x, diffusion.model_timesteps(t)), x, t, clip_denoised=clip_denoised)


@torch.no_grad()
def ddpm_sample(
    diffusion: GaussianDiffusion,
    denoise: DenoiseFn,
    noise: Tensor,
    *,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling x_{T-1} -> ... -> x_0 (Ho et al. 2020, Algorithm 2).

    x_{t-1} = mu_theta(x_t, t) + exp(log_Sigma / 2) z, z ~ N(0, I), with no noise
    added at the final step t == 0 (whose mean is the sample).

    noise: (N, C, H, W) starting point x_{T-1} ~ N(0, I). Returns (N, C, H, W).
    """
    x = noise
    for i in _steps(diffusion, progress, "DDPM"):
        t, out = _model_step(diffusion, denoise, x, i, clip_denoised)
        if i > 0:
            x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * _randn_like(x, generator)
        else:
            x = out["mean"]
    return x


@torch.no_grad()
def ddim_sample(
    diffusion: GaussianDiffusion,
    denoise: DenoiseFn,
    noise: Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    progress: bool = False,
) -> Tensor:
    """DDIM sampling (Song et al. 2021); deterministic for ``eta == 0``.

    With a = alpha_bar_t, a' = alpha_bar_{t-1} (DDIM's alpha_t, alpha_{t-1}), eq. 12:

        x_{t-1} = sqrt(a') x^_0 + sqrt(1 - a' - sigma_t^2) eps + sigma_t z,

    and eq. 16: sigma_t(eta) = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a').
    eps is re-derived from the (possibly clipped) x^_0, as in ADM, so clipping
    stays consistent. No noise is added at the final step.

    noise: (N, C, H, W). Returns (N, C, H, W).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}")
    x = noise
    for i in _steps(diffusion, progress, "DDIM"):
        t, out = _model_step(diffusion, denoise, x, i, clip_denoised)
        pred_xstart = out["pred_xstart"]  # x^_0, (N, C, H, W)
        eps = diffusion.predict_eps_from_xstart(x, t, pred_xstart)  # (N, C, H, W)
        a = diffusion._extract(diffusion.alphas_cumprod, t, x)
        a_prev = diffusion._extract(diffusion.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1.0 - a_prev) / (1.0 - a)) * torch.sqrt(1.0 - a / a_prev)
        # clamp: guards the square root against rounding (and eta > 1) going below zero
        x = torch.sqrt(a_prev) * pred_xstart + torch.sqrt((1.0 - a_prev - sigma**2).clamp(min=0.0)) * eps
        if i > 0 and eta > 0:
            x = x + sigma * _randn_like(x, generator)
    return x
