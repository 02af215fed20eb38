"""Which times a flow model trains on: uniform, or logit-normal, with an optional shift.

* ``uniform``: t ~ U(0, 1) (SiT, rectified flow).
* ``logit-normal``: t = sigmoid(n), n ~ N(mean, std^2) (Esser et al. 2024, "Scaling Rectified Flow
  Transformers for High-Resolution Image Synthesis" (SD3), Sec. 3.1, eq. 19):

      p(t; m, s) = 1 / (s sqrt(2 pi)) * 1 / (t (1 - t)) * exp(-(logit(t) - m)^2 / (2 s^2)),

  which spends the training on the middle times, where the velocity is hardest to predict
  (LightningDiT trains with it, mean 0, std 1).
* ``shift`` (SD3 Sec. 5.3.2, eq. 23): t -> shift t / (1 + (shift - 1) t), towards the noise for
  shift > 1 (more signal needs more noise: higher resolutions); 1 leaves t as drawn.

Times are in [0, 1] with 0 = data, 1 = noise (``paths.py``). ``eps`` keeps t inside
[eps, 1 - eps] for predictions that are singular at the ends (noise, score: SiT's train_eps).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TIME_DISTRIBUTIONS", "sample_times", "shift_times", "logit_normal_cdf"]

TIME_DISTRIBUTIONS = ("uniform", "logit-normal")


def shift_times(t: Tensor, shift: float) -> Tensor:
    """SD3's shift: t -> shift t / (1 + (shift - 1) t); monotone, fixes 0 and 1."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_times(
    n: int,
    distribution: str,
    generator: torch.Generator | None,
    device: torch.device,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    eps: float = 0.0,
) -> Tensor:
    """(n,) float32 training times, drawn from ``generator`` (one tensor of n draws)."""
    if distribution == "uniform":
        t = torch.rand(n, generator=generator, device=device)  # (n,)
    elif distribution == "logit-normal":
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))  # (n,)
    else:
        raise ValueError(f"unknown time distribution {distribution!r}; choose one of: {', '.join(TIME_DISTRIBUTIONS)}")
    t = shift_times(t, shift)
    return t * (1 - 2 * eps) + eps if eps > 0 else t


def logit_normal_cdf(t: Tensor, mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> Tensor:
    """P(T <= t) for the (shifted) logit-normal time: Phi((logit(u) - m) / s) with u the time
    before the shift, u = t / (shift - (shift - 1) t) (the inverse of ``shift_times``)."""
    u = t / (shift - (shift - 1) * t)
    z = (torch.logit(u) - mean) / std
    return 0.5 * (1 + torch.erf(z / 2**0.5))
