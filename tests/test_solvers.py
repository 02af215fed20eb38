"""The fast solvers (DPM-Solver++(2M), UniPC; SDE-DPM-Solver++(2M)) against closed forms, in float64.

For data x_0 ~ N(mu, s2) (per channel) every marginal of x_s = alpha_s x_0 + sigma_s eps is
Gaussian, N(alpha_s mu, V_s) with V_s = alpha_s^2 s2 + sigma_s^2, so both the exact denoiser and
the exact probability-flow ODE solution are known:

    E[x_0 | x_s] = mu + alpha_s s2 / V_s (x_s - alpha_s mu)              (the ideal data prediction)
    x_t = alpha_t mu + sqrt(V_t / V_s) (x_s - alpha_s mu)               (the ODE flow from s to t)

(the flow of a linear ODE is affine and increasing, and the only such map between two 1-D
Gaussians is this one). A solver's output is E[x_0 | x_0-end] at s = 0, so its error is the ODE
error at s = 0 times a constant: halving the step must divide it by 2^order.
"""

import math

import numpy as np
import pytest
import torch

from ditforge.diffusion import create_diffusion, ddim_sample, ddpm_sample
from ditforge.diffusion.solvers import VPSchedule, dpm_solver_pp_2m, dpm_solver_pp_2m_sde, unipc
from ditforge.diffusion.solvers.unipc import phi

F64 = torch.float64
SCHEDULE = VPSchedule(create_diffusion("").alphas_cumprod)  # the linear 1000-step chain
MU = torch.tensor([0.3, -0.5], dtype=F64).view(1, 2, 1, 1)
S2 = torch.tensor([0.1, 0.5], dtype=F64).view(1, 2, 1, 1)


def gaussian_denoiser(schedule, mu, s2, v_channels=True):
    """Exact eps_theta(x_s, s) for N(mu, s2) data, with junk learned-variance channels appended."""

    def denoise(x, t):
        assert t.dtype == F64 and (t == t[0]).all()
        s = float(t[0])
        a, sg = schedule.alpha(s), schedule.sigma(s)
        x0 = mu + a * s2 / (a * a * s2 + sg * sg) * (x - a * mu)  # E[x_0 | x_s]
        eps = (x - a * x0) / sg
        return torch.cat([eps, torch.full_like(eps, 123.0)], dim=1) if v_channels else eps

    return denoise


def exact_sample(schedule, noise, mu, s2):
    """E[x_0 | x(0)] with x(0) the exact ODE solution from x(T - 1) = noise."""
    a_T, s_T = schedule.alpha(schedule.s_max), schedule.sigma(schedule.s_max)
    a_0, s_0 = schedule.alpha(0.0), schedule.sigma(0.0)
    v_T, v_0 = a_T**2 * s2 + s_T**2, a_0**2 * s2 + s_0**2
    x = a_0 * mu + (v_0 / v_T).sqrt() * (noise - a_T * mu)
    return mu + a_0 * s2 / v_0 * (x - a_0 * mu)


def _noise(seed=0):
    return torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _errors(solver, spacing, steps_list, **kw):
    noise = _noise()
    exact = exact_sample(SCHEDULE, noise, MU, S2)
    denoise = gaussian_denoiser(SCHEDULE, MU, S2)
    return [(solver(SCHEDULE, denoise, noise, m, spacing=spacing, **kw) - exact).abs().max().item() for m in steps_list]


def _orders(errors):
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


@pytest.mark.parametrize(
    "solver, kw, order",
    [(dpm_solver_pp_2m, {}, 2), (unipc, {"order": 1}, 2), (unipc, {"order": 2}, 3)],
    ids=["dpm++2m", "unipc-1", "unipc-2"],
)
def test_solution_error_shrinks_at_the_solvers_order_logsnr(solver, kw, order):
    errors = _errors(solver, "logsnr", [20, 40, 80, 160], **kw)
    for p in _orders(errors):
        assert order - 0.25 < p < order + 0.35, (errors, _orders(errors))
    assert errors[-1] < 2e-3


@pytest.mark.parametrize(
    "solver, kw, order",
    [(dpm_solver_pp_2m, {}, 2), (unipc, {"order": 2}, 3)],
    ids=["dpm++2m", "unipc-2"],
)
def test_solution_error_shrinks_towards_the_order_time_uniform(solver, kw, order):
    # The time-uniform grid takes long, unequal steps in lambda near the data (lambda ~ -log(s + 1) / 2
    # there), so the asymptotic order needs steps much shorter than one timestep; the observed order
    # climbs towards it as the steps halve.
    errors = _errors(solver, "time", [40, 80, 160, 320, 640], **kw)
    orders = _orders(errors)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert all(b > a - 0.05 for a, b in zip(orders, orders[1:])), orders
    assert order - 0.6 < orders[-1] < order + 0.3, (errors, orders)


def test_unipc_corrector_beats_its_predictor_alone():
    # UniPC-1's predictor is DDIM (first order); its corrector lifts it to second order
    ddim_like = _errors(dpm_solver_pp_2m, "logsnr", [40, 80])  # second order, for scale
    unipc1 = _errors(unipc, "logsnr", [40, 80], order=1)
    assert _orders(unipc1)[0] > 1.7 and unipc1[1] < 10 * ddim_like[1]


@pytest.mark.parametrize("solver", [dpm_solver_pp_2m, unipc])
def test_two_evaluations_equal_ddim_on_the_same_timesteps(solver):
    # one first-order step from t = 999 to t = 0, then x_theta: DPM-Solver++(1) is DDIM (Lu et al. 2022b, eq. 9)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(2, 2, generator=g, dtype=F64)

    def denoise(x, t):  # any smooth model: eps depends nonlinearly on x and t
        eps = torch.tanh(torch.einsum("ij,njhw->nihw", w, x)) * (1 + t.to(F64).view(-1, 1, 1, 1) / 1000.0)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    noise = _noise(1)
    ddim = ddim_sample(create_diffusion("2"), denoise, noise)  # kept timesteps 0 and 999
    torch.testing.assert_close(solver(SCHEDULE, denoise, noise, 2, spacing="time"), ddim, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver", [dpm_solver_pp_2m, unipc])
def test_steps_count_model_evaluations_and_variance_channels_are_ignored(solver):
    calls = []
    exact = gaussian_denoiser(SCHEDULE, MU, S2)

    def counting(x, t):
        calls.append(float(t[0]))
        return exact(x, t)

    noise = _noise(2)
    out = solver(SCHEDULE, counting, noise, 7, spacing="logsnr")
    assert len(calls) == 7 and calls[0] == 999.0 and calls[-1] == 0.0
    assert calls == sorted(calls, reverse=True)
    eps_only = solver(SCHEDULE, gaussian_denoiser(SCHEDULE, MU, S2, v_channels=False), noise, 7, spacing="logsnr")
    assert torch.equal(out, eps_only)
    one = solver(SCHEDULE, exact, noise, 1, spacing="logsnr")  # one evaluation: x_theta at t = 999
    a, sg = SCHEDULE.alpha(999.0), SCHEDULE.sigma(999.0)
    torch.testing.assert_close(one, MU + a * S2 / (a * a * S2 + sg * sg) * (noise - a * MU), rtol=0, atol=1e-12)


def test_float32_inputs_and_bad_model_output():
    noise = _noise(3).float()

    def denoise(x, t):
        assert t.dtype == torch.float32
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    out = dpm_solver_pp_2m(SCHEDULE, denoise, noise, 4)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="expected 2 .eps. or 4"):
        unipc(SCHEDULE, lambda x, t: torch.zeros(x.shape[0], 3, *x.shape[2:]), noise, 3)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        unipc(SCHEDULE, denoise, noise, 3, order=4)


def test_schedule_matches_the_chain_and_inverts_lambda():
    ab = create_diffusion("").alphas_cumprod
    for s in (0, 1, 500, 999):
        assert SCHEDULE.alpha(float(s)) ** 2 == pytest.approx(ab[s], rel=1e-13)
        assert SCHEDULE.alpha(float(s)) ** 2 + SCHEDULE.sigma(float(s)) ** 2 == pytest.approx(1.0, rel=1e-13)
    # between integer steps log alpha is linear in s
    assert math.log(SCHEDULE.alpha(10.25)) == pytest.approx(0.75 * 0.5 * math.log(ab[10]) + 0.25 * 0.5 * math.log(ab[11]), rel=1e-13)
    for s in (0.0, 0.3, 17.6, 998.9, 999.0):
        assert SCHEDULE.s_of_lam(SCHEDULE.lam(s)) == pytest.approx(s, abs=1e-8)
    lams = [SCHEDULE.lam(s) for s in range(1000)]
    assert all(b < a for a, b in zip(lams, lams[1:]))  # lambda falls as the noise grows


@pytest.mark.parametrize("steps", [2, 5, 20])
def test_time_grids(steps):
    for spacing in ("time", "logsnr"):
        grid = SCHEDULE.time_grid(steps, spacing)
        assert len(grid) == steps and grid[0] == 999.0 and grid[-1] == 0.0
        assert all(b < a for a, b in zip(grid, grid[1:]))
    time = np.diff(SCHEDULE.time_grid(steps, "time"))
    np.testing.assert_allclose(time, -999.0 / (steps - 1), rtol=1e-12)
    lam = np.diff([SCHEDULE.lam(s) for s in SCHEDULE.time_grid(steps, "logsnr")])
    np.testing.assert_allclose(lam, lam[0], rtol=1e-9)
    assert SCHEDULE.time_grid(1, "time") == [999.0]
    with pytest.raises(ValueError, match="unknown time spacing"):
        SCHEDULE.time_grid(5, "karras")
    with pytest.raises(ValueError, match="positive integer"):
        SCHEDULE.time_grid(0, "time")


def test_phi_functions():
    for z in (-3.0, -0.7, -0.3, -1e-4, 0.2, 2.0):
        assert phi(1, z) == pytest.approx(math.expm1(z) / z, rel=1e-12)
        assert phi(2, z) == pytest.approx((math.expm1(z) - z) / z**2, rel=1e-8)
        assert phi(3, z) == pytest.approx((math.expm1(z) - z - z * z / 2) / z**3, rel=1e-5)
    assert phi(3, 0.0) == pytest.approx(1 / 6)


# -- SDE-DPM-Solver++(2M): the reverse SDE, so its samples are checked in distribution ------------


def test_sde_solver_first_step_is_the_ddpm_posterior_step():
    # SDE-DPM-Solver++(1) from s to t draws from q(x_t | x_s, x_0 = x_theta) (Ho et al. 2020, eq. 7):
    # mean (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) x_theta, variance sigma_t^2 (1 - e^{-2h}).
    # DDPM respaced to the two timesteps {999, 0} with v = -1 (the posterior variance) takes the same step.
    g = torch.Generator().manual_seed(6)
    w = torch.randn(2, 2, generator=g, dtype=F64)

    def denoise(x, t):  # any smooth model, with v = -1: DDPM's variance is the posterior's
        eps = torch.tanh(torch.einsum("ij,njhw->nihw", w, x)) * (1 + t.to(F64).view(-1, 1, 1, 1) / 1000.0)
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    noise = _noise(4)
    ddpm = ddpm_sample(create_diffusion("2"), denoise, noise, generator=torch.Generator().manual_seed(9))
    sde = dpm_solver_pp_2m_sde(SCHEDULE, denoise, noise, 2, spacing="time", generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(sde, ddpm, rtol=1e-9, atol=1e-9)


def test_sde_solver_samples_the_data_distribution():
    # For N(mu, s2) data the output E[x_0 | x(0)] has mean mu and variance alpha_0^2 s2^2 / V_0 when
    # x(0) has the exact marginal: the error of the variance is large for 5 steps and within the
    # Monte-Carlo error (64,000 draws a channel: 0.56% relative std) for 80 and 160.
    noise = torch.randn(4000, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    a0, s0 = SCHEDULE.alpha(0.0), SCHEDULE.sigma(0.0)
    target_var = (a0**2 * S2**2 / (a0**2 * S2 + s0**2)).flatten()
    rel_var_error = {}
    for m in (5, 80, 160):
        x = dpm_solver_pp_2m_sde(SCHEDULE, gaussian_denoiser(SCHEDULE, MU, S2), noise, m, spacing="logsnr",
                                 generator=torch.Generator().manual_seed(1))
        assert (x.mean(dim=(0, 2, 3)) - MU.flatten()).abs().max() < 0.012
        rel_var_error[m] = (x.var(dim=(0, 2, 3)) / target_var - 1).abs().max().item()
    assert rel_var_error[5] > 0.2 and rel_var_error[80] < 0.025 and rel_var_error[160] < 0.025, rel_var_error


def test_sde_solver_noise_comes_from_the_generator():
    exact = gaussian_denoiser(SCHEDULE, MU, S2)
    noise = _noise(5)
    run = [dpm_solver_pp_2m_sde(SCHEDULE, exact, noise, 6, generator=torch.Generator().manual_seed(k)) for k in (3, 3, 4)]
    assert torch.equal(run[0], run[1]) and not torch.allclose(run[0], run[2])
