"""Gaussian statistics of features and the Frechet distance between two of them: the maths
under FID, sFID and the built-in sets' feature distance."""

from __future__ import annotations

import numpy as np


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982; FID,
    Heusel et al. 2017):  d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), the sum of the square roots of the
    eigenvalues of a symmetric PSD matrix: exact for singular covariances (dead ReLU features),
    where a general matrix square root of S1 S2 is unstable.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"mismatched statistics: means {mu1.shape} vs {mu2.shape}, covariances {sigma1.shape} vs {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features."""
    return features.mean(axis=0), np.cov(features, rowvar=False)
