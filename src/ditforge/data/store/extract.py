"""Extraction: encode a list of images into a latent store, in batches, resumably, over ranks.

`extract` loads each batch's images (in a thread pool, one batch ahead, with `workers` > 0),
encodes them with their flips in one autoencoder call and appends the records through a
`LatentWriter`; unreadable files are skipped and listed. `extract_store` is the `extract`
command: a data set (`data.sources`) through an autoencoder (`data.autoencoder`), over ranks,
then the manifest.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditforge.data.store.writer import LatentWriter
from ditforge.errors import UnreadableImage, UserError, quiet
from ditforge.flags import flag
from ditforge.preemption import StopRequest, Stopped
from ditforge.progress import progress_of
from ditforge.folder_lock import FolderLock, folder_lock_file

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


def stopped(stop: StopRequest, writer: LatentWriter, root: str | Path) -> Stopped:
    """The error that ends an extraction stopped by a signal, once its shard in flight is written."""
    done, items = writer.resume_position() - writer.items.start, len(writer.items)
    error = Stopped(f"stopped by {stop.signal_name} after a shard: {done} of rank {writer.rank}'s {items} images are in "
                    f"finished shards of {str(root)!r}", distributed=writer.world_size > 1)
    return error if writer.rank == 0 else quiet(error)  # rank 0 says it


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
    keep_pixels: bool = False,
    progress: bool = False,
    skip_errors: tuple[type[BaseException], ...] = SKIP_ERRORS,
    stop: StopRequest | None = None,
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
    batch ahead. `keep_pixels` also stores each image as encoded (uint8, unflipped), for REPA's
    encoder on the store. The caller then runs `finalize_store` once, on one process, after all ranks.

    Once `stop` has heard a signal (SIGTERM, SIGUSR1, Ctrl-C: `preemption.py`), this rank stops
    as soon as the shard in flight is written, raising `Stopped`; a rerun continues from there.

    Returns {rank, items, resumed_at, encoded, skipped, records, seconds, images_per_s}
    (encoded, skipped and the rate count this call only).
    """
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    items = items if isinstance(items, Sequence) else list(items)
    full_plan = {"items_sha256": items_digest(items), "autoencoder": autoencoder.describe(), **(plan or {}),
                 **({"keep_pixels": True} if keep_pixels else {})}  # (absent when off: older plans still resume)
    writer = LatentWriter(root, rank, world_size, shard_size, num_items=len(items), dtype=dtype, plan=full_plan, overwrite=overwrite,
                          means_only=autoencoder.means_only, channel_stats=autoencoder.latent_norm == "channel")
    lo, hi = writer.items.start, writer.items.stop
    start = writer.resume_position()
    grid_start = lo + (start - lo) // batch_size * batch_size
    batches = [] if writer.done else [range(b, min(b + batch_size, hi)) for b in range(grid_start, hi, batch_size)]
    t0 = time.perf_counter()
    encoded = skipped = 0
    first_shape: tuple[int, ...] | None = None
    bar = progress_of(hi - lo, start - lo, f"extract (rank {rank})", batch_size) if progress else None
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
                pixels = x[keep].add(1).mul_(127.5).round_().to(torch.uint8) if keep_pixels else None  # exact: x = u / 127.5 - 1
                saved = writer.resume_position()
                writer.add(new_items, torch.tensor([int(items[i][1]) for i in new_items.tolist()]), mean[keep], std[keep], pixels)
                encoded += int(keep.sum())
                if stop is not None and stop.requested and writer.resume_position() != saved:  # a shard was just written
                    raise stopped(stop, writer, root)
            if bar is not None:
                bar.update(batch.stop - max(batch.start, start))
        summary = writer.close()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
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


# -- the `extract` command's library side: a data set through an autoencoder into a store -----


@dataclass(kw_only=True)
class ExtractOptions:
    """What `ditforge extract` asks for, each field its option."""

    data: str = field(metadata=flag(
        "--data", "image folder (ROOT/<class>/<image>), hf:NAME or hf:PATH, or a built-in set", required=True))
    vae: str = field(default="stabilityai/sd-vae-ft-ema", metadata=flag(
        "--vae", "hub id, 'ema' / 'mse', a save_pretrained folder of a diffusers AutoencoderKL (SD, FLUX, SD3), "
        "AutoencoderDC or AutoencoderKLQwenImage (the class from its config), or 'identity'"))
    latent_norm: str = field(default="scale", metadata=flag(
        "--latent-norm", "scale: the autoencoder's own (z - shift_factor) x scaling_factor from its config; channel: "
        "also the data set's per-channel mean and std of the latents, measured while extracting and kept in the "
        "manifest", choices=["scale", "channel"]))
    image_size: int = field(default=256, metadata=flag(
        "--image-size", "pixels; a multiple of the VAE's downsampling (8)"))
    crop: str = field(default="center", metadata=flag(
        "--crop", "ADM centre crop, or a plain resize", choices=["center", "resize"]))
    out: str = field(metadata=flag("--out", "folder of the latent store", required=True))
    batch_size: int = field(default=32, metadata=flag("--batch-size", "images per VAE call (each with its flip)"))
    shard_size: int = field(default=1024, metadata=flag("--shard-size", "records per shard file"))
    dtype: str = field(default="float16", metadata=flag(
        "--dtype", "storage precision of mean and log-variance", choices=["float16", "float32"]))
    workers: int = field(default=4, metadata=flag("--workers", "threads that load images ahead of the VAE"))
    keep_pixels: bool = field(default=False, metadata=flag(
        "--keep-pixels", "also store each image as encoded (uint8, 3 x size^2 bytes: 192 KiB at 256 px), which REPA's "
        "encoder reads when training on the store (`train --repa-encoder`)", action="store_true"))
    overwrite: bool = field(default=False, metadata=flag("--overwrite", "replace an existing store", action="store_true"))
    repair: bool = field(default=False, metadata=flag(
        "--repair", "re-encode only the shards of the finished store --out that fail verification (`ditforge verify`), "
        "with this same command's inputs; the good shards stay untouched", action="store_true"))
    hf_config: str | None = field(default=None, metadata=flag(
        "--hf-config", "Hugging Face dataset config name (default: none)"))
    hf_split: str = field(default="train", metadata=flag("--hf-split", "Hugging Face dataset split"))
    hf_image_column: str | None = field(default=None, metadata=flag(
        "--hf-image-column", "image column (default: the first Image feature)"))
    hf_label_column: str | None = field(default=None, metadata=flag(
        "--hf-label-column", "label column (default: label)"))
    no_progress: bool = field(default=False, metadata=flag("--no-progress", "no progress bar", action="store_true"))


@dataclass
class ExtractResult:
    line: str  # what was written, for the command to print
    is_main: bool = True  # only the main rank finalizes the store and reports it


def extract_store(opts: ExtractOptions) -> ExtractResult:
    """Encode `opts.data` through `opts.vae` into the store `opts.out`: each rank (under torchrun)
    its share (`extract`), then the main rank writes the manifest (`finalize_store`)."""
    from ditforge.data.autoencoder import load_autoencoder
    from ditforge.data.sources import list_items
    from ditforge.data.store.writer import finalize_store
    from ditforge.train import distributed

    if opts.image_size <= 0:
        raise UserError(f"--image-size must be positive, got {opts.image_size}")
    hf = {}
    if opts.data.startswith("hf:"):
        hf = dict(config=opts.hf_config, split=opts.hf_split, image_column=opts.hf_image_column, label_column=opts.hf_label_column)
    d = distributed.init()
    lock = FolderLock(folder_lock_file(opts.out), "ditforge extract", opts.out)  # one writer per store (folder_lock.py)
    try:
        distributed.raise_together(d, lock.acquire if d.is_main else lambda: None)
        source = list_items(opts.data, **hf)
        ae = load_autoencoder(opts.vae, device=d.device, latent_norm=opts.latent_norm)
        down = getattr(ae, "downsample", 1)
        if opts.image_size % down:
            raise UserError(f"--image-size {opts.image_size} is not a multiple of the VAE's downsampling factor {down}")
        items = list(zip(source.items, source.labels))
        plan = dict(image_size=opts.image_size, crop=opts.crop, source=opts.data)
        if opts.repair:  # only the shards that fail verification, encoded again (repair.py)
            return ExtractResult(_repair(opts, d, items, source, ae, plan))
        with StopRequest() as stop:  # SIGTERM, SIGUSR1, Ctrl-C: the shard in flight is finished first (preemption.py)
            summary = extract(
                items, lambda key: source.load(key, opts.image_size, opts.crop), ae, opts.out,
                batch_size=opts.batch_size, rank=d.rank, world_size=d.world_size, shard_size=opts.shard_size,
                dtype=opts.dtype, plan=plan,
                overwrite=opts.overwrite, workers=opts.workers, keep_pixels=opts.keep_pixels, progress=not opts.no_progress,
                stop=stop,
            )
        distributed.barrier(d)
        if not d.is_main:
            return ExtractResult("", is_main=False)
        manifest = finalize_store(opts.out, dict(
            source=opts.data, image_size=opts.image_size, crop=opts.crop, autoencoder=ae.describe(),
            class_names=source.class_names,
        ))
        return ExtractResult(
            f"wrote {opts.out}: {manifest.get('count')} records of {tuple(manifest.get('latent_shape', ()))} "
            f"from {len(items)} images ({len(manifest.get('skipped', []))} unreadable, skipped and listed in manifest.json); "
            f"this process encoded {summary.get('encoded')} at {summary.get('images_per_s') or 0:.1f} images/s"
        )
    finally:
        lock.release()
        distributed.shutdown()


def _repair(opts: ExtractOptions, d, items, source, ae, plan: dict[str, Any]) -> str:
    """`extract --repair`: the damaged shards of the store encoded again, one process (repair.py)."""
    from ditforge.data.store.repair import repair_store

    if d.world_size > 1:
        raise UserError("extract --repair runs as one process: start it without torchrun")
    if opts.overwrite:
        raise UserError("--repair mends the store in place and --overwrite replaces it: give one of them")
    return "\n".join(repair_store(
        items, lambda key: source.load(key, opts.image_size, opts.crop), ae, opts.out, extract=extract,
        batch_size=opts.batch_size, dtype=opts.dtype, plan=plan, workers=opts.workers, keep_pixels=opts.keep_pixels))
