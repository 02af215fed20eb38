"""The metrics of OpenAI's ADM evaluator (Dhariwal & Nichol 2021, guided-diffusion
`evaluations/evaluator.py`), written from their definitions, on Inception-v3 features.

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to pool_3 features
  (mean and unbiased covariance), `statistics.frechet_distance`.
- sFID (Nash et al. 2021): the same on the spatial features (first 7 channels of mixed_6/conv).
- Inception Score (Salimans et al. 2016): p(y|x) = softmax of the logits; for each chunk of
  `split_size` samples IS = exp(mean_x KL(p(y|x) || p(y))) with p(y) the chunk's mean prediction;
  the score is the mean over chunks (ADM: chunks of 5,000, the last one may be smaller).
- Improved precision and recall (Kynkaanniemi et al. 2019), k = 3: each set's manifold is the
  union of balls around its points with radius the distance to the point's k-th nearest neighbour
  in its own set (itself excluded). Precision = share of generated samples inside the real
  manifold; recall = share of real samples inside the generated manifold. A point on the sphere
  counts as inside (ADM compares with <=).

The Frechet distances take two statistics, each (mu, sigma) or a `RefStats`
(`reference.py`); the features come from `features.py`.
"""

from __future__ import annotations

import numpy as np
import torch

from ditforge.errors import UserError
from ditforge.metrics.reference import RefStats, Stats
from ditforge.metrics.statistics import frechet_distance


def _as_stats(s: RefStats | Stats, spatial: bool) -> Stats | None:
    if isinstance(s, RefStats):
        return s.spatial_stats if spatial else s.pool_stats
    return s


def fid(stats_a: RefStats | Stats, stats_b: RefStats | Stats) -> float:
    """FID between two pool_3 statistics, each (mu, sigma) or a RefStats."""
    return frechet_distance(*_as_stats(stats_a, False), *_as_stats(stats_b, False))


def sfid(stats_a: RefStats | Stats, stats_b: RefStats | Stats) -> float:
    """sFID between two spatial statistics, each (mu_s, sigma_s) or a RefStats (which must have them)."""
    a, b = _as_stats(stats_a, True), _as_stats(stats_b, True)
    if a is None or b is None:
        raise UserError("sFID needs spatial statistics on both sides; this reference has none")
    return frechet_distance(*a, *b)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(logits_or_probs: np.ndarray, split_size: int = 5000, probs: bool | None = None) -> float:
    """ADM's Inception Score: mean over chunks of `split_size` rows of exp(mean KL(p(y|x) || p(y))).

    Rows are logits (softmax is applied) or probabilities; `probs=None` decides by looking: rows of
    non-negative values summing to 1 are taken as probabilities. 0 * log 0 is taken as 0 (ADM's
    numpy code would give NaN for a probability that underflowed to exactly 0).
    """
    p = np.asarray(logits_or_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1:
        raise UserError(f"inception_score needs (N, classes) predictions; got shape {p.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    if probs is None:
        probs = bool((p >= 0).all() and np.allclose(p.sum(axis=1), 1.0, atol=1e-4))
    if not probs:
        p = _softmax(p)
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores))


def _sq_distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)), clamped at 0 (|a|^2 - 2ab + |b|^2)."""
    d = (a * a).sum(1, keepdim=True) - 2.0 * (a @ b.T) + b_sq[None, :]
    return d.clamp_(min=0.0)


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest neighbour in x, itself excluded."""
    sq = (x * x).sum(1)
    radii = torch.empty(len(x), dtype=x.dtype)
    for s in range(0, len(x), chunk):
        d = _sq_distances(x[s : s + chunk], x, sq)
        rows = torch.arange(d.shape[0])
        d[rows, rows + s] = -1.0  # the point itself is the smallest: sorts first, never the k-th neighbour
        radii[s : s + chunk] = torch.topk(d, k + 1, dim=1, largest=False).values[:, k]
    return radii


def precision_recall(
    real_feats: np.ndarray,
    fake_feats: np.ndarray,
    k: int = 3,
    chunk: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of `fake_feats` against `real_feats`.

    Distances are computed `chunk` rows at a time (memory ~ chunk * max(N_real, N_fake) values), so
    10k x 10k sets need ~40 MB at a time. Features are centred on the real mean first (distances do
    not change; float32 rounding does less harm).
    """
    real = np.asarray(real_feats)
    fake = np.asarray(fake_feats)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise UserError(f"precision/recall need (N, D) feature sets of one width; got {real.shape} and {fake.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for name, x in (("real", real), ("generated", fake)):
        if len(x) <= k:
            raise UserError(f"precision/recall with k={k} need more than {k} {name} samples; got {len(x)}")
    centre = real.mean(axis=0, dtype=np.float64)
    r = torch.from_numpy(np.asarray(real - centre, dtype=np.float64)).to(dtype)
    f = torch.from_numpy(np.asarray(fake - centre, dtype=np.float64)).to(dtype)
    r_radii, f_radii = _knn_radii(r, k, chunk), _knn_radii(f, k, chunk)
    f_sq = (f * f).sum(1)
    fake_covered = torch.zeros(len(f), dtype=torch.bool)  # inside some real ball: precision
    real_covered = torch.zeros(len(r), dtype=torch.bool)  # inside some generated ball: recall
    for s in range(0, len(r), chunk):
        d = _sq_distances(r[s : s + chunk], f, f_sq)  # (rows of real, all fake)
        fake_covered |= (d <= r_radii[s : s + chunk, None]).any(dim=0)
        real_covered[s : s + chunk] = (d <= f_radii[None, :]).any(dim=1)
    return float(fake_covered.double().mean()), float(real_covered.double().mean())
