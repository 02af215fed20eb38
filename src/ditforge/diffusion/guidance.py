"""Classifier-free guidance (Ho & Salimans 2022).

    eps~ = eps(x_t, null) + s (eps(x_t, y) - eps(x_t, null))

``s == 1`` is the plain conditional model, ``s == 0`` the unconditional one,
``s > 1`` sharpens towards the class. Only the epsilon channels are guided; the
variance channels ``v`` (when the model learns sigma) come from the conditional
half, as in DiT.

Options of the model beyond (x_t, t, y) (MeanFlow's ``interval``, one value per sample) pass
through ``denoise(x_t, t, **options)``, doubled with the batch when guided.

Guidance interval (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval
Improves Sample and Distribution Quality in Diffusion Models", Sec. 3): guidance only for
timesteps ``lo <= t <= hi``; elsewhere the model runs once, conditionally, on the plain batch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["guided_denoiser"]

#: Channels guided by the original DiT / GLIDE code (see ``legacy_three_channel``).
LEGACY_GUIDED_CHANNELS = 3


def guided_denoiser(
    model: Callable[[Tensor, Tensor, Tensor], Tensor],
    y: Tensor,
    cfg_scale: float,
    null_class: int,
    channels: int,
    legacy_three_channel: bool = False,
    interval: tuple[float, float] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap ``model(x, t, y)`` into a guided denoise function ``(x_t, t) -> output``.

    Args:
        model: class-conditional model; output (N, K, H, W) with K >= ``channels``
            (K = 2 * channels when it learns sigma).
        y: (N,) class labels for the batch to be sampled.
        cfg_scale: guidance scale s >= 0. With s == 1 the model runs once,
            conditionally; otherwise once on a doubled batch
            ``[x, x]``, ``[t, t]``, ``[y, null_class]``.
        null_class: the label of the "no class" embedding (DiT: ``num_classes``).
        channels: number of epsilon channels C at the front of the model output.
        legacy_three_channel: reproduce the original DiT sampler, which guides
            only the first 3 output channels; the remaining eps channels come
            from the conditional half.
            REFERENCE: guidance applied to the first 3 of 4 latent channels only, a bug carried over from GLIDE; guiding all channels at 1.375 gives the FID 3-channel guidance gives at 1.5.
            Use it only to reproduce the paper's numbers at its published scales.
        interval: ``(lo, hi)`` in the model's timesteps: guide only where ``lo <= t <= hi``
            (per sample), the conditional model elsewhere. None (default): guide at every t.

    Returns:
        ``denoise(x_t, t, **options) -> (N, K, H, W)``: guided eps in the first ``channels``
        channels, the conditional half's remaining channels after them; ``options`` are (N,)
        tensors passed on to the model (doubled with the batch).
    """
    if cfg_scale < 0:
        raise ValueError(
            f"cfg_scale must be >= 0 (1 = no guidance, > 1 = stronger guidance), got {cfg_scale!r}"
        )
    if channels < 1:
        raise ValueError(f"channels must be a positive number of eps channels, got {channels!r}")
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D tensor of class labels, got shape {tuple(y.shape)}")
    if interval is not None and not (len(interval) == 2 and interval[0] <= interval[1]):
        raise ValueError(f"guidance interval must be (lo, hi) with lo <= hi, got {interval!r}")
    guided = min(LEGACY_GUIDED_CHANNELS, channels) if legacy_three_channel else channels

    if cfg_scale == 1.0:

        def denoise_conditional(x_t: Tensor, t: Tensor, **options: Tensor) -> Tensor:
            return model(x_t, t, y, **options)

        return denoise_conditional

    y_null = torch.full_like(y, null_class)
    y_both = torch.cat([y, y_null])  # (2N,)

    def denoise_guided(x_t: Tensor, t: Tensor, **options: Tensor) -> Tensor:
        n = x_t.shape[0]
        if n != y.shape[0]:
            raise ValueError(f"x_t has batch size {n} but y has {y.shape[0]} labels")
        both = {k: torch.cat([v, v]) for k, v in options.items()}  # (2N,) each
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), y_both.to(x_t.device), **both)  # (2N, K, H, W)
        if out.shape[1] < channels:
            raise ValueError(
                f"model output has {out.shape[1]} channels, fewer than channels={channels} eps channels"
            )
        cond, uncond = out[:n], out[n:]  # (N, K, H, W) each
        eps = cond[:, :guided]
        eps = uncond[:, :guided] + cfg_scale * (eps - uncond[:, :guided])  # (N, guided, H, W)
        return torch.cat([eps, cond[:, guided:]], dim=1)  # (N, K, H, W)

    if interval is None:
        return denoise_guided
    lo, hi = interval

    def denoise_in_interval(x_t: Tensor, t: Tensor, **options: Tensor) -> Tensor:
        inside = (t >= lo) & (t <= hi)  # (N,) bool
        if not bool(inside.any()):
            return model(x_t, t, y, **options)  # no sample is guided at this t: the plain batch only
        out = denoise_guided(x_t, t, **options)  # (N, K, H, W)
        if bool(inside.all()):
            return out
        # samples at different t (not done by our samplers): the unguided rows need the conditional output
        return torch.where(inside.view(-1, *([1] * (out.ndim - 1))), out, model(x_t, t, y, **options).to(out.dtype))

    return denoise_in_interval
