"""Gaussian diffusion: forward process, posterior, model parameterisation and losses.

Follows Ho et al. 2020 ("DDPM") and Nichol & Dhariwal 2021 ("Improved DDPM",
the ADM code base DiT builds on). Timesteps are 0-indexed: ``t`` in ``0..T-1``,
``betas[t]`` is the variance added by step ``t``, and ``x_t`` has been noised
``t + 1`` times. Step ``t == 0`` is the decoder step to the data.

Variable names and the paper symbols they stand for:

=================================  ==================================================
name                               symbol (paper, equation)
=================================  ==================================================
``betas[t]``                       beta_t (Ho eq. 2)
``alphas[t]``                      alpha_t = 1 - beta_t
``alphas_cumprod[t]``              alpha_bar_t = prod_{s<=t} alpha_s (Ho eq. 4)
``alphas_cumprod_prev[t]``         alpha_bar_{t-1}, with alpha_bar_{-1} := 1
``sqrt_recip_alphas_cumprod``      1 / sqrt(alpha_bar_t)
``sqrt_recipm1_alphas_cumprod``    sqrt(1 / alpha_bar_t - 1)
``posterior_variance[t]``          beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t (Ho eq. 7)
``posterior_mean_coef1[t]``        sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)  (Ho eq. 7, x_0)
``posterior_mean_coef2[t]``        sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)  (Ho eq. 7, x_t)
``x0``, ``pred_xstart``            x_0, and its prediction x^_0 (Ho eq. 15)
``noise``, ``eps``                 epsilon, and its prediction epsilon_theta (Ho eq. 11)
``v``                              v, the variance interpolation output (Nichol & Dhariwal eq. 15)
``mse``                            L_simple (Ho eq. 14)
``vb``                             L_{t-1} (KL, Ho eq. 5) or L_0 (decoder NLL, Ho eq. 13), in bits
=================================  ==================================================

Why one module of ~450 lines: the forward process, the posterior, the learned-variance
parameterisation and the VB loss share one set of coefficient tables and one definition of a
timestep; split apart, each would re-derive them (ADM's own file is 900 lines).

Coefficient tables are float64 numpy arrays, as in ADM; :meth:`GaussianDiffusion._extract`
gathers the per-sample entries and casts them to the dtype/device of the tensor
they multiply, so float64 inputs stay float64.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .schedules import beta_schedule, respace_betas, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "create_diffusion",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
]

_LOG2 = math.log(2.0)


# --------------------------------------------------------------------------- helpers


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension except the first (batch): (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), in nats.

    KL = 1/2 [ log(s2^2 / s1^2) + s1^2 / s2^2 + (m1 - m2)^2 / s2^2 - 1 ].
    Arguments broadcast; Python floats are promoted to the dtype/device of the
    first tensor argument (float64 if none is a tensor).
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, Tensor)), None)
    dtype = ref.dtype if ref is not None else torch.float64
    device = ref.device if ref is not None else None
    mean1, logvar1, mean2, logvar2 = (
        a if isinstance(a, Tensor) else torch.as_tensor(a, dtype=dtype, device=device)
        for a in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Standard normal CDF via the tanh approximation ADM uses (abs. error < 3e-4).

    Phi(x) ~= 1/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood (nats, elementwise) of data in [-1, 1] quantised to 256 bins.

    Ho et al. 2020, eq. 13: each value ``x`` owns the bin ``[x - 1/255, x + 1/255]``
    under N(means, exp(log_scales)^2), except the edge bins, which extend to
    -inf (for ``x < -0.999``) and +inf (for ``x > 0.999``). Probabilities are
    floored at 1e-12 before the log, as in ADM.

    x, means, log_scales: same shape, e.g. (N, C, H, W). ``log_scales`` is the
    log standard deviation (half the log variance).
    """
    if x.shape != means.shape or x.shape != log_scales.shape:
        raise ValueError(
            f"x, means and log_scales must have the same shape, got {tuple(x.shape)}, "
            f"{tuple(means.shape)} and {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))  # P(X <= x + 1/255)
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))  # P(X <= x - 1/255)
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))  # left edge bin (-inf, x + 1/255]
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))  # right edge bin
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))  # interior bin
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


# --------------------------------------------------------------------------- diffusion


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with an epsilon-predicting model.

    Args:
        betas: forward-process variances, shape (T,), each in (0, 1].
        learn_sigma: the model outputs 2C channels, epsilon then ``v``
            (Nichol & Dhariwal eq. 15); otherwise C channels of epsilon and the
            fixed "large" variance beta_t is used.
        timestep_map: for a respaced chain, the original timestep of each of the
            T steps (length T). The model is always called with
            ``timestep_map[t]`` so a respaced diffusion drives a model trained on
            the full chain. Identity if None.
    """

    def __init__(
        self,
        betas: np.ndarray,
        learn_sigma: bool = True,
        timestep_map: list[int] | None = None,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(
                f"betas must lie in (0, 1], got min {betas.min()!r} and max {betas.max()!r}"
            )
        self.betas = betas  # beta_t, (T,)
        self.num_timesteps = T = len(betas)
        self.learn_sigma = bool(learn_sigma)

        if timestep_map is None:
            timestep_map = list(range(T))
        if len(timestep_map) != T:
            raise ValueError(
                f"timestep_map has {len(timestep_map)} entries but there are {T} betas; "
                "it needs one original timestep per step"
            )
        self.timestep_map = torch.tensor(list(timestep_map), dtype=torch.long)  # (T,)
        self._timestep_map = np.asarray(timestep_map, dtype=np.int64)  # its source for per-device copies

        alphas = 1.0 - betas  # alpha_t
        self.alphas_cumprod = np.cumprod(alphas)  # alpha_bar_t (Ho eq. 4)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])  # alpha_bar_{t-1}
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)  # alpha_bar_{t+1}

        # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)   (Ho eq. 4)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # x_0 = x_t / sqrt(alpha_bar_t) - sqrt(1 / alpha_bar_t - 1) eps   (Ho eq. 15, inverted eq. 4)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)   (Ho eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: take log(beta~_1) there instead, as ADM does, so the log stays finite.
        if T > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:  # a single step has no beta~_1 to borrow; fall back to beta_0
            self.posterior_log_variance_clipped = np.log(betas.copy())
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # "fixedlarge" variance for learn_sigma=False: beta_t, with beta_0 replaced by
        # beta~_1 (ADM) so the decoder's variance is not needlessly large.
        fixed = betas.copy()
        if T > 1:
            fixed[0] = self.posterior_variance[1]
        self.fixed_large_variance = fixed
        self.fixed_large_log_variance = np.log(fixed)
        self.log_betas = np.log(betas)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.log_one_minus_alphas_cumprod = np.log(self.one_minus_alphas_cumprod)
        # coefficient tables as tensors, per (table, device, dtype): one copy to a device, not one a call
        self._tables: dict[tuple[int, torch.device, torch.dtype], tuple[np.ndarray, Tensor]] = {}

    # ------------------------------------------------------------------ utilities

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}, learn_sigma={self.learn_sigma}, "
            f"respaced={not torch.equal(self.timestep_map, torch.arange(self.num_timesteps))})"
        )

    def _table(self, arr: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (id(arr), device, dtype)
        hit = self._tables.get(key)
        if hit is None or hit[0] is not arr:  # the array is kept in the entry, so its id stays unique
            # Casting the table before the gather is exact (no arithmetic happens in between)
            # and avoids float64 on devices without it.
            hit = (arr, torch.as_tensor(arr).to(device=device, dtype=dtype))
            self._tables[key] = hit
        return hit[1]

    def _extract(self, arr: np.ndarray, t: Tensor, shape) -> Tensor:
        """Gather ``arr[t]`` per sample and shape it to broadcast against ``shape``.

        ``shape`` is normally the tensor the coefficient will multiply: its shape,
        dtype and device are used (so float64 inputs get float64 coefficients).
        A plain ``torch.Size``/tuple is also accepted (float32 on ``t``'s device).

        arr: (T,), t: (N,) long -> (N, 1, ..., 1) with ``len(shape)`` dims.
        """
        if isinstance(shape, Tensor):
            dtype, device, dims = shape.dtype, shape.device, shape.shape
        else:
            dtype, device, dims = torch.float32, t.device, torch.Size(shape)
        out = self._table(arr, device, dtype)[t.to(device)]  # (N,)
        return out.reshape(out.shape + (1,) * (len(dims) - 1))

    def _check_t(self, t: Tensor, x: Tensor) -> None:
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"t must have shape (N,) = ({x.shape[0]},) to match the batch, got {tuple(t.shape)}"
            )

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Original (pre-respacing) timesteps the model is conditioned on: (N,) -> (N,)."""
        return self._table(self._timestep_map, t.device, torch.long)[t]  # one copy per device, not one a call

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log variance of q(x_t | x_0) (Ho eq. 4)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = self._extract(self.one_minus_alphas_cumprod, t, x0).expand_as(x0)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x0).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) (Ho eq. 4): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        x0, noise: (N, C, H, W); t: (N,) long -> (N, C, H, W).
        """
        self._check_t(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Ho eq. 6-7).

        mu~_t = coef1 x_0 + coef2 x_t, beta~_t as in the table above.
        x0, x_t: (N, C, H, W); t: (N,) -> three (N, C, H, W) tensors.
        """
        if x0.shape != x_t.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} must equal x_t shape {tuple(x_t.shape)}")
        self._check_t(t, x_t)
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x0
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x^_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)   (Ho eq. 15)."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        """Inverse of :meth:`predict_xstart_from_eps`: eps = (x_t / sqrt(alpha_bar_t) - x^_0) / sqrt(1/alpha_bar_t - 1)."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
        ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def split_model_output(self, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split a model output into (eps, v), cast to ``x_t``'s dtype; v is None without learn_sigma.

        model_output: (N, 2C, H, W) if learn_sigma else (N, C, H, W); x_t: (N, C, H, W).
        """
        C = x_t.shape[1]
        expected = 2 * C if self.learn_sigma else C
        if model_output.shape[0] != x_t.shape[0] or model_output.shape[1] != expected or (
            model_output.shape[2:] != x_t.shape[2:]
        ):
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}; expected "
                f"{(x_t.shape[0], expected) + tuple(x_t.shape[2:])} "
                f"({'eps and v' if self.learn_sigma else 'eps only'}, learn_sigma={self.learn_sigma})"
            )
        # Do the diffusion math in x_t's precision (float32 when the model ran under autocast).
        model_output = model_output.to(x_t.dtype)
        if self.learn_sigma:
            eps, v = torch.split(model_output, C, dim=1)  # (N, C, H, W) each
            return eps, v
        return model_output, None

    def p_mean_variance(
        self,
        model_output: Tensor,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool = False,
    ) -> dict[str, Tensor]:
        """Parameters of p_theta(x_{t-1} | x_t) from a model output.

        Variance: learned range (Nichol & Dhariwal eq. 15),
            log Sigma = frac log(beta_t) + (1 - frac) log(beta~_t),  frac = (v + 1) / 2,
        or the fixed beta_t ("fixedlarge", beta_0 := beta~_1) when not learn_sigma.
        Mean: mu~_t(x^_0, x_t) of the posterior (Ho eq. 7), with x^_0 from eps (Ho eq. 15),
        clamped to [-1, 1] first if ``clip_denoised``.

        Returns a dict of (N, C, H, W) tensors: ``mean``, ``variance``, ``log_variance``,
        ``pred_xstart`` and ``eps`` (the model's raw epsilon prediction).
        """
        self._check_t(t, x_t)
        eps, v = self.split_model_output(model_output, x_t)
        if v is not None:
            min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)  # log beta~_t
            max_log = self._extract(self.log_betas, t, x_t)  # log beta_t
            frac = (v + 1.0) / 2.0  # v in [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1.0 - frac) * min_log  # (N, C, H, W)
            variance = torch.exp(log_variance)
        else:
            variance = self._extract(self.fixed_large_variance, t, x_t).expand_as(x_t)
            log_variance = self._extract(self.fixed_large_log_variance, t, x_t).expand_as(x_t)

        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    # ------------------------------------------------------------------ losses

    def vb_terms_bpd(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """One term of the variational bound, per sample, in bits per dimension: (N,).

        For t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) (Ho eq. 5).
        For t == 0: L_0 = -log p_theta(x_0 | x_1), the discretised decoder (Ho eq. 13).
        Both are averaged over dimensions and divided by log(2).
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LOG2  # (N,)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LOG2  # (N,)
        return torch.where(t.to(kl.device) == 0, decoder_nll, kl)

    def training_losses(
        self,
        model: Callable[[Tensor, Tensor, Tensor], Tensor],
        x0: Tensor,
        t: Tensor,
        y: Tensor,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample training losses, each of shape (N,).

        * ``mse``: L_simple = mean_flat((eps - eps_theta)^2) (Ho eq. 14).
        * ``vb`` (learn_sigma only): the VB term L_{t-1} of :meth:`vb_terms_bpd`, computed
          with eps_theta detached (ADM's "frozen_out") so it trains only the variance
          output v, scaled by T / 1000 (ADM's RESCALED_MSE; a no-op for T = 1000). With
          T = 1000 this is L_hybrid = L_simple + lambda L_vlb, lambda = 1e-3 (Nichol &
          Dhariwal eq. 16), since L_vlb sums T such terms.
        * ``loss``: mse + vb (or mse alone).

        The model is called as ``model(x_t, timestep_map[t], y)``.
        x0: (N, C, H, W); t: (N,) long in [0, T); y: (N,) class labels.
        """
        self._check_t(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)  # (N, C, H, W)
        model_output = model(x_t, self.model_timesteps(t), y)
        eps, v = self.split_model_output(model_output, x_t)

        terms: dict[str, Tensor] = {}
        terms["mse"] = mean_flat((noise - eps) ** 2)
        if v is not None:
            frozen_out = torch.cat([eps.detach(), v], dim=1)  # (N, 2C, H, W): no VB grad to eps
            terms["vb"] = self.vb_terms_bpd(frozen_out, x0, x_t, t) * (self.num_timesteps / 1000.0)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms


# --------------------------------------------------------------------------- factory


def create_diffusion(
    timestep_respacing: str | None = "",
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """Build a :class:`GaussianDiffusion` as DiT does.

    ``timestep_respacing`` is a :func:`~ditforge.diffusion.schedules.space_timesteps`
    string ("" / None for all ``diffusion_steps``, "250", "ddim50", "10,15,20").
    A respaced diffusion keeps the original alpha_bar at the kept steps and calls
    the model with the original timesteps.
    """
    betas = beta_schedule(noise_schedule, diffusion_steps)
    use_timesteps = space_timesteps(diffusion_steps, timestep_respacing)
    if len(use_timesteps) == diffusion_steps:
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    return GaussianDiffusion(
        respace_betas(betas, use_timesteps),
        learn_sigma=learn_sigma,
        timestep_map=use_timesteps,
    )
