"""How good are a model's samples of a built-in data set (digits, mnist)?

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ditforge.data.sources import ImageSet, is_builtin, load_data
from ditforge.diffusion.sampling import DEFAULT_SPACING, SOLVERS
from ditforge.errors import UserError
from ditforge.metrics.statistics import feature_statistics, frechet_distance
from ditforge.models import DiT
from ditforge.objectives import DiffusionObjective, Objective, default_sampler, objective_sampler
from ditforge.sampling.generate import generate
from ditforge.sampling.options import interval_text

FEATURE_SEED = 0


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
    nfe: int | None = None  # model evaluations per sample (None in reports written before it)

    def line(self) -> str:
        how = f"{self.steps} {self.sampler.upper()} steps" + (f" ({self.spacing} spacing)" if self.spacing else "")
        how += f", {self.nfe} evaluation{'s' if self.nfe != 1 else ''}" if self.nfe is not None else ""
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
        spacing if sampler in SOLVERS else None, cfg_interval, objective_sampler(objective, sampler, steps, spacing).nfe,
    )
