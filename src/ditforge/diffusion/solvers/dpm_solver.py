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

**SDE-DPM-Solver++(2M)** (``dpm_solver_pp_2m_sde``, ``--sampler dpm++2m-sde``): the stochastic
counterpart of Algorithm 2 (the same paper; the form diffusers calls ``sde-dpmsolver++``). The reverse SDE
(Song et al. 2021, eq. 6) written in the half log-SNR lambda and the data prediction x_theta has,
by variation of constants, the exact solution from ``s`` to ``t`` (h = lambda_t - lambda_s > 0):

    x_t = (sigma_t / sigma_s) e^{-h} x_s + 2 alpha_t int_{lambda_s}^{lambda_t} e^{-2 (lambda_t - lambda)} x_theta dlambda
          + sigma_t sqrt(1 - e^{-2h}) z,                                       z ~ N(0, I).

With x_theta held constant the integral is (1 - e^{-2h}) x_theta / 2 (first order); 2M holds
instead the same linear extrapolation of the last two data predictions as the ODE solver,
D_i = (1 + 1 / (2 r_i)) x_theta(x_{t_{i-1}}) - 1 / (2 r_i) x_theta(x_{t_{i-2}}):

    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) e^{-h_i} x_{t_{i-1}} + alpha_{t_i} (1 - e^{-2 h_i}) D_i
              + sigma_{t_i} sqrt(1 - e^{-2 h_i}) z_i.

Like DDPM it injects fresh noise every step, which corrects the errors of the earlier steps
(on the digits, 250-step DDPM beats every ODE solver; README "Fast samplers"), at the cost of a
smaller step before its discretisation error vanishes. The grid and the last step (from s = 0 to
sigma = 0: x_theta itself, no noise) are the ODE solver's, so ``steps`` is the number of model
evaluations. ``generator`` draws the z_i (the same generator DDPM draws from).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from ..samplers import DenoiseFn, _randn_like
from .data_prediction import data_predictor, solver_steps
from .vp_schedule import VPSchedule

__all__ = ["dpm_solver_pp_2m", "dpm_solver_pp_2m_sde"]


@torch.no_grad()
def dpm_solver_pp_2m(
    schedule: VPSchedule,
    denoise: DenoiseFn,
    noise: Tensor,
    steps: int,
    *,
    spacing: str = "logsnr",
    progress: bool = False,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample x_0 from ``noise`` (N, C, H, W) at s = T - 1 in ``steps`` model evaluations: the ODE,
    or with ``stochastic`` the reverse SDE, whose fresh noise ``generator`` draws."""
    grid = schedule.time_grid(steps, spacing)  # t_0 > t_1 > ... > t_{M-1} = 0, model times
    predict = data_predictor(schedule, denoise)
    x = noise
    prev: tuple[Tensor, float] | None = None  # (x_theta, lambda) at the previous grid point
    for i in solver_steps(grid[:-1], progress, "SDE-DPM-Solver++(2M)" if stochastic else "DPM-Solver++(2M)"):
        s, t = grid[i], grid[i + 1]
        m = predict(x, s)  # x_theta(x_{t_i}, t_i), (N, C, H, W)
        lam_s, lam_t = schedule.lam(s), schedule.lam(t)
        h = lam_t - lam_s
        if prev is None:
            d = m  # first order for the first step (DPM-Solver++(1))
        else:
            r = (lam_s - prev[1]) / h  # r_i = h_{i-1} / h_i
            d = (1.0 + 0.5 / r) * m - (0.5 / r) * prev[0]  # D_i
        if stochastic:
            decay = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
            x = (schedule.sigma(t) / schedule.sigma(s) * math.exp(-h)) * x + (schedule.alpha(t) * decay) * d \
                + (schedule.sigma(t) * math.sqrt(decay)) * _randn_like(x, generator)
        else:
            x = (schedule.sigma(t) / schedule.sigma(s)) * x - (schedule.alpha(t) * math.expm1(-h)) * d
        prev = (m, lam_s)
    return predict(x, grid[-1])  # the step from s = 0 to sigma = 0 (x_theta; no noise)


dpm_solver_pp_2m_sde = partial(dpm_solver_pp_2m, stochastic=True)
