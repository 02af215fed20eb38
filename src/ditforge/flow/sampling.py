"""Sampling a flow-objective model: a named solver over a time grid, as ``diffusion/sampling.py``
does for diffusion models (same call: ``sampler(denoise, noise, generator=...) -> x0``).

``denoise(x, s)`` is the (guided) network at SiT's time s = 1 - t; its first C channels are the
prediction of the objective (velocity, noise or score), turned into dx/dt here. ``steps`` counts
the intervals of the time grid: Euler, AB2 and the SDE cost ``steps`` model evaluations, Heun twice
that (``nfe``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .objective import FlowObjective
from .solvers import ab2, euler, euler_maruyama, heun

__all__ = ["FLOW_SAMPLERS", "FlowSampler"]

ODE_SOLVERS = {"euler": euler, "heun": heun, "ab2": ab2}
FLOW_SAMPLERS = (*ODE_SOLVERS, "sde")
#: SiT's last deterministic step of the SDE sampler (``--last-step-size``).
SDE_LAST_STEP = 0.04


@dataclass(frozen=True)
class FlowSampler:
    name: str
    steps: int
    objective: FlowObjective = FlowObjective()

    def __post_init__(self) -> None:
        if self.name not in FLOW_SAMPLERS:
            raise ValueError(f"unknown flow sampler {self.name!r}; choose one of: {', '.join(FLOW_SAMPLERS)}")
        if not isinstance(self.steps, int) or self.steps < 1 or (self.name == "sde" and self.steps < 2):
            raise ValueError(f"steps must be a positive whole number (the SDE needs 2 or more), got {self.steps!r}")

    @property
    def nfe(self) -> int:
        """Model evaluations a sample costs (twice that many forward rows with guidance on)."""
        return 2 * self.steps if self.name == "heun" else self.steps

    def guidance_times(self, interval: tuple[float, float] | None) -> tuple[float, float] | None:
        """A guidance interval in fractions of the noise level t -> the network's s = 1 - t."""
        return None if interval is None else (1 - interval[1], 1 - interval[0])

    @staticmethod
    def guidance_scale(cfg: float) -> float:
        """The classifier-free guidance scale applied at sampling for ``--cfg`` ``cfg``: ``cfg``."""
        return cfg

    @staticmethod
    def guidance_input(cfg: float) -> None:
        """The scale fed to the network as an input: none (only iMF models take one)."""
        return None

    def describe(self) -> str:
        """E.g. ``25 HEUN steps (50 model evaluations)``."""
        return f"{self.steps} {self.name.upper()} steps ({self.nfe} model evaluations)"

    def __call__(
        self,
        denoise: Callable[[Tensor, Tensor], Tensor],
        noise: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Tensor:
        """x_0 (N, C, H, W) from ``noise`` (N, C, H, W) at t = 1."""
        obj, channels = self.objective, noise.shape[1]
        path = obj.interpolant

        def times(x: Tensor, t: float) -> Tensor:
            return torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)  # (N,)

        def field(x: Tensor, t: float) -> Tensor:  # dx/dt (N, C, H, W)
            tt = times(x, t)
            return obj.velocity(denoise(x, obj.network_time(tt))[:, :channels].float(), x, tt)

        if self.name in ODE_SOLVERS:
            return ODE_SOLVERS[self.name](field, noise, obj.time_grid(self.steps), progress)

        def score(x: Tensor, v: Tensor, t: float) -> Tensor:
            tt = times(x, t)
            return path.score_from_noise(path.noise_from_velocity(v, x, tt), tt)

        def w(t: float) -> float:  # SiT's diffusion_form="sigma": w = the noise coefficient
            return float(path.coefficients(torch.tensor(t, dtype=torch.float64))[1])

        grid = torch.linspace(1 - obj.eps, SDE_LAST_STEP, self.steps, dtype=torch.float64)  # steps - 1 SDE steps
        return euler_maruyama(field, score, w, noise, grid, generator, last_step=SDE_LAST_STEP, progress=progress)
