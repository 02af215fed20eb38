"""Noise schedules and respacing, checked against their closed forms in float64."""

import math

import numpy as np
import pytest

from ditforge.diffusion.schedules import beta_schedule, respace_betas, space_timesteps


def test_linear_endpoints_t1000():
    betas = beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02, rel=1e-12)
    assert np.all(np.diff(betas) > 0)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_linear_rescales_with_num_timesteps():
    betas = beta_schedule("linear", 250)  # scale = 1000 / 250 = 4
    assert betas.shape == (250,)
    assert betas[0] == pytest.approx(4e-4, rel=1e-12)
    assert betas[-1] == pytest.approx(0.08, rel=1e-12)


@pytest.mark.parametrize("T", [1000, 100])
def test_cosine_alpha_bar_matches_formula(T):
    betas = beta_schedule("cosine", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)

    def f(u):  # Nichol & Dhariwal eq. 17, unnormalised
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    # x_t (0-indexed step t) has been noised t + 1 times: alpha_bar = f((t+1)/T) / f(0)
    expected = np.array([f((t + 1) / T) / f(0) for t in range(T)])
    alpha_bar = np.cumprod(1.0 - betas)
    # the last beta is clipped to 0.999 (f(1) = 0), so compare all but the last step
    np.testing.assert_allclose(alpha_bar[:-1], expected[:-1], rtol=1e-10, atol=1e-15)
    assert betas[-1] == pytest.approx(0.999)
    assert np.all(betas <= 0.999) and np.all(betas > 0)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="quadratic"):
        beta_schedule("quadratic", 1000)
    with pytest.raises(ValueError, match="num_timesteps"):
        beta_schedule("linear", 0)


def test_space_timesteps_all_steps():
    assert space_timesteps(1000, "") == list(range(1000))
    assert space_timesteps(1000, None) == list(range(1000))


def test_space_timesteps_single_section():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250
    assert steps[0] == 0 and steps[-1] == 999
    assert steps == sorted(set(steps))
    strides = np.diff(steps)
    assert strides.min() >= 4 and strides.max() <= 5  # 999 / 249 ~ 4.01


def test_space_timesteps_ddim():
    steps = space_timesteps(1000, "ddim50")
    assert steps == list(range(0, 1000, 20))
    assert len(steps) == 50


def test_space_timesteps_sections():
    steps = space_timesteps(1000, "10,15,20")
    assert len(steps) == 45
    # sections of 334, 333, 333 steps: [0, 333], [334, 666], [667, 999]
    for lo, hi, count in [(0, 333, 10), (334, 666, 15), (667, 999, 20)]:
        inside = [s for s in steps if lo <= s <= hi]
        assert len(inside) == count
        assert inside[0] == lo and inside[-1] == hi


@pytest.mark.parametrize(
    "spacing, match",
    [
        ("abc", "abc"),
        ("10,x", "'x'"),
        ("0", "0"),
        ("-5", "-5"),
        ("1001", "1001"),  # more steps than the section has
        ("ddim999", "999"),  # no integer stride gives 999 of 1000 steps
        ("ddim", "ddim"),
        ("ddimfoo", "foo"),
    ],
)
def test_space_timesteps_bad_strings_raise(spacing, match):
    with pytest.raises(ValueError, match=match):
        space_timesteps(1000, spacing)


def test_space_timesteps_section_count_too_large_names_section():
    with pytest.raises(ValueError, match="section 1 has 5 timesteps"):
        space_timesteps(10, "2,6")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["250", "ddim50", "10,15,20", "1"])
def test_respaced_betas_keep_alpha_bar(schedule, spacing):
    betas = beta_schedule(schedule, 1000)
    use = space_timesteps(1000, spacing)
    new = respace_betas(betas, use)
    assert new.shape == (len(use),)
    assert np.all(new > 0) and np.all(new <= 1)
    np.testing.assert_allclose(
        np.cumprod(1.0 - new), np.cumprod(1.0 - betas)[use], rtol=1e-10, atol=0
    )


def test_respace_betas_bad_steps_raise():
    betas = beta_schedule("linear", 10)
    with pytest.raises(ValueError, match="10"):
        respace_betas(betas, [0, 10])
    with pytest.raises(ValueError, match="empty"):
        respace_betas(betas, [])
