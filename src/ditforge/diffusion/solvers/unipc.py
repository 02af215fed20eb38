"""UniPC: a unified predictor-corrector solver of the diffusion ODE, in data prediction.

Zhao, Bai, Rao, Zhou, Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
of Diffusion Models" (NeurIPS 2023, arXiv 2302.04867). One step from ``s`` to ``t`` with
h = lambda_t - lambda_s (lambda the half log-SNR), in the data-prediction form of their
Sec. 3 and Appendix (hh = -h there):

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) m_s - alpha_t sum_k c_k D_k,     (UniP / UniC)

where m are data predictions x_theta, and D_k = (m_{s_k} - m_s) / r_k are differences to earlier
(or, for the corrector, the new) evaluations at lambda_{s_k} = lambda_s + r_k h. The weights solve
the order conditions (their Sec. 3, UniP-p and UniC-p with the vector a_p; written here with B(h) multiplied in):

    sum_k c_k r_k^{j-1} = (-h) phi_{j+1}(-h) j!,   j = 1..K,
    phi_1(z) = (e^z - 1) / z,   phi_{j+1}(z) = (phi_j(z) - 1 / j!) / z.

That makes the step exact for a data prediction that is a polynomial of degree K in lambda
(expand x_theta in a Taylor series in lambda inside the integral of the exact solution, see
``dpm_solver.py``, and match term by term), so its local error is O(h^{K+2}).
With K equations and K unknowns the paper's B(h) (their bh1 / bh2 variants) cancels:
c = B(h) a_K with a_K = R_K^{-1} g_K / B(h).

* UniP-p, the predictor: the p - 1 previous evaluations (r_k < 0), order p.
* UniC-p, the corrector: the same plus the evaluation at the predicted x~_t (r = 1), which the
  next predictor reuses, so the corrector costs no model evaluation; order p + 1.

``order`` p = 2 is the paper's recommendation for guided sampling (UniPC-2: order 3 in total).
The first steps lower the order to the evaluations available; the last grid point is s = 0,
whose data prediction is the sample (the corrector there would need one more evaluation), as
in ``dpm_solver.py``. ``steps`` is the number of model evaluations.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..samplers import DenoiseFn
from .data_prediction import data_predictor, solver_steps
from .vp_schedule import VPSchedule

__all__ = ["unipc", "phi"]

MAX_ORDER = 3


def phi(j: int, z: float) -> float:
    """phi_j(z) = sum_{n >= 0} z^n / (n + j)!  (j >= 1); the series near 0 avoids cancellation."""
    if abs(z) < 0.5:
        return sum(z**n / math.factorial(n + j) for n in range(24))
    value = math.expm1(z) / z  # phi_1
    for k in range(1, j):
        value = (value - 1.0 / math.factorial(k)) / z
    return value


def _uni_step(
    schedule: VPSchedule,
    x: Tensor,
    history: list[tuple[float, float, Tensor]],
    t: float,
    m_new: Tensor | None = None,
) -> Tensor:
    """One UniP step (``m_new`` None) or UniC step from ``history[-1]`` to model time ``t``.

    history: (model time, lambda, data prediction) of the last evaluations, oldest first;
    ``x`` is the state at the newest of them.
    """
    s, lam_s, m_s = history[-1]
    lam_t = schedule.lam(t)
    h = lam_t - lam_s
    r = [(lam_k - lam_s) / h for _, lam_k, _ in history[:-1]]  # r_k < 0, earlier points
    d = [(m_k - m_s) / r_k for (_, _, m_k), r_k in zip(history[:-1], r)]  # D_k, (N, C, H, W) each
    if m_new is not None:
        r.append(1.0)
        d.append(m_new - m_s)
    alpha_t = schedule.alpha(t)
    x_t = (schedule.sigma(t) / schedule.sigma(s)) * x - (alpha_t * math.expm1(-h)) * m_s
    if d:
        k = len(d)
        R = np.array([[r_k**j for r_k in r] for j in range(k)])  # R[j-1][k] = r_k^{j-1}, (K, K)
        g = np.array([-h * phi(j + 1, -h) * math.factorial(j) for j in range(1, k + 1)])  # (K,)
        c = np.linalg.solve(R, g)
        x_t = x_t - alpha_t * sum(float(c_k) * d_k for c_k, d_k in zip(c, d))
    return x_t


@torch.no_grad()
def unipc(
    schedule: VPSchedule,
    denoise: DenoiseFn,
    noise: Tensor,
    steps: int,
    *,
    spacing: str = "logsnr",
    order: int = 2,
    progress: bool = False,
) -> Tensor:
    """Sample x_0 from ``noise`` (N, C, H, W) at s = T - 1 in ``steps`` model evaluations."""
    if order not in range(1, MAX_ORDER + 1):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    grid = schedule.time_grid(steps, spacing)  # t_0 > ... > t_{M-1} = 0, model times
    predict = data_predictor(schedule, denoise)
    history: list[tuple[float, float, Tensor]] = []  # the last `order` evaluations
    x_prev = noise  # the (corrected) state at the newest point of `history`
    x = noise  # the state at grid[i]: predicted, not yet corrected
    for i in solver_steps(grid[:-1], progress, f"UniPC-{order}"):
        s = grid[i]
        m = predict(x, s)  # x_theta(x~_{t_i}, t_i)
        if history:  # UniC: correct x_{t_i} with the evaluation just made
            x = _uni_step(schedule, x_prev, history, s, m_new=m)
        history = (history + [(s, schedule.lam(s), m)])[-order:]
        x_prev = x
        x = _uni_step(schedule, x, history, grid[i + 1])  # UniP to the next grid point
    return predict(x, grid[-1])  # the step from s = 0 to sigma = 0
