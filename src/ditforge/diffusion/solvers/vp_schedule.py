"""A discrete DDPM chain seen as a continuous variance-preserving (VP) process, for ODE solvers.

The fast solvers integrate the probability-flow ODE (Song, Sohl-Dickstein et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", eq. 13) of the process

    x_s = alpha_s x_0 + sigma_s eps,   alpha_s^2 + sigma_s^2 = 1,

over the model's own time ``s`` in [0, T - 1] (the timesteps the model was trained on; the
solvers may call it at fractional ``s``). At integer ``s``, ``alpha_s^2`` is the chain's
``alpha_bar[s]``; in between, ``log alpha_s`` is linear in ``s``, which is how the DPM-Solver
authors make a discrete-time model continuous (Lu et al. 2022a, "DPM-Solver", arXiv 2206.00927:
their ``NoiseScheduleVP("discrete")``, a piecewise-linear ``log alpha_t``).

=====================  ==========================================================
name                   symbol (Lu et al. 2022a, Sec. 2-3)
=====================  ==========================================================
``log_alpha(s)``       log alpha_t
``sigma(s)``           sigma_t = sqrt(1 - alpha_t^2)
``lam(s)``             lambda_t = log(alpha_t / sigma_t), half the log-SNR (Sec. 3.1)
``s_of_lam(l)``        t_lambda(.), the inverse of lambda_t
=====================  ==========================================================

The time grid of a solver (``time_grid``) has one point per model evaluation, from ``s = T - 1``
(the noise) down to ``s = 0``; the solvers then take a last step to ``sigma = 0``, which is the
data prediction at ``s = 0`` (as DDIM's last step is).

* ``"time"``: ``s`` uniform, DDIM's spacing (Song et al. 2021); the DPM-Solver authors' code
  recommends it for high-resolution images.
* ``"logsnr"``: ``lambda`` uniform, the step-size schedule of Lu et al. 2022a (Sec. 3.3), which
  the authors recommend for low-resolution images.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["VPSchedule", "SPACINGS"]

SPACINGS = ("time", "logsnr")


class VPSchedule:
    """The continuous VP schedule of a chain with cumulative products ``alphas_cumprod`` (T,)."""

    def __init__(self, alphas_cumprod: np.ndarray) -> None:
        ab = np.asarray(alphas_cumprod, dtype=np.float64)
        if ab.ndim != 1 or len(ab) == 0 or not ((ab > 0) & (ab < 1)).all() or (np.diff(ab) >= 0).any():
            raise ValueError("alphas_cumprod must be a non-empty 1-D array, strictly decreasing inside (0, 1)")
        self.num_timesteps = len(ab)
        self._s = np.arange(len(ab), dtype=np.float64)  # (T,) model timesteps
        self._log_alpha = 0.5 * np.log(ab)  # (T,) log alpha at the integer timesteps, decreasing

    @property
    def s_max(self) -> float:
        return float(self.num_timesteps - 1)

    def log_alpha(self, s: float) -> float:
        if not 0.0 <= s <= self.s_max:
            raise ValueError(f"model time {s!r} is outside [0, {self.s_max:g}]")
        return float(np.interp(s, self._s, self._log_alpha))

    def alpha(self, s: float) -> float:
        return math.exp(self.log_alpha(s))

    def sigma(self, s: float) -> float:
        # sigma^2 = 1 - alpha^2 = -expm1(2 log alpha), accurate when alpha is near 1
        return math.sqrt(-math.expm1(2.0 * self.log_alpha(s)))

    def lam(self, s: float) -> float:
        return self.log_alpha(s) - math.log(self.sigma(s))

    def s_of_lam(self, lam: float) -> float:
        """Inverse of ``lam``: log alpha = -log(1 + e^{-2 lambda}) / 2, then invert the interpolation."""
        log_alpha = -0.5 * math.log1p(math.exp(-2.0 * lam))
        # np.interp needs increasing abscissae: log alpha decreases with s, so read both reversed
        s = float(np.interp(log_alpha, self._log_alpha[::-1], self._s[::-1]))
        return min(max(s, 0.0), self.s_max)

    def time_grid(self, steps: int, spacing: str) -> list[float]:
        """``steps`` model times from T - 1 down to 0 (one model evaluation each), decreasing."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"unknown time spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
        if steps == 1:
            return [self.s_max]
        if spacing == "time":
            return [self.s_max * (1.0 - i / (steps - 1)) for i in range(steps)]
        lo, hi = self.lam(self.s_max), self.lam(0.0)
        grid = [self.s_of_lam(lo + (hi - lo) * i / (steps - 1)) for i in range(steps)]
        grid[0], grid[-1] = self.s_max, 0.0  # exact ends, whatever the rounding of the inverse
        return grid
