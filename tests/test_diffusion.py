"""GaussianDiffusion math against closed forms, in float64."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from ditforge.diffusion import GaussianDiffusion, create_diffusion
from ditforge.diffusion.gaussian import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from ditforge.diffusion.schedules import beta_schedule

F64 = torch.float64


def _alpha_bar(betas):
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def _bayes_posterior(betas, t, x0, x_t):
    """q(x_{t-1} | x_t, x0) from the product of q(x_{t-1} | x0) and q(x_t | x_{t-1}).

    prior     x_{t-1} ~ N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1})
    likelihood x_t | x_{t-1} ~ N(sqrt(a_t) x_{t-1}, b_t), i.e. in x_{t-1}: mean x_t / sqrt(a_t),
               precision a_t / b_t.
    """
    ab = _alpha_bar(betas)
    ab_prev = ab[t - 1]
    a_t, b_t = 1.0 - betas[t], betas[t]
    prec = 1.0 / (1.0 - ab_prev) + a_t / b_t
    var = 1.0 / prec
    mean = var * (math.sqrt(ab_prev) * x0 / (1.0 - ab_prev) + math.sqrt(a_t) * x_t / b_t)
    return mean, var


# --------------------------------------------------------------------------- helpers


def test_mean_flat():
    x = torch.arange(24, dtype=F64).reshape(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), torch.tensor([5.5, 17.5], dtype=F64))


def test_normal_kl_scalar_closed_form():
    m1, s1, m2, s2 = 0.3, 0.7, -0.4, 1.9
    expected = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    got = normal_kl(m1, 2 * math.log(s1), m2, 2 * math.log(s2))
    assert got.dtype == F64
    assert got.item() == pytest.approx(expected, rel=1e-12)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.tensor(m1, dtype=F64), torch.tensor(s1, dtype=F64)),
        torch.distributions.Normal(torch.tensor(m2, dtype=F64), torch.tensor(s2, dtype=F64)),
    )
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)


def test_normal_kl_monte_carlo():
    m1, s1, m2, s2 = 1.0, 0.5, 0.2, 0.8
    rng = np.random.default_rng(0)
    x = rng.normal(m1, s1, size=400_000)
    log_ratio = stats.norm.logpdf(x, m1, s1) - stats.norm.logpdf(x, m2, s2)
    mc, se = log_ratio.mean(), log_ratio.std() / math.sqrt(len(x))
    got = normal_kl(
        torch.tensor(m1, dtype=F64), math.log(s1**2), torch.tensor(m2, dtype=F64), math.log(s2**2)
    ).item()
    assert abs(got - mc) < 5 * se


def test_normal_kl_self_is_zero_and_elementwise():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, generator=g, dtype=F64)
    logvar = torch.randn(3, 4, generator=g, dtype=F64)
    kl = normal_kl(mean, logvar, mean, logvar)
    assert kl.shape == (3, 4)
    torch.testing.assert_close(kl, torch.zeros_like(kl), atol=1e-15, rtol=0)
    assert (normal_kl(mean, logvar, mean + 0.1, logvar) > 0).all()


def test_approx_cdf_close_to_exact():
    x = torch.linspace(-6, 6, 2001, dtype=F64)
    err = (approx_standard_normal_cdf(x) - torch.from_numpy(stats.norm.cdf(x.numpy()))).abs()
    assert err.max() < 3e-4


def _grid():
    return torch.tensor(-1.0 + 2.0 * np.arange(256) / 255.0, dtype=F64)  # the 256 data values


@pytest.mark.parametrize("mean, scale", [(0.0, 0.1), (0.37, 0.02), (-0.9, 0.3), (0.95, 0.05)])
def test_discretized_loglik_against_scipy(mean, scale):
    x = _grid()
    means = torch.full_like(x, mean)
    log_scales = torch.full_like(x, math.log(scale))
    got = discretized_gaussian_log_likelihood(x, means, log_scales).exp().numpy()

    xs = x.numpy()
    upper = stats.norm.cdf(xs + 1 / 255, loc=mean, scale=scale)
    lower = stats.norm.cdf(xs - 1 / 255, loc=mean, scale=scale)
    ref = upper - lower
    ref[0] = stats.norm.cdf(xs[0] + 1 / 255, loc=mean, scale=scale)  # edge bin (-inf, -1 + 1/255]
    ref[-1] = stats.norm.sf(xs[-1] - 1 / 255, loc=mean, scale=scale)  # edge bin [1 - 1/255, inf)

    # tanh CDF approximation: absolute errors of a few 1e-4 per CDF evaluation
    np.testing.assert_allclose(got, ref, atol=5e-4)
    big = ref > 0.01
    np.testing.assert_allclose(got[big], ref[big], rtol=0.03)
    # the two edge bins specifically
    np.testing.assert_allclose(got[[0, -1]], ref[[0, -1]], atol=5e-4)
    # a proper distribution over the 256 bins
    assert got.sum() == pytest.approx(1.0, abs=1e-6)


def test_discretized_loglik_edge_bins_take_the_tails():
    # mean far below -1: nearly all mass sits in the left edge bin, none in the right one
    x = torch.tensor([-1.0, 1.0], dtype=F64)
    means = torch.full_like(x, -3.0)
    log_scales = torch.full_like(x, math.log(0.5))
    ll = discretized_gaussian_log_likelihood(x, means, log_scales)
    assert ll[0].item() == pytest.approx(0.0, abs=1e-4)
    assert ll[1].item() == pytest.approx(math.log(1e-12), rel=1e-6)  # floored


def test_discretized_loglik_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        discretized_gaussian_log_likelihood(torch.zeros(2), torch.zeros(3), torch.zeros(2))


# --------------------------------------------------------------------------- coefficients


def test_coefficients_precomputed_in_float64():
    d = create_diffusion("")
    betas = beta_schedule("linear", 1000)
    ab = _alpha_bar(betas)
    assert d.num_timesteps == 1000
    assert d.alphas_cumprod.dtype == np.float64
    np.testing.assert_allclose(d.alphas_cumprod, ab, rtol=1e-14)
    np.testing.assert_allclose(d.alphas_cumprod_prev, np.append(1.0, ab[:-1]), rtol=1e-14)
    np.testing.assert_allclose(d.sqrt_recip_alphas_cumprod, 1 / np.sqrt(ab), rtol=1e-14)
    np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / ab - 1), rtol=1e-12)
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    np.testing.assert_allclose(np.exp(d.posterior_log_variance_clipped[1:]), d.posterior_variance[1:])
    torch.testing.assert_close(d.timestep_map, torch.arange(1000))


def test_extract_casts_to_input_dtype():
    d = create_diffusion("")
    t = torch.tensor([0, 999])
    x = torch.zeros(2, 3, 4, 4, dtype=F64)
    c = d._extract(d.alphas_cumprod, t, x)
    assert c.dtype == F64 and c.shape == (2, 1, 1, 1)
    assert c[1].item() == d.alphas_cumprod[999]  # exact, no float32 round trip
    c32 = d._extract(d.alphas_cumprod, t, x.float())
    assert c32.dtype == torch.float32


def test_create_diffusion_respaced():
    d = create_diffusion("ddim50")
    full = create_diffusion("")
    assert d.num_timesteps == 50
    torch.testing.assert_close(d.timestep_map, torch.arange(0, 1000, 20))
    np.testing.assert_allclose(d.alphas_cumprod, full.alphas_cumprod[::20], rtol=1e-12)
    with pytest.raises(ValueError, match="sigmoid"):
        create_diffusion("", noise_schedule="sigmoid")


# --------------------------------------------------------------------------- forward process


def test_q_sample_statistics():
    d = create_diffusion("")
    g = torch.Generator().manual_seed(1)
    n = 20_000
    x0 = torch.tensor([0.8, -0.3, 0.0], dtype=F64).reshape(1, 3, 1, 1).expand(n, 3, 1, 1)
    for step in [0, 300, 999]:
        ab = _alpha_bar(d.betas)[step]
        t = torch.full((n,), step, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=g, dtype=F64)
        x_t = d.q_sample(x0, t, noise)
        mean = x_t.mean(0).flatten()
        var = x_t.var(0).flatten()
        expected_mean = math.sqrt(ab) * x0[0].flatten()
        tol_mean = 5 * math.sqrt((1 - ab) / n)
        assert (mean - expected_mean).abs().max() < tol_mean
        np.testing.assert_allclose(var.numpy(), 1 - ab, rtol=5 * math.sqrt(2 / n))
        # and pointwise against Ho eq. 4 computed here
        torch.testing.assert_close(x_t, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_posterior_matches_bayes_rule(schedule):
    d = create_diffusion("", noise_schedule=schedule)
    betas = beta_schedule(schedule, 1000)
    g = torch.Generator().manual_seed(2)
    steps = [1, 2, 10, 500, 998, 999]
    x0 = torch.randn(len(steps), 2, 3, 3, generator=g, dtype=F64)
    x_t = torch.randn(len(steps), 2, 3, 3, generator=g, dtype=F64)
    t = torch.tensor(steps)
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, t)
    for i, step in enumerate(steps):
        ref_mean, ref_var = _bayes_posterior(betas, step, x0[i], x_t[i])
        torch.testing.assert_close(mean[i], ref_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(var[i], torch.full_like(var[i], ref_var), rtol=1e-10, atol=0)
        torch.testing.assert_close(log_var[i], torch.full_like(var[i], math.log(ref_var)), rtol=1e-10, atol=0)


def test_q_posterior_at_t0_is_the_data():
    d = create_diffusion("")
    x0 = torch.randn(2, 1, 2, 2, dtype=F64)
    x_t = torch.randn(2, 1, 2, 2, dtype=F64)
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)
    assert (var == 0).all()
    # clipped log variance borrows beta~_1 (ADM)
    torch.testing.assert_close(log_var, torch.full_like(x0, math.log(d.posterior_variance[1])))


# --------------------------------------------------------------------------- p(x_{t-1} | x_t)


def test_p_mean_variance_learned_range_and_fixed():
    d = create_diffusion("")
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 5, 900])
    betas = beta_schedule("linear", 1000)
    ab = _alpha_bar(betas)
    post_var = betas * (1 - np.append(1.0, ab[:-1])) / (1 - ab)  # beta~_t (Ho eq. 7)
    for v_value, frac in [(-1.0, 0.0), (1.0, 1.0), (0.0, 0.5)]:
        out = d.p_mean_variance(torch.cat([eps, torch.full_like(eps, v_value)], 1), x_t, t)
        for i, step in enumerate(t.tolist()):
            lo = math.log(post_var[max(step, 1)])
            hi = math.log(betas[step])
            expected = frac * hi + (1 - frac) * lo
            torch.testing.assert_close(out["log_variance"][i], torch.full_like(eps[i], expected))
            x0_hat = (x_t[i] - math.sqrt(1 - ab[step]) * eps[i]) / math.sqrt(ab[step])
            torch.testing.assert_close(out["pred_xstart"][i], x0_hat)
            if step > 0:
                ref_mean, _ = _bayes_posterior(betas, step, x0_hat, x_t[i])
            else:
                ref_mean = x0_hat
            torch.testing.assert_close(out["mean"][i], ref_mean)
        torch.testing.assert_close(out["eps"], eps)

    d_fixed = create_diffusion("", learn_sigma=False)
    out = d_fixed.p_mean_variance(eps, x_t, t)
    expected_var = [post_var[1], betas[5], betas[900]]  # fixedlarge, beta_0 := beta~_1
    for i in range(3):
        torch.testing.assert_close(out["variance"][i], torch.full_like(eps[i], expected_var[i]))

    clipped = d_fixed.p_mean_variance(eps * 50, x_t, t, clip_denoised=True)
    assert clipped["pred_xstart"].abs().max() <= 1.0

    with pytest.raises(ValueError, match="expected"):
        d.p_mean_variance(eps, x_t, t)  # learn_sigma needs 2C channels


# --------------------------------------------------------------------------- training losses


class SplitModel(nn.Module):
    """Tiny conditional model whose eps and v channels come from separate parameters."""

    def __init__(self, channels: int, num_classes: int = 5):
        super().__init__()
        self.eps_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.v_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.class_emb = nn.Embedding(num_classes, channels)
        self.seen_t = None

    def forward(self, x, t, y):
        self.seen_t = t.clone()
        time = (t.to(x.dtype) / 1000.0).view(-1, 1, 1, 1)
        eps = self.eps_conv(x) + self.class_emb(y)[:, :, None, None] + time
        v = torch.tanh(self.v_conv(x))
        return torch.cat([eps, v], dim=1)

    def eps_params(self):
        return list(self.eps_conv.parameters()) + list(self.class_emb.parameters())

    def v_params(self):
        return list(self.v_conv.parameters())


def _grads(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _batch(seed, n=4, c=3, hw=4):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.randint(0, 256, (n, c, hw, hw), generator=g).to(F64) / 127.5 - 1.0)  # on the 256-bin grid
    noise = torch.randn(n, c, hw, hw, generator=g, dtype=F64)
    y = torch.randint(0, 5, (n,), generator=g)
    return x0, noise, y


def test_training_losses_vb_gradient_reaches_only_v():
    torch.manual_seed(0)
    d = create_diffusion("")
    model = SplitModel(3).double()
    x0, noise, y = _batch(4)
    t = torch.tensor([0, 3, 400, 999])
    terms = d.training_losses(model, x0, t, y, noise=noise)
    assert set(terms) == {"mse", "vb", "loss"}
    for k in terms:
        assert terms[k].shape == (4,)

    vb_eps = _grads(terms["vb"].sum(), model.eps_params())
    vb_v = _grads(terms["vb"].sum(), model.v_params())
    mse_v = _grads(terms["mse"].sum(), model.v_params())
    mse_eps = _grads(terms["mse"].sum(), model.eps_params())
    assert all((g == 0).all() for g in vb_eps)
    assert any((g != 0).any() for g in vb_v)
    assert all((g == 0).all() for g in mse_v)
    assert any((g != 0).any() for g in mse_eps)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_training_losses_mse_and_vb_by_hand():
    torch.manual_seed(0)
    d = create_diffusion("")
    model = SplitModel(3).double()
    x0, noise, y = _batch(5)
    steps = [0, 1, 250, 999]
    t = torch.tensor(steps)
    terms = d.training_losses(model, x0, t, y, noise=noise)

    betas = beta_schedule("linear", 1000)
    ab = _alpha_bar(betas)
    post_var = betas * (1 - np.append(1.0, ab[:-1])) / (1 - ab)  # beta~_t (Ho eq. 7)
    sab = torch.tensor(np.sqrt(ab[steps])).view(-1, 1, 1, 1)
    x_t = sab * x0 + torch.sqrt(1 - sab**2) * noise
    with torch.no_grad():
        out = model(x_t, t, y)
    eps, v = out[:, :3], out[:, 3:]
    torch.testing.assert_close(terms["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)))

    for i, step in enumerate(steps):
        x0_hat = (x_t[i] - math.sqrt(1 - ab[step]) * eps[i]) / math.sqrt(ab[step])
        frac = (v[i] + 1) / 2
        log_var = frac * math.log(betas[step]) + (1 - frac) * math.log(post_var[max(step, 1)])
        if step == 0:
            # decoder NLL (Ho eq. 13): at t = 0 the mean is x0_hat itself (coef1 = 1, coef2 = 0).
            # (The discretised likelihood is checked against scipy on its own; here the random
            # model puts many pixels deep in the tails, where the tanh CDF is not accurate.)
            exact = -discretized_gaussian_log_likelihood(x0[i], x0_hat, 0.5 * log_var).mean() / math.log(2)
            assert terms["vb"][i].item() == pytest.approx(exact.item(), rel=1e-10)
        else:
            true_mean, true_var = _bayes_posterior(betas, step, x0[i], x_t[i])
            p_mean, _ = _bayes_posterior(betas, step, x0_hat, x_t[i])
            p_var = torch.exp(log_var)
            kl = 0.5 * (torch.log(p_var / true_var) + (true_var + (true_mean - p_mean) ** 2) / p_var - 1)
            assert terms["vb"][i].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-8)


def test_training_losses_respaced_calls_model_with_original_t_and_rescales_vb():
    torch.manual_seed(0)
    full = create_diffusion("")
    d = create_diffusion("ddim100")  # stride 10
    model = SplitModel(3).double()
    x0, noise, y = _batch(6)
    t = torch.tensor([0, 1, 50, 99])
    terms = d.training_losses(model, x0, t, y, noise=noise)
    torch.testing.assert_close(model.seen_t, torch.tensor([0, 10, 500, 990]))
    # the VB term is multiplied by T / 1000 = 0.1 (ADM's RESCALED_MSE)
    with torch.no_grad():
        out = model(d.q_sample(x0, t, noise), model.seen_t, y)
    raw = d.vb_terms_bpd(out, x0, d.q_sample(x0, t, noise), t)
    torch.testing.assert_close(terms["vb"], 0.1 * raw)
    # the forward process at kept steps is the full chain's
    torch.testing.assert_close(d.q_sample(x0, t, noise), full.q_sample(x0, model.seen_t, noise))


def test_training_losses_fixed_sigma_is_mse_only():
    d = create_diffusion("", learn_sigma=False)
    conv = nn.Conv2d(3, 3, 1).double()
    x0, noise, y = _batch(7)
    t = torch.tensor([0, 10, 20, 30])
    terms = d.training_losses(lambda x, tt, yy: conv(x), x0, t, y, noise=noise)
    assert set(terms) == {"mse", "loss"}
    torch.testing.assert_close(terms["loss"], terms["mse"])


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="timestep_map"):
        GaussianDiffusion(np.full(10, 0.01), timestep_map=[0, 1])
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(np.array([0.0, 0.1]))


def test_low_precision_model_output_is_upcast_for_the_loss():
    # e.g. a model run under autocast returns bfloat16; the loss math stays in x0's dtype
    d = create_diffusion("")
    conv = nn.Conv2d(3, 6, 1)
    x0, noise, y = _batch(8)
    x0, noise = x0.float(), noise.float()
    t = torch.tensor([0, 10, 500, 999])
    terms = d.training_losses(lambda x, tt, yy: conv(x).bfloat16(), x0, t, y, noise=noise)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in terms.values())
    terms["loss"].sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
