"""Evaluation math against closed forms, and the judge of the built-in digits."""

import numpy as np
import pytest
from scipy import linalg

from ditforge.data.sources import load_data
from ditforge.evaluation.builtin import DigitJudge
from ditforge.metrics.statistics import feature_statistics, frechet_distance


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # identical Gaussians: 0
    a = rng.normal(size=(6, 6))
    s = a @ a.T + np.eye(6)
    mu = rng.normal(size=6)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)
    # diagonal covariances: sum (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2
    v1, v2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # general case against scipy's matrix square root
    b = rng.normal(size=(6, 6))
    s2 = b @ b.T + 0.5 * np.eye(6)
    ref = ((mu - 1) ** 2).sum() + np.trace(s) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s @ s2).real)
    assert frechet_distance(mu, s, mu - (mu - 1), s2) == pytest.approx(ref, rel=1e-8)
    # singular covariances (rank-deficient features) stay finite and exact: 1-D case
    z = np.zeros((3, 3))
    z[0, 0] = 4.0
    w = np.zeros((3, 3))
    w[0, 0] = 1.0
    assert frechet_distance(np.zeros(3), z, np.zeros(3), w) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_statistics_and_shift_grows_distance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 3))
    mu, sigma = feature_statistics(x)
    assert np.allclose(mu, 0, atol=0.06) and np.allclose(sigma, np.eye(3), atol=0.08)
    d = [frechet_distance(*feature_statistics(x + k), mu, sigma) for k in (0.0, 0.5, 1.0)]
    assert d[0] == pytest.approx(0, abs=1e-9) and d[0] < d[1] < d[2]
    assert d[2] == pytest.approx(3.0, rel=1e-6)  # shift by 1 in 3 dims


def test_digit_judge_recognises_real_held_out_digits():
    train, held = load_data("digits", "train"), load_data("digits", "heldout")
    judge = DigitJudge(train)
    assert (judge.predict(held.images) == held.labels.numpy()).mean() > 0.97
    assert judge.features(held.images).shape == (len(held), 64)


def test_digit_judges_svc_reads_the_digits_own_grey_levels():
    """The classic digits SVC (gamma 0.001) is fitted on scikit-learn's grey levels 0..16."""
    from sklearn.datasets import load_digits

    from ditforge.evaluation.builtin import SVC_INPUT, _flat

    raw = load_digits().images.reshape(-1, 64).astype(np.float64)
    scale, gamma = SVC_INPUT["digits"]
    assert np.array_equal(_flat(load_data("digits", "all").images) * scale, raw) and gamma == 0.001


def test_mnist_judge_recognises_real_held_out_mnist():
    train, held = load_data("mnist", "train"), load_data("mnist", "heldout")
    judge = DigitJudge(train)
    assert (judge.predict(held.images) == held.labels.numpy()).mean() > 0.96
    assert judge.features(held.images[:10]).shape == (10, 64)
