"""Which autoencoder: extraction speed, store size and the DiT-XL training step per 256-px image.

For SD-VAE (f8, 4 channels) + patch 2, the FLUX VAE (f8, 16 channels, shift and scale) + patch 2
and DC-AE f32c32 (SANA's, deterministic) + patch 1, each built with random weights at its
published config, saved with `save_pretrained` and loaded back as a user's folder:

- extract images/s: `ditforge.data.store.extract` of `--images` random 256-px images, each with
  its flip (two encoder passes an image), fp32 on this machine's CPU;
- store bytes per image: the shards' size over the records (float16; DC-AE keeps means only);
- the DiT-XL step: analytic training FLOPs per image (`ditforge.bench.train_flops_per_image`,
  6 x forward MACs) on the latent grid, and, with `--step-time`, the seconds of one forward +
  backward of DiT-XL at batch `--step-batch` (no optimizer: AdamW and EMA add a fixed cost per
  parameter, the same for the three).

    .venv/bin/python benchmarks/autoencoders.py --images 4 --batch 2 --step-time

Prints one JSON line per autoencoder and the README's table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ditforge.bench import train_flops_per_image
from ditforge.data.autoencoder import load_autoencoder
from ditforge.data.store import extract, finalize_store
from ditforge.models import DiT

SD_BLOCKS = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, act_fn="silu",
)
# stabilityai/sd-vae-ft-ema's config.json; black-forest-labs/FLUX.1-dev vae/config.json (16 channels, no quant convs);
# mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (diffusers' scripts/convert_dcae_to_diffusers.py, get_ae_config)
CONFIGS = {
    "SD-VAE ft-EMA": ("AutoencoderKL", dict(SD_BLOCKS, latent_channels=4, sample_size=256, scaling_factor=0.18215), 2),
    "FLUX VAE": ("AutoencoderKL", dict(SD_BLOCKS, latent_channels=16, sample_size=1024, scaling_factor=0.3611,
                                       shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False), 2),
    "DC-AE f32c32 (SANA 1.0)": ("AutoencoderDC", dict(
        in_channels=3, latent_channels=32, attention_head_dim=32,
        encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
        decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
        encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024], decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
        encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
        encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
        downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.41407), 1),
}
XL = dict(depth=28, hidden_size=1152, num_heads=16)  # DiT-XL (Peebles & Xie 2022, Table 1)


def build_folder(cls_name: str, config: dict, folder: Path) -> int:
    import diffusers

    torch.manual_seed(0)
    vae = getattr(diffusers, cls_name)(**config)
    vae.save_pretrained(folder)
    return sum(p.numel() for p in vae.parameters())


def step_seconds(c: int, side: int, patch: int, batch: int, steps: int) -> float:
    """Seconds of one forward + backward of DiT-XL/patch on (batch, c, side, side), mean of `steps` after one warm-up."""
    torch.manual_seed(0)
    model = DiT(input_size=side, in_channels=c, patch_size=patch, num_classes=1000, learn_sigma=True, **XL)
    x, t, y = torch.randn(batch, c, side, side), torch.rand(batch) * 999, torch.randint(0, 1000, (batch,))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        model(x, t, y).square().mean().backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    del model
    return float(np.mean(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--step-time", action="store_true", help="also time DiT-XL forward + backward")
    ap.add_argument("--step-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rng = np.random.default_rng(0)
    pixels = {f"img-{i}": rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for i in range(args.images)}
    items = [(k, 0) for k in pixels]
    rows = []
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.images} images at {args.size} px, batch {args.batch}")
    for name, (cls_name, config, patch) in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            params = build_folder(cls_name, config, Path(tmp) / "vae")
            ae = load_autoencoder(str(Path(tmp) / "vae"), device="cpu")
            summary = extract(items, pixels.__getitem__, ae, Path(tmp) / "store", batch_size=args.batch, shard_size=1024)
            manifest = finalize_store(Path(tmp) / "store", {"source": "bench", "image_size": args.size,
                                                            "autoencoder": ae.describe(), "class_names": ["x"]})
            store_bytes = sum(p.stat().st_size for p in (Path(tmp) / "store" / "shards").glob("*.safetensors"))
            c, h, w = manifest["latent_shape"]
            del ae
        dit = DiT(input_size=h, in_channels=c, patch_size=patch, num_classes=1000, learn_sigma=True, **XL)
        flops = train_flops_per_image(dit)
        del dit
        row = dict(autoencoder=name, cls=cls_name, params=params, latent=[c, h, w], patch=patch, tokens=(h // patch) * (w // patch),
                   extract_images_per_s=summary["images_per_s"], store_bytes_per_image=store_bytes / manifest["count"],
                   train_gflop_per_image=flops / 1e9)
        if args.step_time:
            row["step_s_per_image"] = step_seconds(c, h, patch, args.step_batch, args.steps) / args.step_batch
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| autoencoder | latent at 256 px | DiT-XL patch, tokens | extract images/s | store KiB/image | DiT-XL step GFLOP/image |"
          + (" step s/image (fwd+bwd) |" if args.step_time else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.step_time else ""))
    for r in rows:
        c, h, w = r["latent"]
        line = (f"| {r['autoencoder']} ({r['params'] / 1e6:.0f}M) | {c}x{h}x{w} | {r['patch']}, {r['tokens']} | "
                f"{r['extract_images_per_s']:.2f} | {r['store_bytes_per_image'] / 1024:.1f} | {r['train_gflop_per_image']:.0f} |")
        if args.step_time:
            line += f" {r['step_s_per_image']:.2f} |"
        print(line)


if __name__ == "__main__":
    main()
