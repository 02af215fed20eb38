"""DiT's small layers: layer norms (LayerNorm, RMSNorm), adaLN modulation, and the embedders
of patches, timesteps and class labels (Peebles & Xie 2022, Sec. 3.2).

Notation of the shape comments as in models/dit.py.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditforge.models.tangents import Pair, layer_norm_jvp, linear_jvp, rms_norm_jvp, silu_jvp, sinusoid_jvp

__all__ = [
    "NORMS",
    "LayerNorm",
    "RMSNorm",
    "make_norm",
    "norm_jvp",
    "modulate",
    "PatchEmbed",
    "TimestepEmbedder",
    "LabelEmbedder",
]

#: block norm kinds: DiT's LayerNorm (no affine), or RMSNorm with a learned gain (LightningDiT)
NORMS = ("layer", "rms")


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose print is the same on every torch version.

    torch >= 2.1 appends ``bias=...`` to LayerNorm's print; the reference module print (and
    so ``repr(DiT)``) was made without it. The layer itself is unchanged.
    """

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if self.elementwise_affine and self.bias is None:
            text += ", bias=False"
        return text


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift``; x (N, T, D), shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (N, T, D)


class RMSNorm(nn.Module):
    """Root mean square layer norm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization",
    Eq. 4): y = x / sqrt(mean(x^2) + eps) * g over the last dim, g a learned gain (init 1).

    Computed in at least float32 and returned in x's dtype (LightningDiT and LLaMA cast back
    before the gain, so their bf16 inputs come out in the gain's float32); no mean is
    subtracted and there is no bias.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (D,) gain g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = x.to(torch.promote_types(x.dtype, torch.float32))  # (..., D)
        normed = acc * torch.rsqrt(acc.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., D)
        return (normed * self.weight).to(x.dtype)  # (..., D)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int) -> nn.Module:
    """The norm before attention, MLP and final layer: DiT's LayerNorm without affine
    parameters (``layer``), or RMSNorm with a gain (``rms``); eps 1e-6 either way."""
    if kind == "layer":
        return LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    if kind == "rms":
        return RMSNorm(dim, eps=1e-6)
    raise ValueError(f"unknown norm {kind!r}; choose one of: {', '.join(NORMS)}")


def norm_jvp(norm: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> Pair:
    """(y, dy) of any norm a DiT uses (`make_norm`, qk-norm's RMSNorm or Identity): models/tangents.py."""
    if isinstance(norm, nn.Identity):
        return x, dx
    if isinstance(norm, RMSNorm):
        return rms_norm_jvp(norm, x, dx)
    if isinstance(norm, nn.LayerNorm):
        return layer_norm_jvp(norm, x, dx)
    raise TypeError(f"no JVP for the norm {type(norm).__name__}")


# ----------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Image to patch tokens: Conv2d(C, D, kernel=p, stride=p), flattened to (N, T, D).

    ``patch_size`` and ``img_size`` are stored as (p, p) / (H, W) tuples as in timm's
    PatchEmbed, so code written against the reference (``x_embedder.patch_size[0]``) works.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (N, T, D), token index = row * (W/p) + col
        return self.norm(x)  # (N, T, D)

    def jvp(self, x: torch.Tensor, dx: torch.Tensor) -> Pair:
        """(tokens, their tangent) for (x, dx): the convolution is linear, its tangent has no bias."""
        if not isinstance(self.norm, nn.Identity):
            raise TypeError("PatchEmbed.jvp covers DiT's patch embedding without a norm")
        dtokens = F.conv2d(dx, self.proj.weight, None, self.proj.stride)  # (N, D, H/p, W/p)
        return self(x), dtokens.flatten(2).transpose(1, 2)  # (N, T, D) each


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features (dim 256) then an MLP to D."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(dim // 2,) f_i = max_period ** (-i / (dim // 2)), in `timestep_embedding`'s dtype for t."""
        compute_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        half = dim // 2
        return torch.exp(-math.log(max_period) * torch.arange(half, dtype=compute_dtype, device=t.device) / half)

    @classmethod
    def timestep_embedding(cls, t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal timestep features as in GLIDE/DiT: t (N,) -> (N, dim) = [cos(t f), sin(t f)],
        f_i = max_period ** (-i / (dim // 2)), i = 0 .. dim//2 - 1; a zero column is appended
        when dim is odd. Computed in float32 (float64 if t is float64); t may be fractional."""
        freqs = cls.frequencies(t, dim, max_period)  # (dim/2,)
        args = t[:, None].to(freqs.dtype) * freqs[None, :]  # (N, dim/2)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * (dim/2))
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (N, dim)
        return embedding  # (N, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        t_freq = t_freq.to(self.mlp[0].weight.dtype)  # (N, 256), match a bf16/fp16 model
        return self.mlp(t_freq)  # (N, D)

    def jvp(self, t: torch.Tensor, dt: torch.Tensor) -> Pair:
        """(embedding, tangent), each (N, D), for times t (N,) moving at dt (N,)."""
        dim = self.frequency_embedding_size
        freqs = self.frequencies(t, dim)  # (dim/2,)
        features, d_features = sinusoid_jvp(t[:, None].to(freqs.dtype) * freqs, dt[:, None].to(freqs.dtype) * freqs)
        if dim % 2:
            zero = torch.zeros_like(features[:, :1])
            features, d_features = torch.cat([features, zero], dim=-1), torch.cat([d_features, zero], dim=-1)
        dtype = self.mlp[0].weight.dtype
        hidden = linear_jvp(self.mlp[0], features.to(dtype), d_features.to(dtype))  # (N, D) each
        return linear_jvp(self.mlp[2], *silu_jvp(*hidden))  # (N, D) each


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with label dropout for classifier-free guidance.

    When ``dropout_prob > 0`` the table has one extra row, index ``num_classes``: the
    "null" (unconditional) class.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def has_null_class(self) -> bool:
        return self.embedding_table.num_embeddings > self.num_classes

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replace labels by the null class ``num_classes``: at random with probability
        ``dropout_prob``, or exactly where ``force_drop_ids`` is 1/True when it is given."""
        if not self.has_null_class:
            raise ValueError(
                "label dropout needs a null class, which exists only when class_dropout_prob > 0 "
                f"(got {self.dropout_prob})"
            )
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (N,)
        else:
            drop_ids = force_drop_ids.to(device=labels.device) == 1  # (N,) bool
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)  # (N,)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)  # (N,)
        return self.embedding_table(labels)  # (N, D)
