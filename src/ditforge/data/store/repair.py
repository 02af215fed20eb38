"""`extract --repair`: re-encode only the shards of a finished store that fail verification.

A damaged shard (missing, of the wrong size, its checksum not the manifest's, its header
unreadable: `format.shard_damage`) is encoded again by the extraction itself, resumed in a
scratch folder `FEATURES/.repair/` just before that shard: the shards of its rank before it are
linked there (hard links: no copy), `extract` continues from the end of the last of them, as a
resumed extraction does, and stops as soon as the shard is written (a `stop` that is already
requested; the last shard of a rank ends with the rank). So the new shard is what the original
extraction wrote, byte for byte, on a machine that encodes deterministically (the same code
path as a resume, which is tested to give the same store), given the same inputs; the inputs
are checked against the rank's recorded plan before the shard replaces the damaged one, and the
good shards are never touched. Where the new bytes differ from the recorded checksum (another
machine, thread count or `--batch-size`, which the plan does not record), the shard is still a
faithful encoding of its images: it is installed, the manifest's record updated, and the line
says so.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ditforge.checksums import own_checksum_damage, record_file, with_own_checksum
from ditforge.data.store.format import (
    MANIFEST,
    MANIFEST_CHECKSUM,
    SHARD_DIR,
    SHARD_RE,
    rank_file_name,
    read_rank_file,
    shard_damage,
    shard_name,
    write_json_atomic,
)
from ditforge.errors import UserError
from ditforge.preemption import Stopped

SCRATCH = ".repair"


class _AtTheNextShard:
    """A `stop` for `extract` that is requested from the start: it stops once a shard is written."""

    requested = True
    signal_name = "repair"


def damaged_shards(root: Path, manifest: dict[str, Any]) -> list[tuple[int, dict[str, Any], str]]:
    """(index in the manifest, its entry, what is wrong) of every shard that fails verification."""
    out = []
    for k, entry in enumerate(manifest.get("shards", [])):
        recorded = {key: entry[key] for key in ("size", "crc32") if key in entry}
        if damage := shard_damage(root / str(entry["file"]), recorded):
            out.append((k, entry, damage))
    return out


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
            raise ValueError("no list of shards")
        if damage := own_checksum_damage(manifest, MANIFEST_CHECKSUM):
            raise ValueError(damage)
    except FileNotFoundError:
        raise UserError(f"{str(root)!r} is not a finished latent store (no {MANIFEST}); --repair mends a finished "
                        "store: rerun the extraction without it to finish this one") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{str(path)!r} is damaged ({e}), so the shards cannot be checked against it; extract the "
                        "store again with --overwrite") from None
    return manifest


def repair_store(
    items: Sequence[tuple[Any, int]], load: Callable[[Any], Any], autoencoder, root: str | Path, *,
    extract: Callable[..., dict[str, Any]], **extract_args: Any,
) -> list[str]:
    """Re-encode the damaged shards of the finished store `root` (module docstring) through
    `extract` (`extract.extract`, with the command's `extract_args`: batch_size, dtype, plan,
    workers, keep_pixels); one line per shard, and a last one. One process only."""
    root = Path(root)
    manifest = read_manifest(root)
    damaged = damaged_shards(root, manifest)
    if not damaged:
        return [f"{root}: all {len(manifest['shards'])} shards verified; nothing to repair"]
    shard_dir, scratch = root / SHARD_DIR, root / SCRATCH
    lines = []
    for k, entry, damage in damaged:
        name = Path(str(entry["file"])).name
        m = SHARD_RE.match(name)
        if m is None:
            raise UserError(f"{str(root / MANIFEST)!r} lists {entry['file']!r}, which is not a shard name; extract again with --overwrite")
        rank, number = int(m.group(1)), int(m.group(2))
        recorded = read_rank_file(shard_dir / rank_file_name(rank))
        if scratch.exists():
            shutil.rmtree(scratch)  # left by a repair that was killed
        (scratch / SHARD_DIR).mkdir(parents=True)
        try:
            before = [shard_name(rank, n) for n in range(number)]  # the rank's shards before it: where the resumed extraction starts
            for other in before:
                _link(shard_dir / other, scratch / SHARD_DIR / other)
            # their progress as the rank recorded it (so none is read again; other inputs are refused by the writer)
            write_json_atomic(scratch / SHARD_DIR / rank_file_name(rank), {
                **recorded, "done": False, "files": {n: (recorded.get("files") or {}).get(n) for n in before}})
            try:
                extract(items, load, autoencoder, scratch, rank=rank, world_size=int(manifest["world_size"]),
                        shard_size=int(manifest["shard_size"]), stop=_AtTheNextShard(), **extract_args)
            except Stopped:  # right after the shard was written: what was asked
                pass
            made = read_rank_file(scratch / SHARD_DIR / rank_file_name(rank))
            differs = [key for key in ("num_items", "world_size", "shard_size", "dtype", "plan", "items")
                       if made.get(key) != recorded.get(key)]
            if differs:
                raise UserError(
                    f"{str(root)!r} was extracted with other inputs ({', '.join(f'{key}: {recorded.get(key)!r} in the store, {made.get(key)!r} now' for key in differs)[:400]}); "
                    "rerun --repair with the extraction's own command")
            new = scratch / SHARD_DIR / name
            os.replace(new, shard_dir / name)  # the damaged shard, replaced whole (an atomic rename)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        record = record_file(shard_dir / name, fsync=True)
        same = entry.get("crc32") in (None, record["crc32"]) and entry.get("size") in (None, record["size"])
        manifest["shards"][k] = {**entry, **record}
        recorded.setdefault("files", {})[name] = record
        write_json_atomic(shard_dir / rank_file_name(rank), recorded)
        lines.append(f"{root / str(entry['file'])}: was {damage}; re-encoded "
                     + ("(the bytes written first, exactly)" if same else
                        "(a faithful encoding, but not the bytes written first: this machine, its threads or --batch-size "
                        "round differently; the manifest records the new checksum)"))
    write_json_atomic(root / MANIFEST, with_own_checksum(manifest, MANIFEST_CHECKSUM))
    lines.append(f"repaired {len(damaged)} of {len(manifest['shards'])} shards of {root}; the others are untouched")
    return lines


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links: a copy
        shutil.copy2(src, dst)
