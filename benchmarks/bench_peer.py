"""Our training step against the peers', same model size, same loss, same run.

Peers: diffusers' `DiTTransformer2DModel` (the DiT port most users reach for; default), and the
official implementation (facebookresearch/DiT: its `models.py` and `diffusion/`, from a local
copy given with --official PATH; it needs timm). Both train with the same AdamW and the same
Gaussian diffusion loss (epsilon MSE + VB with learned sigma), at --peer-precision (fp32 with no
options by default; bf16 autocast on a GPU, as ours), optionally compiled (--peer-compile).
Ours runs through `ditforge.train.step.TrainStep`, exactly what `ditforge train` runs, with each
setting listed. Prints images/s of each and the ratio.

    .venv/bin/python benchmarks/bench_peer.py --model DiT-S/2 --input-size 32 --batch 8
    python3 benchmarks/bench_peer.py --model DiT-XL/2 --batch 256 --precision bf16 --peer-precision bf16 \
        --compile --peer-compile --peer official --official .peers/DiT   # GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys

import torch

from ditforge.bench import run_benchmark, time_steps
from ditforge.diffusion import create_diffusion
from ditforge.models.dit import MODEL_SIZES
from ditforge.train.device import autocast, keep_freed_host_memory, pick_device, resolve_precision


def _diffusers_peer(model_name: str, input_size: int, channels: int):
    """diffusers' DiT of the same size, and its forward as `(x_t, t, y) -> output`."""
    from diffusers import DiTTransformer2DModel

    size, patch = model_name.removeprefix("DiT-").split("/")
    depth, hidden, heads = MODEL_SIZES[size]
    peer = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=channels,
        out_channels=2 * channels, num_layers=depth, patch_size=int(patch), sample_size=input_size,
        num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    )
    return peer, lambda m, x_t, t, labels: m(x_t, timestep=t, class_labels=labels).sample


def _official_peer(model_name: str, input_size: int, channels: int, path: str):
    """The official DiT (`models.DiT_models`) from a local copy of facebookresearch/DiT."""
    sys.path.insert(0, path)
    from models import DiT_models  # noqa: E402 - the official file, not ours

    peer = DiT_models[model_name](input_size=input_size, in_channels=channels, num_classes=1000)
    return peer, lambda m, x_t, t, labels: m(x_t, t, labels)


def peer_images_per_s(model_name: str, input_size: int, channels: int, batch: int, precision: str, steps: int, warmup: int,
                      which: str = "diffusers", official: str | None = None, compile: bool = False) -> float:
    device = pick_device()
    torch.manual_seed(0)
    if which == "official":
        peer, call = _official_peer(model_name, input_size, channels, official)
    else:
        peer, call = _diffusers_peer(model_name, input_size, channels)
    peer = peer.to(device).train()
    run = torch.compile(peer) if compile else peer
    opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, fused=device.type == "cuda")
    diffusion = create_diffusion("")  # the same loss for every side (ours equals the official one bit for bit)
    x = torch.randn(batch, channels, input_size, input_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step(i):
        t = torch.randint(0, 1000, (batch,), device=device)
        with autocast(precision, device):
            loss = diffusion.training_losses(lambda x_t, tt, labels: call(run, x_t, tt, labels), x, t, y)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return steps * batch / time_steps(step, steps, warmup, device)[0]


def measure(which: str, args: argparse.Namespace) -> float:
    """Images/s of one side: 'peer', 'peer+malloc' (the peer with our allocator setting) or
    'ours:PRECISION[:compile]'. Run in a process of its own."""
    if which.startswith("peer"):
        if which == "peer+malloc":
            keep_freed_host_memory()
        return peer_images_per_s(args.model, args.input_size, args.channels, args.batch, args.peer_precision, args.steps,
                                 args.warmup, args.peer, args.official, which.endswith(":compile"))
    _, precision, *opts = which.split(":")
    return run_benchmark(args.model, args.input_size, args.channels, 1000, args.batch, precision, "compile" in opts,
                         args.grad_checkpoint, args.steps, args.warmup).images_per_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="bf16", help="our best setting to compare (the peer always runs fp32)")
    p.add_argument("--compile", action="store_true", help="also try ours with torch.compile")
    p.add_argument("--grad-checkpoint", default="none", help="ours: what blocks keep for backward (models/recompute.py)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternate peer and ours this many times")
    p.add_argument("--peer", choices=["diffusers", "official"], default="diffusers", help="which peer")
    p.add_argument("--official", help="folder of a facebookresearch/DiT copy (models.py; needs timm), for --peer official")
    p.add_argument("--peer-precision", default="fp32", help="the peer's autocast precision (bf16 on a GPU, as ours)")
    p.add_argument("--peer-compile", action="store_true", help="also time the peer under torch.compile")
    p.add_argument("--no-malloc-row", action="store_true", help="skip the row of the peer with our allocator setting (CPU only matters)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one side, print images/s
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    device = pick_device()
    print(f"$ python {' '.join(sys.argv)}")
    print(f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()} "
          f"torch {torch.__version__} threads {torch.get_num_threads()} device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; each row a fresh process")
    best = resolve_precision(args.precision, device)
    fp32 = ["ours:fp32"] if args.peer_precision == "fp32" and best != "fp32" else []  # like against like
    ours = [*fp32, f"ours:{best}"] + ([f"ours:{best}:compile"] if args.compile else [])
    peers = ["peer"] + ([] if args.no_malloc_row else ["peer+malloc"]) + (["peer:compile"] if args.peer_compile else [])
    label = {"diffusers": "diffusers DiTTransformer2DModel", "official": "official DiT (models.py)"}[args.peer]
    for r in range(args.rounds):  # alternate, so that machine noise hits both sides alike
        rates = {}
        for which in [*peers, *ours]:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", which], check=True, capture_output=True, text=True)
            rates[which] = json.loads(out.stdout.strip().splitlines()[-1])
        peer = rates["peer"]
        for which in peers:
            extra = {"peer+malloc": " with our allocator setting", "peer:compile": " + compile"}.get(which, "")
            print(f"round {r}: peer {label} {args.peer_precision}{extra}: {rates[which]:.2f} images/s")
        for which in ours:
            name = which.removeprefix("ours:").replace(":", " +")
            vs = f"{rates[which] / peer:.2f}x peer"
            if "peer:compile" in rates:
                vs += f", {rates[which] / rates['peer:compile']:.2f}x the compiled peer"
            print(f"round {r}: ours {name}: {rates[which]:.2f} images/s = {vs}")


if __name__ == "__main__":
    main()
