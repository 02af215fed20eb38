"""DDPM / DDIM samplers with exact (oracle) denoisers, and classifier-free guidance."""

import math

import numpy as np
import pytest
import torch

from ditforge.diffusion import create_diffusion, ddim_sample, ddpm_sample, guided_denoiser
from ditforge.diffusion.schedules import beta_schedule, space_timesteps

F64 = torch.float64


def _ab_original():
    """alpha_bar of the original 1000-step linear chain, indexed by ORIGINAL timestep."""
    return torch.from_numpy(create_diffusion("").alphas_cumprod)  # (1000,)


def point_oracle(x0):
    """Exact eps for a data distribution concentrated on the single point x0."""
    ab_all = _ab_original()

    def denoise(x_t, t_model):
        ab = ab_all[t_model].view(-1, 1, 1, 1).to(x_t.dtype)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)  # v = 0

    return denoise


@pytest.mark.parametrize("spacing", ["50", "ddim50"])
def test_point_oracle_recovers_x0(spacing):
    d = create_diffusion(spacing)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 4, 8, 8, generator=g, dtype=F64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    seen = []
    oracle = point_oracle(x0)

    def recording(x_t, t_model):
        seen.append(int(t_model[0]))
        return oracle(x_t, t_model)

    out = ddpm_sample(d, recording, noise, generator=torch.Generator().manual_seed(1))
    assert out.dtype == F64 and out.shape == x0.shape
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)
    # the model saw the original timesteps, from the last kept one down to 0
    assert seen == d.timestep_map.flip(0).tolist()
    assert len(seen) == d.num_timesteps and seen[0] > 900 and seen[-1] == 0

    for eta in (0.0, 1.0):
        out = ddim_sample(d, oracle, noise, eta=eta, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


def gaussian_oracle(diffusion, mu, s2):
    """Exact eps AND exact reverse variance for data x0 ~ N(mu, s2) per channel.

    Everything is jointly Gaussian, so with a = alpha_bar(t_model):
        E[x0 | x_t] = mu + sqrt(a) s2 / (a s2 + 1 - a) (x_t - sqrt(a) mu)
        Var[x0 | x_t] = s2 (1 - a) / (a s2 + 1 - a)
    and the true reverse step q(x_{t-1} | x_t) of the (respaced) chain is Gaussian with
        mean = coef1 E[x0 | x_t] + coef2 x_t,   variance = beta~_t + coef1^2 Var[x0 | x_t].
    That variance lies in [beta~_t, beta_t] when s2 <= 1, so v can express it exactly.
    """
    ab_all = _ab_original()
    index_of = {int(o): i for i, o in enumerate(diffusion.timestep_map)}
    betas = torch.from_numpy(diffusion.betas)
    ab_chain = torch.from_numpy(np.cumprod(1 - diffusion.betas))
    ab_prev = torch.cat([torch.ones(1, dtype=F64), ab_chain[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab_chain)
    coef1 = betas * ab_prev.sqrt() / (1 - ab_chain)

    def denoise(x_t, t_model):
        a = ab_all[t_model].view(-1, 1, 1, 1)
        var_xt = a * s2 + 1 - a
        ex0 = mu + a.sqrt() * s2 / var_xt * (x_t - a.sqrt() * mu)
        eps = (x_t - a.sqrt() * ex0) / (1 - a).sqrt()
        i = index_of[int(t_model[0])]
        if i == 0:  # the last step adds no noise; its variance is unused
            v = torch.zeros_like(eps)
        else:
            true_var = post_var[i] + coef1[i] ** 2 * s2 * (1 - a) / var_xt
            lo, hi = math.log(post_var[i]), math.log(betas[i])
            frac = (true_var.log() - lo) / (hi - lo)
            assert ((frac >= 0) & (frac <= 1)).all()
            v = (2 * frac - 1).expand_as(eps)
        return torch.cat([eps, v], dim=1)

    return denoise


def test_ddpm_samples_gaussian_data_exactly():
    d = create_diffusion("50")
    mu = torch.tensor([0.3, -0.5], dtype=F64).view(1, 2, 1, 1)
    s2 = torch.tensor([0.25, 0.6], dtype=F64).view(1, 2, 1, 1)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(64, 2, 16, 16, generator=g, dtype=F64)
    out = ddpm_sample(d, gaussian_oracle(d, mu, s2), noise, generator=g)
    n = out.shape[0] * 16 * 16
    # the final step returns E[x0 | x_0-index], whose variance is s2 minus the tiny Var[x0 | x]
    a0 = d.alphas_cumprod[0]
    expected_var = s2 - s2 * (1 - a0) / (a0 * s2 + 1 - a0)
    for c in range(2):
        vals = out[:, c].flatten()
        assert abs(vals.mean() - mu.flatten()[c]) < 5 * math.sqrt(s2.flatten()[c] / n)
        assert vals.var().item() == pytest.approx(expected_var.flatten()[c].item(), rel=5 * math.sqrt(2 / n))


def _ddim_affine_map(use_timesteps, mu, s2):
    """DDIM (eta = 0) with the exact E[x0 | x_t] of N(mu, s2) data is affine: x_out = A z + B.

    Derived here by pushing (A, B) through Song et al. eq. 12 step by step, with
    alpha_bar from the original chain at the kept timesteps.
    """
    ab = np.cumprod(1 - beta_schedule("linear", 1000))[use_timesteps]
    A, B = 1.0, 0.0  # x_{T-1} = z
    for i in reversed(range(len(use_timesteps))):
        a, a_prev = ab[i], (ab[i - 1] if i > 0 else 1.0)
        c = math.sqrt(a) * s2 / (a * s2 + 1 - a)  # x0_hat = c x + mu (1 - c sqrt(a))
        x0_a, x0_b = c * A, c * B + mu * (1 - c * math.sqrt(a))
        eps_a = (A - math.sqrt(a) * x0_a) / math.sqrt(1 - a)
        eps_b = (B - math.sqrt(a) * x0_b) / math.sqrt(1 - a)
        A = math.sqrt(a_prev) * x0_a + math.sqrt(1 - a_prev) * eps_a
        B = math.sqrt(a_prev) * x0_b + math.sqrt(1 - a_prev) * eps_b
    return A, B


def test_ddim_gaussian_data_matches_closed_form_map():
    d = create_diffusion("ddim50")
    mus, s2s = [0.3, -0.5], [0.25, 0.6]
    mu = torch.tensor(mus, dtype=F64).view(1, 2, 1, 1)
    s2 = torch.tensor(s2s, dtype=F64).view(1, 2, 1, 1)
    noise = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    out = ddim_sample(d, gaussian_oracle(d, mu, s2), noise, eta=0.0)
    use = d.timestep_map.tolist()
    for c in range(2):
        A, B = _ddim_affine_map(use, mus[c], s2s[c])
        torch.testing.assert_close(out[:, c], A * noise[:, c] + B, rtol=1e-9, atol=1e-9)


def test_ddim_closed_form_map_converges_to_the_data_distribution():
    # the output law N(B, A^2) approaches N(mu, s2) as the number of steps grows
    # (DDIM is a first-order discretisation of the probability-flow ODE)
    errors = []
    for spacing in ["ddim10", "ddim50", "ddim250", ""]:
        A, B = _ddim_affine_map(space_timesteps(1000, spacing), 0.3, 0.25)
        errors.append(abs(A * A - 0.25) / 0.25)
        assert abs(B - 0.3) < 0.01
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01


def _toy_denoise(x_t, t_model):
    scale = (t_model.to(x_t.dtype) / 1000).view(-1, 1, 1, 1)
    eps = 0.5 * x_t * scale
    return torch.cat([eps, torch.tanh(x_t)], dim=1)


def test_ddpm_deterministic_for_a_seed():
    d = create_diffusion("20")
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ddpm_sample(d, _toy_denoise, noise, generator=torch.Generator().manual_seed(42))
    b = ddpm_sample(d, _toy_denoise, noise, generator=torch.Generator().manual_seed(42))
    c = ddpm_sample(d, _toy_denoise, noise, generator=torch.Generator().manual_seed(43))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_ddim_eta_zero_needs_no_generator_and_eta_one_is_seeded():
    d = create_diffusion("ddim20")
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ddim_sample(d, _toy_denoise, noise)
    b = ddim_sample(d, _toy_denoise, noise)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    e1 = ddim_sample(d, _toy_denoise, noise, eta=1.0, generator=torch.Generator().manual_seed(5))
    e2 = ddim_sample(d, _toy_denoise, noise, eta=1.0, generator=torch.Generator().manual_seed(5))
    e3 = ddim_sample(d, _toy_denoise, noise, eta=1.0, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    assert not torch.allclose(e1, e3)
    with pytest.raises(ValueError, match="-0.5"):
        ddim_sample(d, _toy_denoise, noise, eta=-0.5)


def test_samplers_run_without_grad_and_with_progress():
    d = create_diffusion("5")
    w = torch.ones(1, requires_grad=True)

    def denoise(x_t, t_model):
        assert not torch.is_grad_enabled()
        return torch.cat([x_t * w * 0.1, torch.zeros_like(x_t)], 1)

    out = ddpm_sample(d, denoise, torch.randn(1, 2, 2, 2), progress=True)
    assert not out.requires_grad
    out = ddim_sample(d, denoise, torch.randn(1, 2, 2, 2), progress=True)
    assert not out.requires_grad


# --------------------------------------------------------------------------- guidance


NULL = 10


class LabelModel:
    """out = [eps_k = x_k * (y + 1) + k for k < C, v_k = x_k + 100 y]: depends on y in a known way."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        yy = y.to(x.dtype).view(-1, 1, 1, 1)
        k = torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, 1, 1)
        return torch.cat([x * (yy + 1) + k, x + 100 * yy], dim=1)


def _guidance_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 2, 2, generator=g, dtype=F64)
    t = torch.tensor([5, 5, 5])
    y = torch.tensor([0, 3, 7])
    return x, t, y


def test_guidance_scale_one_is_the_conditional_model():
    x, t, y = _guidance_inputs()
    model = LabelModel()
    out = guided_denoiser(model, y, 1.0, NULL, channels=4)(x, t)
    torch.testing.assert_close(out, LabelModel()(x, t, y))
    assert len(model.calls) == 1 and model.calls[0][0] == 3


@pytest.mark.parametrize("scale", [0.0, 1.5, 4.0])
def test_guidance_all_channels(scale):
    x, t, y = _guidance_inputs()
    model = LabelModel()
    out = guided_denoiser(model, y, scale, NULL, channels=4)(x, t)
    cond = LabelModel()(x, t, y)
    uncond = LabelModel()(x, t, torch.full_like(y, NULL))
    assert out.shape == (3, 8, 2, 2)
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])  # variance from the conditional half
    # one model call on the doubled batch
    assert len(model.calls) == 1
    n, tt, yy = model.calls[0]
    assert n == 6
    torch.testing.assert_close(tt, torch.cat([t, t]))
    torch.testing.assert_close(yy, torch.tensor([0, 3, 7, NULL, NULL, NULL]))


def test_guidance_legacy_three_channels():
    x, t, y = _guidance_inputs()
    scale = 4.0
    out = guided_denoiser(LabelModel(), y, scale, NULL, channels=4, legacy_three_channel=True)(x, t)
    cond = LabelModel()(x, t, y)
    uncond = LabelModel()(x, t, torch.full_like(y, NULL))
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:, 3], cond[:, 3])  # eps channel 3 unguided: the legacy bug
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])
    assert not torch.allclose(out[:, 3], (uncond + scale * (cond - uncond))[:, 3])


def test_guidance_rejects_negative_scale():
    _, _, y = _guidance_inputs()
    with pytest.raises(ValueError, match="-0.5"):
        guided_denoiser(LabelModel(), y, -0.5, NULL, channels=4)


def test_guided_denoiser_drives_a_sampler():
    x, _, y = _guidance_inputs()
    d = create_diffusion("ddim10")
    model = LabelModel()

    def small(x_t, t, yy):  # keep the toy model's outputs tame for sampling
        out = model(x_t, t, yy)
        return torch.cat([0.01 * out[:, :4], torch.tanh(out[:, 4:])], 1)

    out = ddpm_sample(d, guided_denoiser(small, y, 1.5, NULL, 4), x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert len(model.calls) == 10 and all(c[0] == 6 for c in model.calls)
