"""How good are the samples of a run trained on any labelled data (image folder, latent store)?

One call answers "did it learn my classes?" and "how close is it to the real images?":

- the judge (`evaluation/judge.py`, a small CNN trained once on the run's own training split and
  cached in `RUN/judge/`) reads `per_class` generated samples of every class: the share read
  as the requested class, overall and per class, next to the judge's accuracy on the held-out
  real split (its ceiling) and the ratio of the two;
- FID, sFID, precision and recall (k = 3) of the samples against the held-out split on
  Inception-v3 (`ditforge.metrics`, the ADM evaluator's definitions, as `eval --samples`), next
  to the FID of as many real training images against the same split (the floor; with a few
  hundred images it is far from 0).

Which real images: an image folder is split by `data.sources.split_indices` (20% of each
class held out, seed 0), the split training already uses, so the DiT never saw the held-out
images. A latent store trains the DiT on all its records; here its records are split the same
way and decoded (posterior mean, unflipped) through the store's autoencoder, so the judge never
saw the held-out records but the DiT did (the report's `note` says so). At most `MAX_TRAIN`
and `MAX_HELDOUT` records are decoded (a seeded subset), since decoding an SD VAE on a CPU
takes seconds an image.

The judge, the held-out Inception statistics and the real-vs-held-out floor are cached in
`RUN/judge/`, so later evaluations cost only the samples. The caches are keyed on the data's
identity (`data_key`: for a folder a digest of its files' paths and sizes, for a store of its
manifest), since the split is taken by index: a file added or removed moves it, and then the
caches are made again. Training records the same identity in every checkpoint; when it differs
now (or, for a checkpoint older than the digest, the training image count), the report says the
data changed since training (`data_change`): its held-out split may hold images the DiT trained on.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ditforge.data.sources import ImageSet, load_data, split_indices, to_uint8
from ditforge.data.training_data import data_identity, is_latent_store
from ditforge.diffusion.sampling import DEFAULT_SPACING
from ditforge.evaluation.judge import Judge, load_judge, per_class_accuracy, score_heldout, train_judge
from ditforge.models import DiT
from ditforge.objectives import DiffusionObjective, Objective, default_sampler, objective_sampler
from ditforge.sampling.generate import CPU_SAMPLE_BATCH, SAMPLE_BATCH, generate

MAX_TRAIN = 20_000
MAX_HELDOUT = 10_000
DECODE_BATCH = 32
REFERENCE_FILE = "heldout_inception.npz"


def data_key(config: dict[str, Any], identity: dict[str, Any] | None) -> str:
    """What the judge's and the held-out statistics' caches are valid for: the run's data, image
    size and the data's identity now (`data_identity`: what the split is taken over)."""
    return json.dumps([str(config["data"]), config.get("image_size"), identity and identity["digest"]])


def data_change(trained_on: dict[str, Any] | None, now: dict[str, Any] | None, train_count: int,
                latent: bool) -> tuple[bool | None, str | None]:
    """Did the data change since training? (changed, the report's warning line or None), from the
    checkpoint's `data` record: its identity's digest against `now`'s, or, for a checkpoint older
    than the digest, its training image count against `train_count` (the training split now).
    (None, None) when nothing was recorded."""
    if trained_on is None or now is None:
        return None, None
    what, unit = ("latent store", "records") if latent else ("data folder", "files")
    then = trained_on.get("identity")
    if then:
        if then.get("digest") == now["digest"]:
            return False, None
        counts = f"{then.get('items')} {unit} then, {now['items']} now"
    elif trained_on.get("count") is not None:
        if int(trained_on["count"]) == train_count:
            return False, None
        counts = f"{trained_on['count']} training {'records' if latent else 'images'} then, {train_count} now"
    else:
        return None, None
    consequence = ("the model trained on other records than these" if latent
                   else "the held-out split may include images the model trained on")
    return True, f"the {what} changed since training: {counts}; {consequence}"


def _subset(idx: np.ndarray, limit: int) -> np.ndarray:
    if len(idx) <= limit:
        return idx
    return np.sort(np.random.default_rng(0).choice(idx, size=limit, replace=False))


def _decode_store(data: str, device: torch.device, progress: bool) -> tuple[ImageSet, ImageSet]:
    from ditforge.data.autoencoder import load_autoencoder
    from ditforge.data.store import LatentStore

    store = LatentStore(data)
    ae = load_autoencoder(store.autoencoder, device=device)
    train_idx, held_idx = split_indices(store.labels)
    splits = []
    for idx in (_subset(train_idx, MAX_TRAIN), _subset(held_idx, MAX_HELDOUT)):
        images = []
        for s in range(0, len(idx), DECODE_BATCH):
            part = torch.from_numpy(idx[s : s + DECODE_BATCH])
            mean, _, _ = store.posterior(part, torch.zeros(len(part), dtype=torch.bool))  # (B, C, h, w)
            with torch.no_grad():
                images.append(ae.decode(mean.to(device)).float().clamp(-1, 1).cpu())  # (B, 3, H, W)
        x = torch.cat(images) if images else torch.zeros(0)
        splits.append(ImageSet(Path(data).name, x, store.labels[torch.from_numpy(idx)], store.class_names))
    return splits[0], splits[1]


class RealImages:
    """The run's real training and held-out images, loaded (or decoded) on first use only."""

    def __init__(self, config: dict[str, Any], device: torch.device, progress: bool = False):
        self.config, self.device, self.progress = config, device, progress
        self.latent = is_latent_store(config["data"])
        self.identity = data_identity(str(config["data"]))  # what the split is taken over now
        self.key = data_key(config, self.identity)
        self._splits: tuple[ImageSet, ImageSet] | None = None
        self.note = (
            "latent store: the DiT trained on all records; the held-out split is 20% of them, decoded, "
            "unseen by the judge only" if self.latent else "held-out split: 20% of each class, never seen in training"
        )

    def splits(self) -> tuple[ImageSet, ImageSet]:
        if self._splits is None:
            data = self.config["data"]
            if self.latent:
                self._splits = _decode_store(data, self.device, self.progress)
            else:
                size = self.config.get("image_size")
                self._splits = (load_data(data, "train", size), load_data(data, "heldout", size))
        return self._splits


def pixels(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, 3) for Inception (greyscale repeated)."""
    x = to_uint8(images.float())
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def get_judge(run_dir: Path, real: RealImages, num_classes: int, in_channels: int, device: torch.device) -> Judge:
    """The run's cached judge, or a new one trained on its training split (and cached)."""
    folder = run_dir / "judge"
    judge = load_judge(folder, real.key, num_classes, in_channels, device)
    if judge is None:
        train, heldout = real.splits()
        judge = train_judge(train.images, train.labels, num_classes, real.key, device)
        score_heldout(judge, heldout.images, heldout.labels)
        judge.save(folder)
    return judge


@dataclass
class RunReport:
    data: str
    cfg: float
    steps: int
    sampler: str
    per_class: int
    class_accuracy: float  # share of samples read as their requested class
    heldout_accuracy: float  # the judge on real held-out images: the ceiling
    accuracy_ratio: float  # class_accuracy / heldout_accuracy (the goal: >= 0.8)
    classes: list[dict[str, Any]]  # per class: id, name, samples and heldout (accuracy), read_as (most common reading)
    judge: dict[str, Any]
    note: str
    fid: float | None = None
    sfid: float | None = None
    precision: float | None = None
    recall: float | None = None
    fid_real: float | None = None  # as many real training images vs held-out: the floor
    num_heldout: int | None = None
    data_changed: bool | None = None  # the data differs from what training recorded (None: nothing recorded)
    data_warning: str | None = None  # the line that says so
    nfe: int | None = None  # model evaluations per sample

    def line(self) -> str:
        worst = sorted(self.classes, key=lambda c: c["samples"])[:3]
        text = (
            f"quality ({self.data}, cfg {self.cfg:g}, {self.steps} {self.sampler.upper()} steps"
            + (f", {self.nfe} evaluation{'s' if self.nfe != 1 else ''}" if self.nfe is not None else "") + f", {self.per_class} per class): "
            f"class accuracy {self.class_accuracy:.3f} (judge on real held-out {self.heldout_accuracy:.3f}, "
            f"ratio {self.accuracy_ratio:.2f}) | lowest: "
            + ", ".join(f"{c['name']} {c['samples']:.2f}" for c in worst)
        )
        if self.fid is not None:
            text += (
                f" | FID {self.fid:.2f} vs {self.num_heldout} held-out (real train vs held-out {self.fid_real:.2f}), "
                f"precision {self.precision:.3f}, recall {self.recall:.3f}"
            )
        return text

    def table(self) -> str:
        rows = [f"{'class':>12}  samples  real held-out  samples mostly read as"]
        rows += [f"{c['name'][:12]:>12}  {c['samples']:7.3f}  {c['heldout']:13.3f}  {c['read_as']}" for c in self.classes]
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _inception_reference(run_dir: Path, real: RealImages, inception, progress: bool):
    from ditforge.metrics import accumulate_features, is_reference_file, load_reference, save_reference

    path = run_dir / "judge" / REFERENCE_FILE
    if path.is_file() and is_reference_file(path):
        ref = load_reference(path)
        if ref.extractor == getattr(inception, "description", ref.extractor) and ref.data == real.key:
            return ref
    _, heldout = real.splits()
    acc = accumulate_features(inception, pixels(heldout.images), keep_pool=10_000, batch_size=64, progress=progress)
    ref = acc.reference(getattr(inception, "description", ""))
    ref.data = real.key
    save_reference(path, ref)
    return ref


def _real_floor(judge: Judge, run_dir: Path, real: RealImages, inception, ref, count: int, progress: bool) -> float:
    """FID of `count` real training images (balanced over classes, seed 0) vs the held-out split; cached."""
    from ditforge.metrics import accumulate_features, fid

    cached = judge.info.fid_real or {}
    if cached.get("count") == count and cached.get("extractor") == ref.extractor:
        return float(cached["fid"])
    train, _ = real.splits()
    labels = train.labels.numpy()
    rng = np.random.default_rng(0)
    per = math.ceil(count / train.num_classes)
    idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in range(train.num_classes)])[:count]
    acc = accumulate_features(inception, pixels(train.images[np.sort(idx)]), batch_size=64, progress=progress)
    value = fid(acc.stats("pool"), ref.pool_stats)
    judge.info.fid_real = {"count": count, "fid": value, "extractor": ref.extractor}
    judge.save_info(run_dir / "judge")
    return value


def evaluate_run(
    model: DiT,
    config: dict[str, Any],
    run_dir: str | Path,
    class_names: list[str],
    per_class: int = 50,
    cfg_scale: float = 1.5,
    steps: int = 50,
    sampler: str | None = None,
    seed: int = 0,
    objective: Objective = DiffusionObjective(),
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    with_fid: bool = True,
    inception_path: str | None = None,
    progress: bool = False,
    *,
    spacing: str = DEFAULT_SPACING,
    cfg_interval: tuple[float, float] | None = None,
    precision: str = "fp32",
    trained_on: dict[str, Any] | None = None,
) -> RunReport:
    """Judge `per_class` samples of every class of `model`, trained with `config` in `run_dir`;
    `trained_on` is the checkpoint's `data` record, to tell whether the data changed since."""
    run_dir = Path(run_dir)
    sampler = sampler or default_sampler(objective)
    device = next(model.parameters()).device
    real = RealImages(config, device, progress)
    classes = list(range(model.num_classes))
    x, y = generate(model, classes, per_class, cfg_scale, steps, sampler, seed, objective, progress=progress,
                    spacing=spacing, cfg_interval=cfg_interval, precision=precision,
                    batch_size=CPU_SAMPLE_BATCH if device.type == "cpu" else SAMPLE_BATCH)
    if decode is not None:
        x = torch.cat([decode(x[s : s + DECODE_BATCH].to(device)).float().cpu() for s in range(0, len(x), DECODE_BATCH)])
    judge = get_judge(run_dir, real, model.num_classes, x.shape[1], device)
    pred = judge.predict(x)
    accuracy = float((pred == y.numpy()).mean())
    per = per_class_accuracy(pred, y.numpy(), model.num_classes)
    names = [class_names[c] if c < len(class_names) else str(c) for c in classes]
    info = judge.info
    report = RunReport(
        data=Path(config["data"]).name, cfg=cfg_scale, steps=steps, sampler=sampler, per_class=per_class,
        nfe=objective_sampler(objective, sampler, steps, spacing).nfe,
        class_accuracy=accuracy, heldout_accuracy=info.heldout_accuracy,
        accuracy_ratio=accuracy / info.heldout_accuracy if info.heldout_accuracy > 0 else float("nan"),
        classes=[dict(id=c, name=names[c], samples=per[c], heldout=info.heldout_per_class[c],
                      read_as=names[int(np.bincount(pred[y.numpy() == c], minlength=len(classes)).argmax())])
                 for c in classes],
        judge=dict(kind="cnn", train_images=info.train_count, heldout_images=info.heldout_count,
                   steps=info.steps, train_seconds=round(info.seconds, 1), cache=str(run_dir / "judge")),
        note=real.note,
    )
    trained_now = (real.identity or {}).get("items", 0) if real.latent else info.train_count  # the DiT's share of the data now
    report.data_changed, report.data_warning = data_change(trained_on, real.identity, trained_now, real.latent)
    if with_fid:
        from ditforge.metrics import InceptionFeatures, evaluate_batches

        inception = InceptionFeatures(inception_path, device=device, batch_size=64)
        ref = _inception_reference(run_dir, real, inception, progress)
        result = evaluate_batches(inception, pixels(x), ref, progress=progress)
        report.fid, report.sfid = result["fid"], result["sfid"]
        report.precision, report.recall = result["precision"], result["recall"]
        report.num_heldout = ref.num_images
        report.fid_real = _real_floor(judge, run_dir, real, inception, ref, len(x), progress)
    return report

