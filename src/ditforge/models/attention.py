"""Attention kernels: which computation of softmax(q k^T / sqrt(d)) v runs (Vaswani et al. 2017,
"Attention Is All You Need", Eq. 1), chosen in one place.

All backends take q, k, v of shape (N, h, T, d) and return (N, h, T, d):

============  ===========================================================================
backend       computation
============  ===========================================================================
``sdpa``      ``F.scaled_dot_product_attention``: flash / memory-efficient / cuDNN kernels on a
              GPU, the flash kernel on CPU (the default everywhere but below)
``explicit``  two batched matrix products in the input dtype, q scaled first. In bf16 on CPU
              with few tokens it is 2x faster than SDPA's CPU flash kernel there
              (benchmarks/README.md), so `choose_backend` picks it in that case
``math``      the plain formula, scores and softmax in at least float32: a reference for tests
              and for debugging a kernel; never chosen on its own
============  ===========================================================================

Forward-mode derivatives (MeanFlow's training target, ``meanflow/``) do not run through these
kernels: the fused SDPA kernels have none (on CPU, ``_scaled_dot_product_flash_attention_for_cpu``
raises NotImplementedError under forward AD, torch 2.13); the DiT's JVP writes attention's
derivative out (models/tangents.py `attention_jvp`, the ``math`` formula and its derivative).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "CPU_EXPLICIT_ATTENTION_MAX_TOKENS",
    "attention",
    "choose_backend",
    "uses_explicit_attention",
    "sdpa_attention",
    "explicit_attention",
    "math_attention",
]

# Up to this many tokens (256: DiT-*/2 at 256 px), bf16 attention on CPU materialises the
# (N, h, T, T) scores instead of calling SDPA's CPU flash kernel, which is 2x slower there.
CPU_EXPLICIT_ATTENTION_MAX_TOKENS = 256


def uses_explicit_attention(q: torch.Tensor, tokens: int) -> bool:
    """Whether the automatic choice for q's device and dtype and `tokens` tokens is ``explicit``
    (bf16 on CPU, few tokens) rather than ``sdpa``."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and tokens <= CPU_EXPLICIT_ATTENTION_MAX_TOKENS


def choose_backend(q: torch.Tensor, tokens: int) -> str:
    """The backend that runs by default for q (N, h, T, d): ``explicit`` or ``sdpa``."""
    return "explicit" if uses_explicit_attention(q, tokens) else "sdpa"


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (N, h, T, d)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    # Scores in the input dtype (bf16 under autocast), like the outputs of the linear layers
    # around them.
    a = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, h, T, T)
    return F.dropout(a.softmax(dim=-1), dropout_p) @ v  # (N, h, T, d)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) / q.shape[-1] ** 0.5  # (N, h, T, T)
    weights = F.dropout(scores.softmax(dim=-1), dropout_p)  # (N, h, T, T), rows sum to 1
    return (weights @ v.to(acc)).to(v.dtype)  # (N, h, T, d)


_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": sdpa_attention,
    "explicit": explicit_attention,
    "math": math_attention,
}
BACKENDS = tuple(_KERNELS)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, backend: str | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v (N, h, T, d); `backend` None = `choose_backend`."""
    if backend is None:
        backend = choose_backend(q, q.shape[-2])
    if backend not in _KERNELS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    return _KERNELS[backend](q, k, v, dropout_p)  # (N, h, T, d)
