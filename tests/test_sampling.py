"""Sampler choice (diffusion/sampling.py) and the guidance interval (guidance.py, sampling/generate.py)."""

import pytest
import torch

from ditforge.diffusion import create_diffusion, ddim_sample, ddpm_sample, guided_denoiser
from ditforge.diffusion.sampling import SAMPLERS, Sampler
from ditforge.errors import UserError
from ditforge.models import create_model
from ditforge.objectives import DiffusionObjective
from ditforge.sampling.generate import NOISE_PURPOSES, choose_sampler, generate, noise_seed

NULL = 10


class Recorder:
    """A class-conditional 'model' whose eps is a known function of (x, t, y); it records each call."""

    def __init__(self):
        self.calls = []  # (batch size, labels)

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.tolist()))
        eps = 0.1 * x + 0.01 * y.view(-1, 1, 1, 1).to(x.dtype) + 1e-4 * t.view(-1, 1, 1, 1).to(x.dtype)
        return torch.cat([eps, torch.full_like(eps, 0.5)], dim=1)  # (N, 2C, H, W)


def _x(n=3):
    return torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_guidance_interval_guides_inside_and_runs_the_plain_batch_outside():
    y = torch.tensor([1, 2, 3])
    x = _x()
    model = Recorder()
    denoise = guided_denoiser(model, y, 2.0, NULL, 2, interval=(200.0, 600.0))
    full = guided_denoiser(Recorder(), y, 2.0, NULL, 2)
    cond = lambda t: Recorder()(x, torch.full((3,), t), y)  # noqa: E731
    for t, inside in [(100, False), (199.5, False), (200, True), (400, True), (600, True), (600.5, False), (999, False)]:
        tt = torch.full((3,), float(t), dtype=torch.float64)
        out = denoise(x, tt)
        if inside:
            assert model.calls[-1] == (6, [1, 2, 3, NULL, NULL, NULL])  # cond and uncond in one batch
            assert torch.equal(out, full(x, tt))
            uncond = Recorder()(x, tt, torch.full((3,), NULL))
            expected = uncond[:, :2] + 2.0 * (cond(float(t))[:, :2] - uncond[:, :2])
            torch.testing.assert_close(out[:, :2], expected)
        else:
            assert model.calls[-1] == (3, [1, 2, 3])  # the conditional model alone
            assert torch.equal(out, cond(float(t)))
    # samples at different t in one batch: each row by its own t
    t = torch.tensor([100.0, 400.0, 999.0], dtype=torch.float64)
    out = denoise(x, t)
    plain, guided = Recorder()(x, t, y), full(x, t)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[1], guided[1]) and torch.equal(out[2], plain[2])
    with pytest.raises(ValueError, match="lo <= hi"):
        guided_denoiser(model, y, 2.0, NULL, 2, interval=(0.6, 0.2))


@pytest.mark.parametrize("name", SAMPLERS)
def test_interval_outside_every_step_equals_no_guidance_and_covering_all_equals_full(name):
    y = torch.tensor([4, 7])
    noise = _x(2)
    sampler = Sampler(name, 6)

    def run(cfg, interval=None):
        denoise = guided_denoiser(Recorder(), y, cfg, NULL, 2, interval=interval)
        return sampler(denoise, noise, generator=torch.Generator().manual_seed(1))

    assert torch.equal(run(3.0, (1000.5, 2000.0)), run(1.0))
    assert torch.equal(run(3.0, (0.0, 1000.0)), run(3.0))
    assert not torch.equal(run(3.0, (0.0, 500.0)), run(3.0))


def test_sampler_dispatch_runs_the_existing_loops_for_ddpm_and_ddim():
    denoise = guided_denoiser(Recorder(), torch.tensor([4, 7]), 1.5, NULL, 2)
    noise = _x(2)
    for name, loop in (("ddpm", ddpm_sample), ("ddim", ddim_sample)):
        got = Sampler(name, 10)(denoise, noise, generator=torch.Generator().manual_seed(3))
        want = loop(create_diffusion("10"), denoise, noise, generator=torch.Generator().manual_seed(3))
        assert torch.equal(got, want)
    assert Sampler("dpm++2m", 20, spacing="time").describe() == "20 DPM++2M steps (time spacing)"
    assert Sampler("ddim", 50).describe() == "50 DDIM steps"
    for bad, match in [(dict(name="euler"), "unknown sampler"), (dict(spacing="karras"), "unknown time spacing"),
                       (dict(steps=0), "between 1 and 1000")]:
        with pytest.raises(ValueError, match=match):
            Sampler(**{"name": "unipc", "steps": 5, **bad})


def test_interval_fractions_and_bad_values():
    assert Sampler("ddpm", 10).guidance_times((0.2, 0.6)) == (200.0, 600.0)
    assert Sampler("ddpm", 10).guidance_times(None) is None
    model = create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=10)
    for interval in [(0.6, 0.2), (-0.1, 0.5), (0.5, 1.5)]:
        with pytest.raises(UserError, match="0 <= LO <= HI <= 1"):
            choose_sampler(model, DiffusionObjective(), 10, 1.5, "ddpm", cfg_interval=interval)
    with pytest.raises(UserError, match="unknown time spacing"):
        choose_sampler(model, DiffusionObjective(), 10, 1.5, "unipc", spacing="edm")


def test_generate_with_each_solver_counts_model_evaluations():
    model = create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=10)
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    for name in ("dpm++2m", "unipc"):
        calls.clear()
        x, y = generate(model, [2, 5], 2, cfg_scale=1.5, steps=5, sampler=name, spacing="time")
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all() and y.tolist() == [2, 2, 5, 5]
        assert calls == [8] * 5  # 5 evaluations of the doubled (cond + uncond) batch
        calls.clear()
        generate(model, [2, 5], 2, cfg_scale=1.5, steps=5, sampler=name, spacing="time", cfg_interval=(0.0, 0.5))
        assert calls == [4, 4, 8, 8, 8]  # t = 999, 749.25 unguided; 499.5, 249.75, 0 guided


def record_draws(monkeypatch) -> list[torch.Tensor]:
    """Every tensor that `torch.randn` draws from an explicit generator from now on (it still draws them)."""
    draws, real_randn = [], torch.randn

    def randn(*args, **kw):
        x = real_randn(*args, **kw)
        if kw.get("generator") is not None:
            draws.append(x.detach().clone())
        return x

    monkeypatch.setattr(torch, "randn", randn)
    return draws


def test_noise_seeds_of_distinct_seed_index_purpose_are_distinct():
    keys = [(s, i, p) for s in (0, 1, 2, -1, 10**12) for i in range(2000) for p in NOISE_PURPOSES]
    seeds = [noise_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys)  # seed + 1, index + 1 and the purpose each change it
    assert all(0 <= s < 2**63 for s in seeds)  # what torch.Generator.manual_seed takes, on any device
    # the derivation is part of the file format: another one changes every sample of every seed
    assert noise_seed(0, 0, "start") == 7931383711556872323 and noise_seed(0, 0, "steps") == 2122084156281601275
    with pytest.raises(ValueError, match="purpose"):
        noise_seed(0, 0, "labels")


def test_grid_noise_streams_of_neighbouring_seeds_do_not_coincide(monkeypatch):
    """DDPM draws noise at each step but the last; the step noise of seed 0 was the starting noise
    of seed 1 (generators seeded seed + 1 and seed). Now no two draws of either grid coincide."""
    model = create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=10)
    draws = record_draws(monkeypatch)
    for seed in (0, 1):
        generate(model, [2, 5], 2, cfg_scale=1.0, steps=3, sampler="ddpm", seed=seed, batch_size=4)
    firsts = [x.reshape(-1, 64)[0] for x in draws]  # the first 8x8 image of each draw
    assert len(firsts) >= 2 * 3  # each seed: its starting noise, then two steps with noise
    same = [(j, i) for i in range(len(firsts)) for j in range(i) if torch.equal(firsts[i], firsts[j])]
    assert not same, f"these pairs of draws are the same noise: {same}"
