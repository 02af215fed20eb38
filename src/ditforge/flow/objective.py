"""The flow-matching objective (SiT): train a network to predict the velocity of a path from data to
noise; sample by integrating that velocity back from noise to data.

Ma et al. 2024, "SiT" (arXiv 2401.08740), Sec. 2.1-2.3; Lipman et al. 2023, "Flow Matching for
Generative Modeling", eq. 23 (the conditional flow-matching loss). With the path of ``paths.py``,
x_t = a(t) x0 + b(t) eps, t drawn by ``timesteps.py``, the loss per sample is

    velocity:  || F(x_t, s, y) - u ||^2,   u = -(a' x0 + b' eps)  (= x0 - eps on the linear path)
    noise:     || F(x_t, s, y) - eps ||^2
    score:     || b F(x_t, s, y) + eps ||^2      (SiT's score loss, F ~ -eps / b)

averaged over the C channels and pixels (``mean_flat``), with s = 1 - t. LightningDiT (Yao et
al. 2025, Sec. 4.1; its `transport.py` `use_cosine_loss`) adds, with weight w (``cosine_weight``),
the velocity direction loss  w * mean over pixels of (1 - cos(F_p, u_p)), the cosine taken over the
C channels of each pixel p (1 at w = 1 in LightningDiT). With one channel (grey pixel data) the
cosine is only the sign of F_p u_p and carries no gradient, so it is meant for latents. The network sees SiT's
time s (0 = noise, 1 = data) and a velocity prediction is SiT's u = dx/ds, so the published
SiT-XL/2 weights load and sample as they were trained. When the network learns sigma (2C output
channels, DiT's layout) only the first C are used, as SiT's ``forward`` does; the other C get no
gradient.

Noise and score predictions are singular at one end of the path, so SiT keeps their times inside
[1e-3, 1 - 1e-3] in training and sampling (``EPS``); the velocity is regular everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import Tensor

from ditforge.diffusion.gaussian import mean_flat
from ditforge.flags import flag

from .paths import PATHS, Path
from .timesteps import TIME_DISTRIBUTIONS, sample_times

__all__ = ["FlowObjective", "PREDICTIONS"]

PREDICTIONS = ("velocity", "noise", "score")
#: SiT's train_eps / sample_eps for the noise and score predictions.
EPS = 1e-3


@dataclass(frozen=True)
class FlowObjective:
    """Flow matching on one path with one prediction target and a training-time distribution."""

    path: str = field(default="linear", metadata=flag(
        "--path", "flow: interpolant, linear (1-t) x0 + t eps or SiT's GVP cos/sin", choices=PATHS))
    prediction: str = field(default="velocity", metadata=flag(
        "--prediction", "flow: what the network predicts", choices=PREDICTIONS))
    time_distribution: str = field(default="uniform", metadata=flag(
        "--time-dist", "flow: training times, uniform or SD3's logit-normal", choices=TIME_DISTRIBUTIONS))
    time_mean: float = field(default=0.0, metadata=flag("--time-mean", "flow: logit-normal mean"))
    time_std: float = field(default=1.0, metadata=flag("--time-std", "flow: logit-normal std"))
    time_shift: float = field(default=1.0, metadata=flag(
        "--time-shift", "flow: SD3's shift of the training times towards noise, 1 = none"))
    cosine_weight: float = field(default=0.0, metadata=flag(
        "--cosine-loss", "flow, velocity prediction: weight of LightningDiT's velocity direction loss "
        "1 - cos(F, u) over channels, added to the MSE (0 = off; LightningDiT: 1)"))

    name: ClassVar[str] = "flow"

    def __post_init__(self) -> None:
        Path(self.path)  # validates the name
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown flow prediction {self.prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
        if self.time_distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(
                f"unknown time distribution {self.time_distribution!r}; choose one of: {', '.join(TIME_DISTRIBUTIONS)}"
            )
        if not self.time_std > 0:
            raise ValueError(f"time_std (the logit-normal's std) must be > 0, got {self.time_std!r}")
        if not self.time_shift > 0:
            raise ValueError(f"time_shift must be > 0 (1 = no shift), got {self.time_shift!r}")
        if not self.cosine_weight >= 0:
            raise ValueError(f"cosine_weight must be >= 0 (0 = off), got {self.cosine_weight!r}")
        if self.cosine_weight and self.prediction != "velocity":
            raise ValueError(f"the cosine loss is LightningDiT's velocity direction loss; it needs prediction "
                             f"'velocity', not {self.prediction!r}")

    @property
    def interpolant(self) -> Path:
        return Path(self.path)

    @property
    def eps(self) -> float:
        """How far training and sampling times stay from the ends of [0, 1]."""
        return 0.0 if self.prediction == "velocity" else EPS

    # -- training -----------------------------------------------------------------------------
    def sample_time(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """(n,) training times in [0, 1] (0 = data)."""
        return sample_times(
            n, self.time_distribution, generator, device,
            mean=self.time_mean, std=self.time_std, shift=self.time_shift, eps=self.eps,
        )

    @staticmethod
    def network_time(t: Tensor) -> Tensor:
        """The network's time input: SiT's s = 1 - t (module docstring)."""
        return 1 - t

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the network's first C channels are trained towards (module docstring)."""
        if self.prediction == "velocity":
            return -self.interpolant.velocity(x0, eps, t)
        return eps if self.prediction == "noise" else -eps

    def training_losses(
        self,
        model: Callable[[Tensor, Tensor, Tensor], Tensor],
        x0: Tensor,  # (N, C, H, W) data
        t: Tensor,  # (N,) times in [0, 1]
        y: Tensor,  # (N,) labels
        noise: Tensor,  # (N, C, H, W) eps
        drop: Tensor | None = None,  # (N,) the step's label drops, applied by `model`; no change to the target
    ) -> dict[str, Tensor]:
        """Per-sample losses (N,): ``loss`` (the flow-matching MSE, plus the cosine term when
        ``cosine_weight`` > 0: module docstring), ``mse`` and, then, ``cosine``."""
        x_t = self.interpolant.interpolate(x0, noise, t)  # (N, C, H, W)
        out = model(x_t, self.network_time(t), y)[:, : x0.shape[1]]  # (N, C, H, W): the first C channels
        if self.prediction == "score":
            out = -self.interpolant.noise_from_score(out, t)  # b * score ~ -eps
        target = self.target(x0, noise, t)  # (N, C, H, W)
        mse = mean_flat((out - target) ** 2)  # (N,)
        if not self.cosine_weight:
            return {"loss": mse, "mse": mse}
        cosine = mean_flat(1 - torch.nn.functional.cosine_similarity(out, target, dim=1))  # (N,): per pixel over C
        return {"loss": mse + self.cosine_weight * cosine, "mse": mse, "cosine": cosine}

    # -- sampling -----------------------------------------------------------------------------
    def velocity(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """dx_t/dt (N, C, H, W) from the network's first C channels ``out`` at x_t, times t (N,)."""
        if self.prediction == "velocity":
            return -out
        path = self.interpolant
        eps = out if self.prediction == "noise" else path.noise_from_score(out, t)
        return path.velocity_from_noise(eps, x, t)

    def time_grid(self, steps: int) -> Tensor:
        """steps + 1 times from the noise end to the data end, uniform in t (float64)."""
        return torch.linspace(1 - self.eps, self.eps, steps + 1, dtype=torch.float64)
