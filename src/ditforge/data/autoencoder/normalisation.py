"""How an autoencoder's latents become the DiT's inputs, recorded, never guessed.

For a latent z of the autoencoder (the posterior mean or a sample of it), the model's input is

    x = ((z - shift) * scale - mean) / std

| name | what | where it comes from |
|---|---|---|
| `shift` | a number, or one per channel | the VAE config's `shift_factor` (FLUX 0.1159, SD3 0.0609), its `latents_mean`; else 0 |
| `scale` | a number, or one per channel | its `scaling_factor` (SD 0.18215, FLUX 0.3611), over `latents_std` where it has them |
| `mean`, `std` | one per channel | `extract --latent-norm channel`: the data set's own statistics (below); else absent |

A latent store holds `(z - shift) * scale` (the autoencoder's own normalisation, `--latent-norm
scale`); with `--latent-norm channel` the manifest's autoencoder record adds `channel_mean` and
`channel_std`, the per-channel mean and population standard deviation of the stored posterior
means over every record and both of its views (image and flip), which the store's reader
subtracts and divides by (LightningDiT's `latents_stats.pt` normalisation, there computed on a
sample of the data). They are accumulated while the shards are written: each shard's header
holds its float64 sums (`channel_sums`), and the manifest reduces them with `math.fsum`, so a
resumed extraction, whose shards are the same, gives the same statistics to the last bit.

Records written before shifts and statistics existed have neither: shift 0, no statistics,
which is what they meant.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ditforge.errors import UserError

LATENT_NORMS = ("scale", "channel")
Number = float | tuple[float, ...]


@dataclass(frozen=True)
class LatentNorm:
    """x = ((z - shift) * scale - mean) / std (module docstring); `kind` "scale" or "channel"
    (then `mean` and `std` once the extraction has measured them, None before)."""

    shift: Number = 0.0
    scale: Number = 1.0
    kind: str = "scale"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in LATENT_NORMS:
            raise UserError(f"latent normalisation {self.kind!r}; choose one of: {', '.join(LATENT_NORMS)}")
        for name, value in (("scale", self.scale), ("channel std", self.std)):
            values = [value] if isinstance(value, (int, float)) else list(value or [])
            if not all(math.isfinite(v) and v > 0 for v in values):
                raise UserError(f"latent {name} must be positive and finite, got {value}")
        if (self.mean is None) != (self.std is None):
            raise UserError("channel statistics need both channel_mean and channel_std")
        if self.mean is not None and self.kind != "channel":
            raise UserError(f"channel statistics given with latent_norm {self.kind!r}; they belong to latent_norm 'channel'")

    @property
    def measured(self) -> bool:
        """Whether every number is known (a 'channel' normalisation before its statistics is not)."""
        return self.kind == "scale" or self.mean is not None

    def check_channels(self, channels: int, what: str) -> None:
        for name, value in (("shift", self.shift), ("scale", self.scale), ("channel_mean", self.mean), ("channel_std", self.std)):
            if isinstance(value, tuple) and len(value) != channels:
                raise UserError(f"{what}: {name} has {len(value)} values for {channels} latent channels")

    # records -------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The fields of an autoencoder's `describe()` that say it. A shift of 0 and latent_norm
        "scale" are left out: a record without them means them, as every record before them did
        (so an SD VAE's record, and an extraction begun before them, are what they were)."""
        out: dict[str, Any] = {"scale": _plain(self.scale)}
        if self.shift != 0.0:
            out["shift"] = _plain(self.shift)
        if self.kind != "scale":
            out["latent_norm"] = self.kind
        if self.mean is not None:
            out.update(channel_mean=list(self.mean), channel_std=list(self.std))
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any], default_scale: Number = 1.0) -> "LatentNorm":
        """The normalisation a `describe()` record says; what an older record (scale only) meant."""
        scale = record.get("scale")
        return cls(
            shift=_number(record.get("shift", 0.0)),
            scale=_number(default_scale if scale is None else scale),
            kind=str(record.get("latent_norm", "scale")),
            mean=_vector(record.get("channel_mean")),
            std=_vector(record.get("channel_std")),
        )

    def with_stats(self, mean: Sequence[float], std: Sequence[float]) -> "LatentNorm":
        return LatentNorm(self.shift, self.scale, self.kind, tuple(float(m) for m in mean), tuple(float(s) for s in std))

    # the maps ------------------------------------------------------------------------------

    def encode(self, mean: torch.Tensor, std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The autoencoder's posterior (mean, std) of z, (N, C, h, w), -> that of the model's x.
        Before the channel statistics are measured (an extraction with latent_norm "channel"):
        of (z - shift) * scale, what a store's records hold."""
        a, b = self._affine(mean)  # x = a z + b per channel
        return mean * a + b, None if std is None else std * a.abs()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The model's x (N, C, h, w) -> the autoencoder's z (the exact inverse of `encode`)."""
        if not self.measured:
            raise UserError("latent_norm 'channel' has no channel statistics yet (an unfinished extraction); "
                            "finish the extraction, whose manifest then holds them")
        a, b = self._affine(x)
        return (x - b) / a

    def channel_part(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) as (C, 1, 1) tensors of `like`'s dtype and device: what a store's reader
        applies to its records; None without channel statistics."""
        if self.mean is None:
            return None
        return _column(self.mean, like), _column(self.std, like)

    def _affine(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # in float64: (z - shift) * scale / std - mean / std = a z + b
        shift, scale = _column(self.shift, like, torch.float64), _column(self.scale, like, torch.float64)
        a, b = scale, -shift * scale
        if self.mean is not None:
            m, s = _column(self.mean, like, torch.float64), _column(self.std, like, torch.float64)
            a, b = a / s, (b - m) / s
        return a.to(like.dtype), b.to(like.dtype)


def _column(value: Number | Sequence[float], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    return t.reshape(-1, 1, 1).to(device=like.device, dtype=dtype or like.dtype) if t.ndim else t.to(like.device, dtype or like.dtype)


def _plain(value: Number) -> float | list[float]:
    return [float(v) for v in value] if isinstance(value, tuple) else float(value)


def _number(value: Any) -> Number:
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    return float(value)


def _vector(value: Any) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


def is_plain_scale(record: dict[str, Any]) -> bool:
    """Whether a recorded autoencoder's latents are only (z x one number): what DiT's own code and
    diffusers' DiTPipeline undo (they divide by the scale factor and know nothing else)."""
    norm = LatentNorm.from_record(record)
    return norm.kind == "scale" and norm.shift == 0.0 and isinstance(norm.scale, float)


# -- channel statistics over an extraction -------------------------------------------------


def channel_sums(means: torch.Tensor) -> dict[str, Any]:
    """float64 sums of stored posterior means (n, V, C, h, w) per channel C: {"count", "sum",
    "sumsq"}, what a shard's header keeps (`channel_sums`)."""
    m = means.detach().cpu().double()
    dims = [d for d in range(m.ndim) if d != 2]
    return {
        "count": int(m.numel() // m.shape[2]),
        "sum": m.sum(dim=dims).tolist(),
        "sumsq": m.square().sum(dim=dims).tolist(),
    }


def encode_sums(sums: dict[str, Any]) -> str:
    return json.dumps(sums)  # floats written as repr: read back to the same bits


def channel_stats(parts: Iterable[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(mean, population std) per channel from shards' `channel_sums`, reduced with `math.fsum`
    (the same result in any order)."""
    parts = list(parts)
    if not parts:
        raise UserError("no channel statistics to reduce (no records)")
    channels = len(parts[0]["sum"])
    n = sum(int(p["count"]) for p in parts)
    mean, std = [], []
    for c in range(channels):
        s = math.fsum(p["sum"][c] for p in parts)
        q = math.fsum(p["sumsq"][c] for p in parts)
        mu = s / n
        var = max(q / n - mu * mu, 0.0)
        if not var > 0 or not math.isfinite(var):
            raise UserError(f"latent channel {c} is constant over the data (std 0): --latent-norm channel cannot "
                            "normalise it; use --latent-norm scale")
        mean.append(mu)
        std.append(math.sqrt(var))
    return mean, std
