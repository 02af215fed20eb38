"""DiT's transformer parts: attention, the MLPs, the adaLN-Zero block and the final layer
(Peebles & Xie 2022, Sec. 3.2 and Fig. 3), with the "modern" options of LightningDiT
(Yao et al. 2025): RMSNorm, a SwiGLU MLP, 2-D RoPE and qk-norm. Every option is off by
default, and then modules, parameter names and ``repr`` are the official ones.

Notation of the shape comments as in models/dit.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditforge.models.attention import attention
from ditforge.models.layers import NORMS, RMSNorm, make_norm, modulate, norm_jvp
from ditforge.models.positions import RotaryEmbedding2D
from ditforge.models.recompute import keep_products, run_halves
from ditforge.models.tangents import Pair, attention_jvp, gelu_tanh_jvp, linear_jvp, modulate_jvp, silu_jvp

__all__ = ["MLPS", "BlockOptions", "swiglu_hidden", "Attention", "Mlp", "SwiGLUMlp", "DiTBlock", "FinalLayer"]

#: MLP kinds: DiT's GELU(tanh) MLP, or SwiGLU (Shazeer 2020)
MLPS = ("gelu", "swiglu")


@dataclass(frozen=True)
class BlockOptions:
    """The block options beyond the paper's DiT; the defaults are the paper's blocks.

    norm: ``layer`` (LayerNorm, no affine) or ``rms`` (RMSNorm with a gain) before attention,
        MLP and the final linear layer.
    mlp: ``gelu`` (fc1 -> GELU(tanh) -> fc2) or ``swiglu`` (`SwiGLUMlp`).
    rope: 2-D rotary position embedding on q and k (`RotaryEmbedding2D`); the absolute sin-cos
        ``pos_embed`` is kept and still added to the tokens, as in LightningDiT.
    qk_norm: RMSNorm (with a gain) on q and on k of each head before the scores.
    """

    norm: str = "layer"
    mlp: str = "gelu"
    rope: bool = False
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of: {', '.join(NORMS)}")
        if self.mlp not in MLPS:
            raise ValueError(f"unknown mlp {self.mlp!r}; choose one of: {', '.join(MLPS)}")
        for name in ("rope", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


def swiglu_hidden(mlp_hidden: int) -> int:
    """SwiGLU's hidden width for a GELU MLP of width `mlp_hidden`: 2/3 of it (rounded down), so
    its three matrices hold about the parameters of the GELU MLP's two (LightningDiT's
    ``int(2/3 * mlp_hidden_dim)``; e.g. 4608 -> 3072 for XL, 768 -> 512 for Ti)."""
    return (2 * mlp_hidden) // 3


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout). The kernel is chosen
    in models/attention.py (``backend`` None: automatic; or one of its BACKENDS).

    Options: ``qk_norm`` puts RMSNorm on q and k per head (d values each); ``rope`` (a shared
    `RotaryEmbedding2D`) rotates q and k after that, as LightningDiT does.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        qk_norm: bool = False,
        rope: Optional[RotaryEmbedding2D] = None,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rope = rope  # None, or the RoPE module shared by all blocks (no parameters, no state-dict keys)
        self.backend: Optional[str] = None  # None = models/attention.py's automatic choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape  # (N, T, D)
        qkv = self.qkv(x)  # (N, T, 3D)
        qkv = qkv.reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, N, h, T, d)
        q, k, v = qkv.unbind(0)  # each (N, h, T, d)
        q, k = self.q_norm(q), self.k_norm(k)  # (N, h, T, d)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)  # (N, h, T, d), rotated by token position
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = attention(q, k, v, dropout_p, self.backend)  # (N, h, T, d) = softmax(q k^T / sqrt(d)) v
        x = x.transpose(1, 2).reshape(B, T, D)  # (N, T, D)
        x = self.proj(x)  # (N, T, D)
        return self.proj_drop(x)  # (N, T, D)

    def jvp(self, x: torch.Tensor, dx: torch.Tensor) -> Pair:
        """(output, tangent), each (N, T, D), for tokens x moving at dx (no dropout: DiT has none).
        RoPE is linear in q and k, so it turns their tangents as it turns them."""
        B, T, D = x.shape
        heads = [a.reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
                 for a in linear_jvp(self.qkv, x, dx)]  # value and tangent: q, k, v each (N, h, T, d)
        (q, k, v), (dq, dk, dv) = heads
        q, dq = norm_jvp(self.q_norm, q, dq)
        k, dk = norm_jvp(self.k_norm, k, dk)
        if self.rope is not None:
            q, dq, k, dk = self.rope(q), self.rope(dq), self.rope(k), self.rope(dk)
        o, do = attention_jvp(q, k, v, dq, dk, dv)  # (N, h, T, d) each
        return linear_jvp(self.proj, o.transpose(1, 2).reshape(B, T, D), do.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Transformer MLP (timm layout): fc1 -> GELU(tanh) -> drop1 -> norm -> fc2 -> drop2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None, drop=0):
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = nn.Dropout(drop)  # an int 0 prints as p=0, like the reference
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)  # (N, T, mlp_ratio * D)
        x = self.act(x)  # (N, T, mlp_ratio * D)
        x = self.drop1(x)  # (N, T, mlp_ratio * D)
        x = self.norm(x)  # (N, T, mlp_ratio * D)
        x = self.fc2(x)  # (N, T, D)
        return self.drop2(x)  # (N, T, D)

    def jvp(self, x: torch.Tensor, dx: torch.Tensor) -> Pair:
        """(output, tangent), each (N, T, D) (no dropout: DiT's p is 0)."""
        return linear_jvp(self.fc2, *gelu_tanh_jvp(*linear_jvp(self.fc1, x, dx)))


class SwiGLUMlp(nn.Module):
    """SwiGLU MLP (Shazeer 2020, "GLU Variants Improve Transformer", Eq. 6):
    FFN(x) = (SiLU(x W) * (x V)) W2, with biases; W and V fused in ``w12`` (W first), W2 is
    ``w3`` (the names of LightningDiT's SwiGLUFFN). H' = hidden width (`swiglu_hidden`)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features)
        self.w3 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # two of (N, T, H')
        return self.w3(F.silu(gate) * value)  # (N, T, D)

    def jvp(self, x: torch.Tensor, dx: torch.Tensor) -> Pair:
        """(output, tangent), each (N, T, D): the product rule on SiLU(x W) * (x V)."""
        (gate, value), (dgate, dvalue) = (a.chunk(2, dim=-1) for a in linear_jvp(self.w12, x, dx))  # (N, T, H') each
        act, dact = silu_jvp(gate, dgate)
        return linear_jvp(self.w3, act * value, dact * value + act * dvalue)


class DiTBlock(nn.Module):
    """DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        options: BlockOptions = BlockOptions(),
        rope: Optional[RotaryEmbedding2D] = None,
    ):
        super().__init__()
        self.norm1 = make_norm(options.norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=options.qk_norm, rope=rope)
        self.norm2 = make_norm(options.norm, hidden_size)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        if options.mlp == "swiglu":
            self.mlp = SwiGLUMlp(hidden_size, swiglu_hidden(mlp_hidden_dim))
        else:
            self.mlp = Mlp(in_features=hidden_size, hidden_features=mlp_hidden_dim, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.recompute = "none"  # or "attn" / "mlp" (models/recompute.py); set through DiT.grad_checkpointing

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c (N, D) -> shift, scale, gate of attention, then of the MLP (the checkpoints' order)."""
        return self.adaLN_modulation(c).chunk(6, dim=1)  # six of (N, D)

    def attn_residual(self, x, shift, scale, gate) -> torch.Tensor:
        return x + gate.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift, scale))  # (N, T, D)

    def mlp_residual(self, x, shift, scale, gate) -> torch.Tensor:
        return x + gate.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift, scale))  # (N, T, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor, tangents: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        # x (N, T, D) tokens, c (N, D) conditioning; with tangents (dx, dc): `jvp`, called
        # through forward so that an FSDP2 wrapper gathers the block's weights for it too
        if tangents is not None:
            return self.jvp(x, tangents[0], c, tangents[1])  # (N, T, D) twice
        if self.training and self.recompute != "none":
            return run_halves(self, x, c, self.recompute)  # (N, T, D), the same values
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)  # six of (N, D)
        x = self.attn_residual(x, shift_msa, scale_msa, gate_msa)  # (N, T, D)
        return self.mlp_residual(x, shift_mlp, scale_mlp, gate_mlp)  # (N, T, D)

    def jvp(self, x: torch.Tensor, dx: torch.Tensor, c: torch.Tensor, dc: torch.Tensor) -> Pair:
        """(tokens, tangent), each (N, T, D), for tokens x and conditioning c (N, D) moving at dx, dc."""
        mods, dmods = (a.chunk(6, dim=1) for a in linear_jvp(self.adaLN_modulation[1], *silu_jvp(c, dc)))
        for (shift, scale, gate), (dshift, dscale, dgate), norm, branch in (
            (mods[:3], dmods[:3], self.norm1, self.attn), (mods[3:], dmods[3:], self.norm2, self.mlp),
        ):
            a, da = branch.jvp(*modulate_jvp(*norm_jvp(norm, x, dx), shift, dshift, scale, dscale))  # (N, T, D) each
            x, dx = x + gate.unsqueeze(1) * a, dx + dgate.unsqueeze(1) * a + gate.unsqueeze(1) * da
        return x, dx


class FinalLayer(nn.Module):
    """adaLN-modulated norm (LayerNorm, or RMSNorm with ``norm="rms"``), then a linear map from
    D to p*p*C' per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str = "layer"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        self.recompute = "none"  # "none", or any other mode: recompute the cheap ops in backward

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.training and self.recompute != "none":
            return keep_products(self.plain_forward, x, c)  # (N, T, p*p*C'), keeps only x of the cheap ops
        return self.plain_forward(x, c)  # (N, T, p*p*C')

    def plain_forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # two of (N, D)
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)  # (N, T, p*p*C')

    def jvp(self, x: torch.Tensor, dx: torch.Tensor, c: torch.Tensor, dc: torch.Tensor) -> Pair:
        """(output, tangent), each (N, T, p*p*C')."""
        (shift, scale), (dshift, dscale) = (a.chunk(2, dim=1) for a in linear_jvp(self.adaLN_modulation[1], *silu_jvp(c, dc)))
        return linear_jvp(self.linear, *modulate_jvp(*norm_jvp(self.norm_final, x, dx), shift, dshift, scale, dscale))
