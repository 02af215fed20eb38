"""The objective boundary: what a model is trained to predict and how its samples are drawn.

Two objectives implement one small interface, and the training step (``train/step.py``), the
samplers and the evaluations see only that interface:

* ``diffusion`` (``diffusion/objective.py``): DiT's Gaussian diffusion, epsilon prediction with
  learned variance, integer times in [0, T); samplers ``ddpm``, ``ddim``, ``dpm++2m``, ``unipc``,
  ``dpm++2m-sde``.
* ``flow`` (``flow/objective.py``): SiT's flow matching, velocity (or noise / score) prediction,
  times in [0, 1]; samplers ``euler``, ``heun``, ``ab2``, ``sde``.
* ``meanflow`` (``meanflow/objective.py``): MeanFlow (Geng et al. 2025), the average velocity over
  an interval, times (t, r) in [0, 1]; the network takes the interval as a second time
  (`model_options`); sampler ``meanflow``, 1 evaluation by default.

    objective.sample_time(n, generator, device) -> (n,) times of a training batch ((n, 2) for meanflow: t, r)
    objective.training_losses(model, x0, t, y, noise, drop) -> {"loss": (N,), ...}
        model(x_t, t, y, **options) the network with the step's label drops (``force_drop_ids``
        may be overridden; meanflow passes ``interval`` and ``tangents``); drop (N,) those drops
    objective_of_run(cfg, teacher) -> the objective that distils the frozen `teacher` network (meanflow's
        --mf-velocity teacher, `uses_teacher`; ``train/init_from.py`` builds the teacher, the step passes it)
    objective_sampler(objective, name, steps, spacing) -> sampler(denoise, noise, generator) -> x0
    sampler.guidance_times((lo, hi)) -> the guidance interval in the network's time units
    sampler.guidance_scale(cfg) -> the classifier-free guidance scale applied at sampling

The run's config (``TrainConfig.objective`` with its ``diffusion`` / ``flow`` / ``meanflow``
sections) names the objective; every checkpoint holds that config, so ``sample`` and ``eval``
rebuild it (``objective_from_config``; configs written before objectives existed are diffusion).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol

import torch
from torch import Tensor

from ditforge.diffusion.objective import DiffusionObjective
from ditforge.diffusion.sampling import SAMPLERS as DIFFUSION_SAMPLERS
from ditforge.diffusion.sampling import DEFAULT_SPACING, Sampler
from ditforge.errors import UserError
from ditforge.flags import section_from_dict
from ditforge.flow import FLOW_SAMPLERS, FlowObjective, FlowSampler
from ditforge.meanflow import DEFAULT_STEPS as MEANFLOW_STEPS
from ditforge.meanflow import MEANFLOW_SAMPLERS, MeanFlowObjective, MeanFlowSampler

__all__ = [
    "OBJECTIVES", "Objective", "DiffusionObjective", "FlowObjective", "MeanFlowObjective", "objective_from_config",
    "objective_of_run", "samplers_of", "default_sampler", "default_steps", "default_cfg", "check_cfg", "objective_sampler",
    "check_steps", "model_options", "uses_teacher",
]

OBJECTIVES = ("diffusion", "flow", "meanflow")
#: Sampling defaults per objective, the same for `sample`, bulk `.npz`, `eval` and the previews:
#: the fewest evaluations that stayed within the sampling noise of the best sampler on our
#: curves (README "Fast samplers": `benchmarks/sampler_curve.py` on the digits and MNIST, at cfg
#: 1.0 and 1.5). Diffusion: DPM-Solver++(2M) SDE at 20 steps against DDPM at 250 (FID 22.36 /
#: 22.31 on the digits at cfg 1.5, 23.97 / 23.58 at 1.0; Lu et al. 2022 report 15-20 steps for
#: guided sampling). Flows: Euler at 20 steps against Heun at 50 (100 evaluations; 20.89 / 21.80,
#: MNIST 56.45 / 72.66). Ten steps scored as well on these small models, but not on the
#: published ImageNet curves, so 20. MeanFlow: the one jump it is trained for
#: (``meanflow/sampling.py``). The paper's protocol is `--sampler ddpm --steps 250`.
_DEFAULTS = {"diffusion": ("dpm++2m-sde", 20), "flow": ("euler", 20), "meanflow": ("meanflow", MEANFLOW_STEPS)}


class Objective(Protocol):
    """What ``train/step.py`` calls: implemented by ``DiffusionObjective``, ``FlowObjective`` and
    ``MeanFlowObjective``."""

    name: ClassVar[str]

    def sample_time(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor: ...

    def training_losses(
        self, model: Callable[..., Tensor], x0: Tensor, t: Tensor, y: Tensor, noise: Tensor, drop: Tensor | None = None
    ) -> dict[str, Tensor]: ...


def objective_from_config(config: dict[str, Any], learn_sigma: bool = True) -> Objective:
    """The objective a run's config (``TrainConfig.to_dict()``, as in ``config.json`` and every
    checkpoint) trains with."""
    kind = config.get("objective", "diffusion")
    if kind == "flow":
        return section_from_dict(FlowObjective, "flow", config.get("flow", {}))
    if kind == "meanflow":
        return section_from_dict(MeanFlowObjective, "meanflow", config.get("meanflow", {}))
    if kind != "diffusion":
        raise UserError(f"unknown objective {kind!r}; choose one of: {', '.join(OBJECTIVES)}")
    d = config.get("diffusion", {})
    return DiffusionObjective(d.get("noise_schedule", "linear"), d.get("diffusion_steps", 1000), learn_sigma)


def objective_of_run(cfg: Any, teacher: Callable[..., Tensor] | None = None) -> Objective:
    """The objective of a ``TrainConfig`` (what ``train/step.py`` trains and the previews sample);
    with `teacher`, the frozen network it distils (`uses_teacher`)."""
    objective = objective_from_config(cfg.to_dict(), cfg.model.learn_sigma)
    if teacher is None:
        return objective
    if not uses_teacher(objective):
        raise ValueError(f"a {objective.name}-objective run distils no teacher")
    return objective.with_teacher(teacher)


def uses_teacher(objective: Objective) -> bool:
    """Whether training `objective` calls a frozen teacher network, the model --init-from loads
    (MeanFlow's ``--mf-velocity teacher``; ``train/init_from.py`` keeps it)."""
    return isinstance(objective, MeanFlowObjective) and objective.velocity == "teacher"


def _kind(objective: Objective | str) -> str:
    return objective if isinstance(objective, str) else objective.name


def samplers_of(objective: Objective | str) -> tuple[str, ...]:
    return {"flow": FLOW_SAMPLERS, "meanflow": MEANFLOW_SAMPLERS}.get(_kind(objective), DIFFUSION_SAMPLERS)


def default_sampler(objective: Objective | str) -> str:
    return _DEFAULTS[_kind(objective)][0]


def default_steps(objective: Objective | str) -> int:
    """The sampling steps when none are given (every command alike); for a diffusion model with
    fewer diffusion steps T than that, T."""
    steps = _DEFAULTS[_kind(objective)][1]
    if isinstance(objective, DiffusionObjective):
        steps = min(steps, objective.diffusion_steps)
    return steps


def default_cfg(objective: Objective, usual: float) -> float:
    """The guidance scale when none is given: the one built into a model trained with guidance
    (MeanFlow's ``--train-cfg``), else the command's `usual` one (sample 4.0, eval 1.5)."""
    if isinstance(objective, MeanFlowObjective) and objective.guided:
        return objective.built_in_scale
    if isinstance(objective, MeanFlowObjective) and objective.guidance_input:
        return min(usual, objective.train_cfg_max)  # the largest scale it was trained on, at most
    return usual


def check_cfg(objective: Objective, cfg: float) -> None:
    """UserError when `cfg` is a scale a model cannot sample at: a model trained with its guidance
    built in (MeanFlow, omega != 1 or kappa != 0) samples at that scale, omega / (1 - kappa), only."""
    scale = objective.built_in_scale if isinstance(objective, MeanFlowObjective) and objective.guided else None
    if scale is not None and abs(cfg - scale) > 1e-5 * scale:  # the scale as printed (6 digits) passes
        raise UserError(f"this MeanFlow model has guidance scale {scale:g} built in (trained with "
                        f"{objective.guidance_flags}) and samples at that scale only; use --cfg {scale:g} (the default), "
                        f"not {cfg:g}")
    if isinstance(objective, MeanFlowObjective) and objective.guidance_input and not 1 <= cfg <= objective.train_cfg_max:
        raise UserError(f"this MeanFlow model takes the guidance scale as an input, trained on [1, {objective.train_cfg_max:g}] "
                        f"(--train-cfg-max {objective.train_cfg_max:g}); use a --cfg in that range, not {cfg:g}")


def model_options(objective: Objective | str) -> dict[str, Any]:
    """What an objective needs of the network beyond the model config, as `create_model` keyword
    arguments (recorded in a run's model_args): MeanFlow's interval input, and iMF's guidance-scale
    input for a MeanFlow objective with ``train_cfg_max``; nothing for the others, so their model
    args and state-dict keys are what they were."""
    if _kind(objective) != "meanflow":
        return {}
    scale_input = isinstance(objective, MeanFlowObjective) and objective.guidance_input
    return {"interval_embedding": True, **({"guidance_embedding": True} if scale_input else {})}


def check_steps(objective: Objective, steps: int) -> None:
    """UserError unless ``steps`` is a valid number of sampling steps for ``objective``."""
    top = objective.diffusion_steps if isinstance(objective, DiffusionObjective) else None
    if not isinstance(steps, int) or steps < 1 or (top is not None and steps > top):
        limit = f"between 1 and {top} (the diffusion steps T)" if top else "a positive whole number"
        raise UserError(f"steps must be {limit}, got {steps!r}")


def objective_sampler(
    objective: Objective, name: str | None, steps: int, spacing: str = DEFAULT_SPACING
) -> Sampler | FlowSampler | MeanFlowSampler:
    """The sampler called ``name`` (None: the objective's default) for a model of ``objective``."""
    name = name or default_sampler(objective)
    if name not in samplers_of(objective):
        raise UserError(
            f"sampler {name!r} does not sample a {objective.name}-objective model; choose one of: "
            f"{', '.join(samplers_of(objective))}"
        )
    check_steps(objective, steps)
    if isinstance(objective, FlowObjective):
        return FlowSampler(name, steps, objective)
    if isinstance(objective, MeanFlowObjective):
        return MeanFlowSampler(name, steps, objective)
    return Sampler(
        name, steps, objective.noise_schedule, objective.diffusion_steps, objective.learn_sigma, spacing
    )
