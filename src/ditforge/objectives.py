"""The objective boundary: what a model is trained to predict and how its samples are drawn.

Two objectives implement one small interface, and the training step (``train/step.py``), the
samplers and the evaluations see only that interface:

* ``diffusion`` (``diffusion/objective.py``): DiT's Gaussian diffusion, epsilon prediction with
  learned variance, integer times in [0, T); samplers ``ddpm``, ``ddim``, ``dpm++2m``, ``unipc``,
  ``dpm++2m-sde``.
* ``flow`` (``flow/objective.py``): SiT's flow matching, velocity (or noise / score) prediction,
  times in [0, 1]; samplers ``euler``, ``heun``, ``ab2``, ``sde``.

    objective.sample_time(n, generator, device) -> (n,) times of a training batch
    objective.training_losses(model, x0, t, y, noise) -> {"loss": (N,), ...}
    objective_sampler(objective, name, steps, spacing) -> sampler(denoise, noise, generator) -> x0
    sampler.guidance_times((lo, hi)) -> the guidance interval in the network's time units

The run's config (``TrainConfig.objective`` with its ``diffusion`` / ``flow`` sections) names the
objective; every checkpoint holds that config, so ``sample`` and ``eval`` rebuild it
(``objective_from_config``; configs written before objectives existed are diffusion).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol

import torch
from torch import Tensor

from ditforge.diffusion.objective import DiffusionObjective
from ditforge.diffusion.sampling import SAMPLERS as DIFFUSION_SAMPLERS
from ditforge.diffusion.sampling import DEFAULT_SPACING, Sampler
from ditforge.errors import UserError
from ditforge.flow import FLOW_SAMPLERS, FlowObjective, FlowSampler

__all__ = [
    "OBJECTIVES", "Objective", "DiffusionObjective", "FlowObjective", "objective_from_config", "objective_of_run", "samplers_of",
    "default_sampler", "default_steps", "objective_sampler", "check_steps",
]

OBJECTIVES = ("diffusion", "flow")
#: Sampling defaults per objective: the paper's 250 DDPM steps; Heun for flows (SiT's ODE is
#: adaptive dopri5; 50 Heun steps = 100 evaluations is within its error on our models).
_DEFAULTS = {"diffusion": ("ddpm", 250), "flow": ("heun", 50)}


class Objective(Protocol):
    """What ``train/step.py`` calls: implemented by ``DiffusionObjective`` and ``FlowObjective``."""

    name: ClassVar[str]

    def sample_time(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor: ...

    def training_losses(
        self, model: Callable[[Tensor, Tensor, Tensor], Tensor], x0: Tensor, t: Tensor, y: Tensor, noise: Tensor
    ) -> dict[str, Tensor]: ...


def objective_from_config(config: dict[str, Any], learn_sigma: bool = True) -> Objective:
    """The objective a run's config (``TrainConfig.to_dict()``, as in ``config.json`` and every
    checkpoint) trains with."""
    kind = config.get("objective", "diffusion")
    if kind == "flow":
        return FlowObjective(**config.get("flow", {}))
    if kind != "diffusion":
        raise UserError(f"unknown objective {kind!r}; choose one of: {', '.join(OBJECTIVES)}")
    d = config.get("diffusion", {})
    return DiffusionObjective(d.get("noise_schedule", "linear"), d.get("diffusion_steps", 1000), learn_sigma)


def objective_of_run(cfg: Any) -> Objective:
    """The objective of a ``TrainConfig`` (what ``train/step.py`` trains and the previews sample)."""
    return objective_from_config(cfg.to_dict(), cfg.model.learn_sigma)


def samplers_of(objective: Objective | str) -> tuple[str, ...]:
    kind = objective if isinstance(objective, str) else objective.name
    return FLOW_SAMPLERS if kind == "flow" else DIFFUSION_SAMPLERS


def default_sampler(objective: Objective | str) -> str:
    return _DEFAULTS[objective if isinstance(objective, str) else objective.name][0]


def default_steps(objective: Objective | str) -> int:
    return _DEFAULTS[objective if isinstance(objective, str) else objective.name][1]


def check_steps(objective: Objective, steps: int) -> None:
    """UserError unless ``steps`` is a valid number of sampling steps for ``objective``."""
    top = objective.diffusion_steps if isinstance(objective, DiffusionObjective) else None
    if not isinstance(steps, int) or steps < 1 or (top is not None and steps > top):
        limit = f"between 1 and {top} (the diffusion steps T)" if top else "a positive whole number"
        raise UserError(f"steps must be {limit}, got {steps!r}")


def objective_sampler(
    objective: Objective, name: str | None, steps: int, spacing: str = DEFAULT_SPACING
) -> Sampler | FlowSampler:
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
    return Sampler(
        name, steps, objective.noise_schedule, objective.diffusion_steps, objective.learn_sigma, spacing
    )
