"""Flow matching (flow/): paths, training times, losses and solvers against closed forms.

The Gaussian case: data x0 ~ N(mu, s0^2) (per element) on the path x_t = a x0 + b eps has
Gaussian marginals N(m, S^2), m = a mu, S^2 = a^2 s0^2 + b^2, and the exact marginal velocity
v(x, t) = m' + (S'/S)(x - m); the flow maps the noise z at t = 1 to mu + s0 z at t = 0 exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from ditforge.flow import FlowObjective, FlowSampler, Path
from ditforge.flow.solvers import ab2, euler, euler_maruyama, heun
from ditforge.flow.timesteps import logit_normal_cdf, sample_times, shift_times

MU, S0 = 0.7, 0.3


def gaussian_velocity(path: Path, x: torch.Tensor, t: float) -> torch.Tensor:
    tt = torch.tensor(t, dtype=torch.float64)
    a, b, da, db = path.coefficients(tt)
    s2 = a * a * S0**2 + b * b
    ds2 = 2 * a * da * S0**2 + 2 * b * db
    return da * MU + (ds2 / (2 * s2)) * (x - a * MU)  # m' + (S'/S)(x - m)


@pytest.mark.parametrize("name", ["linear", "gvp"])
def test_path_endpoints_derivatives_and_conversions(name):
    path = Path(name)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=torch.float64)
    xt = path.interpolate(x0, eps, t)
    assert torch.equal(xt[0], x0[0]) and torch.allclose(xt[3], eps[3], atol=1e-15)
    # velocity = d x_t / dt by central differences
    h = 1e-6
    tm = torch.tensor([0.3, 0.5, 0.6, 0.9], dtype=torch.float64)
    fd = (path.interpolate(x0, eps, tm + h) - path.interpolate(x0, eps, tm - h)) / (2 * h)
    v = path.velocity(x0, eps, tm)
    assert torch.allclose(v, fd, atol=1e-8)
    x = path.interpolate(x0, eps, tm)
    assert torch.allclose(path.noise_from_velocity(v, x, tm), eps, atol=1e-12)
    assert torch.allclose(path.velocity_from_noise(eps, x, tm), v, atol=1e-12)
    assert torch.allclose(path.noise_from_score(path.score_from_noise(eps, tm), tm), eps, atol=1e-12)
    if name == "linear":
        assert torch.allclose(v, eps - x0)
    else:
        a, b, _, _ = path.coefficients(tm)
        assert torch.allclose(a * a + b * b, torch.ones_like(tm))


def test_sit_convention():
    """SiT (transport/path.py, ICPlan): x_s = s x1 + (1 - s) x0 with x1 data, x0 noise; the network
    sees s and is trained towards u = x1 - x0. Ours at t = 1 - s must be the same."""
    obj = FlowObjective()
    g = torch.Generator().manual_seed(1)
    data, noise = torch.randn(5, 1, 2, 2, generator=g), torch.randn(5, 1, 2, 2, generator=g)
    s = torch.rand(5, generator=g)
    t = 1 - s
    sit_x = s.view(-1, 1, 1, 1) * data + (1 - s.view(-1, 1, 1, 1)) * noise
    assert torch.allclose(obj.interpolant.interpolate(data, noise, t), sit_x, atol=1e-6)
    assert torch.allclose(obj.network_time(t), s)
    assert torch.allclose(obj.target(data, noise, t), data - noise)


@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_oracle_has_zero_loss_and_its_velocity_is_the_paths(prediction, path):
    """A network that outputs exactly what the loss asks for has loss 0, and ``velocity`` turns that
    output into dx_t/dt of the path, whatever is predicted."""
    obj = FlowObjective(path=path, prediction=prediction)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    t = obj.sample_time(6, g, torch.device("cpu")).double()
    path_ = obj.interpolant
    want = {"velocity": -path_.velocity(x0, eps, t), "noise": eps, "score": path_.score_from_noise(eps, t)}[prediction]

    def oracle(x, s, y):
        assert torch.allclose(s, 1 - t)
        return torch.cat([want, torch.full_like(want, 123.0)], dim=1)  # learned-sigma channels are ignored

    losses = obj.training_losses(oracle, x0, t, torch.zeros(6, dtype=torch.long), eps)
    assert losses["loss"].shape == (6,) and torch.allclose(losses["loss"], torch.zeros(6, dtype=torch.float64), atol=1e-20)
    x = path_.interpolate(x0, eps, t)
    assert torch.allclose(obj.velocity(want, x, t), path_.velocity(x0, eps, t), atol=1e-9)


def test_loss_is_the_mse_to_the_target():
    obj = FlowObjective()
    x0, eps = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    losses = obj.training_losses(lambda x, s, y: torch.zeros_like(x), x0, torch.tensor([0.5, 0.5]), torch.zeros(2, dtype=torch.long), eps)
    assert torch.allclose(losses["loss"], torch.ones(2))  # target x0 - eps = -1 everywhere


def test_cosine_loss_is_one_minus_the_per_pixel_cosine_over_channels():
    """LightningDiT's direction term on 2-channel pixels with known angles to the target x0 - eps."""
    obj = FlowObjective(cosine_weight=0.5)
    x0 = torch.zeros(1, 2, 1, 3, dtype=torch.float64)
    eps = torch.zeros_like(x0)
    eps[:, 0] = -1.0  # target u = x0 - eps = (1, 0) at each of the 3 pixels
    out = torch.tensor([[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0]], dtype=torch.float64).T.reshape(1, 2, 1, 3)  # 0, 90, 180 deg
    losses = obj.training_losses(lambda x, s, y: out, x0, torch.tensor([0.5], dtype=torch.float64), torch.zeros(1, dtype=torch.long), eps)
    cosine = ((1 - 1) + (1 - 0) + (1 + 1)) / 3  # 1 - cos per pixel, averaged
    mse = ((3 - 1) ** 2 + 1 + 4 + (-1 - 1) ** 2 + 0) / 6  # over channels and pixels
    assert losses["cosine"].item() == pytest.approx(cosine) and losses["mse"].item() == pytest.approx(mse)
    assert losses["loss"].item() == pytest.approx(mse + 0.5 * cosine)
    with pytest.raises(ValueError, match="needs prediction 'velocity', not 'noise'"):
        FlowObjective(cosine_weight=1.0, prediction="noise")


@pytest.mark.parametrize("path", ["linear", "gvp"])
@pytest.mark.parametrize("solver,order", [(euler, 1), (heun, 2), (ab2, 2)])
def test_ode_solvers_converge_at_their_order_on_a_gaussian(path, solver, order):
    p = Path(path)
    z = torch.linspace(-2, 2, 9, dtype=torch.float64).view(9, 1, 1, 1)
    exact = MU + S0 * z

    def error(steps: int) -> float:
        grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        out = solver(lambda x, t: gaussian_velocity(p, x, t), z.clone(), grid)
        return float((out - exact).abs().max())

    errors = [error(n) for n in (16, 32, 64)]
    assert errors[-1] < (0.02 if order == 1 else 3e-3)
    for coarse, fine in zip(errors, errors[1:]):
        assert 2**order * 0.8 < coarse / fine < 2**order * 1.25, errors


def test_euler_maruyama_samples_the_gaussian():
    """SiT's SDE with the exact score keeps the marginals: 20,000 paths end at N(mu, s0^2)."""
    p = Path("linear")

    def score(x, v, t):
        tt = torch.full((x.shape[0],), t, dtype=x.dtype)
        return p.score_from_noise(p.noise_from_velocity(v, x, tt), tt)

    def w(t):
        return float(p.coefficients(torch.tensor(t, dtype=torch.float64))[1])

    g = torch.Generator().manual_seed(3)
    x = torch.randn(20_000, 1, 1, 1, generator=g, dtype=torch.float64)
    grid = torch.linspace(1, 0.04, 200, dtype=torch.float64)
    out = euler_maruyama(lambda x, t: gaussian_velocity(p, x, t), score, w, x, grid, g, last_step=0.04)
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() - S0) < 0.01


def test_logit_normal_and_shift_match_their_distribution_functions():
    g = torch.Generator().manual_seed(4)
    for mean, std, shift in [(0.0, 1.0, 1.0), (-0.5, 0.8, 1.0), (0.0, 1.0, 3.0)]:
        t = sample_times(40_000, "logit-normal", g, torch.device("cpu"), mean=mean, std=std, shift=shift).double()
        grid = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
        empirical = (t[None, :] <= grid[:, None]).double().mean(1)
        ks = (empirical - logit_normal_cdf(grid, mean, std, shift)).abs().max().item()
        assert ks < 0.01, (mean, std, shift, ks)
    # the density of the unshifted logit-normal (SD3 eq. 19) is the derivative of that CDF
    u = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64)
    density = torch.exp(-torch.logit(u) ** 2 / 2) / (math.sqrt(2 * math.pi) * u * (1 - u))
    h = 1e-6
    assert torch.allclose((logit_normal_cdf(u + h) - logit_normal_cdf(u - h)) / (2 * h), density, atol=1e-6)
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.allclose(shift_times(t, 3.0), torch.tensor([0.0, 0.5, 1.0]))


def test_uniform_times_and_eps():
    g = torch.Generator().manual_seed(5)
    t = FlowObjective(prediction="noise").sample_time(10_000, g, torch.device("cpu"))
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3 and abs(t.mean().item() - 0.5) < 0.01
    assert FlowObjective().time_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("field,value", [("path", "cosine"), ("prediction", "x0"), ("time_distribution", "beta"), ("time_std", 0), ("time_shift", -1),
                                         ("cosine_weight", -0.5)])
def test_bad_settings_are_named(field, value):
    with pytest.raises(ValueError) as err:
        FlowObjective(**{field: value})
    assert repr(value) in str(err.value)


def test_flow_sampler_counts_evaluations_and_uses_sit_time():
    calls = []

    def denoise(x, s):
        calls.append(float(s[0]))
        return torch.zeros_like(x)

    x = torch.randn(2, 1, 2, 2)
    for name, nfe in [("euler", 4), ("heun", 8), ("ab2", 4), ("sde", 4)]:
        calls.clear()
        sampler = FlowSampler(name, 4)
        assert sampler.nfe == nfe
        sampler(denoise, x, generator=torch.Generator().manual_seed(0))
        assert len(calls) == nfe and calls[0] == 0.0  # the network starts at SiT's s = 0 (noise)
    assert FlowSampler("euler", 4).guidance_times((0.2, 0.6)) == pytest.approx((0.4, 0.8))
