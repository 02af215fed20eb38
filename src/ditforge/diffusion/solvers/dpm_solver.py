"""DPM-Solver++(2M): the second-order multistep solver of the diffusion ODE in data prediction.

Lu, Zhou, Bao, Chen, Li, Zhu 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models" (arXiv 2211.01095). The exact solution of the probability-flow ODE from
``s`` to ``t`` (their Sec. 4, from the variation-of-constants formula), with lambda the half log-SNR and x_theta the data prediction:

    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x_theta(x_lambda, lambda) dlambda.

With x_theta held constant it gives DPM-Solver++(1), which is DDIM (Sec. 4):

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x_theta(x_s, s),   h = lambda_t - lambda_s.

Algorithm 2 (2M) replaces x_theta by a linear extrapolation from the last two evaluations,
one model evaluation a step, second order. Step i (from t_{i-1} to t_i), i >= 2:

    h_i = lambda_{t_i} - lambda_{t_{i-1}},   r_i = h_{i-1} / h_i,
    D_i = (1 + 1 / (2 r_i)) x_theta(x_{t_{i-1}}) - 1 / (2 r_i) x_theta(x_{t_{i-2}}),
    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,

and the first step is DPM-Solver++(1). The time grid (``VPSchedule.time_grid``) has one point
a model evaluation, from the noise to ``s = 0``; the last step goes on to sigma = 0 with the
first-order update, whose limit h -> inf is x_theta itself (DDIM's last step; the authors'
"lower order final" for few steps). So ``steps`` is the number of model evaluations (NFE).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..samplers import DenoiseFn
from .data_prediction import data_predictor, solver_steps
from .vp_schedule import VPSchedule

__all__ = ["dpm_solver_pp_2m"]


@torch.no_grad()
def dpm_solver_pp_2m(
    schedule: VPSchedule,
    denoise: DenoiseFn,
    noise: Tensor,
    steps: int,
    *,
    spacing: str = "logsnr",
    progress: bool = False,
) -> Tensor:
    """Sample x_0 from ``noise`` (N, C, H, W) at s = T - 1 in ``steps`` model evaluations."""
    grid = schedule.time_grid(steps, spacing)  # t_0 > t_1 > ... > t_{M-1} = 0, model times
    predict = data_predictor(schedule, denoise)
    x = noise
    prev: tuple[Tensor, float] | None = None  # (x_theta, lambda) at the previous grid point
    for i in solver_steps(grid[:-1], progress, "DPM-Solver++(2M)"):
        s, t = grid[i], grid[i + 1]
        m = predict(x, s)  # x_theta(x_{t_i}, t_i), (N, C, H, W)
        lam_s, lam_t = schedule.lam(s), schedule.lam(t)
        h = lam_t - lam_s
        if prev is None:
            d = m  # DPM-Solver++(1) for the first step
        else:
            r = (lam_s - prev[1]) / h  # r_i = h_{i-1} / h_i
            d = (1.0 + 0.5 / r) * m - (0.5 / r) * prev[0]  # D_i
        x = (schedule.sigma(t) / schedule.sigma(s)) * x - (schedule.alpha(t) * math.expm1(-h)) * d
        prev = (m, lam_s)
    return predict(x, grid[-1])  # the step from s = 0 to sigma = 0
