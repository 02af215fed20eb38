"""The attention kernels of models/attention.py: every backend computes the same function."""

from __future__ import annotations

import pytest
import torch

from ditforge.models import create_model
from ditforge.models.attention import (
    BACKENDS,
    CPU_EXPLICIT_ATTENTION_MAX_TOKENS,
    attention,
    choose_backend,
)


def _qkv(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def _closed_form(q, k, v):
    """softmax(q k^T / sqrt(d)) v written out: exp of shifted scores over their row sums."""
    s = torch.einsum("nhid,nhjd->nhij", q, k) / q.shape[-1] ** 0.5  # (N, h, T, T)
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))  # (N, h, T, T)
    return torch.einsum("nhij,nhjd->nhid", e / e.sum(dim=-1, keepdim=True), v)  # (N, h, T, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_is_the_formula_in_float64(backend):
    q, k, v = _qkv((2, 3, 5, 8), torch.float64)
    out = attention(q, k, v, backend=backend)
    assert out.dtype == torch.float64 and out.shape == (2, 3, 5, 8)
    torch.testing.assert_close(out, _closed_form(q, k, v), atol=1e-12, rtol=0)


@pytest.mark.parametrize("tokens", [7, 300])
def test_backends_agree_in_float32(tokens):
    q, k, v = _qkv((2, 4, tokens, 16), torch.float32, seed=1)
    ref = _closed_form(q.double(), k.double(), v.double())
    outs = {b: attention(q, k, v, backend=b) for b in BACKENDS}
    for b, out in outs.items():
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5, msg=b)
    torch.testing.assert_close(outs["sdpa"], outs["explicit"], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_backends_within_bf16_error(backend):
    q, k, v = _qkv((2, 4, 16, 16), torch.bfloat16, seed=2)
    ref = _closed_form(q.double(), k.double(), v.double())
    out = attention(q, k, v, backend=backend)
    assert out.dtype == torch.bfloat16
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, err  # bf16 rounds at 2^-8 relative


def test_automatic_choice():
    """Explicit products only for bf16 on CPU with few tokens (faster there); SDPA otherwise."""
    few, many = CPU_EXPLICIT_ATTENTION_MAX_TOKENS, CPU_EXPLICIT_ATTENTION_MAX_TOKENS + 1
    bf16 = torch.empty(0, dtype=torch.bfloat16)
    assert choose_backend(bf16, few) == "explicit"
    assert choose_backend(bf16, many) == "sdpa"
    assert choose_backend(torch.empty(0), few) == "sdpa"
    assert choose_backend(torch.empty(0, dtype=torch.float64), few) == "sdpa"


def test_unknown_backend_is_named():
    q, k, v = _qkv((1, 1, 2, 4), torch.float32)
    with pytest.raises(ValueError, match="'flash2'.*sdpa"):
        attention(q, k, v, backend="flash2")


def test_model_output_is_the_same_with_each_backend():
    """A whole DiT (with RoPE and qk-norm in the attention) gives the same output whichever
    kernel its attention layers use."""
    torch.manual_seed(0)
    model = create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10, rope=True, qk_norm=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model = model.double().eval()
    x, t, y = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([5, 900]), torch.tensor([1, 7])
    outs = {}
    for b in BACKENDS:
        for block in model.blocks:
            block.attn.backend = b
        with torch.no_grad():
            outs[b] = model(x, t, y)
    assert outs["math"].abs().max() > 0.1  # not a trivially zero output
    for b in BACKENDS:
        torch.testing.assert_close(outs[b], outs["math"], atol=1e-10, rtol=0, msg=b)
