"""Every file is checked: sizes and checksums recorded when written (a store's manifest, a
checkpoint's state.json, an .npz's zip CRCs), `ditforge verify PATH` naming every damaged file,
a store that stops training on a damaged shard, a resume that sets a damaged latest checkpoint
aside and resumes from the previous one."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TRAIN, run_cli
from ditforge.data.store import LatentStore, LatentWriter, finalize_store
from ditforge.errors import CheckpointError, UserError
from ditforge.export import ExportOptions, export
from ditforge.npz import NpzStreamWriter
from ditforge.train.checkpoint import read_training_state
from ditforge.verify import verify


def flip_bit(path, offset=-3, bit=2):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def small_store(root, n=12, shard_size=4):
    torch.manual_seed(0)
    w = LatentWriter(root, shard_size=shard_size, num_items=n, dtype="float32")
    w.add(torch.arange(n), torch.arange(n) % 2, torch.randn(n, 2, 2, 4, 4), torch.rand(n, 2, 2, 4, 4))
    w.close()
    finalize_store(root, {"source": "synthetic", "autoencoder": {"kind": "test"}, "class_names": ["x", "y"]})
    return sorted((root / "shards").glob("shard-*.safetensors"))


def test_verify_names_every_damaged_shard_and_a_store_stops_on_one_when_it_is_read(tmp_path):
    root = tmp_path / "store"
    shards = small_store(root)
    manifest = json.loads((root / "manifest.json").read_text())
    assert all(s["size"] == p.stat().st_size and len(s["crc32"]) == 8 for s, p in zip(manifest["shards"], shards))
    assert verify(root).ok and verify(root).checked == 4  # the manifest and 3 shards

    flip_bit(shards[0])  # a flipped bit in the records: the header is intact, only the checksum sees it
    truncate(shards[2])
    report = verify(root)
    bad = dict(report.bad)
    assert set(bad) == {shards[0], shards[2]}, report.lines()
    assert bad[shards[0]].startswith("checksum mismatch") and bad[shards[2]].startswith("size ")
    assert report.lines()[-1] == f"latent store {root}: 2 of 4 files damaged"

    with pytest.raises(UserError, match=r"shard 'shards/shard-00000-00002.safetensors' is damaged: size \d+ bytes, expected"):
        LatentStore(root)  # opening checks sizes and headers (cheap)
    small_store(tmp_path / "again")  # the same records again: an intact copy of the truncated shard
    shutil.copy(tmp_path / "again" / "shards" / shards[2].name, shards[2])
    store = LatentStore(root)  # opens: sizes and headers are right; shard 0's bytes are not
    store.get_batch(torch.tensor([4, 9]), torch.tensor([False, True]))  # shards 1 and 2: checked, fine
    with pytest.raises(UserError, match=r"shard 'shards/shard-00000-00000.safetensors' is damaged: checksum mismatch.*--repair") as e:
        store.get_batch(torch.tensor([5, 1]), torch.tensor([False, False]))  # the first read from shard 0
    assert "\n" not in str(e.value)


def test_verify_names_damaged_checkpoint_files_and_npz_outputs(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints")
    shutil.copy(trained_run / "config.json", run / "config.json")
    report = verify(run)
    assert report.ok and report.checked == 11 and not report.unrecorded, report.lines()  # config.json + 2 x 5 files
    ckpt = run / "checkpoints" / "step-0000030"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["files"]["model.safetensors"]["size"] == (ckpt / "model.safetensors").stat().st_size

    flip_bit(ckpt / "model.safetensors")
    truncate(ckpt / "optimizer.safetensors")
    (ckpt / "state.json").write_text((ckpt / "state.json").read_text().replace('"position": 480', '"position": 481'))
    (run / "checkpoints" / "step-0000015" / "rng.safetensors").unlink()
    bad = {p.relative_to(run).as_posix(): what for p, what in verify(run).bad}
    assert bad.keys() == {"checkpoints/step-0000030/model.safetensors", "checkpoints/step-0000030/optimizer.safetensors",
                          "checkpoints/step-0000030/state.json", "checkpoints/step-0000015/rng.safetensors"}, bad
    assert bad["checkpoints/step-0000030/model.safetensors"].startswith("checksum mismatch")
    assert bad["checkpoints/step-0000030/optimizer.safetensors"].startswith("size ")
    assert bad["checkpoints/step-0000030/state.json"].startswith("checksum mismatch")  # still valid JSON: its own checksum
    assert bad["checkpoints/step-0000015/rng.safetensors"] == "missing"
    assert dict(verify(ckpt).bad).keys() == {ckpt / "model.safetensors", ckpt / "optimizer.safetensors", ckpt / "state.json"}
    with pytest.raises(CheckpointError, match="state.json' is damaged: checksum mismatch"):
        read_training_state(ckpt)  # what a resume loads is checked too

    npz = tmp_path / "s.npz"
    with NpzStreamWriter(npz, {"arr_0": ((6, 4, 4, 3), np.uint8), "labels": ((6,), np.int64)}) as w:
        w.write("arr_0", np.arange(6 * 48, dtype=np.uint8).reshape(6, 4, 4, 3))
        w.write("labels", np.arange(6))
    assert verify(npz).ok
    flipped, cut = tmp_path / "flipped.npz", tmp_path / "cut.npz"
    shutil.copy(npz, flipped)
    flip_bit(flipped, offset=200)  # inside arr_0's data
    shutil.copy(npz, cut)
    truncate(cut, 0.7)
    assert verify(flipped).bad == [(flipped, "checksum mismatch in member 'arr_0.npy' (its CRC-32 is not the one the zip records)")]
    assert verify(cut).bad[0][1].startswith("not a whole zip file")

    hub = tmp_path / "hub"  # an exported folder: its config records the weights' size and checksum
    export(ExportOptions(checkpoint=str(trained_run), format="hub", out=str(hub)))
    assert verify(hub).ok and hub / "model.safetensors" not in verify(hub).unrecorded
    flip_bit(hub / "model.safetensors")
    assert [(p.name, what.split(" (")[0]) for p, what in verify(hub).bad] == [("model.safetensors", "checksum mismatch")]


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous_one(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    latest = run / "checkpoints" / "step-0000030"
    weights = load_file(str(latest / "model.safetensors"))
    flip_bit(latest / "ema.safetensors")
    p = run_cli("train", "--run-dir", str(run), "--steps", "30", "--ckpt-every", "15", "--sample-steps", "2", *TINY_TRAIN)
    warned = [line for line in p.stdout.splitlines() if "is corrupt" in line]
    assert len(warned) == 1 and f"{latest / 'ema.safetensors'}' is corrupt: checksum mismatch" in warned[0], p.stdout
    assert "set aside as step-0000030.damaged and the run resumes from" in warned[0] and "resumed from" in p.stdout
    assert (run / "checkpoints" / "step-0000030.damaged" / "ema.safetensors").is_file()  # kept, for inspection
    again = load_file(str(latest / "model.safetensors"))  # steps 16-30 trained again from step 15: the same weights
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)

    report = verify(run)  # the run is whole again; what was set aside is noted, not counted
    assert report.ok and any("step-0000030.damaged: a checkpoint that a resume found damaged" in n for n in report.notes)
    flip_bit(latest / "rng.safetensors")
    out = run_cli("verify", str(run), check=False)  # the command: one line per damaged file, exit status 1
    assert out.returncode == 1 and out.stdout.splitlines()[0] == f"{latest / 'rng.safetensors'}: " + dict(verify(run).bad)[
        latest / "rng.safetensors"] and f"run {run}: 1 of 11 files damaged" in out.stdout, out.stdout
    with pytest.raises(UserError, match="does not exist"):  # exit status 2, as every UserError
        verify(tmp_path / "nothing")


def test_a_damaged_shard_stops_training_in_one_line_and_extract_repair_re_encodes_only_the_damaged_ones(tmp_path):
    store = tmp_path / "store"
    extract = ["extract", "--data", "digits", "--vae", "identity", "--image-size", "8", "--shard-size", "256",
               "--out", str(store), "--no-progress"]
    run_cli(*extract)
    shards = sorted((store / "shards").glob("shard-*.safetensors"))
    assert len(shards) == 6
    written = {p.name: p.read_bytes() for p in (store / "shards").iterdir()} | {"manifest.json": (store / "manifest.json").read_bytes()}
    flip_bit(shards[1], offset=5000)
    truncate(shards[5])
    untouched = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards if p not in (shards[1], shards[5])}

    p = run_cli("train", "--data", str(store), "--run-dir", str(tmp_path / "run"), "--steps", "2", *TINY_TRAIN, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"shard 'shards/{shards[5].name}' is damaged: size " in p.stderr and "--repair" in p.stderr

    out = run_cli(*extract, "--repair").stdout
    assert f"{shards[1]}: was checksum mismatch" in out and f"{shards[5]}: was size " in out, out
    assert "repaired 2 of 6 shards" in out and out.count("re-encoded (the bytes written first, exactly)") == 2
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in untouched} == untouched  # the good shards: not rewritten
    now = {p.name: p.read_bytes() for p in (store / "shards").iterdir()} | {"manifest.json": (store / "manifest.json").read_bytes()}
    assert now == written  # the whole store byte-identical to the one first written, manifest and progress too
    assert verify(store).ok and not (store / ".repair").exists()
