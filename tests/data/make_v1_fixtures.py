"""How tests/data/store_v1/ and tests/data/checkpoint_v1/ were made (run once, at commit 3da9e14).

    PYTHONPATH=src python tests/data/make_v1_fixtures.py

Kept as the record of what the fixtures hold; the code it calls has since moved (the latent
store from `ditforge.data.latents` to `ditforge.data.store`), so it is not meant to run again:
the fixtures are there to prove that files written by that version still load.

- store_v1/: `extract` of 7 random 16x16 images (one unreadable) with a small random diffusers
  AutoencoderKL (4x8x8 latents), as two ranks, shards of 2 records, float16; then
  `finalize_store`. expected.safetensors holds, computed without the store's reader: the
  records as the writer was handed them (mean and log-variance, rounded to float16, for the
  image and its flip), labels and items; and the batches that `InfiniteLoader(StoreSource)`
  gave (global batch 4, seed 3, flips, 2 micro-batches, 2 steps), as golden values.
- checkpoint_v1/run.zip: a run folder of `ditforge train --model DiT-Ti/4` on the built-in
  digits (2 steps, batch 8), with config.json, state.json and rng.safetensors as written and
  model / ema / optimizer.safetensors as written except their tensor payloads zeroed (headers
  kept byte for byte), so that the 66 MB of weights zip to a few KB.
"""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ditforge.data.autoencoder import load_autoencoder
from ditforge.data.latents import LatentStore, extract, finalize_store
from ditforge.data.loader import InfiniteLoader, StoreSource
from ditforge.errors import UnreadableImage

HERE = Path(__file__).resolve().parent


def make_store(tmp: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32, sample_size=16,
    ).save_pretrained(tmp / "vae")
    ae = load_autoencoder(str(tmp / "vae"), device="cpu")
    rng = np.random.default_rng(0)
    pixels = {f"img-{i}": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for i in range(7)}
    items = [(key, i % 2) for i, key in enumerate(pixels)]

    def load(key):
        if key == "img-4":
            raise UnreadableImage("OSError: image file is truncated (img-4)")
        return pixels[key]

    root = HERE / "store_v1"
    shutil.rmtree(root, ignore_errors=True)
    for rank in (0, 1):
        extract(items, load, ae, root, batch_size=2, rank=rank, world_size=2, shard_size=2)
    meta = {"source": "random", "image_size": 16, "autoencoder": ae.describe(), "class_names": ["even", "odd"]}
    finalize_store(root, meta)

    kept = [i for i in range(7) if i != 4]
    x = torch.stack([torch.from_numpy(pixels[items[i][0]]).permute(2, 0, 1).float() / 127.5 - 1.0 for i in kept])
    views = []
    for images in (x, x.flip(-1)):
        mean, std = ae.encode(images)  # (6, 4, 8, 8) each
        views.append((mean.half(), (2.0 * std.log()).half()))
    expected = {
        "mean": torch.stack([views[0][0], views[1][0]], dim=1),  # (6, 2, 4, 8, 8): [:, 1] the flip
        "logvar": torch.stack([views[0][1], views[1][1]], dim=1),
        "label": torch.tensor([items[i][1] for i in kept]),
        "item": torch.tensor(kept),
    }
    loader = InfiniteLoader(StoreSource(LatentStore(root)), global_batch=4, seed=3, hflip=True, grad_accum=2)
    for step in range(2):
        for m, (xb, yb) in enumerate(loader.next_step()):
            expected[f"batch{step}_{m}_x"], expected[f"batch{step}_{m}_y"] = xb, yb
    save_file({k: v.contiguous() for k, v in expected.items()}, str(root / "expected.safetensors"))


def zero_payload(path: Path) -> None:
    """Zero the tensor bytes of a safetensors file, keeping its header byte for byte."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = bytes(len(data) - start)
    path.write_bytes(bytes(data))


def make_checkpoint(tmp: Path) -> None:
    run = tmp / "run"
    subprocess.run([sys.executable, "-m", "ditforge", "train", "--run-dir", str(run), "--model", "DiT-Ti/4",
                    "--steps", "2", "--batch-size", "8", "--ckpt-every", "2", "--sample-every", "0",
                    "--log-every", "1", "--no-progress"], check=True)
    ckpt = run / "checkpoints" / "step-0000002"
    for name in ("model", "ema", "optimizer"):
        zero_payload(ckpt / f"{name}.safetensors")
    out = HERE / "checkpoint_v1"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    with zipfile.ZipFile(out / "run.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for p in sorted([run / "config.json", *ckpt.iterdir()]):
            z.write(p, p.relative_to(run).as_posix())
    print(json.dumps(sorted(z.namelist() for z in [zipfile.ZipFile(out / "run.zip")])))


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        make_store(Path(d))
        make_checkpoint(Path(d))
