"""Interpolants of flow matching: the paths from data to noise that a flow model learns to reverse.

Ma, Goldstein, Albergo, Boffi, Vanden-Eijnden, Xie 2024, "SiT: Exploring Flow and Diffusion-based
Generative Models with Scalable Interpolant Transformers" (arXiv 2401.08740), Sec. 2-3; Albergo &
Vanden-Eijnden 2023 (stochastic interpolants); Liu et al. 2023 (rectified flow).

A path mixes a data sample x0 and Gaussian noise eps:

    x_t = a(t) x0 + b(t) eps,      t in [0, 1],   a(0) = b(1) = 1,  a(1) = b(0) = 0,

* ``linear`` (SiT's default, rectified flow):  a = 1 - t,          b = t;
* ``gvp`` (SiT's generalised variance-preserving path): a = cos(pi t / 2), b = sin(pi t / 2),
  so a^2 + b^2 = 1.

Time runs from data (t = 0) to noise (t = 1), as in the issue's and SD3's notation. SiT counts it
the other way; its symbols against ours:

    SiT           ours
    t             s = 1 - t          (the network's time input: 0 = noise, 1 = data)
    x1            x0                 (data)
    x0            eps                (noise)
    alpha_t       a(t)               (data coefficient)
    sigma_t       b(t)               (noise coefficient)
    u_t = dx/ds   -dx/dt             (the velocity a SiT network predicts)

The velocity of the path, dx_t/dt = a'(t) x0 + b'(t) eps, is the target the ODE of sampling needs
(Lipman et al. 2023, eq. 9: the marginal velocity E[dx_t/dt | x_t]). From a prediction of eps, or
of x0, or of the velocity, the other two follow from the 2 x 2 system (``PathCoefficients``)

    x = a x0 + b eps,    v = a' x0 + b' eps   =>   eps = (a v - a' x) / (a b' - a' b),
                                                   x0  = (b' x - b v) / (a b' - a' b).

The score of the marginal is grad log p_t(x) = -E[eps | x_t] / b (Tweedie).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PATHS", "Path"]

PATHS = ("linear", "gvp")


def _like(t: Tensor, x: Tensor) -> Tensor:
    """(N,) times -> (N, 1, ..., 1), broadcastable against x (N, C, H, W)."""
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


@dataclass(frozen=True)
class Path:
    """One interpolant x_t = a(t) x0 + b(t) eps, with its derivatives and the conversions between
    the three things a network may predict (velocity, noise, score)."""

    name: str = "linear"

    def __post_init__(self) -> None:
        if self.name not in PATHS:
            raise ValueError(f"unknown interpolant path {self.name!r}; choose one of: {', '.join(PATHS)}")

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """a(t), b(t), a'(t), b'(t), each shaped like ``t``."""
        if self.name == "linear":
            one = torch.ones_like(t)
            return 1 - t, t, -one, one
        half_pi = math.pi / 2
        c, s = torch.cos(half_pi * t), torch.sin(half_pi * t)
        return c, s, -half_pi * s, half_pi * c

    def interpolate(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = a(t) x0 + b(t) eps; x0, eps (N, C, H, W), t (N,)."""
        a, b, _, _ = self.coefficients(_like(t, x0))
        return a * x0 + b * eps

    def velocity(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """dx_t/dt = a'(t) x0 + b'(t) eps (N, C, H, W): the flow from data to noise."""
        _, _, da, db = self.coefficients(_like(t, x0))
        return da * x0 + db * eps

    def noise_from_velocity(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """E[eps | x_t] from dx_t/dt (module docstring's 2 x 2 system)."""
        a, b, da, db = self.coefficients(_like(t, x))
        return (a * v - da * x) / (a * db - da * b)

    def velocity_from_noise(self, eps: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """dx_t/dt from a prediction of eps: x0 = (x - b eps) / a, v = a' x0 + b' eps (needs a > 0, t < 1)."""
        a, b, da, db = self.coefficients(_like(t, x))
        return da * (x - b * eps) / a + db * eps

    def score_from_noise(self, eps: Tensor, t: Tensor) -> Tensor:
        """grad log p_t(x) = -eps / b (needs b > 0, t > 0)."""
        _, b, _, _ = self.coefficients(_like(t, eps))
        return -eps / b

    def noise_from_score(self, score: Tensor, t: Tensor) -> Tensor:
        """eps = -b score (the inverse of ``score_from_noise``)."""
        _, b, _, _ = self.coefficients(_like(t, score))
        return -b * score
