"""Sampling a MeanFlow model: `steps` jumps along its average velocity (``solvers.py``), with the
call of the other objectives' samplers: ``sampler(denoise, noise, generator=...) -> x0``.

``denoise(x, s, interval=h)`` is the (guided) network at SiT's time s = 1 - t and interval
h = t - r (``objective.py``: its first C channels are F = -u). Each step is one model evaluation
(two forward rows per sample with sampling-time guidance, `guided_denoiser`).

Guidance: a model trained with omega = 1 (``--train-cfg 1``) samples with classifier-free
guidance at any ``--cfg`` as flow models do, the conditional and unconditional average velocities
mixed per step (u~ = u_null + cfg (u - u_null), two evaluations per step; for the one-step map
z_0 = z_1 - u it extrapolates from the unconditional sample towards the conditional one). That is
not the average velocity of the guided flow, whose trajectories differ from both: a heuristic (the
sampler of zhuyu-cs/MeanFlow does the same), exact only as the steps shrink; the paper's guidance
is the trained one (Sec. 4.2). A model trained with omega != 1 has its guidance built in: its one
evaluation is the guided velocity at scale omega, so its ``--cfg`` is omega (the default) and the
network runs once, conditionally (`guidance_scale`: 1); any other scale is a one-line error
(``objectives.check_cfg``), since the model cannot be re-guided at another scale. A model trained
with the scale as an input (iMF, ``--train-cfg-max S``) samples at any ``--cfg`` in [1, S]: the
scale is its input (`guidance_input`), the network runs once, conditionally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .objective import MeanFlowObjective
from .solvers import mean_flow_jumps

__all__ = ["MEANFLOW_SAMPLERS", "MeanFlowSampler", "DEFAULT_STEPS"]

MEANFLOW_SAMPLERS = ("meanflow",)
#: One evaluation: the point of MeanFlow (the paper's ImageNet FID 3.43 at 1 NFE, 2.93 at 2).
DEFAULT_STEPS = 1


@dataclass(frozen=True)
class MeanFlowSampler:
    name: str = "meanflow"
    steps: int = DEFAULT_STEPS
    objective: MeanFlowObjective = MeanFlowObjective()

    def __post_init__(self) -> None:
        if self.name not in MEANFLOW_SAMPLERS:
            raise ValueError(f"unknown MeanFlow sampler {self.name!r}; choose one of: {', '.join(MEANFLOW_SAMPLERS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive whole number, got {self.steps!r}")

    @property
    def nfe(self) -> int:
        """Model evaluations a sample costs (twice that many forward rows with sampling-time guidance)."""
        return self.steps

    def guidance_times(self, interval: tuple[float, float] | None) -> tuple[float, float] | None:
        """A guidance interval in fractions of the noise level t -> the network's s = 1 - t (each
        step is guided or not by the time t it starts from)."""
        return None if interval is None else (1 - interval[1], 1 - interval[0])

    def guidance_scale(self, cfg: float) -> float:
        """The classifier-free guidance scale applied at sampling for ``--cfg`` ``cfg``: 1 (one
        conditional evaluation) for a model with its guidance built in, else ``cfg``."""
        return 1.0 if self.objective.guided or self.objective.guidance_input else cfg

    def guidance_input(self, cfg: float) -> float | None:
        """The scale fed to the network as an input for ``--cfg`` ``cfg``: ``cfg`` for an iMF model
        (trained with the scale as an input), else None (no such input)."""
        return float(cfg) if self.objective.guidance_input else None

    def describe(self) -> str:
        """E.g. ``1 MEANFLOW step (1 model evaluation)``."""
        plural = "s" if self.steps != 1 else ""
        return f"{self.steps} MEANFLOW step{plural} ({self.nfe} model evaluation{plural})"

    def time_grid(self) -> Tensor:
        """steps + 1 times from the noise end (1) to the data end (0), equal intervals (float64)."""
        return torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)

    def __call__(
        self,
        denoise: Callable[..., Tensor],
        noise: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Tensor:
        """x_0 (N, C, H, W) from ``noise`` (N, C, H, W) at t = 1 (``generator`` unused: deterministic)."""
        channels = noise.shape[1]
        dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32  # of the times and the jumps

        def average_velocity(z: Tensor, r: float, t: float) -> Tensor:  # u(z, r, t) (N, C, H, W)
            s = torch.full((z.shape[0],), 1 - t, device=z.device, dtype=dtype)  # (N,)
            h = torch.full((z.shape[0],), t - r, device=z.device, dtype=dtype)  # (N,)
            return -denoise(z, s, interval=h)[:, :channels].to(dtype)  # u = -F

        return mean_flow_jumps(average_velocity, noise.to(dtype), self.time_grid(), progress)
