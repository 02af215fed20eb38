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
unconditional model). omega = 1 is no guidance and costs nothing extra. The paper's improved form
(its appendix; the authors' code, ``guidance_fn``: kappa 0.5 and omega 1 in its ImageNet config)
mixes in the model's own conditional velocity as well (``--train-cfg-kappa``),

    v~ = omega v + kappa u_theta(z_t, t, t | y) + (1 - omega - kappa) u_theta(z_t, t, t | null),

whose fixed point u(y) = u(null) + omega / (1 - kappa) (E[v | z_t, y] - u(null)) is guidance at
the scale S = omega / (1 - kappa) (``built_in_scale``): the model samples at --cfg S; kappa = 0 is
the form above. Both apply only at the noise levels t in ``train_cfg_interval`` (the code's
t_start, t_end; elsewhere omega = 1, kappa = 0: the target is v), so the built-in guidance has an
interval as sampling-time guidance can (Kynkaanniemi et al. 2024).

The guidance scale as a network input (improved MeanFlow, iMF: Geng, Lu, Wu, Shechtman, Kolter,
He 2025, arXiv 2512.02012, Sec. 5; ``--train-cfg-max S``): omega is drawn per sample, log-uniform
on [1, S] (iMF's power distribution with beta = 1), and fed to the network (``w_embedder``,
``models/dit.py``), so one model samples at any scale in [1, S] in one evaluation. The target
follows iMF: with the network's own instantaneous velocities (h = 0, no gradient) v_c =
u_theta(z_t, t, t | y, omega) and v_u = u_theta(z_t, t, t | null, 1),

    v~ = v + (1 - 1/omega) (v_c - v_u),

whose fixed point v_c = v_u + omega (E[v | z_t, y] - v_u) is classifier-free guidance at scale
omega. Its JVP runs along v_c (`--mf-tangent model`, below; v_u for a row whose label is
dropped, whose target stays v) or along v~ (`sample`).

Distillation from a trained flow model (``--mf-velocity teacher``, with ``--init-from``): the
velocity v is the frozen source model's instantaneous velocity v_T(z_t, t) (the model the run
started from, at h = 0, no gradient) instead of the sample's eps - x, in the target and as the
tangent. The fixed point is the same kind of object, the average velocity of an ODE, but of the
teacher's ODE dz/dt = v_T rather than the data's: the identity u = v - (t - r) du/dt holds
exactly along the teacher's trajectories, and the target's variance is no longer the conditional
velocity's (eps - x given z_t scatters around its mean v by the data's spread), so far fewer steps
learn it. This is flow-map distillation (Boffi, Albergo, Vanden-Eijnden 2024, "Flow map
matching", arXiv 2406.07507, their Lagrangian / Eulerian losses; Sabour, Fidler, Kreis 2025,
"Align Your Flow", arXiv 2506.14603, with the MeanFlow identity as their Eulerian loss). With
guidance built in (omega != 1, or iMF's scale input) the teacher is guided too:

    v~ = v_T(z_t, t | null) + S (v_T(z_t, t | y) - v_T(z_t, t | null)),

S = omega / (1 - kappa) (the fixed point of the mix above, since the teacher's velocities are the
exact ones; S = 1 outside the guidance interval), from one forward of the doubled batch; a row
whose label the step dropped gets v_T(z_t, t | null).
The teacher's own 20-step samples are then what a one-step student can at best reproduce.

The JVP's tangent (``--mf-tangent``): the velocity the target's total derivative is taken along.
MeanFlow uses the sample's own v (or v~; `sample`, the default); iMF uses the network's own
instantaneous velocity u_theta(z_t, t, t) (`model`, no gradient, one more forward without
gradient when the scale is not an input): the true trajectory's direction is E[v | z_t], of which
v is a noisy draw, so the network's estimate gives a target of lower variance once it is good
(a fine-tune from a flow model starts with it good).

Our network's conventions (as ``flow/objective.py``): it sees SiT's time s = 1 - t (0 = noise,
1 = data) and predicts SiT's velocity, so its output is F = -u (the average velocity in s); its
second time input is the interval h = t - r >= 0 (the same in s and t: (1 - r) - (1 - t)). So

    u(z, r, t) = -F(z, 1 - t, t - r),       along (dz, dt, dr) = (v, 1, 0):  (dz, ds, dh) = (v, -1, 1),

and du/dt = -dF. A model with a zero-initialised interval embedder is, at h = 0, exactly the flow
model it starts from, with the same sign and time (``models/dit.py``). Only the first C output
channels are used (a learned-sigma network's other C get no gradient), as for flow models.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar

import torch
from torch import Tensor

from ditforge.diffusion.gaussian import mean_flat
from ditforge.flags import flag
from ditforge.flow.paths import Path

__all__ = ["MeanFlowObjective", "sample_time_pairs", "sample_guidance_scales"]


#: What the JVP's tangent can be (module docstring)
TANGENTS = ("sample", "model")
#: Where the velocity v of the target comes from (module docstring): the sample's eps - x, or the
#: frozen model the run started from (--init-from), distilled
VELOCITIES = ("sample", "teacher")


def _like(t: Tensor, x: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1), broadcastable against x (N, C, H, W)."""
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def sample_guidance_scales(n: int, generator: torch.Generator | None, device: torch.device, top: float) -> Tensor:
    """(n,) float32 guidance scales omega, log-uniform on [1, top]: top ** U, U ~ U[0, 1) (n uniform
    draws from ``generator``)."""
    u = torch.rand(n, generator=generator, device=device)  # (n,)
    return torch.exp(u * torch.log(torch.tensor(float(top), device=device)))  # (n,) in [1, top)


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
    train_cfg_kappa: float = field(default=0.0, metadata=flag(
        "--train-cfg-kappa", "meanflow: the paper's mixing scale kappa in [0, 1) of training-time guidance: the target "
        "velocity omega v + kappa u(y) + (1 - omega - kappa) u(null), the model's own conditional and unconditional "
        "velocities; the scale built in is omega / (1 - kappa) (the authors' ImageNet setting: --train-cfg 1 "
        "--train-cfg-kappa 0.5, scale 2)", metavar="KAPPA"))
    train_cfg_interval: tuple[float, float] = field(default=(0.0, 1.0), metadata=flag(
        "--train-cfg-interval", "meanflow: the noise levels t (0 = data, 1 = noise) where training-time guidance "
        "(--train-cfg, --train-cfg-kappa) applies; elsewhere the target is the unguided velocity (the paper: 0 1)",
        metavar=("LO", "HI")))
    train_cfg_max: float = field(default=0.0, metadata=flag(
        "--train-cfg-max", "meanflow, improved MeanFlow (iMF): the guidance scale as a network input, drawn log-uniform in "
        "[1, S] for each sample at training; such a model samples at any --cfg in [1, S] in one evaluation (0 = off)",
        metavar="S"))
    tangent: str = field(default="sample", metadata=flag(
        "--mf-tangent", "meanflow: the velocity the JVP runs along: the sample's v (the paper) or the network's own "
        "instantaneous velocity, without gradient (iMF)", choices=TANGENTS))
    velocity: str = field(default="sample", metadata=flag(
        "--mf-velocity", "meanflow: the velocity v of the target and its JVP: the sample's eps - x (the paper) or the "
        "instantaneous velocity of the frozen model that --init-from loads (teacher: distils a flow model into one "
        "step; guided by --train-cfg / --train-cfg-max with the teacher's own unconditional velocity)",
        choices=VELOCITIES))

    name: ClassVar[str] = "meanflow"

    def __post_init__(self) -> None:
        for key in ("time_mean", "time_std", "flow_share", "weight_p", "weight_c", "train_cfg", "train_cfg_kappa",
                    "train_cfg_max"):
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
        if self.tangent not in TANGENTS:
            raise ValueError(f"meanflow tangent must be one of {', '.join(TANGENTS)}, got {self.tangent!r}")
        if not (self.train_cfg_max == 0 or self.train_cfg_max > 1):
            raise ValueError(f"meanflow train_cfg_max (the largest guidance scale input) must be > 1, or 0 for none; got "
                             f"{self.train_cfg_max!r}")
        if self.velocity not in VELOCITIES:
            raise ValueError(f"meanflow velocity must be one of {', '.join(VELOCITIES)}, got {self.velocity!r}")
        if self.velocity == "teacher" and self.tangent == "model":
            raise ValueError("meanflow velocity 'teacher' runs the JVP along the teacher's velocity, the trajectory's own "
                             "direction; tangent 'model' (the network's own estimate of it) does not combine with it: "
                             "drop --mf-tangent model")
        if not 0.0 <= self.train_cfg_kappa < 1.0:
            raise ValueError(f"meanflow train_cfg_kappa must be in [0, 1) (0 = the plain guided target; the scale built in "
                             f"is omega / (1 - kappa)), got {self.train_cfg_kappa!r}")
        interval = self.train_cfg_interval
        if isinstance(interval, list):  # a run's config.json gives lists back
            object.__setattr__(self, "train_cfg_interval", interval := tuple(interval))
        if (not isinstance(interval, tuple) or len(interval) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in interval)
                or not 0.0 <= interval[0] < interval[1] <= 1.0):
            raise ValueError(f"meanflow train_cfg_interval must be two noise levels 0 <= LO < HI <= 1 (0 = data, 1 = noise), "
                             f"got {interval!r}")
        if self.train_cfg_interval != (0.0, 1.0) and self.train_cfg_max:
            raise ValueError(f"meanflow train_cfg_interval {list(interval)} limits a scale built in (--train-cfg, "
                             "--train-cfg-kappa), not the scale as an input (--train-cfg-max); drop --train-cfg-interval")
        if self.train_cfg_interval != (0.0, 1.0) and not self.guided:
            raise ValueError(f"meanflow train_cfg_interval {list(interval)} limits training-time guidance, and there is none: "
                             "give --train-cfg OMEGA (not 1) or --train-cfg-kappa, or drop --train-cfg-interval")
        if self.train_cfg_max and self.guided:
            raise ValueError(f"meanflow train_cfg {self.train_cfg:g} with train_cfg_kappa {self.train_cfg_kappa:g} (one "
                             f"scale built in, {self.built_in_scale:g}) and train_cfg_max {self.train_cfg_max:g} (the scale "
                             "as an input) exclude each other; give one of them")

    def with_teacher(self, teacher: Callable[..., Tensor]) -> "MeanFlowObjective":
        """A copy of these settings that distils `teacher` (``--mf-velocity teacher``): the frozen
        network the run started from, called as the model is (``teacher(z, s, y, interval=h,
        force_drop_ids=...)``). Not a setting: it is not in the config, nor compared."""
        bound = replace(self)
        object.__setattr__(bound, "_teacher", teacher)
        return bound

    @property
    def interpolant(self) -> Path:
        return Path("linear")

    @property
    def guided(self) -> bool:
        """Whether the model has guidance built in (trained with omega != 1, or with kappa)."""
        return self.train_cfg != 1.0 or self.train_cfg_kappa != 0.0

    @property
    def built_in_scale(self) -> float:
        """The guidance scale a guided model samples at: omega / (1 - kappa) (module docstring)."""
        return self.train_cfg / (1.0 - self.train_cfg_kappa)

    @property
    def guidance_flags(self) -> str:
        """The options that built the guidance in, as a user gives them: ``--train-cfg 1.5``, with
        `` --train-cfg-kappa 0.5`` when kappa is set (for messages)."""
        kappa = f" --train-cfg-kappa {self.train_cfg_kappa:g}" if self.train_cfg_kappa else ""
        return f"--train-cfg {self.train_cfg:g}{kappa}"

    def inside_interval(self, t: Tensor, like: Tensor) -> Tensor:
        """(N, 1, ..., 1) in the dtype of `like`: 1 where the noise level `t` (N,) is in
        ``train_cfg_interval`` (its ends included), 0 elsewhere."""
        lo, hi = self.train_cfg_interval
        return _like((t >= lo) & (t <= hi), like)

    def guidance_weights(self, t: Tensor, like: Tensor) -> tuple[float | Tensor, float | Tensor]:
        """(omega, kappa) of the target's mix at noise levels `t` (N,): the settings' floats when
        their interval is all of [0, 1], else (N, 1, ..., 1) tensors with 1 and 0 outside it."""
        if self.train_cfg_interval == (0.0, 1.0):
            return self.train_cfg, self.train_cfg_kappa
        inside = self.inside_interval(t, like)
        return 1 + inside * (self.train_cfg - 1), inside * self.train_cfg_kappa

    @property
    def guidance_input(self) -> bool:
        """Whether the network takes the guidance scale as an input (iMF, ``--train-cfg-max``)."""
        return self.train_cfg_max > 0

    # -- training -----------------------------------------------------------------------------
    def sample_time(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """(n, 2) training times, each row (t, r) with t >= r (0 = data): `sample_time_pairs`; with
        the guidance scale as an input, (n, 3): each row (t, r, omega), omega drawn after the times
        (`sample_guidance_scales`), so the times are those of a run without it."""
        times = sample_time_pairs(n, generator, device, self.time_mean, self.time_std, self.flow_share)
        if not self.guidance_input:
            return times
        return torch.cat([times, sample_guidance_scales(n, generator, device, self.train_cfg_max)[:, None]], dim=1)

    @staticmethod
    def network_time(t: Tensor) -> Tensor:
        """The network's time input: SiT's s = 1 - t (as the flow objective)."""
        return 1 - t

    def guided_velocity(
        self, model: Callable[..., Tensor], z: Tensor, t: Tensor, y: Tensor, v: Tensor, drop: Tensor | None
    ) -> Tensor:
        """v~ = omega v + kappa u_theta(z_t, t, t | y) + (1 - omega - kappa) u_theta(z_t, t, t | null)
        (module docstring), v itself where `drop` (N,) is set, outside the guidance interval and
        without guidance. No gradient: it is a target and a tangent. One forward of the batch
        (the null class's), of the doubled batch with kappa (the labels' too)."""
        if not self.guided:
            return v
        n, channels = z.shape[0], z.shape[1]
        omega, kappa = self.guidance_weights(t, v)
        s, h = self.network_time(t), torch.zeros_like(t)  # the instantaneous velocity: h = 0
        with torch.no_grad():
            null = torch.ones(n, dtype=torch.long, device=z.device)  # force_drop_ids: every label to the null class
            if not self.train_cfg_kappa:
                u_null = -model(z, s, y, interval=h, force_drop_ids=null)[:, :channels].to(v.dtype)  # (N, C, H, W)
                v_guided = omega * v + (1 - omega) * u_null  # (N, C, H, W)
            else:
                out = model(torch.cat([z, z]), torch.cat([s, s]), torch.cat([y, y]), interval=torch.cat([h, h]),
                            force_drop_ids=torch.cat([torch.zeros_like(null), null]))  # (2N, C', H, W)
                u_cond, u_null = -out[:n, :channels].to(v.dtype), -out[n:, :channels].to(v.dtype)  # (N, C, H, W) each
                v_guided = omega * v + kappa * u_cond + (1 - omega - kappa) * u_null  # (N, C, H, W)
        if drop is None:
            return v_guided
        return torch.where(_like(drop, v).bool(), v, v_guided)  # (N, C, H, W)

    def teacher_velocity(self, z: Tensor, t: Tensor, y: Tensor, drop: Tensor | None, w: Tensor | None) -> Tensor:
        """(N, C, H, W) the frozen teacher's instantaneous velocity at (z_t, t), guided at the built-in
        scale (``built_in_scale`` inside ``train_cfg_interval``, 1 outside it; or the per-sample
        scale `w` (N,) of an iMF network) with its own
        unconditional velocity (module docstring); the null class's where `drop` (N,) is set. No
        gradient: one forward of the batch, of the doubled batch when guided."""
        teacher = getattr(self, "_teacher", None)
        if teacher is None:
            raise RuntimeError("meanflow velocity 'teacher' needs the frozen teacher network: with_teacher(net)")
        n, channels = z.shape[0], z.shape[1]
        s, h = self.network_time(t), torch.zeros_like(t)  # the instantaneous velocity: h = 0
        dropped = torch.zeros(n, dtype=torch.long, device=z.device) if drop is None else drop.long()  # 1 = null class
        with torch.no_grad():
            if not (self.guided or w is not None):
                return -teacher(z, s, y, interval=h, force_drop_ids=dropped)[:, :channels].to(z.dtype)
            null = torch.ones_like(dropped)
            out = teacher(torch.cat([z, z]), torch.cat([s, s]), torch.cat([y, y]), interval=torch.cat([h, h]),
                          force_drop_ids=torch.cat([dropped, null]))  # (2N, C', H, W)
            v_c, v_u = -out[:n, :channels].to(z.dtype), -out[n:, :channels].to(z.dtype)  # (N, C, H, W): as asked, null
            if w is not None:
                scale = _like(w, z)
            elif self.train_cfg_interval == (0.0, 1.0):
                scale = self.built_in_scale  # a float (omega itself without kappa, as before kappa existed)
            else:
                scale = 1 + self.inside_interval(t, z) * (self.built_in_scale - 1)  # (N, 1, 1, 1)
            return v_u + scale * (v_c - v_u)  # a dropped row: v_c = v_u, so v_u

    def model_velocity(
        self, model: Callable[..., Tensor], z: Tensor, t: Tensor, y: Tensor, drop: Tensor | None, rows: Tensor
    ) -> Tensor:
        """(N, C, H, W) the network's own instantaneous velocity u_theta(z_t, t, t) at the step's
        labels (`drop` (N,) set: the null class's), without gradient: the `model` tangent, on the
        rows (N,) bool that take a JVP (r < t) alone, 0 on the others, which no JVP runs along."""
        picked = rows.nonzero().squeeze(1)  # (J,) (a host sync: their count)
        velocity = torch.zeros_like(z)  # (N, C, H, W)
        if picked.numel():
            with torch.no_grad():
                out = model(z[picked], self.network_time(t[picked]), y[picked], interval=torch.zeros_like(t[picked]),
                            force_drop_ids=None if drop is None else drop[picked])  # (J, C', H, W)
                velocity.index_copy_(0, picked, -out[:, : z.shape[1]].to(z.dtype))
        return velocity

    def scale_conditioned_velocity(
        self, model: Callable[..., Tensor], z: Tensor, t: Tensor, y: Tensor, v: Tensor, w: Tensor, drop: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(v~, tangent), each (N, C, H, W), for a network with the scale omega `w` (N,) as an input
        (iMF, module docstring): v~ = v + (1 - 1/w) (v_c - v_u) and the tangent v_c, from one
        forward of the doubled batch at h = 0 with no gradient; v and v_u where `drop` (N,) is set."""
        n, channels = z.shape[0], z.shape[1]
        with torch.no_grad():
            rows = torch.cat([torch.zeros(n, dtype=torch.long, device=z.device), torch.ones(n, dtype=torch.long, device=z.device)])
            s = self.network_time(t)
            out = model(torch.cat([z, z]), torch.cat([s, s]), torch.cat([y, y]), interval=torch.zeros(2 * n, device=z.device,
                        dtype=t.dtype), force_drop_ids=rows, guidance=torch.cat([w, torch.ones_like(w)]))  # (2N, C', H, W)
            u_all = -out[:, :channels].to(v.dtype)  # the instantaneous velocities (h = 0): u = -F
            v_c, v_u = u_all[:n], u_all[n:]  # (N, C, H, W) each: conditional at omega, unconditional
            v_guided = v + _like(1 - 1 / w, v) * (v_c - v_u)  # (N, C, H, W)
        if drop is None:
            return v_guided, v_c
        dropped = _like(drop, v).bool()
        return torch.where(dropped, v, v_guided), torch.where(dropped, v_u, v_c)

    def prediction_and_target(
        self, model: Callable[..., Tensor], z: Tensor, r: Tensor, t: Tensor, y: Tensor, v: Tensor,
        tangent: Tensor | None = None, guidance: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(u_theta(z, r, t), u_tgt), both (N, C, H, W): the network's average velocity (with its
        graph to the weights) and the detached target of Eq. 10 for the velocity (tangent) ``v``,
        from one call of the network with tangents (``model(..., tangents=...)``: its plain
        forward with gradient and its JVP without, models/dit.py `forward_with_tangents`). Rows
        with r = t need no derivative (their target is v) and get none (``tangent_rows``), so a
        batch with the paper's 75% at r = t pays the JVP for a quarter of it. ``tangent`` (None: ``v``) is
        the velocity the JVP runs along; ``guidance`` (N,) the scale input of an iMF network."""
        channels, h = z.shape[1], t - r  # h (N,) the interval
        tangents = (v if tangent is None else tangent, -torch.ones_like(t), torch.ones_like(t))  # (dz, ds, dh) along d/dt
        scale = {} if guidance is None else {"guidance": guidance}
        out, d_out = model(z, self.network_time(t), y, interval=h, tangents=tangents, tangent_rows=h > 0, **scale)  # F, dF
        u, du_dt = -out[:, :channels], -d_out[:, :channels].detach()  # u = -F, du/dt = -dF
        u_tgt = v - _like(h, v) * du_dt.to(v.dtype)  # (N, C, H, W), Eq. 10
        return u, u_tgt.detach()

    def training_losses(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,  # (N, C, H, W) data
        t: Tensor,  # (N, 2) times (t, r); (N, 3) (t, r, omega) with the guidance scale as an input
        y: Tensor,  # (N,) labels
        noise: Tensor,  # (N, C, H, W) eps
        drop: Tensor | None = None,  # (N,) bool: labels the step drops to the null class
    ) -> dict[str, Tensor]:
        """Per-sample losses (N,): ``loss`` (the adaptively weighted squared error, module
        docstring) and ``u_mse``, the unweighted mean squared error of u against its target."""
        w = t[:, 2] if self.guidance_input else None  # (N,) omega, the iMF network's input
        t, r = t[:, 0], t[:, 1]  # (N,) each
        z = self.interpolant.interpolate(x0, noise, t)  # (N, C, H, W), z_t
        if self.velocity == "teacher":  # distillation: v and the tangent from the frozen teacher
            v = self.teacher_velocity(z, t, y, drop, w)  # (N, C, H, W)
            u, u_tgt = self.prediction_and_target(model, z, r, t, y, v, guidance=w)
        elif w is None:
            v = self.guided_velocity(model, z, t, y, noise - x0, drop)  # (N, C, H, W), v (or v~)
            tangent = self.model_velocity(model, z, t, y, drop, t > r) if self.tangent == "model" else v
            u, u_tgt = self.prediction_and_target(model, z, r, t, y, v, tangent=tangent)
        else:
            v, v_model = self.scale_conditioned_velocity(model, z, t, y, noise - x0, w, drop)  # (N, C, H, W) each
            tangent = v_model if self.tangent == "model" else v
            u, u_tgt = self.prediction_and_target(model, z, r, t, y, v, tangent=tangent, guidance=w)
        acc = torch.promote_types(u.dtype, torch.float32)  # float32 under bf16 autocast, float64 for float64
        error = u.to(acc) - u_tgt.to(acc)  # (N, C, H, W)
        mse = mean_flat(error**2)  # (N,)
        sq_norm = error.detach().pow(2).flatten(1).sum(dim=1)  # (N,) ||error||^2
        weight = 1 / (sq_norm + self.weight_c) ** self.weight_p  # (N,), no gradient
        return {"loss": weight * mse, "u_mse": mse.detach()}
