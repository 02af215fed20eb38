"""The metrics of OpenAI's ADM evaluator (Dhariwal & Nichol 2021, guided-diffusion
`evaluations/evaluator.py`), written from their definitions, on Inception-v3 features.

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to pool_3 features
  (mean and unbiased covariance), `ditforge.evaluate.frechet_distance`.
- sFID (Nash et al. 2021): the same on the spatial features (first 7 channels of mixed_6/conv).
- Inception Score (Salimans et al. 2016): p(y|x) = softmax of the logits; for each chunk of
  `split_size` samples IS = exp(mean_x KL(p(y|x) || p(y))) with p(y) the chunk's mean prediction;
  the score is the mean over chunks (ADM: chunks of 5,000, the last one may be smaller).
- Improved precision and recall (Kynkaanniemi et al. 2019), k = 3: each set's manifold is the
  union of balls around its points with radius the distance to the point's k-th nearest neighbour
  in its own set (itself excluded). Precision = share of generated samples inside the real
  manifold; recall = share of real samples inside the generated manifold. A point on the sphere
  counts as inside (ADM compares with <=).

A reference is stored as one `.npz` of plain arrays (`save_reference` / `load_reference`): the
pool_3 mean and covariance, the spatial ones where available, and the pool_3 features of up to
10,000 reference images (ADM's reference batches keep 10,000 images for precision/recall).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy_format

import ditforge.evaluate as _evaluate
from ditforge.errors import UnreadableImage, UserError
from ditforge.metrics.inception import MissingFileError

REFERENCE_FORMAT = "ditforge-inception-reference"
REFERENCE_VERSION = 1
MAX_REFERENCE_FEATURES = 10_000

Stats = tuple[np.ndarray, np.ndarray]  # (mu (D,), sigma (D, D))


# -- reference statistics ------------------------------------------------------------------


@dataclass
class RefStats:
    """Inception statistics of a reference set.

    mu, sigma: pool_3 mean (2048,) and covariance (2048, 2048), float64.
    pool: (M, 2048) float32 pool_3 features of up to 10,000 reference images (precision/recall), or None.
    mu_s, sigma_s: the same statistics of the spatial features (2023 dims), or None.
    num_images: how many images the statistics were computed from.
    extractor: which network and preprocessing made the features (a description, compared on use).
    """

    mu: np.ndarray
    sigma: np.ndarray
    pool: np.ndarray | None
    num_images: int
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    extractor: str = ""

    @property
    def pool_stats(self) -> Stats:
        return self.mu, self.sigma

    @property
    def spatial_stats(self) -> Stats | None:
        return None if self.mu_s is None else (self.mu_s, self.sigma_s)


def _moments(x: np.ndarray, what: str) -> Stats:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise UserError(f"{what} features must be (N, D) with N >= 2 to estimate a covariance; got shape {x.shape}")
    return _evaluate.feature_statistics(x)


def _subset(features: np.ndarray, max_count: int, seed: int) -> np.ndarray:
    """Up to `max_count` rows, a seeded random subset in original order (folders come sorted by
    class, so the first rows would not be representative)."""
    if len(features) <= max_count:
        return np.ascontiguousarray(features, dtype=np.float32)
    idx = np.sort(np.random.default_rng(seed).choice(len(features), size=max_count, replace=False))
    return np.ascontiguousarray(features[idx], dtype=np.float32)


def compute_reference(
    features: dict[str, np.ndarray | None],
    max_features: int = MAX_REFERENCE_FEATURES,
    seed: int = 0,
    extractor: str = "",
) -> RefStats:
    """RefStats from a features dict as `InceptionFeatures` returns it ("pool", "spatial")."""
    pool = features.get("pool")
    if pool is None:
        raise UserError("compute_reference needs pool_3 features (key 'pool')")
    mu, sigma = _moments(pool, "pool_3")
    spatial = features.get("spatial")
    mu_s = sigma_s = None
    if spatial is not None:
        if len(spatial) != len(pool):
            raise UserError(f"{len(spatial)} spatial feature rows for {len(pool)} pool rows")
        mu_s, sigma_s = _moments(spatial, "spatial")
    return RefStats(mu, sigma, _subset(np.asarray(pool), max_features, seed), len(pool), mu_s, sigma_s, extractor)


def save_reference(path: str | os.PathLike, ref: RefStats) -> Path:
    """Write `ref` to one `.npz` of plain arrays (atomically: a temporary name, then a rename)."""
    from ditforge.npz import save_npz_atomic

    arrays: dict[str, np.ndarray] = {
        "format": np.array(REFERENCE_FORMAT),
        "version": np.array(REFERENCE_VERSION, dtype=np.int64),
        "num_images": np.array(int(ref.num_images), dtype=np.int64),
        "extractor": np.array(ref.extractor),
        "mu": np.asarray(ref.mu, dtype=np.float64),
        "sigma": np.asarray(ref.sigma, dtype=np.float64),
    }
    if ref.pool is not None:
        arrays["pool"] = np.asarray(ref.pool, dtype=np.float32)
    if ref.mu_s is not None:
        arrays["mu_s"] = np.asarray(ref.mu_s, dtype=np.float64)
        arrays["sigma_s"] = np.asarray(ref.sigma_s, dtype=np.float64)
    return save_npz_atomic(path, **arrays)


def _open_npz(path: str | os.PathLike, what: str):
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{what} {str(path)!r} not found")
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a folder, not an .npz file")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{what} {str(path)!r} is not a readable .npz file ({type(e).__name__}: {e})") from e


def is_reference_file(path: str | os.PathLike) -> bool:
    """True if `path` is an .npz written by `save_reference` (it carries the format key)."""
    try:
        with zipfile.ZipFile(path) as z:
            if "format.npy" not in z.namelist():
                return False
        with np.load(path, allow_pickle=False) as f:
            return str(f["format"][()]) == REFERENCE_FORMAT
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False


def load_reference(path: str | os.PathLike) -> RefStats:
    """Read a file written by `save_reference`; clear errors for a missing, foreign or damaged file."""
    with _open_npz(path, "reference statistics") as f:
        keys = set(f.files)
        if "format" not in keys:
            hint = (
                "it holds images (arr_0): compute statistics from it first (ditforge.metrics.reference_from_path)"
                if "arr_0" in keys
                else f"its arrays are {sorted(keys)}"
            )
            raise UserError(f"{str(path)!r} is not a ditforge reference statistics file (no 'format' key); {hint}")
        try:
            fmt = str(f["format"][()])
            if fmt != REFERENCE_FORMAT:
                raise UserError(f"{str(path)!r} has format {fmt!r}, expected {REFERENCE_FORMAT!r}")
            version = int(f["version"][()])
            if version > REFERENCE_VERSION:
                raise UserError(
                    f"{str(path)!r} is a reference file of version {version}, newer than this ditforge "
                    f"reads ({REFERENCE_VERSION}); upgrade ditforge or recompute the reference"
                )
            missing = {"version", "num_images", "mu", "sigma"} - keys
            if missing:
                raise UserError(f"{str(path)!r} is an incomplete reference file: missing {sorted(missing)}")
            get = lambda k: f[k] if k in keys else None  # noqa: E731
            ref = RefStats(
                mu=get("mu"),
                sigma=get("sigma"),
                pool=get("pool"),
                num_images=int(f["num_images"][()]),
                mu_s=get("mu_s"),
                sigma_s=get("sigma_s"),
                extractor=str(f["extractor"][()]) if "extractor" in keys else "",
            )
        except UserError:
            raise
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:  # a truncated member, a bad header
            raise UserError(f"{str(path)!r} is a damaged reference file ({type(e).__name__}: {e})") from e
    _check_reference(ref, str(path))
    return ref


def _check_reference(ref: RefStats, where: str) -> None:
    def bad(msg: str) -> UserError:
        return UserError(f"{where!r} is a damaged reference file: {msg}")

    def check_stats(mu, sigma, name):
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise bad(f"{name} mean {mu.shape} and covariance {sigma.shape} do not fit")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise bad(f"{name} statistics are not finite")

    check_stats(ref.mu, ref.sigma, "pool_3")
    if (ref.mu_s is None) != (ref.sigma_s is None):
        raise bad("spatial mean and covariance must both be present or both absent")
    if ref.mu_s is not None:
        check_stats(ref.mu_s, ref.sigma_s, "spatial")
    if ref.pool is not None and (ref.pool.ndim != 2 or ref.pool.shape[1] != ref.mu.shape[0]):
        raise bad(f"pool features of shape {ref.pool.shape} do not fit the {ref.mu.shape[0]}-d statistics")
    if ref.num_images < 2:
        raise bad(f"num_images {ref.num_images} < 2")


# -- the metrics ---------------------------------------------------------------------------


def _as_stats(s: RefStats | Stats, spatial: bool) -> Stats | None:
    if isinstance(s, RefStats):
        return s.spatial_stats if spatial else s.pool_stats
    return s


def fid(stats_a: RefStats | Stats, stats_b: RefStats | Stats) -> float:
    """FID between two pool_3 statistics, each (mu, sigma) or a RefStats."""
    return _evaluate.frechet_distance(*_as_stats(stats_a, False), *_as_stats(stats_b, False))


def sfid(stats_a: RefStats | Stats, stats_b: RefStats | Stats) -> float:
    """sFID between two spatial statistics, each (mu_s, sigma_s) or a RefStats (which must have them)."""
    a, b = _as_stats(stats_a, True), _as_stats(stats_b, True)
    if a is None or b is None:
        raise UserError("sFID needs spatial statistics on both sides; this reference has none")
    return _evaluate.frechet_distance(*a, *b)


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


# -- features in bulk ----------------------------------------------------------------------


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


# -- reading images --------------------------------------------------------------------------


def _mmap_npz_member(path: Path, name: str) -> np.ndarray | None:
    """Memory-map member `name` of an uncompressed .npz (what np.savez and ditforge write);
    None when it can't be mapped (compressed, Fortran order, object dtype)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = npy_format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(fh)
        else:
            return None
        if fortran or dtype.hasobject:
            return None
        offset = fh.tell()
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))


def _check_image_array(arr: np.ndarray, where: str) -> None:
    if arr.dtype != np.uint8:
        raise UserError(f"{where}: arr_0 must be uint8 pixels 0..255, got dtype {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise UserError(f"{where}: arr_0 must be (N, H, W, 3) RGB images, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise UserError(f"{where}: arr_0 holds no images")


def read_npz_images(path: str | os.PathLike) -> np.ndarray:
    """`arr_0` of an ADM sample batch: uint8 (N, H, W, 3), memory-mapped when the .npz is
    uncompressed (np.savez, ditforge's writers), so a 50,000-image file is read as it is used."""
    path = Path(path)
    with _open_npz(path, "image batch") as f:
        if "arr_0" not in f.files:
            raise UserError(f"{str(path)!r} has no 'arr_0' array of images (it holds {sorted(f.files)})")
    try:
        arr = _mmap_npz_member(path, "arr_0")
        if arr is None:
            with np.load(path, allow_pickle=False) as f:
                arr = f["arr_0"]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{str(path)!r}: arr_0 cannot be read ({type(e).__name__}: {e})") from e
    _check_image_array(arr, str(path))
    return arr


def _image_files(folder: Path) -> list[Path]:
    from ditforge.data.sources import IMAGE_EXTENSIONS

    return sorted(
        Path(d) / name
        for d, dirs, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
    )


def iter_folder_images(folder: str | os.PathLike, image_size: int | None = None, batch_size: int = 64) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of every image under `folder` (recursively, any class sub-folders),
    converted to RGB; with `image_size`, ADM's centre crop to image_size x image_size (the crop the
    training data gets). Without it all images must share one size. Unreadable files are skipped
    with a warning."""
    from ditforge.data.sources import center_crop_arr, open_image, to_rgb

    folder = Path(folder)
    files = _image_files(folder)
    if not files:
        raise UserError(f"no images under {str(folder)!r} (looked recursively for the usual image extensions)")
    shape, batch, skipped = None, [], []
    for file in files:
        try:
            im = open_image(file)
        except UnreadableImage as e:
            skipped.append(f"{file}: {e}")
            continue
        im = to_rgb(im)
        arr = center_crop_arr(im, image_size) if image_size else np.asarray(im)
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise UserError(
                f"images under {str(folder)!r} differ in size ({file} is {arr.shape[1]}x{arr.shape[0]}, "
                f"earlier ones {shape[1]}x{shape[0]}); pass an image size to centre-crop them all alike"
            )
        batch.append(arr)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s) under {str(folder)!r}, e.g. {skipped[0]}", stacklevel=2)
    if shape is None:
        raise UserError(f"none of the {len(files)} image files under {str(folder)!r} could be read, e.g. {skipped[0]}")


def load_reference_images(path_or_folder: str | os.PathLike, image_size: int | None = None) -> np.ndarray | RefStats:
    """Reference images as uint8 (N, H, W, 3), from an image folder (recursively) or an .npz with
    `arr_0` (ADM sample or reference batch); a reference statistics file from `save_reference` is
    recognised by its format key and returned as RefStats (there is nothing left to compute)."""
    path = Path(path_or_folder)
    if not path.exists():
        raise MissingFileError(f"reference {str(path)!r} not found (expected an image folder or an .npz)")
    if path.is_dir():
        return np.concatenate(list(iter_folder_images(path, image_size)))
    if is_reference_file(path):
        return load_reference(path)
    images = read_npz_images(path)
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        raise UserError(
            f"{str(path)!r} holds {images.shape[2]}x{images.shape[1]} images, not the {image_size}x{image_size} asked for"
        )
    return images


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
        total = len(_image_files(path)) if progress else None
    else:
        loaded = load_reference_images(path, image_size)
        if isinstance(loaded, RefStats):
            return loaded
        images, total = loaded, len(loaded)
    acc = accumulate_features(inception, images, keep_pool=max_features, seed=seed, batch_size=batch_size, progress=progress, total=total)
    if acc.count < 2:
        raise UserError(f"a reference needs at least 2 images; {str(path)!r} gave {acc.count}")
    return acc.reference(_extractor_of(inception))
