"""Forward-mode derivatives of DiT's operations, written out: each function returns an
operation's value and its Jacobian-vector product (JVP) along a tangent, ``(y, dy)`` for
``(x, dx)``. The modules' ``jvp`` methods (models/layers.py, blocks.py, dit.py) chain them into
the network's JVP, which MeanFlow's training target needs (``meanflow/``; Geng et al. 2025, arXiv
2505.13447, Eq. 8).

Why not ``torch.func.jvp``: on the tiny models of a CPU its per-operation cost made a JVP of a
quarter of the batch cost as much as a whole flow training step (on DiT-Ti/2 at 8x8, batch 32:
142 ms against a forward's 27 ms, 2026-12-03; each linear layer's tangent became a batched matrix
product with the weight copied per row), and PyTorch's fused attention kernels have no
forward-mode rule. Here each tangent is one or two plain operations: a linear layer's tangent is
the same matrix product without the bias, attention's is three more products of the same shapes.
The value and the tangent are meant to run without gradient (the JVP is a target, held fixed);
`tests/test_meanflow.py` checks the network's JVP against a float64 central difference and
against ``torch.func.jvp`` for every block option.

Shapes as the operations' own; ``acc`` is at least float32 (float64 for float64 inputs), where
the forward computes in it (norms, RoPE, attention's scores), the tangent does too.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "linear_jvp",
    "silu_jvp",
    "gelu_tanh_jvp",
    "modulate_jvp",
    "layer_norm_jvp",
    "rms_norm_jvp",
    "attention_jvp",
    "sinusoid_jvp",
]

Pair = tuple[Tensor, Tensor]  # (value, tangent) of the same shape


def _acc(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def linear_jvp(layer: nn.Linear, x: Tensor, dx: Tensor) -> Pair:
    """y = x W^T + b, dy = dx W^T."""
    return layer(x), F.linear(dx, layer.weight)


def silu_jvp(x: Tensor, dx: Tensor) -> Pair:
    """y = x sigmoid(x), dy = dx sigmoid(x) (1 + x (1 - sigmoid(x)))."""
    s = torch.sigmoid(x)
    return F.silu(x), dx * (s * (1 + x * (1 - s)))


def gelu_tanh_jvp(x: Tensor, dx: Tensor) -> Pair:
    """GELU's tanh approximation (Hendrycks & Gimpel 2016), y = x (1 + tanh u) / 2 with
    u = sqrt(2/pi) (x + 0.044715 x^3): dy = dx [(1 + tanh u) / 2 + x (1 - tanh^2 u) u' / 2],
    u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    k = math.sqrt(2 / math.pi)
    th = torch.tanh(k * (x + 0.044715 * x**3))
    slope = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * k * (1 + 3 * 0.044715 * x * x)
    return F.gelu(x, approximate="tanh"), dx * slope


def modulate_jvp(x: Tensor, dx: Tensor, shift: Tensor, dshift: Tensor, scale: Tensor, dscale: Tensor) -> Pair:
    """adaLN's y = x (1 + scale) + shift (x (N, T, D), shift and scale (N, D)) and, by the product
    rule, dy = dx (1 + scale) + x dscale + dshift."""
    y = x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (N, T, D)
    return y, dx * (1 + scale.unsqueeze(1)) + x * dscale.unsqueeze(1) + dshift.unsqueeze(1)


def layer_norm_jvp(norm: nn.LayerNorm, x: Tensor, dx: Tensor) -> Pair:
    """LayerNorm without affine parameters over the last dim, y = (x - mu) r with
    r = 1 / sqrt(var + eps): dy = r (dxc - y mean(y dxc)), dxc = dx - mean(dx) (mean(y) = 0)."""
    if norm.elementwise_affine:
        raise ValueError("layer_norm_jvp covers DiT's LayerNorm without affine parameters")
    acc = _acc(x)
    xa, dxa = x.to(acc), dx.to(acc)
    xc = xa - xa.mean(dim=-1, keepdim=True)
    r = torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    y = xc * r
    dxc = dxa - dxa.mean(dim=-1, keepdim=True)
    value = norm(x)
    return value, (r * (dxc - y * (y * dxc).mean(dim=-1, keepdim=True))).to(value.dtype)


def rms_norm_jvp(norm: nn.Module, x: Tensor, dx: Tensor) -> Pair:
    """RMSNorm (models/layers.py), y = n g with n = x r, r = 1 / sqrt(mean(x^2) + eps):
    dy = g r (dx - n mean(n dx)); in acc as its forward, cast back to x's dtype."""
    acc = _acc(x)
    xa, dxa = x.to(acc), dx.to(acc)
    r = torch.rsqrt(xa.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    n = xa * r
    dn = r * (dxa - n * (n * dxa).mean(dim=-1, keepdim=True))
    return (n * norm.weight).to(x.dtype), (dn * norm.weight).to(x.dtype)


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor) -> Pair:
    """O = P v with P = softmax(S), S = q k^T / sqrt(d) (q, k, v (N, h, T, d)), as the ``math``
    kernel computes it (models/attention.py), and dO = dP v + P dv with
    dS = (dq k^T + q dk^T) / sqrt(d) and dP = P (dS - sum_j P dS) (the softmax's JVP, row-wise)."""
    acc, out_dtype = _acc(q), v.dtype
    q, k, v, dq, dk, dv = (a.to(acc) for a in (q, k, v, dq, dk, dv))
    scale = q.shape[-1] ** -0.5
    p = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)  # (N, h, T, T)
    ds = (dq @ k.transpose(-2, -1) + q @ dk.transpose(-2, -1)) * scale  # (N, h, T, T)
    dp = p * (ds - (p * ds).sum(dim=-1, keepdim=True))  # (N, h, T, T)
    return (p @ v).to(out_dtype), (dp @ v + p @ dv).to(out_dtype)  # (N, h, T, d) each


def sinusoid_jvp(args: Tensor, dargs: Tensor) -> Pair:
    """[cos a, sin a] along the last dim, and its tangent [-sin a da, cos a da]."""
    cos, sin = torch.cos(args), torch.sin(args)
    return torch.cat([cos, sin], dim=-1), torch.cat([-sin * dargs, cos * dargs], dim=-1)
