"""The latent store's byte layout: file names, shard headers, atomic writes, memory maps.

The store: images encoded once by the autoencoder (`extract.py`, through `writer.py`), read
many times by training (`reader.py`). Layout of a store folder FEATURES:

```
FEATURES/manifest.json                          written last, by finalize_store(): the store exists once it does
FEATURES/shards/shard-RRRRR-SSSSS.safetensors   shard SSSSS of rank RRRRR
FEATURES/shards/rank-RRRRR.json                 rank RRRRR's plan and, once it finished, its totals and skipped files
```

A shard is a safetensors file holding `shard_size` records (the last shard of each rank may
hold fewer), as three tensors over its n records:

| tensor | shape | dtype | holds |
|---|---|---|---|
| `posterior` | (n, 2, 2, C, h, w) | float16 (or float32) | [i, f, 0]: posterior mean x scale, [i, f, 1]: its log-variance (of latent x scale; std = exp(logvar / 2), -inf where std = 0); f = 0 the image, f = 1 its horizontal flip. A deterministic autoencoder's (DC-AE): (n, 2, 1, C, h, w), the means only |
| `label` | (n,) | int64 | class id |
| `item` | (n,) | int64 | position of the image in the extraction's item list |
| `pixels` (only with `extract --keep-pixels`) | (n, C_img, H, W) | uint8 | the image as encoded (after crop and resize), not flipped: what REPA's encoder reads on a latent store |

The mean and log-variance of one view of one image are adjacent (16 KiB for a 4x32x32 latent
in float16), so reading a training example is one contiguous read.

"x scale" is the autoencoder's own normalisation, (z - shift) x scale from its config
(`data/autoencoder/normalisation.py`). With `extract --latent-norm channel` each shard's header
also holds `channel_sums` (float64 sums of its stored means per channel, JSON), and the
manifest's autoencoder record the `channel_mean` and `channel_std` reduced from them, which the
reader applies: the model's input is (record - channel_mean) / channel_std. A manifest with
means-only records, channel statistics or a shift says `version` 2 (a reader of version 1 would
misread it); the others stay version 1.

Training draws `mean + std * eps` with fresh eps and a fresh flip choice at every visit
(`reader.sample_posterior`; the original DiT code froze one posterior sample and one flip per
image at extraction).

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
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ditforge.checksums import Crc32, check_file, safetensors_damage
from ditforge.errors import UserError
from ditforge.write_failures import failing_write

FORMAT = "ditforge-latents"
VERSION = 1  # of shards and rank files, and of a manifest that an earlier ditforge reads right
# a manifest of means-only records, channel statistics or a shifted autoencoder: a ditforge
# before them (which reads up to 1) refuses it rather than misread it
NORMALISED_VERSION = 2
MANIFEST = "manifest.json"
MANIFEST_CHECKSUM = "manifest_crc32"  # the manifest's own CRC-32, over its other entries (`checksums.with_own_checksum`)
SHARD_DIR = "shards"
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
RECORD_FIELDS = {
    "posterior": "(2, 2, C, h, w): [f, 0] posterior mean x scale, [f, 1] log variance of (latent x scale) (std = exp(logvar / 2), -inf where std is 0); f = 0 the image, f = 1 its horizontal flip",
    "label": "class id, int64",
    "item": "position of the source image in the extraction's item list, int64",
}
MEANS_ONLY_FIELD = {"posterior": "(2, 1, C, h, w): [f, 0] latent x scale of a deterministic autoencoder (no variance); f = 0 the image, f = 1 its horizontal flip"}
PIXELS_FIELD = {"pixels": "(C_img, H, W) uint8: the image as encoded, unflipped (flip it with the latent's view f)"}
SHARD_RE = re.compile(r"^shard-(\d{5})-(\d{5})\.safetensors$")
RANK_RE = re.compile(r"^rank-(\d{5})\.json$")
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def rank_range(num_items: int, rank: int, world_size: int) -> range:
    """The contiguous slice of the item list that `rank` of `world_size` encodes."""
    return range(num_items * rank // world_size, num_items * (rank + 1) // world_size)


def shard_name(rank: int, shard: int) -> str:
    return f"shard-{rank:05d}-{shard:05d}.safetensors"


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.json"


# -- files ---------------------------------------------------------------------------------


def write_atomic(path: Path, *chunks: bytes | memoryview) -> None:
    """`chunks` into `path` through `PATH.tmp`, renamed when flushed; a full disk is one line
    naming `path` and its size, and leaves no `.tmp` (`write_failures.py`)."""
    tmp = path.with_name(path.name + ".tmp")
    with failing_write(path, sum(memoryview(c).nbytes for c in chunks), [tmp]):
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """A safetensors file with a deterministic header (sorted keys), so equal shards are equal bytes;
    returns its size and checksum (`checksums.py`), taken from the bytes as they are written.

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
    chunks = [len(head).to_bytes(8, "little"), head, *(memoryview(arrays[n].numpy()).cast("B") for n in order)]
    crc = Crc32()
    for chunk in chunks:
        crc.update(chunk)
    write_atomic(path, *chunks)
    return crc.record()


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def normalise(obj: Any) -> Any:
    """What `obj` reads back as from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(obj))


def read_header(path: Path) -> tuple[int, dict[str, Any], dict[str, str]]:
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


def map_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file as views of one private memory map (lazy, no fd kept)."""
    start, header, meta = read_header(path)
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


def shard_damage(path: Path, recorded: dict[str, Any] | None) -> str | None:
    """What is wrong with a shard, in a few words (missing, size, checksum against `recorded`, its
    header), or None: what `verify` and `extract --repair` check of each shard."""
    damage = check_file(path, recorded) or safetensors_damage(path)
    if damage is None:
        try:
            shard_info(path)
        except UserError as e:
            damage = f"header unreadable ({e})"
    return damage


def shard_info(path: Path) -> dict[str, Any]:
    """Counts, item range and skipped files of one of our shards, from its header only."""
    _, header, meta = read_header(path)
    try:
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        post = header["posterior"]
        if len(post["shape"]) != 6 or post["shape"][1:3] not in ([2, 2], [2, 1]):
            raise ValueError(f"posterior of shape {post['shape']}")
        pix = header.get("pixels")
        if pix is not None and (pix["dtype"] != "U8" or len(pix["shape"]) != 4 or pix["shape"][0] != post["shape"][0]):
            raise ValueError(f"pixels {pix['dtype']} of shape {pix['shape']} for {post['shape'][0]} records")
        return {
            "count": int(post["shape"][0]),
            "record_shape": list(post["shape"][3:]),
            "dtype": {"F16": "float16", "F32": "float32"}[post["dtype"]],
            "items": [int(meta["items_begin"]), int(meta["items_end"])],
            "skipped": json.loads(meta.get("skipped", "[]")),
            "zero_std": meta.get("zero_std") == "1",
            "pixels_shape": header["pixels"]["shape"][1:] if "pixels" in header else None,
            "means_only": post["shape"][2] == 1,  # a deterministic autoencoder's: no log-variance
            "channel_sums": json.loads(meta["channel_sums"]) if "channel_sums" in meta else None,
        }
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise UserError(f"shard {str(path)!r} is not a ditforge latent shard ({type(e).__name__}: {e})") from None


def list_shards(shard_dir: Path, rank: int) -> list[Path]:
    found = sorted(
        (int(m.group(2)), p)
        for p in shard_dir.glob(f"shard-{rank:05d}-*.safetensors")
        if (m := SHARD_RE.match(p.name))
    )
    for expected, (number, p) in enumerate(found):
        if number != expected:
            raise UserError(f"{str(shard_dir)!r}: shard {shard_name(rank, expected)} is missing before {p.name}; delete the folder and extract again")
    return [p for _, p in found]


def read_rank_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{str(path)!r} is unreadable ({type(e).__name__}); delete the store folder and extract again") from None

