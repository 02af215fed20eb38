"""The model as a data predictor x_theta(x_s, s) on the continuous schedule, for the ODE solvers.

The solvers need only the model's epsilon channels: the learned-variance channels ``v`` of a
``learn_sigma`` model (the second half of its output) are dropped. Data prediction from epsilon
(Ho et al. 2020, eq. 15; Lu et al. 2022b, "DPM-Solver++", Sec. 2):

    x_theta(x_s, s) = (x_s - sigma_s eps_theta(x_s, s)) / alpha_s.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..samplers import DenoiseFn
from .vp_schedule import VPSchedule

__all__ = ["data_predictor", "solver_steps"]

DataFn = Callable[[Tensor, float], Tensor]


def data_predictor(schedule: VPSchedule, denoise: DenoiseFn) -> DataFn:
    """``denoise(x_s, t_model) -> (N, C or 2C, H, W)`` -> ``x0(x_s, s) -> (N, C, H, W)``.

    The model is called with ``t_model`` = ``s`` for every sample, a float tensor (N,):
    float64 when ``x_s`` is float64 (exact tests), float32 otherwise.
    """

    def predict(x: Tensor, s: float) -> Tensor:
        n, c = x.shape[:2]
        t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = denoise(x, torch.full((n,), s, dtype=t_dtype, device=x.device))
        if out.shape[1] not in (c, 2 * c):
            raise ValueError(
                f"model output has {out.shape[1]} channels; expected {c} (eps) or {2 * c} (eps and v) for {c}-channel inputs"
            )
        eps = out[:, :c].to(x.dtype)  # (N, C, H, W): the epsilon channels, v dropped
        return (x - schedule.sigma(s) * eps) / schedule.alpha(s)

    return predict


def solver_steps(grid: list[float], progress: bool, desc: str):
    """Indices of the steps taken from the points of ``grid``, with a progress bar if asked."""
    indices = range(len(grid))
    if progress:
        from tqdm.auto import tqdm

        return tqdm(indices, desc=desc, total=len(grid))
    return indices
