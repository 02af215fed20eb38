"""Solvers of the flow ODE dx/dt = v(x, t) from the noise (t = 1) to the data (t = 0), and SiT's SDE.

Each is a pure function of a velocity field ``field(x, t) -> dx/dt`` ((N, C, H, W), t a float) and a
decreasing time grid t_0 > t_1 > ... > t_M, with step h_i = t_{i+1} - t_i < 0:

* ``euler``: x_{i+1} = x_i + h_i v(x_i, t_i). First order; M model evaluations.
* ``heun`` (Heun's method, the explicit trapezoidal rule; Karras et al. 2022, Alg. 1 without
  churn): predictor x' = x_i + h_i v_i, corrector x_{i+1} = x_i + h_i (v_i + v(x', t_{i+1})) / 2.
  Second order; 2M model evaluations.
* ``ab2`` (two-step Adams-Bashforth with variable steps; Hairer, Norsett & Wanner, "Solving
  Ordinary Differential Equations I", III.5): with r = h_i / h_{i-1},
      x_{i+1} = x_i + h_i ((1 + r / 2) v_i - (r / 2) v_{i-1}),
  the first step Euler. Second order; M model evaluations (the multistep counterpart of Heun).
* ``euler_maruyama``: SiT's stochastic sampler (Ma et al. 2024, Sec. 2.3, eq. 7; their
  ``sample_sde`` defaults). In SiT's time s = 1 - t the SDE
      dx = [u(x, s) + w(s) grad log p_s(x)] ds + sqrt(2 w(s)) dW,   u = dx/ds = -v,  w = b(t),
  has the ODE's marginals for any w >= 0 (the Fokker-Planck equations agree, since
  p grad log p = grad p). Euler-Maruyama steps over the grid, then one deterministic
  ("Mean") step of the drift over the last ``last_step`` of time. M model evaluations.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["euler", "heun", "ab2", "euler_maruyama", "VelocityField"]

VelocityField = Callable[[Tensor, float], Tensor]


def _steps(grid: Tensor, progress: bool, desc: str):
    indices = range(len(grid) - 1)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(indices, desc=desc, disable=None)
    return indices


@torch.no_grad()
def euler(field: VelocityField, x: Tensor, grid: Tensor, progress: bool = False) -> Tensor:
    for i in _steps(grid, progress, "Euler"):
        t, t_next = float(grid[i]), float(grid[i + 1])
        x = x + (t_next - t) * field(x, t)
    return x


@torch.no_grad()
def heun(field: VelocityField, x: Tensor, grid: Tensor, progress: bool = False) -> Tensor:
    for i in _steps(grid, progress, "Heun"):
        t, t_next = float(grid[i]), float(grid[i + 1])
        h = t_next - t
        v = field(x, t)
        x_pred = x + h * v  # Euler predictor
        x = x + h * 0.5 * (v + field(x_pred, t_next))  # trapezoidal corrector
    return x


@torch.no_grad()
def ab2(field: VelocityField, x: Tensor, grid: Tensor, progress: bool = False) -> Tensor:
    prev: tuple[Tensor, float] | None = None  # (v_{i-1}, h_{i-1})
    for i in _steps(grid, progress, "AB2"):
        t, t_next = float(grid[i]), float(grid[i + 1])
        h = t_next - t
        v = field(x, t)
        if prev is None:
            x = x + h * v
        else:
            r = h / prev[1]
            x = x + h * ((1 + r / 2) * v - (r / 2) * prev[0])
        prev = (v, h)
    return x


@torch.no_grad()
def euler_maruyama(
    field: VelocityField,
    score: Callable[[Tensor, Tensor, float], Tensor],
    diffusion: Callable[[float], float],
    x: Tensor,
    grid: Tensor,
    generator: torch.Generator | None = None,
    last_step: float = 0.0,
    progress: bool = False,
) -> Tensor:
    """SiT's SDE sampler (module docstring). ``score(x, v, t)`` is grad log p_t from the velocity v
    at x; ``diffusion(t)`` is w(t). The grid ends at t = ``last_step``, from where one
    deterministic drift step reaches t = 0 (``last_step`` = 0: no such step)."""

    def drift(x: Tensor, t: float) -> Tensor:  # dx/ds = u + w grad log p, s = 1 - t
        v = field(x, t)
        return -v + diffusion(t) * score(x, v, t)

    for i in _steps(grid, progress, "Euler-Maruyama"):
        t, t_next = float(grid[i]), float(grid[i + 1])
        ds = t - t_next  # > 0: forward in SiT's time
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + ds * drift(x, t) + (2 * diffusion(t) * ds) ** 0.5 * z
    if last_step > 0:
        x = x + last_step * drift(x, float(grid[-1]))
    return x
