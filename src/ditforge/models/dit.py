"""Class-conditional Diffusion Transformer (DiT), Peebles & Xie 2022, "Scalable Diffusion
Models with Transformers" (https://arxiv.org/abs/2212.09748).

Architecture only: no diffusion process, no training loop, no classifier-free guidance.

The module tree, parameter names and shapes follow the official checkpoints exactly
(``DiT-XL-2-256x256.pt`` and friends load with ``strict=True``), and ``repr(model)`` matches
the print of the reference implementation (which builds its attention and MLP from timm;
here they are written out so that timm/torchvision are not needed).

Notation used in the shape comments:
    N  batch size            C  input channels        H, W  input height and width
    p  patch size            D  hidden size           T  tokens = (H / p) * (W / p)
    h  heads                 d  head dim = D / h      C' out channels (2C with learned sigma)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditforge.models.recompute import HALF_MODES, block_groups, keep_products, normalize_spec, run_blocks, run_halves

__all__ = [
    "DiT",
    "PatchEmbed",
    "LayerNorm",
    "TimestepEmbedder",
    "LabelEmbedder",
    "Attention",
    "Mlp",
    "DiTBlock",
    "FinalLayer",
    "modulate",
    "get_2d_sincos_pos_embed",
    "MODEL_SIZES",
    "MODEL_PATCH_SIZES",
    "MODEL_NAMES",
    "create_model",
    "count_parameters",
]


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


# ----------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embedding (MAE / DiT)
# ----------------------------------------------------------------------------------------


def _1d_sincos(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos (M,) -> (M, embed_dim) = [sin(pos * omega), cos(pos * omega)],
    omega_i = 1 / 10000 ** (i / (embed_dim / 2)), i = 0 .. embed_dim/2 - 1."""
    if embed_dim % 2 != 0:
        raise ValueError(f"1-D sin-cos embedding needs an even dim, got {embed_dim}")
    half = embed_dim // 2
    omega = torch.arange(half, dtype=pos.dtype, device=pos.device) / half  # (D/2,)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = pos[:, None] * omega[None, :]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


def get_2d_sincos_pos_embed(
    embed_dim: int,
    grid_size: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding of MAE/DiT, shape (grid_size**2, embed_dim).

    Same semantics as the reference ``get_2d_sincos_pos_embed`` (numpy): the grid is built
    as ``meshgrid(grid_w, grid_h)`` ("w goes first"), the first half of the channels embeds
    ``grid[0]`` and the second half ``grid[1]``. For the token at row i, column j (flat index
    i * grid_size + j, the order of ``Conv2d(...).flatten(2)``) that is:
    channels [0, D/2) embed j and channels [D/2, D) embed i.
    Computed in float64 by default (as the reference does in numpy) and works on any device,
    including ``meta``.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=dtype, device=device)  # (G,)
    # meshgrid(grid_w, grid_h) in numpy's default 'xy' indexing:
    # grid0[i, j] = grid_w[j] (column), grid1[i, j] = grid_h[i] (row)
    grid1, grid0 = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    emb_h = _1d_sincos(embed_dim // 2, grid0.reshape(-1))  # (G*G, D/2), from grid[0]
    emb_w = _1d_sincos(embed_dim // 2, grid1.reshape(-1))  # (G*G, D/2), from grid[1]
    return torch.cat([emb_h, emb_w], dim=1)  # (G*G, D)


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
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal timestep features as in GLIDE/DiT: t (N,) -> (N, dim) = [cos(t f), sin(t f)],
        f_i = max_period ** (-i / (dim // 2)), i = 0 .. dim//2 - 1; a zero column is appended
        when dim is odd. Computed in float32 (float64 if t is float64); t may be fractional."""
        compute_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=compute_dtype, device=t.device) / half
        )  # (dim/2,)
        args = t[:, None].to(compute_dtype) * freqs[None, :]  # (N, dim/2)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * (dim/2))
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (N, dim)
        return embedding  # (N, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        t_freq = t_freq.to(self.mlp[0].weight.dtype)  # (N, 256), match a bf16/fp16 model
        return self.mlp(t_freq)  # (N, D)


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


# ----------------------------------------------------------------------------------------
# Transformer parts
# ----------------------------------------------------------------------------------------


# Up to this many tokens (256: DiT-*/2 at 256 px), bf16 attention on CPU materialises the
# (N, h, T, T) scores instead of calling SDPA's CPU flash kernel, which is 2x slower there.
CPU_EXPLICIT_ATTENTION_MAX_TOKENS = 256


def uses_explicit_attention(q: torch.Tensor, tokens: int) -> bool:
    """Whether Attention computes softmax(q k^T / sqrt(d)) v with two explicit products (bf16 on
    CPU, few tokens) rather than F.scaled_dot_product_attention."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and tokens <= CPU_EXPLICIT_ATTENTION_MAX_TOKENS


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout), computed with
    ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where available), or,
    in bf16 on CPU with few tokens, with two explicit matrix products (faster there)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape  # (N, T, D)
        qkv = self.qkv(x)  # (N, T, 3D)
        qkv = qkv.reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, N, h, T, d)
        q, k, v = qkv.unbind(0)  # each (N, h, T, d)
        q, k = self.q_norm(q), self.k_norm(k)  # (N, h, T, d)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if uses_explicit_attention(q, T):
            # PyTorch's CPU flash kernel is slow in bf16: two batched matrix products are 2x
            # faster there (benchmarks/README.md). Scores in bf16, like the outputs of the
            # linear layers around them under autocast.
            a = (q * self.scale) @ k.transpose(-2, -1)  # (N, h, T, T)
            x = F.dropout(a.softmax(dim=-1), dropout_p) @ v  # (N, h, T, d)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (N, h, T, d) = softmax(q k^T / sqrt(d)) v
        x = x.transpose(1, 2).reshape(B, T, D)  # (N, T, D)
        x = self.proj(x)  # (N, T, D)
        return self.proj_drop(x)  # (N, T, D)


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


class DiTBlock(nn.Module):
    """DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
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

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (N, T, D) tokens, c (N, D) conditioning
        if self.training and self.recompute != "none":
            return run_halves(self, x, c, self.recompute)  # (N, T, D), the same values
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)  # six of (N, D)
        x = self.attn_residual(x, shift_msa, scale_msa, gate_msa)  # (N, T, D)
        return self.mlp_residual(x, shift_mlp, scale_mlp, gate_mlp)  # (N, T, D)


class FinalLayer(nn.Module):
    """adaLN-modulated layer norm, then a linear map from D to p*p*C' per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
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


# ----------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (class-conditional, adaLN-Zero)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        for name, value in (
            ("input_size", input_size),
            ("patch_size", patch_size),
            ("in_channels", in_channels),
            ("hidden_size", hidden_size),
            ("depth", depth),
            ("num_heads", num_heads),
            ("num_classes", num_classes),
        ):
            _check_positive_int(name, value)
        if input_size % patch_size != 0:
            raise ValueError(
                f"input_size ({input_size}) must be divisible by patch_size ({patch_size})"
            )
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if hidden_size % 4 != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by 4 for the 2-D sin-cos position embedding"
            )
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0 and int(hidden_size * mlp_ratio) > 0):
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        if not (isinstance(class_dropout_prob, (int, float)) and 0.0 <= class_dropout_prob <= 1.0):
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob!r}")

        self.learn_sigma = bool(learn_sigma)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.class_dropout_prob = class_dropout_prob
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding: a parameter (so it is in the state dict, as in the official
        # checkpoints) that is never trained.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.grad_checkpointing = "none"  # training memory option: what blocks keep for backward
        self.initialize_weights()

    @property
    def grad_checkpointing(self) -> str:
        """What each block keeps for backward in training: a spec of models/recompute.py
        ("none", "ops", "mlp", "attn", "full", or MODE:FRACTION; True means "full")."""
        return self._grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, spec: str | bool) -> None:
        self._grad_checkpointing = normalize_spec(spec)
        self._block_groups = block_groups(spec, len(self.blocks))  # [(block indices, mode)]
        for indices, mode in self._block_groups:
            for i in indices:
                self.blocks[i].recompute = mode if mode in HALF_MODES else "none"
        self.final_layer.recompute = "none" if self._grad_checkpointing == "none" else "ops"

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """All of DiT's initialisation (works on the ``meta`` device too)."""

        # Transformer layers: xavier-uniform weights, zero biases.
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        # Fixed 2-D sin-cos position embedding, computed in float64 then cast (as the reference).
        grid = self.input_size // self.patch_size
        pos = get_2d_sincos_pos_embed(self.hidden_size, grid, device=self.pos_embed.device)  # (T, D)
        self.pos_embed.copy_(pos.to(self.pos_embed.dtype).unsqueeze(0))  # (1, T, D)

        # Patch embedding like nn.Linear (xavier on the flattened (D, C*p*p) view), not Conv2d's default.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Label embedding table.
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

        # Timestep embedding MLP.
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero the modulation layers of every block, so each block starts as the
        # identity (all gates are 0).
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero the output layers: the model predicts exactly 0 at initialisation.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C') -> (N, C', H, W), element order as the reference
        (``einsum('nhwpqc->nchpwq')``: per token the channel index varies fastest)."""
        c = self.out_channels
        p = self.patch_size
        h = w = self.input_size // p
        if x.shape[1] != h * w:
            raise ValueError(f"expected {h * w} tokens, got {x.shape[1]}")
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, H/p, W/p, p, p, C')
        x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C', H/p, p, W/p, p) == einsum 'nhwpqc->nchpwq'
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C', H, W)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x (N, C, H, W) noisy inputs, t (N,) timesteps (float or int), y (N,) class ids in
        [0, num_classes) (``num_classes`` itself is the null class when it exists);
        force_drop_ids (N,) optional, 1 = use the null class. Returns (N, C', H, W)."""
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected x of shape (N, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])  # (N,)
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H*W / p**2
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        c = t + y  # (N, D)
        for indices, mode in self._block_groups:
            x = run_blocks([self.blocks[i] for i in indices], x, c, mode if self.training else "none")  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C')
        x = self.unpatchify(x)  # (N, C', H, W)
        return x  # (N, C', H, W)


# ----------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------

#: size name -> (depth, hidden_size, num_heads). "Ti" is ditforge's tiny size for CPU work.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "Ti": (6, 192, 3),
}

#: size name -> allowed patch sizes (the paper's 12 models, plus the tiny ones).
MODEL_PATCH_SIZES: dict[str, tuple[int, ...]] = {
    "XL": (2, 4, 8),
    "L": (2, 4, 8),
    "B": (2, 4, 8),
    "S": (2, 4, 8),
    "Ti": (1, 2, 4),
}

MODEL_NAMES: list[str] = [
    f"DiT-{size}/{patch}" for size, patches in MODEL_PATCH_SIZES.items() for patch in patches
]

_MODEL_CONFIGS: dict[str, dict[str, int]] = {}
for _size, _patches in MODEL_PATCH_SIZES.items():
    _depth, _hidden, _heads = MODEL_SIZES[_size]
    for _patch in _patches:
        _MODEL_CONFIGS[f"DiT-{_size}/{_patch}"] = dict(
            depth=_depth, hidden_size=_hidden, num_heads=_heads, patch_size=_patch
        )


def create_model(name: str, **kwargs) -> DiT:
    """Build a named DiT, e.g. ``create_model("DiT-XL/2")`` or
    ``create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10)``.

    ``kwargs`` go to :class:`DiT` (input_size, in_channels, num_classes, learn_sigma,
    class_dropout_prob, mlp_ratio); depth, hidden_size, num_heads and patch_size are fixed
    by the name.
    """
    if name not in _MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    config = _MODEL_CONFIGS[name]
    clash = sorted(set(config) & set(kwargs))
    if clash:
        raise TypeError(f"{', '.join(clash)} is fixed by the model name {name!r} and cannot be overridden")
    return DiT(**config, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values, trainable or not (includes the fixed pos_embed)."""
    return sum(p.numel() for p in model.parameters())
