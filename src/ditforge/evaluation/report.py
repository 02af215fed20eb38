"""How good is this model? The one function that the `eval` command and the trainer's previews
call: for a model of a built-in set (digits, mnist) the built-in sets' judge (`builtin.py`), for
any other data the run report (`run_report.py`: the run's own judge, FID on its held-out split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ditforge.data.sources import is_builtin
from ditforge.diffusion.sampling import DEFAULT_SPACING
from ditforge.evaluation.builtin import BuiltinReport, evaluate_builtin
from ditforge.evaluation.run_report import RunReport, evaluate_run
from ditforge.models import DiT
from ditforge.objectives import Objective


@dataclass
class EvalResult:
    lines: list[str]  # what the command prints
    report: dict | None  # the JSON report; None when only reference statistics were asked for


def evaluate_model(
    model: DiT,
    config: dict[str, Any],
    run_dir: str | Path,
    class_names: list[str],
    per_class: int,
    cfg_scale: float,
    steps: int,
    sampler: str | None,
    seed: int,
    objective: Objective,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    with_fid: bool = True,
    inception_path: str | None = None,
    trained_on: dict[str, Any] | None = None,
    progress: bool = False,
    spacing: str = DEFAULT_SPACING,
    cfg_interval: tuple[float, float] | None = None,
    precision: str = "fp32",
) -> BuiltinReport | RunReport:
    """`per_class` samples of every class of `model` (trained with the run config `config`),
    judged; `decode` turns a latent model's samples into pixels, `trained_on` is the data
    identity its checkpoint recorded (the run report says when the data changed since)."""
    how = dict(progress=progress, spacing=spacing, cfg_interval=cfg_interval, precision=precision)
    args = (per_class, cfg_scale, steps, sampler, seed, objective)
    data_name = config.get("data", "")
    if is_builtin(data_name):
        return evaluate_builtin(model, data_name, *args, **how)
    return evaluate_run(model, config, run_dir, class_names, *args, decode, with_fid=with_fid,
                        inception_path=inception_path, trained_on=trained_on, **how)
