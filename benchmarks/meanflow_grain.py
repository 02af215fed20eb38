"""Is a one-jump MeanFlow student's distance gap the grain of its samples? Paired samples, the same
noise, of a flow teacher (20 AB2 steps) and its distillation (1 jump), judged by the built-in set's
judge (`evaluation/builtin.py`, 50 samples a class): the distance of each; the rms difference of
the pairs and its high band (what a 3x3 binomial blur leaves out); the teacher plus white noise
of that high-band energy; and each set blurred.

    .venv/bin/python benchmarks/meanflow_grain.py runs/noflag-mnist-adamw runs/mf-mnist/distil-noflag

(README, "Measured", MeanFlow: the no-flag MNIST run and its 925-step distillation.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ditforge.data.sources import load_data
from ditforge.evaluation.builtin import DigitJudge
from ditforge.metrics.statistics import feature_statistics, frechet_distance
from ditforge.sampling.generate import generate
from ditforge.sampling.load import load_for_sampling


def blur(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> the same, a 3x3 binomial low-pass (edges replicated)."""
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k[None, None])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teacher", help="the flow run")
    ap.add_argument("student", help="its MeanFlow distillation")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=50)
    a = ap.parse_args()
    torch.set_num_threads(2)
    teacher, student = load_for_sampling(a.teacher), load_for_sampling(a.student)
    name = json.loads((Path(a.teacher) / "config.json").read_text())["data"]  # a built-in set: the judge's
    train, held = load_data(name, "train"), load_data(name, "heldout")
    judge = DigitJudge(train)
    ref = feature_statistics(judge.features(held.images))

    def fd(x: torch.Tensor) -> float:
        return frechet_distance(*feature_statistics(judge.features(x)), *ref)

    classes = list(range(train.num_classes))
    for seed in range(a.seeds):
        xt, y = generate(teacher.model, classes, a.per_class, 1.0, 20, "ab2", seed, teacher.objective)  # (N, 1, H, W)
        xs, _ = generate(student.model, classes, a.per_class, 1.0, 1, "meanflow", seed, student.objective)
        diff = xs - xt
        high = float((diff - blur(diff)).std())  # the residual's high-band rms
        white = torch.randn(xt.shape, generator=torch.Generator().manual_seed(100 + seed))
        grain = white * high / float((white - blur(white)).std())  # white noise of the same high-band energy
        print(f"seed {seed}: distance teacher {fd(xt):.3f}, student {fd(xs):.3f}, teacher + grain {fd(xt + grain):.3f}, "
              f"teacher blurred {fd(blur(xt)):.3f}, student blurred {fd(blur(xs)):.3f}; pairs differ by "
              f"{float(diff.pow(2).mean().sqrt()):.3f} rms, {high:.3f} in the high band; class accuracy teacher "
              f"{(judge.predict(xt) == y.numpy()).mean():.3f}, student {(judge.predict(xs) == y.numpy()).mean():.3f}",
              flush=True)


if __name__ == "__main__":
    main()
