"""Writing a latent store: one rank's records appended shard by shard, resumably; the manifest.

Writes are atomic (a temp file renamed into place) and progress is the set of finished shards:
a writer reopened with the same inputs keeps them and the caller continues from
`resume_position()`. Once every rank has closed its writer, `finalize_store` writes the
manifest, which makes the folder a store. The layout is in `format.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditforge.data.store.format import (
    FORMAT,
    MANIFEST,
    MANIFEST_CHECKSUM,
    MEANS_ONLY_FIELD,
    NORMALISED_VERSION,
    PIXELS_FIELD,
    RANK_RE,
    RECORD_FIELDS,
    SHARD_DIR,
    SHARD_RE,
    STORE_DTYPES,
    VERSION,
    list_shards,
    map_shard,
    normalise,
    rank_file_name,
    rank_range,
    read_rank_file,
    shard_info,
    shard_name,
    write_json_atomic,
    write_safetensors,
)
from ditforge.data.autoencoder.normalisation import channel_stats as reduce_channel_stats
from ditforge.data.autoencoder.normalisation import channel_sums, encode_sums
from ditforge.checksums import record_file, with_own_checksum
from ditforge.errors import UserError


class LatentWriter:
    """Appends one rank's records to a store folder, a shard at a time, resumably.

    Feed every item of `rank_range(num_items, rank, world_size)` in increasing order, each
    either `add`ed (with its encoding) or `skip`ped (with the reason); within one batch, call
    `skip` before `add`. `close()` writes the last, partial shard and marks the rank done.

    Reopened on a folder with this rank's finished shards and the same inputs (`num_items`,
    `world_size`, `shard_size`, `dtype`, `plan`), it keeps them: continue from
    `resume_position()`. Other inputs are refused (`overwrite=True` starts over), and so is a
    finished store (one with manifest.json).
    """

    def __init__(
        self,
        root: str | Path,
        rank: int = 0,
        world_size: int = 1,
        shard_size: int = 1024,
        *,
        num_items: int,
        dtype: str = "float16",
        plan: dict[str, Any] | None = None,
        overwrite: bool = False,
        means_only: bool = False,
        channel_stats: bool = False,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in [0, world size {world_size})")
        if shard_size < 1:
            raise UserError(f"shard size must be positive, got {shard_size}")
        if num_items < 0:
            raise UserError(f"number of items must be >= 0, got {num_items}")
        if dtype not in STORE_DTYPES:
            raise UserError(f"latent store dtype {dtype!r} is not one of: {', '.join(STORE_DTYPES)}")
        self.root, self.rank, self.world_size, self.shard_size = Path(root), rank, world_size, shard_size
        self.dtype = dtype
        # a deterministic autoencoder's records: the means only, (n, 2, 1, C, h, w); channel_stats:
        # each shard's header keeps its float64 channel sums (`--latent-norm channel`)
        self.means_only, self.channel_stats = means_only, channel_stats
        self.dir = self.root / SHARD_DIR
        self.items = rank_range(num_items, rank, world_size)
        self.info = normalise(
            {"format": FORMAT, "version": VERSION, "rank": rank, "world_size": world_size, "num_items": num_items,
             "items": [self.items.start, self.items.stop], "shard_size": shard_size, "dtype": dtype, "plan": plan or {},
             **({"means_only": True} if means_only else {}), **({"channel_stats": True} if channel_stats else {})}
        )  # (the two flags absent when off: the rank files of earlier versions still resume)
        manifest = self.root / MANIFEST
        if manifest.exists() and not overwrite:
            raise UserError(
                f"{str(self.root)!r} is a finished latent store (it has {MANIFEST}); pass overwrite=True (--overwrite) "
                "to replace it, or choose another folder"
            )
        if overwrite:
            self._clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        if not overwrite:  # with overwrite every rank clears its own files, maybe after this one looks
            self._check_other_ranks()
        for tmp in self.dir.glob(f"shard-{rank:05d}-*.safetensors.tmp"):
            tmp.unlink()  # an interrupted write; its records are redone
        self._load_progress()
        if not self._done:
            write_json_atomic(self.dir / rank_file_name(rank), {**self.info, "done": False, "files": self._files})

    # progress ---------------------------------------------------------------------------

    def _clear(self) -> None:
        if self.rank == 0:
            (self.root / MANIFEST).unlink(missing_ok=True)
        if not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            m = SHARD_RE.match(p.name.removesuffix(".tmp")) or RANK_RE.match(p.name.removesuffix(".tmp"))
            if m and (int(m.group(1)) == self.rank or (self.rank == 0 and int(m.group(1)) >= self.world_size)):
                p.unlink(missing_ok=True)

    def _check_other_ranks(self) -> None:
        for p in sorted(self.dir.glob("rank-*.json")):
            other = read_rank_file(p)
            mine = {**self.info, "rank": other.get("rank"), "items": other.get("items")}
            if other.get("rank") == self.rank:
                mine["items"] = self.info["items"]
            for key, value in mine.items():
                if other.get(key) != value:
                    raise UserError(
                        f"{str(self.root)!r} holds an unfinished extraction with {key}={_short(other.get(key))}, this one has "
                        f"{key}={_short(value)}; rerun with the same inputs to resume it, or pass overwrite=True (--overwrite) "
                        "to start over"
                    )

    def _load_progress(self) -> None:
        rank_file = self.dir / rank_file_name(self.rank)
        state = read_rank_file(rank_file) if rank_file.exists() else {}
        self._shards = list_shards(self.dir, self.rank)
        # each finished shard's size and checksum, recorded in the rank file as it was written; a
        # shard that a kill left unrecorded (after its rename, before the rank file's) is read once
        recorded = state.get("files") if isinstance(state.get("files"), dict) else {}
        self._files = {p.name: recorded.get(p.name) or record_file(p) for p in self._shards}
        infos = [shard_info(p) for p in self._shards]
        self._records = sum(i["count"] for i in infos)
        self._record_shape = tuple(infos[0]["record_shape"]) if infos else None
        # the pixels' (C, H, W) when records keep them (`add(pixels=)`), () when they do not, None before any
        self._pixel_shape = (tuple(infos[0]["pixels_shape"] or ())) if infos else None
        self._zero_std = all(i["zero_std"] for i in infos)
        if any(i["means_only"] != self.means_only for i in infos):
            held, wanted = ("records with posterior variances", "none") if self.means_only else ("means-only records", "them")
            raise UserError(f"{str(self.root)!r} holds {held} and this extraction's autoencoder has {wanted}; "
                            "pass overwrite=True (--overwrite) to start over")
        self._done = bool(state.get("done"))
        if self._done:
            self._position = self.items.stop
            self._skipped = list(state.get("skipped", []))
        else:
            self._position = infos[-1]["items"][1] if infos else self.items.start
            self._skipped = [s for i in infos for s in i["skipped"]]
        # in-memory state since the last finished shard
        self._last_record = self._last_skip = self._position - 1
        self._buffer: list[tuple[torch.Tensor, ...]] = []
        self._buffered = 0
        self._pending_skips: list[dict[str, Any]] = []

    def resume_position(self) -> int:
        """The first item not yet saved in a finished shard (== the rank's end when it is done)."""
        return self._position

    def done_indices(self) -> range:
        """Items of this rank already saved (encoded or skipped) in finished shards."""
        return range(self.items.start, self._position)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def records(self) -> int:
        """Records of this rank in finished shards plus those buffered."""
        return self._records + self._buffered

    # appending --------------------------------------------------------------------------

    def skip(self, item: int, file: str, reason: str) -> None:
        """Record an item that could not be read (it gets no record)."""
        item = int(item)
        if item not in self.items or item <= max(self._last_record, self._last_skip):
            raise ValueError(f"rank {self.rank}: skipped item {item} is out of order or outside its items [{self.items.start}, {self.items.stop})")
        self._last_skip = item
        self._pending_skips.append({"item": item, "file": str(file), "reason": " ".join(str(reason).split())})

    def add(
        self, items: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int], mean: torch.Tensor, std: torch.Tensor,
        pixels: torch.Tensor | None = None,
    ) -> None:
        """Append records: mean and std (n, 2, C, h, w), [:, 0] of the image, [:, 1] of its flip;
        optionally the images themselves, pixels uint8 (n, C_img, H, W) unflipped (every add of a
        store with them, or none)."""
        items = torch.as_tensor(items, dtype=torch.int64).reshape(-1)
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        n = items.numel()
        if n == 0:
            return
        if labels.numel() != n or mean.shape[0] != n or std.shape != mean.shape or mean.ndim != 5 or mean.shape[1] != 2:
            raise ValueError(
                f"add() needs items (n,), labels (n,) and mean, std (n, 2, C, h, w); got {n} items, {labels.numel()} labels, "
                f"mean {tuple(mean.shape)}, std {tuple(std.shape)}"
            )
        if self._record_shape is None:
            self._record_shape = tuple(mean.shape[2:])
        elif tuple(mean.shape[2:]) != self._record_shape:
            raise ValueError(f"rank {self.rank}: latents of shape {tuple(mean.shape[2:])} after {self._record_shape}")
        pixel_shape = () if pixels is None else tuple(pixels.shape[1:])
        if pixels is not None and (pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[0] != n):
            raise ValueError(f"add() needs pixels uint8 (n, C, H, W) for {n} items; got {pixels.dtype} {tuple(pixels.shape)}")
        if self._pixel_shape is None:
            self._pixel_shape = pixel_shape
        elif pixel_shape != self._pixel_shape:
            raise ValueError(f"rank {self.rank}: pixels of shape {pixel_shape or None} after {self._pixel_shape or None}")
        first, last = int(items[0]), int(items[-1])
        pending = {s["item"] for s in self._pending_skips}
        if (
            first <= self._last_record
            or last >= self.items.stop
            or first < self.items.start
            or (n > 1 and not bool((items[1:] > items[:-1]).all()))
            or any(int(i) in pending for i in items)
        ):
            raise ValueError(f"rank {self.rank}: items {first}..{last} are out of order, repeated, or outside [{self.items.start}, {self.items.stop})")
        std = std.detach().float().cpu()
        if bool((std < 0).any()) or bool(torch.isnan(std).any()):
            raise ValueError("posterior std must be >= 0")
        self._zero_std = self._zero_std and not bool((std > 0).any())
        storage_dtype = STORE_DTYPES[self.dtype]
        if self.means_only:
            if not self._zero_std:
                raise ValueError("a means-only store (a deterministic autoencoder) got a posterior std > 0")
            posterior = mean.detach().cpu().float()[:, :, None].to(storage_dtype)  # (n, 2, 1, C, h, w)
        else:
            logvar = 2.0 * std.log()  # log 0 = -inf: std 0 stays exactly 0
            posterior = torch.stack([mean.detach().cpu().float(), logvar], dim=2).to(storage_dtype)  # (n, 2, 2, C, h, w)
        self._buffer.append((posterior, labels.cpu(), items.cpu(), *([] if pixels is None else [pixels.cpu()])))
        self._buffered += n
        self._last_record = last
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size, items_end=None)

    def _flush(self, count: int, items_end: int | None) -> None:
        parts = [torch.cat(p) for p in zip(*self._buffer)]
        head = [p[:count] for p in parts]
        rest = [p[count:] for p in parts]
        posterior, labels, items, *pixels = head
        if items_end is None:
            items_end = int(items[-1]) + 1
        skipped = [s for s in self._pending_skips if s["item"] < items_end]
        self._pending_skips = [s for s in self._pending_skips if s["item"] >= items_end]
        number = len(self._shards)
        meta = {
            "format": FORMAT, "version": str(VERSION), "rank": str(self.rank), "shard": str(number),
            "items_begin": str(self._position), "items_end": str(items_end), "skipped": json.dumps(skipped),
            "zero_std": "1" if self._zero_std else "0",
        }
        if self.channel_stats:  # of the means as stored (rounded), so the manifest's statistics are the records'
            meta["channel_sums"] = encode_sums(channel_sums(posterior[:, :, 0]))
        path = self.dir / shard_name(self.rank, number)
        tensors = {"posterior": posterior, "label": labels, "item": items, **({"pixels": pixels[0]} if pixels else {})}
        self._files[path.name] = write_safetensors(path, tensors, meta)  # its size and checksum, as written
        self._shards.append(path)
        self._records += count
        self._skipped.extend(skipped)
        self._position = items_end
        self._buffer = [tuple(rest)] if rest[0].numel() else []
        self._buffered -= count
        write_json_atomic(self.dir / rank_file_name(self.rank), {**self.info, "done": False, "files": self._files})

    def close(self) -> dict[str, Any]:
        """Write the last shard and mark this rank done; every item must have been fed."""
        if self._done:
            return self._summary()
        fed = max(self._last_record, self._last_skip) + 1
        accounted = self._records + self._buffered + len(self._skipped) + len(self._pending_skips)
        if fed != self.items.stop or accounted != len(self.items):
            raise ValueError(
                f"rank {self.rank} closed with {accounted} of its {len(self.items)} items added or skipped "
                f"(last {fed - 1}, items run to {self.items.stop - 1})"
            )
        if self._buffered:
            self._flush(self._buffered, items_end=self.items.stop)
        self._skipped.extend(self._pending_skips)
        self._pending_skips = []
        self._position = self.items.stop
        self._done = True
        write_json_atomic(self.dir / rank_file_name(self.rank), {**self.info, "done": True, **self._summary(), "files": self._files})
        return self._summary()

    def _summary(self) -> dict[str, Any]:
        return {
            "records": self._records,
            "shards": [p.name for p in self._shards],
            "record_shape": list(self._record_shape) if self._record_shape else None,
            "zero_std": self._zero_std,
            "skipped": self._skipped,
        }


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def finalize_store(root: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write FEATURES/manifest.json once every rank has closed its writer; returns the manifest.

    Call it from one process only (rank 0), after a barrier. `meta` supplies what the shards do
    not know: `source`, `image_size`, `autoencoder` (its `describe()`), `class_names`; the
    manifest adds the count, latent shape and dtype, the shards, the fields, the class counts
    and the skipped files. An autoencoder record with `latent_norm` "channel" gets its
    `channel_mean` and `channel_std`, reduced from the shards' float64 sums
    (`data/autoencoder/normalisation.py`): what the reader and every decode apply.
    """
    root = Path(root)
    shard_dir = root / SHARD_DIR
    rank_files = {int(m.group(1)): p for p in shard_dir.glob("rank-*.json") if (m := RANK_RE.match(p.name))} if shard_dir.is_dir() else {}
    if not rank_files:
        raise UserError(f"{str(root)!r} holds no extraction (no {SHARD_DIR}/rank-*.json); extract into it first")
    states = {r: read_rank_file(p) for r, p in rank_files.items()}
    world_size = states[min(states)].get("world_size")
    for r in range(world_size):
        if r not in states or not states[r].get("done"):
            raise UserError(f"rank {r} of {world_size} has not finished extracting into {str(root)!r}; run every rank to the end, then finalize")
    if set(states) != set(range(world_size)):
        raise UserError(f"{str(root)!r} holds rank files of another world size ({sorted(states)}); extract again with overwrite")

    shards, skipped, class_counts, sums = [], [], {}, []
    record_shape = dtype = pixels_shape = means_only = None
    zero_std = True
    for r in range(world_size):
        state = states[r]
        for path in list_shards(shard_dir, r):
            info = shard_info(path)
            if record_shape is None:
                record_shape, dtype, pixels_shape, means_only = info["record_shape"], info["dtype"], info["pixels_shape"], info["means_only"]
            elif (info["record_shape"], info["dtype"], info["pixels_shape"], info["means_only"]) != (record_shape, dtype, pixels_shape, means_only):
                raise UserError(
                    f"shard {path.name} holds {info['dtype']} {info['record_shape']} (pixels {info['pixels_shape']}), "
                    f"others {dtype} {record_shape} (pixels {pixels_shape}); extract again with overwrite"
                )
            tensors, _ = map_shard(path)
            labels, counts = np.unique(tensors["label"].numpy(), return_counts=True)
            for label, c in zip(labels.tolist(), counts.tolist()):
                class_counts[label] = class_counts.get(label, 0) + c
            zero_std = zero_std and info["zero_std"]
            sums.append(info["channel_sums"])
            shards.append({"file": f"{SHARD_DIR}/{path.name}", "rank": r, "count": info["count"], "items": info["items"],
                           **((state.get("files") or {}).get(path.name) or {})})  # size and crc32, as written
        if sum(s["count"] for s in shards if s["rank"] == r) != state.get("records"):
            raise UserError(f"rank {r}'s shards in {str(root)!r} do not add up to the {state.get('records')} records it wrote; extract again with overwrite")
        skipped.extend(state.get("skipped", []))

    count = sum(s["count"] for s in shards)
    if count == 0:
        first = f" (the first, {skipped[0]['file']!r}: {skipped[0]['reason']})" if skipped else ""
        raise UserError(f"{str(root)!r}: no image could be encoded; all {len(skipped)} were skipped{first}")
    class_names = meta.get("class_names")
    num_classes = len(class_names) if class_names is not None else (max(class_counts) + 1 if class_counts else 0)
    if class_counts and (min(class_counts) < 0 or max(class_counts) >= num_classes):
        raise UserError(f"labels {min(class_counts)}..{max(class_counts)} do not fit the {num_classes} class names given")
    meta = normalise(meta)
    autoencoder = meta.get("autoencoder") or {}
    if autoencoder.get("latent_norm") == "channel":  # the statistics of the records, from the shards' sums
        if any(s is None for s in sums):
            raise UserError(f"{str(root)!r}: some shards hold no channel sums (written without --latent-norm channel); "
                            "extract again with --overwrite")
        mean, std = reduce_channel_stats(sums)
        meta["autoencoder"] = {**autoencoder, "channel_mean": mean, "channel_std": std}
    normalised = means_only or autoencoder.get("latent_norm", "scale") != "scale" or bool(autoencoder.get("shift"))
    manifest = {
        "format": FORMAT,
        "version": NORMALISED_VERSION if normalised else VERSION,
        **meta,
        "num_classes": num_classes,
        "count": count,
        "latent_shape": record_shape,
        "dtype": dtype,
        "posterior_std_zero": zero_std,
        **({"means_only": True} if means_only else {}),  # records (2, 1, C, h, w): a deterministic autoencoder's
        "pixels_shape": pixels_shape,  # (C_img, H, W) of the kept images (`extract --keep-pixels`), or None
        "record_fields": {**RECORD_FIELDS, **(MEANS_ONLY_FIELD if means_only else {}), **(PIXELS_FIELD if pixels_shape else {})},
        "num_items": states[0].get("num_items"),
        "world_size": world_size,
        "shard_size": states[0].get("shard_size"),
        "shards": shards,
        "class_counts": [class_counts.get(c, 0) for c in range(num_classes)],
        "skipped": skipped,
        "plan": states[0].get("plan", {}),
    }
    manifest = with_own_checksum(manifest, MANIFEST_CHECKSUM)  # the manifest checks itself (`verify`, the reader)
    write_json_atomic(root / MANIFEST, manifest)
    return manifest
