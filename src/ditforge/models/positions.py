"""Position information for patch tokens: the fixed 2-D sin-cos embedding added to the tokens
(MAE, DiT) and the 2-D rotary embedding applied to queries and keys (RoPE: Su et al. 2021,
"RoFormer", Sec. 3.2-3.4; its 2-D form over the patch grid as in EVA-02 and LightningDiT).

Token order: the token at row i, column j of the G x G patch grid has flat index i * G + j (the
order of ``Conv2d(...).flatten(2)``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["get_2d_sincos_pos_embed", "rope_tables", "apply_rope", "RotaryEmbedding2D"]


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
# 2-D rotary position embedding
# ----------------------------------------------------------------------------------------


def rope_tables(head_dim: int, rows: torch.Tensor, cols: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles for tokens at (rows[m], cols[m]), each (M, d).

    RoFormer Eq. 15 per axis, with m = d / 2 channels per axis: channels [0, m) rotate with the
    row, channels [m, d) with the column; within an axis, channel pair (2k, 2k+1) turns by the
    angle pos * omega_k, omega_k = theta ** (-2k / m), k = 0 .. m/2 - 1 (EVA-02's layout, which
    LightningDiT uses). Computed in the dtype of `rows` (use float64 for exact tests).

        paper       here
        theta_i     omega_k (per axis)
        m (pos)     rows, cols
        d           head_dim
    """
    if head_dim % 4 != 0:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4 (two axes of channel pairs), got {head_dim}")
    m = head_dim // 2
    omega = theta ** (-torch.arange(0, m, 2, dtype=rows.dtype, device=rows.device) / m)  # (m/2,)
    row_angles = rows[:, None] * omega[None, :]  # (M, m/2)
    col_angles = cols[:, None] * omega[None, :]  # (M, m/2)
    angles = torch.cat([row_angles, col_angles], dim=1).repeat_interleave(2, dim=1)  # (M, d), pairs share an angle
    return angles.cos(), angles.sin()  # (M, d) each


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x_{2k}, x_{2k+1}) -> (-x_{2k+1}, x_{2k}) along the last dim: a quarter turn of each pair."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., d/2, 2)
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (..., d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair of x (..., T, d) by its token's angle (cos, sin (T, d)):
    (x0, x1) -> (x0 cos a - x1 sin a, x1 cos a + x0 sin a). In at least float32, cast back."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    return (xa * cos.to(acc) + _rotate_pairs(xa) * sin.to(acc)).to(x.dtype)  # (..., T, d)


class RotaryEmbedding2D(nn.Module):
    """2-D RoPE over a G x G patch grid for heads of size d: ``forward(x (N, h, T, d))``.

    The tables are non-persistent buffers (not in the state dict: they follow from G and d) and
    are refilled by `reset` (DiT.initialize_weights calls it, so meta-device init works).
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4 != 0:
            raise ValueError(f"2-D RoPE needs a head dim divisible by 4 (two axes of channel pairs), got {head_dim}")
        self.head_dim, self.grid_size, self.theta = head_dim, grid_size, theta
        tokens = grid_size * grid_size
        self.register_buffer("cos", torch.ones(tokens, head_dim), persistent=False)  # (T, d)
        self.register_buffer("sin", torch.zeros(tokens, head_dim), persistent=False)  # (T, d)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Fill the tables (computed in float64, stored in the buffers' dtype)."""
        coords = torch.arange(self.grid_size, dtype=torch.float64, device=self.cos.device)  # (G,)
        rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each: row i, column j
        cos, sin = rope_tables(self.head_dim, rows.reshape(-1), cols.reshape(-1), self.theta)  # (T, d) each
        self.cos.copy_(cos.to(self.cos.dtype))
        self.sin.copy_(sin.to(self.sin.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, self.cos, self.sin)  # (N, h, T, d)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, grid_size={self.grid_size}, theta={self.theta:g}"
