"""The autoencoder contract (the package docstring has the table) and the pixel-space identity."""

from __future__ import annotations

from typing import Any

import torch

from ditforge.data.autoencoder.normalisation import LatentNorm
from ditforge.errors import UserError


class Autoencoder:
    """Base of the autoencoders: see the package docstring for the contract. A subclass sets
    `kind`, `in_channels`, `channels`, `downsample`, `norm` and implements `_encode` (images ->
    the posterior (mean, std) of its raw latent z) and `_decode` (z -> images)."""

    kind: str = ""
    in_channels: int  # image channels
    channels: int  # latent channels
    downsample: int  # image side / latent side
    norm: LatentNorm  # raw latent z -> the model's x
    means_only: bool = False  # deterministic (no posterior variance): a store keeps the means only

    @property
    def scale(self) -> float | tuple[float, ...]:
        return self.norm.scale

    @property
    def shift(self) -> float | tuple[float, ...]:
        return self.norm.shift

    @property
    def latent_norm(self) -> str:
        return self.norm.kind

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, C_img, H, W) in [-1, 1] -> the posterior (mean, std) of the model's x, each
        (N, C, H/f, W/f) float32 on the images' device."""
        self._check_images(images)
        mean, std = self._encode(images)
        return self.norm.encode(mean.float(), std.float())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's x (N, C, h, w) -> images (N, C_img, H, W) in [-1, 1], on x's device."""
        return self._decode(self.norm.decode(latents.float())).float().clamp(-1, 1).to(latents.device)

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def renormalised(self, norm: LatentNorm) -> "Autoencoder":
        """This autoencoder with another normalisation (a record's, for `sample --vae`)."""
        norm.check_channels(self.channels, self.kind)
        self.norm = norm
        return self

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
    """Pixel space: the latent is the image itself (std 0, scale 1, downsample 1); with
    `latent_norm` "channel" the pixels are normalised by the data set's channel statistics."""

    kind = "identity"  # (std 0 too, but pixel stores keep their established mean + log-variance records)

    def __init__(self, channels: int = 3, norm: LatentNorm | None = None):
        if channels <= 0:
            raise UserError(f"identity autoencoder needs a positive channel count, got {channels}")
        self.in_channels = self.channels = int(channels)
        self.downsample = 1
        self.norm = norm or LatentNorm()
        if self.norm.shift != 0.0 or self.norm.scale != 1.0:
            raise UserError(f"the identity autoencoder has shift 0 and scale 1, not {self.norm.shift} and {self.norm.scale}")
        self.norm.check_channels(self.channels, self.kind)

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = images.float()
        return mean, torch.zeros_like(mean)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "channels": self.channels, "scale": 1.0, "downsample": 1}
        if self.norm.kind != "scale":  # the record of a plain pixel store stays what it always was
            out.update({k: v for k, v in self.norm.record().items() if k not in ("scale", "shift")})
        return out
