"""Autoencoders between pixels and the space the DiT is trained in.

Latent diffusion (Rombach et al. 2022) trains the diffusion model on the latents of a fixed,
pre-trained autoencoder; DiT (Peebles & Xie 2022, Sec. 3.1, 5) uses Stable Diffusion's
`stabilityai/sd-vae-ft-ema`, which maps a 256x256x3 image to a 32x32x4 latent (downsample 8),
and trains on a posterior sample multiplied by the scale factor 0.18215. Later recipes changed
the tokenizer: FLUX's and SD3's 16-channel VAEs (a shift besides the scale), LightningDiT's
VA-VAE (per-channel statistics of the data set), SANA's deep-compression DC-AE (f32, 32 channels,
deterministic). `diffusers_models.py` has the classes, `normalisation.py` the latent
normalisation x = ((z - shift) * scale - mean) / std.

The contract every autoencoder here keeps:

| call | in | out |
|---|---|---|
| `encode(images)` | (N, C_img, H, W) in [-1, 1] | `(mean, std)` of the model's x, each (N, C, H/f, W/f) float32 |
| `decode(latents)` | the model's x, (N, C, H/f, W/f) | (N, C_img, H, W) in [-1, 1] |
| `describe()` | | JSON-able identity: kind, id, scale, shift (absent: 0), latent_norm (absent: scale; channel: + its statistics), channels, downsample |
| `latent_shape(size)` | image side | (C, size/f, size/f) |

so `mean + std * eps` (eps ~ N(0, I)) is the training latent and `decode` undoes the whole
normalisation itself. `describe()` is what the latent store's manifest and every checkpoint
record, and `load_autoencoder(describe())` rebuilds the same autoencoder (the one rebuild
point), so `sample` never has to be told which VAE was used or how its latents were normalised.
A record written before shifts and channel statistics existed (kind `diffusers-kl`, a scale)
loads as what it meant: shift 0, no statistics.

Outputs are float32 on the device of the input; the model runs on its own device.
"""

from __future__ import annotations

from typing import Any

import torch

from ditforge.data.autoencoder.base import Autoencoder, IdentityAutoencoder
from ditforge.data.autoencoder.diffusers_models import (
    CLASSES,
    DEFAULT_VAE,
    VAE_ALIASES,
    DiffusersAutoencoder,
    DiffusersDC,
    DiffusersKL,
    DiffusersQwenImage,
    class_of,
)
from ditforge.data.autoencoder.diffusers_models import KINDS as _DIFFUSERS_KINDS
from ditforge.data.autoencoder.normalisation import LATENT_NORMS, LatentNorm, is_plain_scale
from ditforge.errors import UserError

KINDS = ("identity", *_DIFFUSERS_KINDS)
LEGACY_KINDS = {"sd-vae": "diffusers-kl"}  # "sd-vae": what official DiT checkpoints are recorded as

__all__ = [
    "CLASSES", "DEFAULT_VAE", "KINDS", "LATENT_NORMS", "VAE_ALIASES", "Autoencoder", "DiffusersAutoencoder", "DiffusersDC",
    "DiffusersKL", "DiffusersQwenImage", "IdentityAutoencoder", "LatentNorm", "is_plain_scale", "load_autoencoder",
]


def load_autoencoder(spec: dict[str, Any] | str, device: str | torch.device | None = None, latent_norm: str = "scale") -> Autoencoder:
    """Build an autoencoder from `describe()` output or a CLI string.

    Strings: "identity" (3 channels) or "identity:C"; "ema" / "mse" (the paper's SD VAEs); an
    existing folder written by `save_pretrained` of a diffusers autoencoder, or a hub id
    (`owner/name`): its class from its config, its normalisation from the config's shift and
    scale, with `latent_norm` "channel" to be completed by an extraction's channel statistics.
    A record rebuilds exactly what it says (`latent_norm` is then the record's).
    """
    if latent_norm not in LATENT_NORMS:
        raise UserError(f"--latent-norm {latent_norm!r}; choose one of: {', '.join(LATENT_NORMS)}")
    if isinstance(spec, str):
        if spec == "identity" or spec.startswith("identity:"):
            channels = spec.partition(":")[2] or "3"
            if not channels.isdigit() or int(channels) <= 0:
                raise UserError(f"--vae {spec!r}: expected 'identity' or 'identity:C' with C a positive channel count")
            return IdentityAutoencoder(int(channels), LatentNorm(kind=latent_norm))
        return class_of(spec)(spec, device=device, latent_norm=latent_norm)
    if not isinstance(spec, dict):
        raise UserError(f"autoencoder spec must be a dict from describe() or a string, got {type(spec).__name__}")
    kind = LEGACY_KINDS.get(spec.get("kind"), spec.get("kind"))
    if kind == "identity":
        return IdentityAutoencoder(int(spec.get("channels", 3)), LatentNorm.from_record(spec))
    if kind in _DIFFUSERS_KINDS:
        return _DIFFUSERS_KINDS[kind](spec.get("id", DEFAULT_VAE), norm=LatentNorm.from_record(spec), device=device)
    raise UserError(f"unknown autoencoder kind {spec.get('kind')!r} in {spec}; expected one of: {', '.join(KINDS)}")


def with_recorded_normalisation(vae: str, record: dict[str, Any], device: str | torch.device | None = None) -> Autoencoder:
    """The autoencoder `vae` (a `--vae` string) normalised as `record` says: `sample --vae` swaps
    the weights a model's latents are decoded with, never how they were normalised."""
    ae = load_autoencoder(vae, device=device)
    if record.get("kind", "identity") == "identity":
        return ae
    if ae.channels != int(record.get("channels", ae.channels)):
        raise UserError(f"--vae {vae}: its latents have {ae.channels} channels, the model's {record.get('channels')} "
                        f"(it was trained on the latents of {record.get('id', record.get('kind'))})")
    return ae.renormalised(LatentNorm.from_record(record, default_scale=ae.scale))
