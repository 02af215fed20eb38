"""folder -> extract (a real diffusers AutoencoderKL from a config) -> train -> resume -> sample."""

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import cpu_env, run_cli


@pytest.fixture(scope="module")
def folder_and_vae(tmp_path_factory):
    AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL  # the `vae` extra

    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32, sample_size=16,
    ).save_pretrained(root / "vae")  # loaded back by the same from_pretrained call a hub id takes
    rng = np.random.default_rng(0)
    for c, base in (("dark", 30), ("light", 220)):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(12):
            arr = np.clip(base + rng.integers(-25, 25, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / "imgs" / c / f"{i:02d}.png")
    (root / "imgs" / "dark" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def _extract(root, out, *extra, check=True):
    return run_cli("extract", "--data", str(root / "imgs"), "--vae", str(root / "vae"), "--image-size", "16",
                   "--out", str(out), "--batch-size", "2", "--shard-size", "4", "--workers", "0", "--no-progress",
                   *extra, check=check)


def test_extract_train_resume_sample(folder_and_vae, tmp_path):
    root = folder_and_vae
    feats = tmp_path / "feats"
    out = _extract(root, feats).stdout
    assert "24 records of (4, 8, 8)" in out and "1 unreadable" in out
    manifest = json.loads((feats / "manifest.json").read_text())
    assert manifest["class_names"] == ["dark", "light"] and manifest["image_size"] == 16
    assert any(s["file"].endswith("truncated.jpg") for s in manifest["skipped"])
    # a finished store is not rewritten by accident
    again = _extract(root, feats, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr

    run = tmp_path / "run"
    args = ["train", "--data", str(feats), "--run-dir", str(run), "--model", "DiT-Ti/2", "--batch-size", "8",
            "--log-every", "2", "--ckpt-every", "2", "--hflip", "--no-progress"]
    run_cli(*args, "--steps", "2")
    resumed = run_cli(*args, "--steps", "4").stdout
    assert "resumed from" in resumed and "step 4/4" in resumed
    state = json.loads((run / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["autoencoder"]["kind"] == "diffusers-kl" and state["model_args"]["in_channels"] == 4
    # sample decodes through the recorded VAE with no flag
    run_cli("sample", str(run), "--steps", "3", "--per-class", "2", "--out", str(tmp_path / "g.png"))
    assert Image.open(tmp_path / "g.png").size[0] > 32
    run_cli("sample", str(run), "--steps", "2", "--num-samples", "4", "--batch-size", "2", "--shard-size", "2",
            "--out", str(tmp_path / "s.npz"))
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (4, 16, 16, 3)
    # eval judges decoded samples; the judge trains on decoded records (20% of each class held out)
    run_cli("eval", str(run), "--per-class", "2", "--steps", "2", "--no-fid", "--json", str(tmp_path / "e.json"))
    report = json.loads((tmp_path / "e.json").read_text())
    assert "latent store" in report["note"] and len(report["classes"]) == 2
    assert (report["judge"]["train_images"], report["judge"]["heldout_images"]) == (20, 4)
    assert report["heldout_accuracy"] == 1.0  # dark vs light, decoded through the recorded VAE
    # the manifest fixes the input size: another one is a clear error
    bad = run_cli("train", "--data", str(feats), "--run-dir", str(tmp_path / "bad"), "--image-size", "32", "--steps", "1", "--no-progress", check=False)
    assert bad.returncode == 2 and "extracted at 16 px" in bad.stderr


def test_killed_extraction_resumes_to_the_same_store(folder_and_vae, tmp_path):
    root = folder_and_vae
    _extract(root, tmp_path / "straight")
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ditforge", "extract", "--data", str(root / "imgs"), "--vae", str(root / "vae"),
           "--image-size", "16", "--out", str(killed), "--batch-size", "2", "--shard-size", "4", "--workers", "0", "--no-progress"]
    # the environment of run_cli's extractions (the CPU, 2 threads): other thread counts, or a GPU, round differently
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cpu_env(OMP_NUM_THREADS="2"))
    deadline = time.time() + 300
    while not list((killed / "shards").glob("shard-*-00001.safetensors")) if (killed / "shards").exists() else True:
        assert proc.poll() is None and time.time() < deadline, "extraction ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()
    _extract(root, killed)
    a, b = sorted((tmp_path / "straight" / "shards").glob("*.safetensors")), sorted((killed / "shards").glob("*.safetensors"))
    assert [p.name for p in a] == [p.name for p in b]
    for pa, pb in zip(a, b):
        ta, tb = load_file(str(pa)), load_file(str(pb))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_offline_hub_id_is_a_one_line_error(folder_and_vae, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = run_cli("extract", "--data", str(folder_and_vae / "imgs"), "--vae", "stabilityai/sd-vae-ft-ema",
                "--out", str(tmp_path / "f"), check=False)
    assert p.returncode == 2 and "--vae PATH" in p.stderr and "Traceback" not in p.stderr


def test_kept_pixels_are_the_images_each_latent_view_encodes(folder_and_vae, tmp_path):
    """`extract --keep-pixels` stores each image as encoded, beside unchanged latents; a record's
    pixels in view f (1: flipped left-right) are the image whose VAE encoding is its latent f."""
    from ditforge.data.autoencoder import load_autoencoder
    from ditforge.data.sources import list_items
    from ditforge.data.store import LatentStore
    from ditforge.errors import UserError

    root = folder_and_vae
    _extract(root, tmp_path / "plain")
    _extract(root, tmp_path / "px", "--keep-pixels")
    plain, store = LatentStore(tmp_path / "plain"), LatentStore(tmp_path / "px")
    assert plain.pixels_shape is None and store.pixels_shape == (3, 16, 16)
    assert "pixels" in store.manifest["record_fields"] and "pixels" not in plain.manifest["record_fields"]
    with pytest.raises(UserError, match="--keep-pixels"):
        plain.pixels(torch.tensor([0]), torch.tensor([0]))
    idx, flip = torch.arange(len(store)), torch.arange(len(store)) % 2
    assert torch.equal(plain.gather(idx, flip)[0], store.gather(idx, flip)[0])  # the same latents

    source = list_items(str(root / "imgs"))
    images = torch.stack([torch.from_numpy(np.asarray(source.load(source.items[i], 16, "center"))).permute(2, 0, 1)
                          for i in store.items.tolist()])  # (N, 3, 16, 16) uint8, as the loader crops them
    px = store.pixels(idx, flip)
    assert px.dtype == torch.uint8 and torch.equal(px, torch.where(flip.bool()[:, None, None, None], images.flip(-1), images))
    mean, _ = load_autoencoder(str(root / "vae")).encode(px.float() / 127.5 - 1)  # (N, 4, 8, 8) x scale
    torch.testing.assert_close(mean, store.gather(idx, flip)[0].float(), atol=2e-3, rtol=1e-3)


def test_repa_on_a_store_reads_its_pixels_and_asks_for_them(folder_and_vae, dinov2_dir, tmp_path):
    root = folder_and_vae
    _extract(root, tmp_path / "plain")
    _extract(root, tmp_path / "px", "--keep-pixels")
    args = ["--model", "DiT-Ti/2", "--batch-size", "8", "--log-every", "1", "--steps", "2", "--sample-steps", "2",
            "--hflip", "--no-progress", "--repa-encoder", dinov2_dir, "--repa-depth", "2", "--repa-projector-dim", "32",
            "--repa-resolution", "16"]
    bad = run_cli("train", "--data", str(tmp_path / "plain"), "--run-dir", str(tmp_path / "r0"), *args, check=False)
    assert bad.returncode == 2 and "--keep-pixels" in bad.stderr and "Traceback" not in bad.stderr
    cached = run_cli("train", "--data", str(tmp_path / "px"), "--run-dir", str(tmp_path / "rc"), *args, "--repa-cache", "on", check=False)
    assert cached.returncode == 2 and "--repa-cache on" in cached.stderr  # features per view cannot be cached
    proc = run_cli("train", "--data", str(tmp_path / "px"), "--run-dir", str(tmp_path / "r1"), *args)
    assert re.search(r"\| repa -?\d", proc.stdout + proc.stderr)  # the alignment loss is logged
    ckpt = tmp_path / "r1" / "checkpoints" / "step-0000002"
    assert set(load_file(ckpt / "projector.safetensors")) and json.loads((ckpt / "state.json").read_text())["config"]["repa"]["depth"] == 2
