"""Labelled sample grids as PNG: one row per class, the class name at the left."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ditforge.data.sources import to_uint8


def _upscale(n_pixels: int) -> int:
    """Integer zoom so small images (8x8 digits) are visible: rows at least 48 px high."""
    return max(1, -(-48 // n_pixels))


def make_grid(
    images: torch.Tensor,  # (N, C, H, W) in [-1, 1], grouped by row
    row_labels: list[str],
    per_row: int,
    pad: int = 2,
) -> np.ndarray:
    """(rows*H', label_w + per_row*W', 3) uint8 picture; H' = zoomed H plus padding."""
    from PIL import Image, ImageDraw

    pix = to_uint8(images.detach().float().cpu())  # (N, C, H, W)
    if pix.shape[1] == 1:
        pix = pix.repeat(1, 3, 1, 1)
    n, _, h, w = pix.shape
    rows = len(row_labels)
    if n != rows * per_row:
        raise ValueError(f"{n} images do not fill {rows} rows of {per_row}")
    zoom = _upscale(h)
    cell_h, cell_w = h * zoom + pad, w * zoom + pad
    label_w = 8 + 7 * max(len(s) for s in row_labels)
    canvas = Image.new("RGB", (label_w + per_row * cell_w + pad, rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    tiles = pix.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    for i in range(n):
        r, c = divmod(i, per_row)
        tile = Image.fromarray(tiles[i]).resize((w * zoom, h * zoom), Image.NEAREST)
        canvas.paste(tile, (label_w + pad + c * cell_w, pad + r * cell_h))
    for r, text in enumerate(row_labels):
        draw.text((4, pad + r * cell_h + cell_h // 2 - 6), text, fill=(0, 0, 0))
    return np.asarray(canvas)


def save_png_atomic(picture: np.ndarray, path: str | Path) -> Path:
    """Write a PNG to a temporary name beside `path`, then rename: no half-written file."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        Image.fromarray(picture).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
