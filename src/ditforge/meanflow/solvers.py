"""The MeanFlow sampler's solver: jumps along the average velocity from the noise (t = 1) to the
data (t = 0).

Geng et al. 2025 (arXiv 2505.13447), Eq. 12: with the average velocity u over [r, t],

    z_r = z_t - (t - r) u(z_t, r, t),

exact for the exact u (it is the definition of u: the displacement over the interval divided by
its length), whatever the interval. One step, z_0 = z_1 - u(z_1, 0, 1), is one model evaluation;
N steps split [0, 1] into the N intervals of a decreasing grid 1 = t_0 > t_1 > ... > t_N = 0,
one evaluation each (the paper's 2-NFE results: two equal halves).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["mean_flow_jumps", "AverageVelocity"]

#: u(z_t, r, t) -> (N, C, H, W) for z_t (N, C, H, W) and the floats r <= t
AverageVelocity = Callable[[Tensor, float, float], Tensor]


@torch.no_grad()
def mean_flow_jumps(u: AverageVelocity, z: Tensor, grid: Tensor, progress: bool = False) -> Tensor:
    """z_{t_N} from z at t_0 over the decreasing ``grid`` (t_0, ..., t_N): z <- z - (t - r) u(z, r, t)."""
    indices = range(len(grid) - 1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="MeanFlow", disable=None)
    for i in indices:
        t, r = float(grid[i]), float(grid[i + 1])
        z = z - (t - r) * u(z, r, t)  # (N, C, H, W), Eq. 12
    return z
