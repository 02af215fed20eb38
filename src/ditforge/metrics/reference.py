"""Reference statistics: the Inception statistics of a reference set, and their `.npz` file.

A reference is stored as one `.npz` of plain arrays (`save_reference` / `load_reference`): the
pool_3 mean and covariance, the spatial ones where available, and the pool_3 features of up to
10,000 reference images (ADM's reference batches keep 10,000 images for precision/recall).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditforge.errors import UserError
from ditforge.metrics.inception import MissingFileError
from ditforge.metrics.statistics import feature_statistics

REFERENCE_FORMAT = "ditforge-inception-reference"
REFERENCE_VERSION = 1
MAX_REFERENCE_FEATURES = 10_000

Stats = tuple[np.ndarray, np.ndarray]  # (mu (D,), sigma (D, D))



@dataclass
class RefStats:
    """Inception statistics of a reference set.

    mu, sigma: pool_3 mean (2048,) and covariance (2048, 2048), float64.
    pool: (M, 2048) float32 pool_3 features of up to 10,000 reference images (precision/recall), or None.
    mu_s, sigma_s: the same statistics of the spatial features (2023 dims), or None.
    num_images: how many images the statistics were computed from.
    extractor: which network and preprocessing made the features (a description, compared on use).
    data: which images they describe, as a cache key of its owner (`eval RUN`'s held-out split:
    its data's digest), compared on use; "" when not recorded (a `--save-ref` file).
    """

    mu: np.ndarray
    sigma: np.ndarray
    pool: np.ndarray | None
    num_images: int
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    extractor: str = ""
    data: str = ""

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
    return feature_statistics(x)


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
    if ref.data:
        arrays["data"] = np.array(ref.data)
    if ref.pool is not None:
        arrays["pool"] = np.asarray(ref.pool, dtype=np.float32)
    if ref.mu_s is not None:
        arrays["mu_s"] = np.asarray(ref.mu_s, dtype=np.float64)
        arrays["sigma_s"] = np.asarray(ref.sigma_s, dtype=np.float64)
    return save_npz_atomic(path, **arrays)


def open_npz(path: str | os.PathLike, what: str):
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
    with open_npz(path, "reference statistics") as f:
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
                data=str(f["data"][()]) if "data" in keys else "",
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
