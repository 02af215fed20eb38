"""Inception features in bulk: a bounded-memory accumulator, and the ADM metrics of a set of
images against a reference (`evaluate_batches`) or the reference of a path (`reference_from_path`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditforge.errors import UserError
from ditforge.metrics.images import image_files, iter_folder_images, load_reference_images
from ditforge.metrics.inception import MissingFileError
from ditforge.metrics.reference import MAX_REFERENCE_FEATURES, RefStats, Stats
from ditforge.metrics.scores import fid, inception_score, precision_recall, sfid


class FeatureAccumulator:
    """Collects features batch by batch: running mean/covariance (Chan et al.'s pairwise update, in
    float64) of pool and spatial features, pool features (all, or a seeded uniform reservoir sample
    of `keep_pool`), and all logits. Memory stays bounded however many images go through."""

    def __init__(self, keep_pool: int | None = None, seed: int = 0):
        self.keep_pool = keep_pool
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self._moments: dict[str, list] = {}  # name -> [n, mean, M2]
        self._pool: list[np.ndarray] | np.ndarray = [] if keep_pool is None else None
        self._logits: list[np.ndarray] = []
        self.has_spatial: bool | None = None
        self.has_logits: bool | None = None

    def _update(self, name: str, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        n_b, mean_b = len(x), x.mean(axis=0)
        xc = x - mean_b
        m2_b = xc.T @ xc
        if name not in self._moments:
            self._moments[name] = [n_b, mean_b, m2_b]
            return
        n_a, mean_a, m2_a = self._moments[name]
        n = n_a + n_b
        delta = mean_b - mean_a
        self._moments[name] = [n, mean_a + delta * (n_b / n), m2_a + m2_b + np.outer(delta, delta) * (n_a * n_b / n)]

    def add(self, features: dict[str, np.ndarray | None]) -> None:
        pool = np.asarray(features["pool"])
        n = len(pool)
        if n == 0:
            return
        spatial, logits = features.get("spatial"), features.get("logits")
        if self.has_spatial is None:
            self.has_spatial, self.has_logits = spatial is not None, logits is not None
        self._update("pool", pool)
        if self.has_spatial:
            self._update("spatial", spatial)
        if self.has_logits:
            self._logits.append(np.asarray(logits, dtype=np.float32))
        if self.keep_pool is None:
            self._pool.append(np.asarray(pool, dtype=np.float32))
        else:
            self._reservoir(np.asarray(pool, dtype=np.float32))
        self.count += n

    def _reservoir(self, pool: np.ndarray) -> None:
        """Algorithm R: item t (0-based) replaces a uniform slot with probability keep/(t+1)."""
        if self._pool is None:
            self._pool = np.empty((0, pool.shape[1]), dtype=np.float32)
        free = self.keep_pool - len(self._pool)
        if free > 0:
            self._pool = np.concatenate([self._pool, pool[:free]])
        for i in range(max(free, 0), len(pool)):
            j = self.rng.integers(0, self.count + i + 1)
            if j < self.keep_pool:
                self._pool[j] = pool[i]

    def stats(self, name: str = "pool") -> Stats:
        if name not in self._moments or self._moments[name][0] < 2:
            raise UserError(f"need at least 2 images for {name} statistics; got {self.count}")
        n, mean, m2 = self._moments[name]
        return mean, m2 / (n - 1)

    @property
    def pool(self) -> np.ndarray:
        if isinstance(self._pool, list):
            return np.concatenate(self._pool) if self._pool else np.zeros((0, 0), np.float32)
        return self._pool

    @property
    def logits(self) -> np.ndarray | None:
        return np.concatenate(self._logits) if self.has_logits and self._logits else None

    def reference(self, extractor: str = "") -> RefStats:
        mu, sigma = self.stats("pool")
        mu_s, sigma_s = self.stats("spatial") if self.has_spatial else (None, None)
        return RefStats(mu, sigma, self.pool, self.count, mu_s, sigma_s, extractor)


def _batches(images: np.ndarray | torch.Tensor | Iterable, batch_size: int) -> Iterator:
    """One (N, H, W, 3) array -> slices of it; an iterable of such arrays -> its items."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        for s in range(0, len(images), batch_size):
            yield images[s : s + batch_size]
    else:
        yield from images


def accumulate_features(
    inception: Callable[[Any], dict],
    images: np.ndarray | torch.Tensor | Iterable,
    keep_pool: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
    total: int | None = None,
) -> FeatureAccumulator:
    """Run `inception` over `images` (one uint8 (N, H, W, 3) array, or an iterable of such batches)."""
    acc = FeatureAccumulator(keep_pool, seed)
    if total is None and isinstance(images, (np.ndarray, torch.Tensor)):
        total = len(images)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="inception features", disable=None)  # off when not a terminal
    try:
        for batch in _batches(images, batch_size):
            acc.add(inception(batch))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return acc


def _extractor_of(inception: Any) -> str:
    return str(getattr(inception, "description", ""))


def evaluate_batches(
    inception: Callable[[Any], dict],
    sample_images_iter: np.ndarray | torch.Tensor | Iterable,
    ref: RefStats,
    k: int = 3,
    split_size: int = 5000,
    progress: bool = False,
) -> dict[str, Any]:
    """All ADM metrics of generated images against a reference.

    `inception` is an `InceptionFeatures` (or any callable with its output); `sample_images_iter`
    is one uint8 (N, H, W, 3) array or an iterable of such batches. Returns fid, sfid,
    inception_score, precision, recall (None where the network or the reference lacks what the
    metric needs), num_samples and num_reference.
    """
    mine, theirs = _extractor_of(inception), ref.extractor
    if mine and theirs and mine != theirs:
        warnings.warn(
            f"the reference statistics were made by a different feature extractor ({theirs!r}) than this one "
            f"({mine!r}); the numbers are not comparable to ones made with a single extractor",
            stacklevel=2,
        )
    acc = accumulate_features(inception, sample_images_iter, progress=progress)
    if acc.count < 2:
        raise UserError(f"evaluation needs at least 2 generated images; got {acc.count}")
    sample_stats = acc.stats("pool")
    result: dict[str, Any] = {
        "fid": fid(sample_stats, ref.pool_stats),
        "sfid": None,
        "inception_score": None,
        "precision": None,
        "recall": None,
        "num_samples": acc.count,
        "num_reference": ref.num_images,
    }
    if acc.has_spatial and ref.spatial_stats is not None:
        result["sfid"] = sfid(acc.stats("spatial"), ref.spatial_stats)
    if acc.logits is not None:
        result["inception_score"] = inception_score(acc.logits, split_size, probs=False)
    if ref.pool is not None:
        if min(acc.count, len(ref.pool)) > k:
            result["precision"], result["recall"] = precision_recall(ref.pool, acc.pool, k=k)
        else:
            warnings.warn(
                f"precision/recall with k={k} need more than {k} images on each side "
                f"({acc.count} generated, {len(ref.pool)} reference): not computed",
                stacklevel=2,
            )
    return result


def reference_from_path(
    inception: Callable[[Any], dict],
    path_or_folder: str | os.PathLike,
    image_size: int | None = None,
    max_features: int = MAX_REFERENCE_FEATURES,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> RefStats:
    """RefStats of a folder or .npz of images (streamed: bounded memory for any size), or the one
    stored in a reference statistics file."""
    path = Path(path_or_folder)
    if not path.exists():
        raise MissingFileError(f"reference {str(path)!r} not found (expected an image folder or an .npz)")
    if path.is_dir():
        images: Any = iter_folder_images(path, image_size, batch_size)
        total = len(image_files(path)) if progress else None
    else:
        loaded = load_reference_images(path, image_size)
        if isinstance(loaded, RefStats):
            return loaded
        images, total = loaded, len(loaded)
    acc = accumulate_features(inception, images, keep_pool=max_features, seed=seed, batch_size=batch_size, progress=progress, total=total)
    if acc.count < 2:
        raise UserError(f"a reference needs at least 2 images; {str(path)!r} gave {acc.count}")
    return acc.reference(_extractor_of(inception))
