"""`ditforge verify PATH`: are the files of a store, a run, a checkpoint, an export or an `.npz`
the bytes that were written?

| PATH | what is checked |
|---|---|
| a latent store (`manifest.json`, or an unfinished one's `shards/`) | every shard listed (in the manifest, or the rank files) against its recorded size and CRC-32, and its safetensors header; the manifest and rank files readable |
| a run folder (`checkpoints/`) | `config.json` readable, and every checkpoint folder as below |
| a checkpoint folder (`state.json`) | state.json against its own checksum, every file against the size and CRC-32 that state.json records (`train/checkpoint.py`) |
| an `.npz` (bulk `sample`) or a `.pt` (official export) | every zip member against the CRC-32 that the zip format records for it; an `.npz`'s arrays readable, of one length |
| any other folder (hub, diffusers export) | the files a hub export's `config.json` records (`checksums`: its weights) against their size and CRC-32; every other `.safetensors` file's header and size, every `.json` file readable |

Every bad file is named with what is wrong (missing, size X expected Y, checksum mismatch,
header unreadable). A file written before checksums were recorded is checked for what can be
seen without one and counted as "no checksum recorded", which is not damage. `verify` exits 0
when every file is good and 1 when any is bad (2: PATH is none of the above).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditforge.checksums import check_file, own_checksum_damage, safetensors_damage
from ditforge.errors import UserError
from ditforge.flags import flag


@dataclass(kw_only=True)
class VerifyOptions:
    """What `ditforge verify` asks for, each field its option."""

    path: str = field(metadata=flag(
        "path", "latent store, run folder, checkpoint folder, exported folder (hub, diffusers), .npz or official .pt"))


@dataclass
class Report:
    """What `verify` found: the kind of PATH, the files checked, the bad ones with what is wrong,
    and those that carry no checksum (checked as far as possible without one)."""

    path: Path
    kind: str = ""
    checked: int = 0
    bad: list[tuple[Path, str]] = field(default_factory=list)
    unrecorded: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what is beside the files checked, not part of them

    def add(self, path: Path, problem: str | None, recorded: bool = True) -> None:
        self.checked += 1
        if problem is not None:
            self.bad.append((path, problem))
        elif not recorded:
            self.unrecorded.append(path)

    @property
    def ok(self) -> bool:
        return not self.bad

    def lines(self) -> list[str]:
        out = [f"{p}: {problem}" for p, problem in self.bad] + self.notes
        note = f" ({len(self.unrecorded)} with no checksum recorded, written before checksums were: checked as far as possible)" if self.unrecorded else ""
        if self.bad:
            out.append(f"{self.kind} {self.path}: {len(self.bad)} of {self.checked} files damaged{note}")
        else:
            out.append(f"{self.kind} {self.path}: all {self.checked} files as written{note}")
        return out


def verify(path: str | Path) -> Report:
    """Check the files at `path` (module docstring); `UserError` if it is nothing we write."""
    path = Path(path)
    report = Report(path)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; give a latent store, run folder, checkpoint folder, export, .npz or .pt")
    if path.is_file():
        if path.suffix not in (".npz", ".pt", ".pth"):
            raise UserError(f"{str(path)!r} is a file that verify does not know; give an .npz (bulk sample), an official .pt, or a folder")
        report.kind = "samples" if path.suffix == ".npz" else "official checkpoint"
        report.add(path, _zip_damage(path, npz=path.suffix == ".npz"))
    elif (path / "manifest.json").exists() or (path / "shards").is_dir():
        report.kind = "latent store"
        _verify_store(path, report)
    elif (path / "checkpoints").is_dir():
        report.kind = "run"
        _verify_run(path, report)
    elif (path / "state.json").exists():
        report.kind = "checkpoint"
        _verify_checkpoint(path, report)
    else:
        report.kind = "folder"
        _verify_folder(path, report)
    if report.checked == 0:
        raise UserError(f"{str(path)!r} holds no file that verify knows (a store's shards, checkpoints, safetensors, json)")
    return report


# -- each kind -------------------------------------------------------------------------------


def _verify_checkpoint(folder: Path, report: Report) -> None:
    from ditforge.train.checkpoint import FILES, STATE_CHECKSUM, checkpoint_problems

    problems = dict(checkpoint_problems(folder))
    try:
        state = json.loads((folder / "state.json").read_text())
        state = state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        state = {}
    files = state.get("files") if isinstance(state.get("files"), dict) else {}
    names = set(files) or {p.name for p in folder.glob("*.safetensors")} | set(FILES)
    names = (names | {p.name for p in problems}) - {"state.json"}
    report.add(folder / "state.json", problems.get(folder / "state.json"), recorded=STATE_CHECKSUM in state)
    for name in sorted(names):
        report.add(folder / name, problems.get(folder / name), recorded=name in files)


def _verify_run(run: Path, report: Report) -> None:
    from ditforge.train.checkpoint import STEP_DIR

    config = run / "config.json"
    if config.exists():
        report.add(config, _json_damage(config))  # readable (TrainConfig records no checksum)
    steps = sorted(p for p in (run / "checkpoints").iterdir() if STEP_DIR.match(p.name) and p.is_dir())
    for folder in steps:
        _verify_checkpoint(folder, report)
    for aside in sorted((run / "checkpoints").glob("step-*.damaged*")):
        report.notes.append(f"{aside}: a checkpoint that a resume found damaged and set aside, not part of the run (delete it once inspected)")


def _verify_store(root: Path, report: Report) -> None:
    from ditforge.data.store.format import MANIFEST, MANIFEST_CHECKSUM, SHARD_DIR, list_shards, read_rank_file, shard_damage

    manifest_path = root / MANIFEST
    listed: list[tuple[Path, dict[str, Any]]] = []
    if manifest_path.exists():
        damage = _json_damage(manifest_path)
        manifest = json.loads(manifest_path.read_text()) if damage is None else None
        if damage is None and not isinstance(manifest, dict):
            damage = "not a JSON object"
        if damage is None:
            damage = own_checksum_damage(manifest, MANIFEST_CHECKSUM)
        report.add(manifest_path, damage, recorded=damage is not None or MANIFEST_CHECKSUM in manifest)
        if damage is not None:  # the shards are checked against what it says: name it, repair nothing else
            return
        for s in manifest.get("shards", []):
            listed.append((root / str(s.get("file")), {k: s[k] for k in ("size", "crc32") if k in s}))
    else:  # an unfinished extraction: what each rank file records
        for rank_file in sorted((root / SHARD_DIR).glob("rank-*.json")):
            damage = _json_damage(rank_file)
            report.add(rank_file, damage)  # readable
            if damage is not None:
                continue
            files = read_rank_file(rank_file).get("files") or {}
            rank = int(rank_file.stem.split("-")[1])
            try:
                on_disk = {p.name for p in list_shards(root / SHARD_DIR, rank)}
            except UserError:  # a gap in the numbers: every file on disk, and the recorded ones
                on_disk = {p.name for p in (root / SHARD_DIR).glob(f"shard-{rank:05d}-*.safetensors")}
            for name in sorted(set(files) | on_disk):
                listed.append((root / SHARD_DIR / name, files.get(name) or {}))
    for shard, recorded in listed:
        report.add(shard, shard_damage(shard, recorded), recorded=bool(recorded))


def _verify_folder(folder: Path, report: Report) -> None:
    record_path = folder / "config.json"  # a hub export's config records its weights' size and checksum
    recorded: dict[str, Any] = {}
    if record_path.exists():
        damage = _json_damage(record_path)
        report.add(record_path, damage)
        config = json.loads(record_path.read_text()) if damage is None else None
        if isinstance(config, dict) and isinstance(config.get("checksums"), dict):
            recorded = config["checksums"]
    for name, rec in sorted(recorded.items()):
        report.add(folder / name, check_file(folder / name, rec))
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or rel in recorded or p == record_path or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.suffix == ".safetensors":
            report.add(p, safetensors_damage(p), recorded=False)
        elif p.suffix == ".json":
            report.add(p, _json_damage(p), recorded=False)
        elif p.suffix in (".npz", ".pt", ".pth"):
            report.add(p, _zip_damage(p, npz=p.suffix == ".npz"))


# -- single files ----------------------------------------------------------------------------


def _json_damage(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"unreadable JSON ({type(e).__name__}: {e})"
    return None


def _zip_damage(path: Path, npz: bool) -> str | None:
    """What is wrong with a zip file (an `.npz`, a torch `.pt`): its directory, the CRC-32 of every
    member (which the zip format records), and for an `.npz` its arrays' headers and lengths."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is not None:
                return f"checksum mismatch in member {bad!r} (its CRC-32 is not the one the zip records)"
            if npz:
                return _npz_members_damage(z)
    except zipfile.BadZipFile as e:
        return f"not a whole zip file ({e}): truncated or overwritten"
    except (OSError, EOFError, ValueError, zipfile.LargeZipFile) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def _npz_members_damage(z: zipfile.ZipFile) -> str | None:
    from numpy.lib import format as npy_format

    lengths = {}
    for info in z.infolist():
        if not info.filename.endswith(".npy"):
            continue
        with z.open(info) as f:
            try:
                major, _ = npy_format.read_magic(f)
                read = npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
                shape, _, _ = read(f)
            except ValueError as e:
                return f"member {info.filename!r} has an unreadable array header ({e})"
        lengths[info.filename] = shape[0] if shape else None
    if not lengths:
        return "holds no arrays"
    if len({n for n in lengths.values()}) > 1:
        return f"arrays of different lengths {lengths}"
    return None


def verify_command(opts: VerifyOptions) -> Report:
    """The `verify` command's library side."""
    return verify(opts.path)
