"""Autoencoders between pixels and the space the DiT is trained in.

Latent diffusion (Rombach et al. 2022) trains the diffusion model on the latents of a fixed,
pre-trained KL autoencoder; DiT (Peebles & Xie 2022, Sec. 3.1, 5) uses Stable Diffusion's
`stabilityai/sd-vae-ft-ema`, which maps a 256x256x3 image to a 32x32x4 latent (downsample 8),
and trains on a posterior sample multiplied by the scale factor 0.18215 (which gives the
latents about unit variance).

The contract every autoencoder here keeps:

| call | in | out |
|---|---|---|
| `encode(images)` | (N, C_img, H, W) in [-1, 1] | `(mean, std)`, each (N, C, H/f, W/f) float32, already x scale |
| `decode(latents)` | (N, C, H/f, W/f), x scale | (N, C_img, H, W) in [-1, 1] |
| `describe()` | | JSON-able identity (kind, id, scale, channels, downsample) |
| `latent_shape(size)` | image side | (C, size/f, size/f) |

so `mean + std * eps` (eps ~ N(0, I)) is the training latent and `decode` undoes the scale
itself. `describe()` is what the latent store's manifest and every checkpoint record, and
`load_autoencoder(describe())` rebuilds the same autoencoder, so `sample` never has to be told
which VAE was used.

Outputs are float32 on the device of the input; the model runs on its own device.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch

from ditforge.errors import UserError
from ditforge.train.device import pick_device

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
# Short names of the two VAEs the DiT paper used (the original code's `--vae ema|mse`).
VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
KINDS = ("identity", "diffusers-kl")


class Autoencoder:
    """Base of the autoencoders: see the module docstring for the contract."""

    kind: str = ""
    in_channels: int  # image channels
    channels: int  # latent channels
    downsample: int  # image side / latent side
    scale: float  # latent = posterior sample x scale

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an image_size x image_size image."""
        if image_size <= 0 or image_size % self.downsample:
            raise UserError(
                f"image size {image_size} is not a positive multiple of the autoencoder's downsample factor "
                f"{self.downsample} ({self.kind}); choose e.g. {max(1, round(image_size / self.downsample)) * self.downsample}"
            )
        side = image_size // self.downsample
        return (self.channels, side, side)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise UserError(
                f"{self.kind} autoencoder expects images (N, {self.in_channels}, H, W); got shape {tuple(images.shape)}"
            )
        if images.shape[2] % self.downsample or images.shape[3] % self.downsample:
            raise UserError(
                f"image size {images.shape[2]}x{images.shape[3]} is not a multiple of the downsample factor {self.downsample}"
            )


class IdentityAutoencoder(Autoencoder):
    """Pixel space: the latent is the image itself (std 0, scale 1, downsample 1)."""

    kind = "identity"

    def __init__(self, channels: int = 3):
        if channels <= 0:
            raise UserError(f"identity autoencoder needs a positive channel count, got {channels}")
        self.in_channels = self.channels = int(channels)
        self.downsample = 1
        self.scale = 1.0

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_images(images)
        mean = images.float()
        return mean, torch.zeros_like(mean)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float().clamp(-1, 1)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "channels": self.channels, "scale": 1.0, "downsample": 1}


class DiffusersKL(Autoencoder):
    """A diffusers `AutoencoderKL`, from a hub id or a folder written by `save_pretrained`.

    `scale` defaults to the model config's `scaling_factor` (0.18215 for the SD VAEs). The
    downsample factor is 2 ** (number of encoder blocks - 1). Encoding and decoding run under
    `torch.no_grad()`, and on CUDA under autocast to `autocast_dtype` (None: full precision).
    """

    kind = "diffusers-kl"

    def __init__(
        self,
        name_or_path: str = DEFAULT_VAE,
        scale: float | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        autocast_dtype: torch.dtype | None = torch.float16,
    ):
        name_or_path = VAE_ALIASES.get(name_or_path, name_or_path)
        local = Path(name_or_path).expanduser()
        self.is_local = local.is_dir()
        if not self.is_local and _looks_like_path(name_or_path):
            what = "is a file" if local.exists() else "does not exist"
            raise UserError(f"--vae {name_or_path}: {what}; expected a folder written by AutoencoderKL.save_pretrained()")
        self.name_or_path = str(local.resolve()) if self.is_local else name_or_path
        self.vae = _from_pretrained(self.name_or_path, self.is_local, dtype)
        self.device = torch.device(device) if device is not None else pick_device()
        self.vae.to(self.device).eval().requires_grad_(False)
        config = self.vae.config
        if scale is None:
            scale = getattr(config, "scaling_factor", None)
            if scale is None:
                raise UserError(f"VAE {self.name_or_path!r} has no scaling_factor in its config; pass the scale explicitly")
        if not scale > 0:
            raise UserError(f"VAE scale factor must be positive, got {scale}")
        self.scale = float(scale)
        self.in_channels = int(config.in_channels)
        self.channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.autocast_dtype = autocast_dtype

    def _precision(self):
        if self.device.type == "cuda" and self.autocast_dtype is not None:
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_images(images)
        dtype = next(self.vae.parameters()).dtype
        x = images.to(self.device, dtype)
        with torch.no_grad(), self._precision():
            dist = self.vae.encode(x).latent_dist  # DiagonalGaussianDistribution of the unscaled latent
            mean = dist.mean.float() * self.scale  # (N, C, H/f, W/f)
            std = (0.5 * dist.logvar.float()).exp() * self.scale  # std of (latent x scale), in float32 even under autocast
        return mean.to(images.device), std.to(images.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        z = latents.to(self.device, dtype) / self.scale
        with torch.no_grad(), self._precision():
            images = self.vae.decode(z).sample.float()  # (N, C_img, H, W)
        return images.clamp(-1, 1).to(latents.device)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.name_or_path,
            "scale": self.scale,
            "channels": self.channels,
            "in_channels": self.in_channels,
            "downsample": self.downsample,
        }


def _load_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from huggingface_hub import errors as hub_errors

        for name in ("HfHubHTTPError", "HFValidationError", "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            if hasattr(hub_errors, name):
                errors.append(getattr(hub_errors, name))
    except ImportError:
        pass
    return tuple(errors)


def _from_pretrained(name_or_path: str, is_local: bool, dtype: torch.dtype):
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("the VAE needs the diffusers package: pip install diffusers") from None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # diffusers passes a retired argument
            # low_cpu_mem_usage=False: the same weights either way, without the `accelerate` nag.
            return AutoencoderKL.from_pretrained(name_or_path, torch_dtype=dtype, low_cpu_mem_usage=False)
    except _load_errors() as e:
        reason = _first_line(e)
        if is_local:
            raise UserError(
                f"--vae {name_or_path}: not a diffusers AutoencoderKL folder ({reason}); "
                "expected a folder written by AutoencoderKL.save_pretrained() (config.json + weights)"
            ) from None
        raise UserError(
            f"cannot load the VAE {name_or_path!r}: it is not in the local Hugging Face cache and the hub cannot "
            f"be reached ({reason}); pass --vae PATH, a local folder saved with AutoencoderKL.save_pretrained()"
        ) from None


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())  # one line, whatever the library put in
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _looks_like_path(spec: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else with separators is meant as a folder."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec or Path(spec).exists()


def load_autoencoder(spec: dict[str, Any] | str, device: str | torch.device | None = None) -> Autoencoder:
    """Build an autoencoder from `describe()` output or a CLI string.

    Strings: "identity" (3 channels) or "identity:C"; "ema" / "mse" (the paper's SD VAEs); an
    existing folder written by `AutoencoderKL.save_pretrained`; or a hub id (`owner/name`).
    """
    if isinstance(spec, str):
        if spec == "identity" or spec.startswith("identity:"):
            channels = spec.partition(":")[2] or "3"
            if not channels.isdigit() or int(channels) <= 0:
                raise UserError(f"--vae {spec!r}: expected 'identity' or 'identity:C' with C a positive channel count")
            return IdentityAutoencoder(int(channels))
        return DiffusersKL(spec, device=device)
    if not isinstance(spec, dict):
        raise UserError(f"autoencoder spec must be a dict from describe() or a string, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind == "identity":
        return IdentityAutoencoder(int(spec.get("channels", 3)))
    if kind in ("diffusers-kl", "sd-vae"):  # "sd-vae": what official DiT checkpoints are recorded as
        return DiffusersKL(spec.get("id", DEFAULT_VAE), scale=spec.get("scale"), device=device)
    raise UserError(f"unknown autoencoder kind {kind!r} in {spec}; expected one of: {', '.join(KINDS)}")
