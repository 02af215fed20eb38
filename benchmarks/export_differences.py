"""How far diffusers' DiT is from ours after `write_diffusers`, next to what bf16 changes in ours.

For each model (random weights; DiT's zero-initialised adaLN and final layers drawn from
N(0, 0.02^2), so that outputs depend on x, t and y), exported with `formats/diffusers.py` and
loaded back with `DiTPipeline.from_pretrained`:

(a) one forward on the same (x, t, y): max abs difference of the exported transformer's output
    from ours (fp32), as shipped and with diffusers' timestep convention set to DiT's
    (`downscale_freq_shift` 1 -> 0 on the loaded module), and then also with the feed-forward
    LayerNorm eps of folders diffusers converted itself (1e-5; exports write DiT's 1e-6);
(b) 25 guided DDIM steps from the same noise: DiTPipeline's final latents against our DDIM
    (ADM's `ddim25` respacing, which is diffusers' 'leading' grid), the same variants, and
    `ditforge sample --sampler ddim --steps 25`'s own grid (ADM's "25": 0, 42, ..., 999).

Next to each: our own model with its weights rounded to bf16, and under bf16 autocast.
"rel" is the max abs difference over the max abs of our fp32 result.

    python benchmarks/export_differences.py                       # DiT-S/2 and DiT-XL/2 at 8x8x4
    python benchmarks/export_differences.py --models DiT-S/2 --input-size 32 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from ditforge.data.autoencoder import load_autoencoder
from ditforge.diffusion import create_diffusion, ddim_sample, guided_denoiser
from ditforge.diffusion.sampling import Sampler
from ditforge.formats.diffusers import NULL_LABEL, write_diffusers
from ditforge.formats.weights import ModelWeights
from ditforge.models import create_model


def random_model(name: str, input_size: int, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, input_size=input_size, in_channels=4, num_classes=num_classes)
    with torch.no_grad():
        for layer in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]:
            layer.weight.normal_(0, 0.02)
            layer.bias.normal_(0, 0.02)
    return model.eval()


def bf16_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose parameters are rounded to bf16 and back (then run in fp32)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    return rounded


def tiny_vae(folder: Path) -> dict:
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                  sample_size=16).save_pretrained(folder)
    return load_autoencoder(str(folder), device="cpu").describe()


def set_time_shift(transformer, shift: float) -> None:
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift


def set_ff_eps(transformer, eps: float) -> None:
    for block in transformer.transformer_blocks:
        block.norm3.eps = eps


def pipeline_latents(pipe, labels: list[int], seed: int, cfg: float, steps: int) -> torch.Tensor:
    """DiTPipeline's final latents (x scale again): its `vae.decode` wrapped for one call."""
    seen = {}
    decode = pipe.vae.decode

    def keep(z, *a, **k):
        seen["z"] = z.clone()
        return decode(z, *a, **k)

    pipe.vae.decode = keep
    try:
        pipe(labels, guidance_scale=cfg, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, output_type="pt")
    finally:
        del pipe.vae.decode
    return seen["z"] * pipe.vae.config.scaling_factor


def our_latents(model, labels: list[int], noise: torch.Tensor, cfg: float, diffusion, precision: str = "fp32") -> torch.Tensor:
    def network(x, t, y):
        if precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x, t, y).float()
        return model(x, t, y)

    denoise = guided_denoiser(network, torch.tensor(labels), cfg, model.num_classes, model.in_channels)
    with torch.no_grad():
        return ddim_sample(diffusion, denoise, noise)


def row(what: str, value: torch.Tensor, ref: torch.Tensor, seconds: float | None = None) -> str:
    """A table row: max abs difference from `ref`, relative to max |ref|, and the time taken."""
    gap = (value.float() - ref).abs().max().item()
    cells = [what, f"{gap:.3g}", f"{gap / ref.abs().max().item():.2e}"] + ([f"{seconds:.1f}"] if seconds is not None else [])
    return "| " + " | ".join(cells) + " |"


def measure(name: str, input_size: int, steps: int, cfg: float, samples: int, seed: int, work: Path, vae: dict) -> None:
    from diffusers import DiTPipeline

    k = 1000
    t0 = time.perf_counter()
    model = random_model(name, input_size, k, seed)
    weights = ModelWeights(dict(name=name, input_size=input_size, in_channels=4, num_classes=k, learn_sigma=True,
                                class_dropout_prob=0.1), model.state_dict(), [str(i) for i in range(k)],
                           {"objective": "diffusion", "diffusion": {"noise_schedule": "linear", "diffusion_steps": 1000}}, vae)
    folder = write_diffusers(weights, work / name.replace("/", "-"))
    del weights
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe.transformer.eval()
    rounded = bf16_weights(model)
    print(f"\n## {name}, input {input_size}x{input_size}x4, 1000 classes (set up in {time.perf_counter() - t0:.0f} s)")

    g = torch.Generator().manual_seed(seed + 1)
    n = 8
    x = torch.randn(n, 4, input_size, input_size, generator=g)
    t = torch.linspace(0, 999, n).round().long()
    y = torch.randint(0, k, (n,), generator=g)
    y[-2:] = k  # two rows of the null class (1000 in both)
    with torch.no_grad():
        ref = model(x, t, y)
        print(f"\n(a) forward, batch {n}, t from 0 to 999; our fp32 output: max abs {ref.abs().max().item():.3g}, "
              f"std {ref.std().item():.3g}\n")
        print("| compared with our fp32 forward | max abs diff | rel |\n|---|---|---|")
        labels = torch.where(y == k, NULL_LABEL, y)
        print(row("diffusers, as exported (downscale_freq_shift 1, norm_eps 1e-6)", theirs(x, timestep=t, class_labels=labels).sample, ref))
        set_time_shift(theirs, 0)
        print(row("diffusers, downscale_freq_shift set to DiT's 0", theirs(x, timestep=t, class_labels=labels).sample, ref))
        set_ff_eps(theirs, 1e-5)
        print(row("diffusers, shift 0 and norm_eps 1e-5 (the eps of folders diffusers converted)",
                  theirs(x, timestep=t, class_labels=labels).sample, ref))
        set_ff_eps(theirs, 1e-6)
        set_time_shift(theirs, 1)
        print(row("ours, weights rounded to bf16", rounded(x, t, y), ref))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            print(row("ours, bf16 autocast", model(x, t, y), ref))

    classes = torch.randint(0, k, (samples,), generator=g).tolist()
    noise = torch.randn((samples, 4, input_size, input_size), generator=torch.Generator().manual_seed(seed + 2))
    ddim = create_diffusion(f"ddim{steps}", "linear", True, 1000)
    t0 = time.perf_counter()
    ref = our_latents(model, classes, noise, cfg, ddim)
    ours_took = time.perf_counter() - t0
    print(f"\n(b) {steps} DDIM steps, cfg {cfg:g}, {samples} samples (classes {classes}); our fp32 latents: max abs "
          f"{ref.abs().max().item():.3g}, std {ref.std().item():.3g} (random weights: not the latents of images)\n")
    print("| compared with our DDIM (fp32, ADM `ddim25` grid) | max abs diff | rel | seconds |\n|---|---|---|---|")
    print(f"| ours (the reference) | 0 | 0 | {ours_took:.1f} |")
    for what, shift in (("DiTPipeline, as exported", 1), ("DiTPipeline, downscale_freq_shift set to DiT's 0", 0)):
        set_time_shift(theirs, shift)
        t0 = time.perf_counter()
        z = pipeline_latents(pipe, classes, seed + 2, cfg, steps)
        print(row(what, z, ref, time.perf_counter() - t0))
    set_time_shift(theirs, 1)
    for what, net, precision in (("ours, weights rounded to bf16", rounded, "fp32"), ("ours, bf16 autocast", model, "bf16")):
        t0 = time.perf_counter()
        z = our_latents(net, classes, noise, cfg, ddim, precision)
        print(row(what, z, ref, time.perf_counter() - t0))
    t0 = time.perf_counter()
    z = our_latents(model, classes, noise, cfg, Sampler("ddim", steps).diffusion)
    print(row(f"ours, `ditforge sample --sampler ddim --steps {steps}` grid (ADM \"{steps}\")", z, ref, time.perf_counter() - t0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="DiT-S/2,DiT-XL/2", help="comma-separated model names")
    p.add_argument("--input-size", type=int, default=8, help="latent side (8: 16 tokens at patch 2)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    print(f"# export_differences: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vae = tiny_vae(work / "vae")
        for name in args.models.split(","):
            measure(name, args.input_size, args.steps, args.cfg, args.samples, args.seed, work, vae)


if __name__ == "__main__":
    main()
