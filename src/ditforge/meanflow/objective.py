"""The MeanFlow objective: train a network to predict the *average* velocity of the flow over an
interval, so that one evaluation crosses the whole path from noise to data.

Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling" (arXiv
2505.13447; equation numbers of its v1). On the linear path of flow matching (``flow/paths.py``),

    z_t = (1 - t) x + t eps,        v = dz_t/dt = eps - x,             t in [0, 1], 1 = noise,

the average velocity over [r, t] is u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds (Eq. 3), which
satisfies the MeanFlow identity (Eq. 6; d/dt the total derivative along the trajectory, r fixed)

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),
    d/dt u = v . grad_z u + d_t u                                       (Eq. 8)

A network u_theta is trained towards its right-hand side, evaluated with the network itself and
held fixed (stop-gradient, Eqs. 9-10):

    u_tgt = sg( v - (t - r) (v . grad_z u_theta + d_t u_theta) ),

the bracket one Jacobian-vector product with tangents (v, 0, 1) for (z, r, t). v is the
conditional velocity eps - x (its expectation given z_t is the marginal velocity, and u_tgt is
linear in v, so the target is unbiased). The loss of a sample (Sec. 4.3, adaptive weighting) is

    w * mean over pixels (u_theta - u_tgt)^2,     w = sg( 1 / (||u_theta - u_tgt||^2 + c)^p ),

||.||^2 the squared L2 norm over all C H W values; p = 1, c = 1e-3 as the paper (p = 0 is the
plain squared error; p = 0.5 the pseudo-Huber loss). The mean over pixels (instead of the sum)
is a constant factor 1/(CHW) on the paper's loss, so that p = 0 with r = t is exactly
``flow/objective.py``'s velocity MSE.

Times (t, r): two logit-normal draws (mean -0.4, std 1: the paper's ImageNet default), sorted so
that t >= r, and r set to t for a share of the batch (75%: the paper's "25% of r != t"); at r = t
the target is v and the loss is flow matching.

Training-time guidance (Sec. 4.2, Eqs. 13-19): with omega != 1 (``--train-cfg``) the target is
built from the guided velocity

    v~ = omega v + (1 - omega) u_theta(z_t, t, t | null)

(the model's own unconditional instantaneous velocity, no gradient) in place of v, both in
u_tgt and as the JVP's tangent, so that one evaluation of the trained model gives a sample guided
at scale omega. Samples whose label the step dropped to the null class keep v (they train the
unconditional model). omega = 1 is no guidance and costs nothing extra.

Our network's conventions (as ``flow/objective.py``): it sees SiT's time s = 1 - t (0 = noise,
1 = data) and predicts SiT's velocity, so its output is F = -u (the average velocity in s); its
second time input is the interval h = t - r >= 0 (the same in s and t: (1 - r) - (1 - t)). So

    u(z, r, t) = -F(z, 1 - t, t - r),       along (dz, dt, dr) = (v, 1, 0):  (dz, ds, dh) = (v, -1, 1),

and du/dt = -dF. A model with a zero-initialised interval embedder is, at h = 0, exactly the flow
model it starts from, with the same sign and time (``models/dit.py``). Only the first C output
channels are used (a learned-sigma network's other C get no gradient), as for flow models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import Tensor

from ditforge.diffusion.gaussian import mean_flat
from ditforge.flags import flag
from ditforge.flow.paths import Path

__all__ = ["MeanFlowObjective", "sample_time_pairs"]


def _like(t: Tensor, x: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1), broadcastable against x (N, C, H, W)."""
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def sample_time_pairs(
    n: int, generator: torch.Generator | None, device: torch.device, mean: float, std: float, flow_share: float
) -> Tensor:
    """(n, 2) float32 pairs (t, r), t >= r, in [0, 1]: two logit-normal draws sigmoid(mean + std n)
    sorted, then r = t for each sample with probability ``flow_share`` (one tensor of 2n normal
    draws, then n uniform ones, from ``generator``)."""
    pair = torch.sigmoid(mean + std * torch.randn((n, 2), generator=generator, device=device))  # (n, 2)
    t, r = pair.amax(dim=1), pair.amin(dim=1)  # (n,) each, t >= r
    same = torch.rand(n, generator=generator, device=device) < flow_share  # (n,) bool: r = t
    return torch.stack([t, torch.where(same, t, r)], dim=1)  # (n, 2)


@dataclass(frozen=True)
class MeanFlowObjective:
    """MeanFlow on the linear path with the paper's time sampler, adaptive weight and training-time
    guidance (module docstring)."""

    time_mean: float = field(default=-0.4, metadata=flag(
        "--mf-time-mean", "meanflow: mean of the logit-normal of both times t and r (the paper: -0.4)"))
    time_std: float = field(default=1.0, metadata=flag(
        "--mf-time-std", "meanflow: std of the logit-normal of both times (the paper: 1.0)"))
    flow_share: float = field(default=0.75, metadata=flag(
        "--mf-flow-share", "meanflow: share of each batch trained at r = t, i.e. on flow matching (the paper: 0.75, "
        "'25%% of r != t')"))
    weight_p: float = field(default=1.0, metadata=flag(
        "--mf-weight-p", "meanflow: power p of the adaptive loss weight 1 / (||error||^2 + c)^p (0 = plain squared "
        "error, 0.5 = pseudo-Huber; the paper: 1)"))
    weight_c: float = field(default=1e-3, metadata=flag(
        "--mf-weight-c", "meanflow: constant c > 0 of the adaptive loss weight (the paper: 1e-3)"))
    train_cfg: float = field(default=1.0, metadata=flag(
        "--train-cfg", "meanflow: guidance scale omega built into the model at training (the target velocity mixed "
        "with the model's own unconditional one; 1 = none); such a model samples at --cfg omega in one evaluation",
        metavar="OMEGA"))

    name: ClassVar[str] = "meanflow"

    def __post_init__(self) -> None:
        for key in ("time_mean", "time_std", "flow_share", "weight_p", "weight_c", "train_cfg"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
                raise ValueError(f"meanflow {key} must be a finite number, got {value!r}")
        if not self.time_std > 0:
            raise ValueError(f"meanflow time_std (the logit-normal's std) must be > 0, got {self.time_std!r}")
        if not 0.0 <= self.flow_share <= 1.0:
            raise ValueError(f"meanflow flow_share (the share of r = t) must be in [0, 1], got {self.flow_share!r}")
        if not self.weight_p >= 0:
            raise ValueError(f"meanflow weight_p must be >= 0 (0 = plain squared error), got {self.weight_p!r}")
        if not self.weight_c > 0:
            raise ValueError(f"meanflow weight_c must be > 0 (the paper: 1e-3), got {self.weight_c!r}")
        if not self.train_cfg > 0:
            raise ValueError(f"meanflow train_cfg (omega) must be > 0 (1 = no guidance), got {self.train_cfg!r}")

    @property
    def interpolant(self) -> Path:
        return Path("linear")

    @property
    def guided(self) -> bool:
        """Whether the model has guidance built in (trained with omega != 1)."""
        return self.train_cfg != 1.0

    # -- training -----------------------------------------------------------------------------
    def sample_time(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """(n, 2) training times, each row (t, r) with t >= r (0 = data): `sample_time_pairs`."""
        return sample_time_pairs(n, generator, device, self.time_mean, self.time_std, self.flow_share)

    @staticmethod
    def network_time(t: Tensor) -> Tensor:
        """The network's time input: SiT's s = 1 - t (as the flow objective)."""
        return 1 - t

    def guided_velocity(
        self, model: Callable[..., Tensor], z: Tensor, t: Tensor, y: Tensor, v: Tensor, drop: Tensor | None
    ) -> Tensor:
        """v~ = omega v + (1 - omega) u_theta(z_t, t, t | null) (module docstring), v itself where
        `drop` (N,) is set and for omega = 1. No gradient: it is a target and a tangent."""
        if not self.guided:
            return v
        n, channels = z.shape[0], z.shape[1]
        with torch.no_grad():
            null = torch.ones(n, dtype=torch.long, device=z.device)  # force_drop_ids: every label to the null class
            u_null = -model(z, self.network_time(t), y, interval=torch.zeros_like(t), force_drop_ids=null)[:, :channels]
            v_guided = self.train_cfg * v + (1 - self.train_cfg) * u_null.to(v.dtype)  # (N, C, H, W)
        if drop is None:
            return v_guided
        return torch.where(_like(drop, v).bool(), v, v_guided)  # (N, C, H, W)

    def prediction_and_target(
        self, model: Callable[..., Tensor], z: Tensor, r: Tensor, t: Tensor, y: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(u_theta(z, r, t), u_tgt), both (N, C, H, W): the network's average velocity (with its
        graph to the weights) and the detached target of Eq. 10 for the velocity (tangent) ``v``,
        from one forward-mode pass of the network (``model(..., tangents=...)``: its output and
        JVP; no second forward for the prediction). Rows with r = t need no derivative (their
        target is v): the network runs them as a plain forward (``tangent_rows``), so a batch
        with the paper's 75% at r = t pays the JVP for a quarter of it."""
        channels, h = z.shape[1], t - r  # h (N,) the interval
        tangents = (v, -torch.ones_like(t), torch.ones_like(t))  # (dz, ds, dh) along d/dt, r fixed
        out, d_out = model(z, self.network_time(t), y, interval=h, tangents=tangents, tangent_rows=h > 0)  # F, dF
        u, du_dt = -out[:, :channels], -d_out[:, :channels].detach()  # u = -F, du/dt = -dF
        u_tgt = v - _like(h, v) * du_dt.to(v.dtype)  # (N, C, H, W), Eq. 10
        return u, u_tgt.detach()

    def training_losses(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,  # (N, C, H, W) data
        t: Tensor,  # (N, 2) times (t, r)
        y: Tensor,  # (N,) labels
        noise: Tensor,  # (N, C, H, W) eps
        drop: Tensor | None = None,  # (N,) bool: labels the step drops to the null class
    ) -> dict[str, Tensor]:
        """Per-sample losses (N,): ``loss`` (the adaptively weighted squared error, module
        docstring) and ``u_mse``, the unweighted mean squared error of u against its target."""
        t, r = t[:, 0], t[:, 1]  # (N,) each
        z = self.interpolant.interpolate(x0, noise, t)  # (N, C, H, W), z_t
        v = self.guided_velocity(model, z, t, y, noise - x0, drop)  # (N, C, H, W), v (or v~)
        u, u_tgt = self.prediction_and_target(model, z, r, t, y, v)
        acc = torch.promote_types(u.dtype, torch.float32)  # float32 under bf16 autocast, float64 for float64
        error = u.to(acc) - u_tgt.to(acc)  # (N, C, H, W)
        mse = mean_flat(error**2)  # (N,)
        sq_norm = error.detach().pow(2).flatten(1).sum(dim=1)  # (N,) ||error||^2
        weight = 1 / (sq_norm + self.weight_c) ** self.weight_p  # (N,), no gradient
        return {"loss": weight * mse, "u_mse": mse.detach()}
