"""The latent store: images encoded once by the autoencoder, read many times by training.

Layout of a store folder FEATURES:

```
FEATURES/manifest.json                          written last, by finalize_store(): the store exists once it does
FEATURES/shards/shard-RRRRR-SSSSS.safetensors   shard SSSSS of rank RRRRR
FEATURES/shards/rank-RRRRR.json                 rank RRRRR's plan and, once it finished, its totals and skipped files
```

A shard is a safetensors file holding `shard_size` records (the last shard of each rank may
hold fewer), as three tensors over its n records:

| tensor | shape | dtype | holds |
|---|---|---|---|
| `posterior` | (n, 2, 2, C, h, w) | float16 (or float32) | [i, f, 0]: posterior mean x scale, [i, f, 1]: its log-variance (of latent x scale; std = exp(logvar / 2), -inf where std = 0); f = 0 the image, f = 1 its horizontal flip |
| `label` | (n,) | int64 | class id |
| `item` | (n,) | int64 | position of the image in the extraction's item list |

The mean and log-variance of one view of one image are adjacent (16 KiB for a 4x32x32 latent
in float16), so reading a training example is one contiguous read.

Training draws `mean + std * eps` with fresh eps and a fresh flip choice at every visit (the
original DiT code froze one posterior sample and one flip per image at extraction).

Why float16 and why log-variance: the mean is O(1) (the scale factor makes latents about unit
variance) and float16 keeps it to a relative error of at most 2**-11 (4.9e-4). The SD VAE's
posterior std is tiny (its KL weight was 1e-6; diffusers clamps logvar to [-30, 20]), which is
below float16's normal range (6.1e-5): stored directly, such std values lose most of their
digits or flush to zero. Stored as log-variance, std keeps a relative error of at most
|logvar| x 2**-12 (under 0.9% over the whole clamp range), and its absolute error
std x |logvar| x 2**-12 never exceeds 1.8e-4 for std <= 1 (max of x |ln x| is 1/e): below the
mean's own rounding for any |mean| >= 0.4. `dtype="float32"` stores both exactly.

Shards are assigned to ranks by contiguous item ranges: rank r of W owns items
[r n / W, (r + 1) n / W) of the item list, and the store lists shards by (rank, shard), so the
records keep the order of the item list whatever the world size. Each rank writes only files
with its rank in the name, so ranks never overwrite each other.

Writes are atomic (a temp file renamed into place) and progress is the set of finished shards:
a writer reopened with the same inputs keeps them and the caller continues from
`resume_position()`. Reading maps each shard once (`torch.UntypedStorage.from_file`, which
keeps no file descriptor open) and gathers records by memory copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditforge.errors import UnreadableImage, UserError

FORMAT = "ditforge-latents"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
RECORD_FIELDS = {
    "posterior": "(2, 2, C, h, w): [f, 0] posterior mean x scale, [f, 1] log variance of (latent x scale) (std = exp(logvar / 2), -inf where std is 0); f = 0 the image, f = 1 its horizontal flip",
    "label": "class id, int64",
    "item": "position of the source image in the extraction's item list, int64",
}
# What a loader raises for an unreadable, truncated or undecodable file (`data.sources.open_image`
# turns the decoder's errors into it): skipped and recorded. Any other exception stops the
# extraction, which a rerun resumes; an error of ours is never taken for a broken file.
SKIP_ERRORS: tuple[type[BaseException], ...] = (UnreadableImage,)

_SHARD_RE = re.compile(r"^shard-(\d{5})-(\d{5})\.safetensors$")
_RANK_RE = re.compile(r"^rank-(\d{5})\.json$")
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def rank_range(num_items: int, rank: int, world_size: int) -> range:
    """The contiguous slice of the item list that `rank` of `world_size` encodes."""
    return range(num_items * rank // world_size, num_items * (rank + 1) // world_size)


def shard_name(rank: int, shard: int) -> str:
    return f"shard-{rank:05d}-{shard:05d}.safetensors"


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.json"


# -- files ---------------------------------------------------------------------------------


def _write_atomic(path: Path, *chunks: bytes | memoryview) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file with a deterministic header (sorted keys), so equal shards are equal bytes.

    The safetensors library writes its metadata in hash-map order, which changes from process to
    process; this writes the same format (8-byte header length, JSON header padded with spaces
    to 8 bytes, tensors back to back, larger items first for alignment).
    """
    codes = {dtype: code for code, dtype in _ST_DTYPES.items()}
    arrays = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    order = sorted(arrays, key=lambda name: (-arrays[name].element_size(), name))
    for name in order:
        t = arrays[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    _write_atomic(path, len(head).to_bytes(8, "little"), head, *(memoryview(arrays[n].numpy()).cast("B") for n in order))


def _write_json_atomic(path: Path, obj: Any) -> None:
    _write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _normalise(obj: Any) -> Any:
    """What `obj` reads back as from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(obj))


def _read_header(path: Path) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(data start, tensor entries, metadata) of a safetensors file, checked against its size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"shard {str(path)!r} is corrupt ({type(e).__name__}: {e}); delete it and rerun the extraction") from None
    if 8 + n + end != size:
        raise UserError(f"shard {str(path)!r} is truncated or corrupt ({size} bytes, header says {8 + n + end}); delete it and rerun the extraction")
    return 8 + n, header, meta


def _map_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file as views of one private memory map (lazy, no fd kept)."""
    start, header, meta = _read_header(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)  # the file's bytes
    tensors = {}
    for name, entry in header.items():
        dtype = _ST_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise UserError(f"shard {str(path)!r}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        b, e = entry["data_offsets"]
        chunk = raw[start + b : start + e]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if (start + b) % itemsize:
            chunk = chunk.clone()  # misaligned for a zero-copy view (never the case for our own files)
        tensors[name] = chunk.view(dtype).view(entry["shape"])
    return tensors, meta


def _shard_info(path: Path) -> dict[str, Any]:
    """Counts, item range and skipped files of one of our shards, from its header only."""
    _, header, meta = _read_header(path)
    try:
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        post = header["posterior"]
        if len(post["shape"]) != 6 or post["shape"][1:3] != [2, 2]:
            raise ValueError(f"posterior of shape {post['shape']}")
        return {
            "count": int(post["shape"][0]),
            "record_shape": list(post["shape"][3:]),
            "dtype": {"F16": "float16", "F32": "float32"}[post["dtype"]],
            "items": [int(meta["items_begin"]), int(meta["items_end"])],
            "skipped": json.loads(meta.get("skipped", "[]")),
            "zero_std": meta.get("zero_std") == "1",
        }
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise UserError(f"shard {str(path)!r} is not a ditforge latent shard ({type(e).__name__}: {e})") from None


def _list_shards(shard_dir: Path, rank: int) -> list[Path]:
    found = sorted(
        (int(m.group(2)), p)
        for p in shard_dir.glob(f"shard-{rank:05d}-*.safetensors")
        if (m := _SHARD_RE.match(p.name))
    )
    for expected, (number, p) in enumerate(found):
        if number != expected:
            raise UserError(f"{str(shard_dir)!r}: shard {shard_name(rank, expected)} is missing before {p.name}; delete the folder and extract again")
    return [p for _, p in found]


def _read_rank_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{str(path)!r} is unreadable ({type(e).__name__}); delete the store folder and extract again") from None


# -- writing -------------------------------------------------------------------------------


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
        self.dir = self.root / SHARD_DIR
        self.items = rank_range(num_items, rank, world_size)
        self.info = _normalise(
            {"format": FORMAT, "version": VERSION, "rank": rank, "world_size": world_size, "num_items": num_items,
             "items": [self.items.start, self.items.stop], "shard_size": shard_size, "dtype": dtype, "plan": plan or {}}
        )
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
            _write_json_atomic(self.dir / rank_file_name(rank), {**self.info, "done": False})

    # progress ---------------------------------------------------------------------------

    def _clear(self) -> None:
        if self.rank == 0:
            (self.root / MANIFEST).unlink(missing_ok=True)
        if not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            m = _SHARD_RE.match(p.name.removesuffix(".tmp")) or _RANK_RE.match(p.name.removesuffix(".tmp"))
            if m and (int(m.group(1)) == self.rank or (self.rank == 0 and int(m.group(1)) >= self.world_size)):
                p.unlink(missing_ok=True)

    def _check_other_ranks(self) -> None:
        for p in sorted(self.dir.glob("rank-*.json")):
            other = _read_rank_file(p)
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
        state = _read_rank_file(rank_file) if rank_file.exists() else {}
        self._shards = _list_shards(self.dir, self.rank)
        infos = [_shard_info(p) for p in self._shards]
        self._records = sum(i["count"] for i in infos)
        self._record_shape = tuple(infos[0]["record_shape"]) if infos else None
        self._zero_std = all(i["zero_std"] for i in infos)
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

    def add(self, items: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int], mean: torch.Tensor, std: torch.Tensor) -> None:
        """Append records: mean and std (n, 2, C, h, w), [:, 0] of the image, [:, 1] of its flip."""
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
        logvar = 2.0 * std.log()  # log 0 = -inf: std 0 stays exactly 0
        posterior = torch.stack([mean.detach().cpu().float(), logvar], dim=2).to(storage_dtype)  # (n, 2, 2, C, h, w)
        self._buffer.append((posterior, labels.cpu(), items.cpu()))
        self._buffered += n
        self._last_record = last
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size, items_end=None)

    def _flush(self, count: int, items_end: int | None) -> None:
        parts = [torch.cat(p) for p in zip(*self._buffer)]
        head = [p[:count] for p in parts]
        rest = [p[count:] for p in parts]
        posterior, labels, items = head
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
        path = self.dir / shard_name(self.rank, number)
        _write_safetensors(path, {"posterior": posterior, "label": labels, "item": items}, meta)
        self._shards.append(path)
        self._records += count
        self._skipped.extend(skipped)
        self._position = items_end
        self._buffer = [tuple(rest)] if rest[0].numel() else []
        self._buffered -= count

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
        _write_json_atomic(self.dir / rank_file_name(self.rank), {**self.info, "done": True, **self._summary()})
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
    and the skipped files.
    """
    root = Path(root)
    shard_dir = root / SHARD_DIR
    rank_files = {int(m.group(1)): p for p in shard_dir.glob("rank-*.json") if (m := _RANK_RE.match(p.name))} if shard_dir.is_dir() else {}
    if not rank_files:
        raise UserError(f"{str(root)!r} holds no extraction (no {SHARD_DIR}/rank-*.json); extract into it first")
    states = {r: _read_rank_file(p) for r, p in rank_files.items()}
    world_size = states[min(states)].get("world_size")
    for r in range(world_size):
        if r not in states or not states[r].get("done"):
            raise UserError(f"rank {r} of {world_size} has not finished extracting into {str(root)!r}; run every rank to the end, then finalize")
    if set(states) != set(range(world_size)):
        raise UserError(f"{str(root)!r} holds rank files of another world size ({sorted(states)}); extract again with overwrite")

    shards, skipped, class_counts = [], [], {}
    record_shape = dtype = None
    zero_std = True
    for r in range(world_size):
        state = states[r]
        for path in _list_shards(shard_dir, r):
            info = _shard_info(path)
            if record_shape is None:
                record_shape, dtype = info["record_shape"], info["dtype"]
            elif (info["record_shape"], info["dtype"]) != (record_shape, dtype):
                raise UserError(f"shard {path.name} holds {info['dtype']} {info['record_shape']}, others {dtype} {record_shape}")
            tensors, _ = _map_shard(path)
            labels, counts = np.unique(tensors["label"].numpy(), return_counts=True)
            for label, c in zip(labels.tolist(), counts.tolist()):
                class_counts[label] = class_counts.get(label, 0) + c
            zero_std = zero_std and info["zero_std"]
            shards.append({"file": f"{SHARD_DIR}/{path.name}", "rank": r, "count": info["count"], "items": info["items"]})
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
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        **_normalise(meta),
        "num_classes": num_classes,
        "count": count,
        "latent_shape": record_shape,
        "dtype": dtype,
        "posterior_std_zero": zero_std,
        "record_fields": RECORD_FIELDS,
        "num_items": states[0].get("num_items"),
        "world_size": world_size,
        "shard_size": states[0].get("shard_size"),
        "shards": shards,
        "class_counts": [class_counts.get(c, 0) for c in range(num_classes)],
        "skipped": skipped,
        "plan": states[0].get("plan", {}),
    }
    _write_json_atomic(root / MANIFEST, manifest)
    return manifest


# -- reading -------------------------------------------------------------------------------


class LatentStore:
    """A finished store, memory-mapped: `get_batch` draws training latents from it.

    Each shard is mapped once, at open; a batch is gathered by one memory copy per record
    from the maps. The object pickles as its folder (a DataLoader worker maps the shards anew).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._open()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.root)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root = Path(state["root"])
        self._open()

    def _open(self) -> None:
        root = self.root
        path = root / MANIFEST
        if not path.is_file():
            if (root / SHARD_DIR).is_dir():
                raise UserError(f"{str(root)!r} is an unfinished latent store (no {MANIFEST} yet); rerun the extraction to finish it")
            if not root.exists():
                raise UserError(f"latent store {str(root)!r} does not exist")
            raise UserError(f"{str(root)!r} is not a latent store (no {MANIFEST}); create one with `ditforge extract`")
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
            if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
                raise ValueError(f"version {manifest.get('version')!r}; this ditforge reads up to {VERSION}")
            shape = tuple(int(s) for s in manifest["latent_shape"])
            entries = [(str(s["file"]), int(s["count"])) for s in manifest["shards"]]
            count = int(manifest["count"])
            if manifest["dtype"] not in STORE_DTYPES or len(shape) != 3 or sum(c for _, c in entries) != count:
                raise ValueError("dtype, latent shape or counts do not agree")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{str(path)!r} is corrupt ({type(e).__name__}: {e}); extract the store again") from None
        self.manifest = manifest
        self.latent_shape: tuple[int, int, int] = shape
        self._posterior: list[np.ndarray] = []
        labels, items = [], []
        self._maps = []  # keeps the mapped tensors (and their storages) alive
        for file, n in entries:
            shard = root / file
            if not shard.is_file():
                raise UserError(f"latent store {str(root)!r}: shard {file!r} listed in {MANIFEST} is missing")
            tensors, _ = _map_shard(shard)
            expected = (n, 2, 2, *shape)
            if "posterior" not in tensors or tuple(tensors["posterior"].shape) != expected or tensors["label"].shape != (n,):
                raise UserError(f"latent store {str(root)!r}: shard {file!r} does not match {MANIFEST} (expected records {expected})")
            self._maps.append(tensors)
            self._posterior.append(tensors["posterior"].numpy())
            labels.append(tensors["label"].clone())
            items.append(tensors["item"].clone())
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)  # (N,) class ids, in memory
        self.items = torch.cat(items) if items else torch.zeros(0, dtype=torch.int64)  # (N,) item list positions
        self._offsets = np.concatenate([[0], np.cumsum([n for _, n in entries])]).astype(np.int64)
        self._np_dtype = np.float16 if manifest["dtype"] == "float16" else np.float32
        self.deterministic = bool(manifest.get("posterior_std_zero", False))

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def class_names(self) -> list[str]:
        names = self.manifest.get("class_names")
        return list(names) if names is not None else [str(i) for i in range(self.num_classes)]

    @property
    def num_classes(self) -> int:
        return int(self.manifest.get("num_classes", 0))

    @property
    def autoencoder(self) -> dict[str, Any]:
        """The `describe()` of the autoencoder that made the store (for `load_autoencoder`)."""
        return dict(self.manifest.get("autoencoder") or {"kind": "identity"})

    def gather(self, indices: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, logvar, labels) of records `indices`, flipped where `flip`, as stored (float16
        or float32, (B, C, h, w)): for sampling elsewhere, e.g. on the GPU with half the bytes."""
        mean, logvar = self._gather(indices, flip)
        return torch.from_numpy(mean), torch.from_numpy(logvar), self.labels[torch.as_tensor(indices).reshape(-1)]

    def _gather(self, indices: torch.Tensor, flip: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Stored (mean, logvar) of records `indices`, flipped where `flip`: (B, C, h, w) each."""
        idx = torch.as_tensor(indices).reshape(-1).numpy().astype(np.int64, copy=False)
        f = torch.as_tensor(flip).reshape(-1).numpy().astype(np.int64)
        if f.shape != idx.shape:
            raise ValueError(f"{idx.size} indices but {f.size} flip flags")
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"record indices {idx.min()}..{idx.max()} outside the store's {n} records")
        shard = np.searchsorted(self._offsets, idx, side="right") - 1  # (B,)
        local = idx - self._offsets[shard]
        out = np.empty((idx.size, 2, *self.latent_shape), dtype=self._np_dtype)  # (B, 2, C, h, w)
        posterior = self._posterior
        for j, (s, i, k) in enumerate(zip(shard.tolist(), local.tolist(), f.tolist())):
            out[j] = posterior[s][i, k]  # one contiguous copy: mean and logvar of the chosen view
        return out[:, 0], out[:, 1]

    def posterior(self, indices: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, labels) of records `indices` (flipped where `flip`), float32 (B, C, h, w)."""
        mean, logvar = self._gather(indices, flip)
        std = torch.from_numpy(logvar).float().mul_(0.5).exp_()
        return torch.from_numpy(mean).float(), std, self.labels[torch.as_tensor(indices).reshape(-1)]

    def get_batch(
        self,
        indices: torch.Tensor,
        flip: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training latents `mean + std * eps` (B, C, h, w) float32 and labels (B,) int64.

        eps is `noise` if given, else drawn with `generator` (torch's default generator when
        None, whose state a checkpoint saves). A store whose std is all zero (pixel space)
        draws nothing.
        """
        mean_np, logvar_np = self._gather(indices, flip)
        labels = self.labels[torch.as_tensor(indices).reshape(-1)]
        mean = torch.from_numpy(mean_np).float()
        if noise is None and self.deterministic:
            return mean, labels
        std = torch.from_numpy(logvar_np).float().mul_(0.5).exp_()  # (B, C, h, w)
        if noise is None:
            eps = torch.randn(mean.shape, generator=generator)
            return eps.mul_(std).add_(mean), labels
        if tuple(noise.shape) != tuple(mean.shape):
            raise ValueError(f"noise of shape {tuple(noise.shape)} for latents {tuple(mean.shape)}")
        return std.mul_(noise.to(std.dtype)).add_(mean), labels


# -- extraction ----------------------------------------------------------------------------


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
