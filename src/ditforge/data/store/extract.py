"""Extraction: encode a list of images into a latent store, in batches, resumably, over ranks.

`extract` loads each batch's images (in a thread pool, one batch ahead, with `workers` > 0),
encodes them with their flips in one autoencoder call and appends the records through a
`LatentWriter`; unreadable files are skipped and listed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditforge.data.store.writer import LatentWriter
from ditforge.errors import UnreadableImage, UserError

# What a loader raises for an unreadable, truncated or undecodable file (`data.sources.open_image`
# turns the decoder's errors into it): skipped and recorded. Any other exception stops the
# extraction, which a rerun resumes; an error of ours is never taken for a broken file.
SKIP_ERRORS: tuple[type[BaseException], ...] = (UnreadableImage,)


def items_digest(items: Sequence[tuple[Any, int]]) -> str:
    """sha256 of the (key, label) list: what a resumed extraction must agree with."""
    h = hashlib.sha256()
    for key, label in items:
        h.update(f"{key}\t{int(label)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _load_one(load: Callable[[Any], Any], key: Any, skip_errors: tuple[type[BaseException], ...]) -> tuple[bool, Any]:
    try:
        return True, load(key)
    except skip_errors as e:  # UnreadableImage already names the decoder's error
        reason = str(e) if isinstance(e, UnreadableImage) else f"{type(e).__name__}: {e}"
        return False, " ".join(reason.split())


def _to_unit(image: Any, in_channels: int, key: Any) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) (a PIL image works too) -> float (C, H, W) in [-1, 1]."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise TypeError(f"the loader returned {arr.dtype} {arr.shape} for {key!r}; expected uint8 (H, W) or (H, W, C)")
    x = torch.from_numpy(arr.copy())  # (a PIL image's array is read-only)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
    if x.shape[0] == 1 and in_channels == 3:
        x = x.expand(3, -1, -1)
    if x.shape[0] != in_channels:
        raise UserError(f"{key!r} has {x.shape[0]} channels; the autoencoder takes {in_channels}")
    return x.float() / 127.5 - 1.0


def extract(
    items: Sequence[tuple[Any, int]],
    load: Callable[[Any], Any],
    autoencoder,
    root: str | Path,
    *,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    shard_size: int = 1024,
    dtype: str = "float16",
    plan: dict[str, Any] | None = None,
    overwrite: bool = False,
    workers: int = 0,
    progress: bool = False,
    skip_errors: tuple[type[BaseException], ...] = SKIP_ERRORS,
) -> dict[str, Any]:
    """Encode this rank's share of `items` into the store folder `root`; resumable.

    items: (key, label) pairs, e.g. (file path, class id); `load(key)` returns the image as
    uint8 (H, W[, C]), all of one size, or raises one of `skip_errors` for an unreadable file,
    which is then skipped and listed with the reason (never fatal). Rank r encodes the items
    `rank_range(len(items), r, world_size)`. Each batch is encoded together with its flipped
    copy (one autoencoder call of 2 x batch images).

    Rerunning with the same arguments after an interruption keeps the finished shards and
    continues; batches sit on a fixed grid (multiples of `batch_size` from the rank's first
    item, the partial batch before the resume point re-encoded and dropped), so the store is
    the same as one written in one go. `workers` > 0 loads images in that many threads, one
    batch ahead. The caller then runs `finalize_store` once, on one process, after all ranks.

    Returns {rank, items, resumed_at, encoded, skipped, records, seconds, images_per_s}
    (encoded, skipped and the rate count this call only).
    """
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    items = items if isinstance(items, Sequence) else list(items)
    full_plan = {"items_sha256": items_digest(items), "autoencoder": autoencoder.describe(), **(plan or {})}
    writer = LatentWriter(root, rank, world_size, shard_size, num_items=len(items), dtype=dtype, plan=full_plan, overwrite=overwrite)
    lo, hi = writer.items.start, writer.items.stop
    start = writer.resume_position()
    grid_start = lo + (start - lo) // batch_size * batch_size
    batches = [] if writer.done else [range(b, min(b + batch_size, hi)) for b in range(grid_start, hi, batch_size)]
    t0 = time.perf_counter()
    encoded = skipped = 0
    first_shape: tuple[int, ...] | None = None
    from tqdm import tqdm

    bar = tqdm(total=hi - lo, initial=start - lo, unit="img", desc=f"extract (rank {rank})", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    pool = ThreadPoolExecutor(workers) if workers > 0 else None

    def submit(batch: range):
        if pool is None:
            return batch
        return [pool.submit(_load_one, load, items[i][0], skip_errors) for i in batch]

    try:
        ahead = submit(batches[0]) if batches else None
        for k, batch in enumerate(batches):
            current = ahead
            ahead = submit(batches[k + 1]) if k + 1 < len(batches) else None
            loaded = [fut.result() for fut in current] if pool is not None else [_load_one(load, items[i][0], skip_errors) for i in batch]
            images, kept = [], []
            for i, (ok, value) in zip(batch, loaded):
                if ok:
                    images.append(_to_unit(value, autoencoder.in_channels, items[i][0]))
                    kept.append(i)
                elif i >= start:
                    writer.skip(i, str(items[i][0]), value)
                    skipped += 1
            if images:
                first_shape = first_shape or tuple(images[0].shape)
                for i, x in zip(kept, images):
                    if tuple(x.shape) != first_shape:
                        raise UserError(
                            f"{items[i][0]!r} is {x.shape[2]}x{x.shape[1]} with {x.shape[0]} channels, other images "
                            f"{first_shape[2]}x{first_shape[1]} with {first_shape[0]}; the loader must bring all to one size"
                        )
                x = torch.stack(images)  # (n, C_img, H, W) in [-1, 1]
                n = x.shape[0]
                mean, std = autoencoder.encode(torch.cat([x, x.flip(-1)]))  # (2n, C, h, w) each
                mean = torch.stack([mean[:n], mean[n:]], dim=1)  # (n, 2, C, h, w): [:, 1] is the flip
                std = torch.stack([std[:n], std[n:]], dim=1)
                keep = torch.tensor(kept) >= start
                new_items = torch.tensor(kept)[keep]
                writer.add(new_items, torch.tensor([int(items[i][1]) for i in new_items.tolist()]), mean[keep], std[keep])
                encoded += int(keep.sum())
            bar.update(batch.stop - max(batch.start, start))
        summary = writer.close()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    seconds = time.perf_counter() - t0
    return {
        "rank": rank,
        "items": hi - lo,
        "resumed_at": start - lo,
        "encoded": encoded,
        "skipped": skipped,
        "records": summary["records"],
        "seconds": seconds,
        "images_per_s": encoded / seconds if seconds > 0 else 0.0,
    }
