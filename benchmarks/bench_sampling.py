"""Bulk sampling images/s: ours (`ditforge sample ... --out X.npz`) against the official loop of
facebookresearch/DiT's `sample_ddp.py`, same model, same weights, same steps, in one process.

OURS is the code path of `ditforge sample RUN --num-samples N --out X.npz` (`sample_bulk.sample_to_npz`):
`choose_sampler` + `sample_batch` with the guided and unguided halves in one forward (2B rows),
the network under autocast at --precision and the sampler's arithmetic in fp32, noise from a CPU
generator seeded per batch and a device generator for the steps; --compile as `sample --compile`.

PEER is `sample_ddp.py`'s loop on the official `models.DiT_models[NAME]` (from --official PATH, a
local copy of facebookresearch/DiT: its `models.py` needs timm): z = cat([z, z]), y = cat([y, null]),
`create_diffusion(str(steps)).p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
model_kwargs=dict(y=y, cfg_scale=cfg), progress=False, device=device)`, then the null half dropped.
sample_ddp runs fp32 (TF32 matmuls on, as ours); with --precision bf16 the peer also runs under
torch.autocast(bf16), so that the ratio compares like with like (both rows are printed).
The peer always samples with DDPM at --steps; the official `forward_with_cfg` guides 3 of the 4
latent channels (ours all 4 unless `--legacy-three-channel`: the same cost).

Both sides get the SAME random weights (ours' state dict loads into the official model with
strict=True), the same batch (--batch images kept per batch, 2x rows per forward when cfg != 1)
and the same number of steps. Excluded from both: the VAE decode, the conversion to uint8 and the
writing of files (the decode is the same diffusers VAE on either side). Timed: --batches batches
after --warmup untimed ones (the first round only: compile, autotuning), with
`torch.cuda.synchronize()` around the clock on a GPU; --rounds rounds, alternating the order of
the sides, so that a shared machine's noise hits both. One JSON line per side and round, and one
with the ratios; appended to --out-jsonl if given.

    # GPU (bring the official code to .peers/DiT and timm: see benchmarks/gpu_checks.sh's header)
    python3 benchmarks/bench_sampling.py --official .peers/DiT --precision bf16 --steps 250 --batches 2
    python3 benchmarks/bench_sampling.py --official .peers/DiT --precision bf16 --sampler dpm++2m-sde --steps 20 --peer none
    # CPU smoke run (checks the script, measures nothing)
    PYTHONPATH=src .venv/bin/python benchmarks/bench_sampling.py --model DiT-S/8 --input-size 16 --batch 2 \
        --steps 3 --batches 1 --warmup 1 --official .peers/DiT
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from ditforge.diffusion.sampling import SAMPLERS
from ditforge.objectives import DiffusionObjective
from ditforge.models import create_model
from ditforge.sampling.generate import choose_sampler, sample_batch, start_noise, step_generator
from ditforge.sampling.bulk import sample_labels
from ditforge.train.device import autocast, enable_tf32, pick_device, resolve_precision


def _load_module(name: str, file: Path, package_dir: Path | None = None) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, file, submodule_search_locations=[str(package_dir)] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the package's relative imports find it by this name
    spec.loader.exec_module(module)
    return module


def load_official(path: str | Path) -> tuple[ModuleType, ModuleType | None, str | None]:
    """The official `diffusion` package and `models` module of a facebookresearch/DiT copy, under
    names of their own (`dit_official_diffusion`, `dit_official_models`: no clash with anything on
    sys.path). `models` is None when it cannot be imported (it needs timm); the reason comes third."""
    path = Path(path)
    if not (path / "diffusion" / "__init__.py").is_file():
        raise FileNotFoundError(f"{str(path)!r} holds no facebookresearch/DiT copy (diffusion/__init__.py)")
    diffusion = sys.modules.get("dit_official_diffusion") or _load_module(
        "dit_official_diffusion", path / "diffusion" / "__init__.py", path / "diffusion")
    try:
        models = sys.modules.get("dit_official_models") or _load_module("dit_official_models", path / "models.py")
    except ImportError as e:  # timm (and through it torchvision) missing
        sys.modules.pop("dit_official_models", None)
        return diffusion, None, f"the official models.py does not import here: {e}"
    return diffusion, models, None


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights N(0, 0.02^2) for every trainable tensor (the adaLN and final-layer zero-init
    would make the output zero); the fixed sin-cos `pos_embed` kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@torch.no_grad()
def peer_batch(diffusion, network: Callable, forward_with_cfg: Callable | None, y: torch.Tensor, z: torch.Tensor,
               cfg: float, null_class: int, precision: str) -> torch.Tensor:
    """One batch of sample_ddp.py's loop: y (B,), z (B, C, H, W) on the device -> (B, C, H, W).
    `network(x, t, y=...)` is the model's forward, `forward_with_cfg(x, t, y=..., cfg_scale=...)`
    the official guided one (needed when cfg != 1). Per-step noise: the device's global RNG."""
    if cfg != 1.0:
        z = torch.cat([z, z], 0)  # (2B, C, H, W)
        y = torch.cat([y, torch.full_like(y, null_class)], 0)  # (2B,)
        fn, kwargs = forward_with_cfg, dict(y=y, cfg_scale=cfg)
    else:
        fn, kwargs = network, dict(y=y)
    with autocast(precision, z.device):
        x = diffusion.p_sample_loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, progress=False,
                                    device=z.device)
    return x.chunk(2, dim=0)[0] if cfg != 1.0 else x  # (B, C, H, W): the null half dropped


class Ours:
    """`sample_to_npz`'s per-batch work, batch `b` of a run seeded `seed`."""

    def __init__(self, model, args, precision: str, device: torch.device):
        self.model = torch.compile(model) if args.compile else model
        self.chosen = choose_sampler(model, DiffusionObjective(), args.steps, args.cfg, args.sampler)
        self.shape = (model.in_channels, model.input_size, model.input_size)
        self.labels = sample_labels(args.batch * 1000, model.num_classes, args.seed, balanced=False)
        self.args, self.precision, self.device = args, precision, device
        self.name, self.compiled = self.chosen.name, args.compile

    def __call__(self, b: int) -> torch.Tensor:
        a, b0 = self.args, (b % 1000) * self.args.batch
        y = self.labels[b0 : b0 + a.batch]  # (B,)
        noise = start_noise(a.seed, range(b0, b0 + a.batch), self.shape)  # (B, C, H, W), as sample_to_npz draws it
        gen = step_generator(a.seed, b0, self.device)
        return sample_batch(self.model, self.chosen, y.to(self.device), noise.to(self.device), gen, a.cfg,
                            a.legacy_three_channel, precision=self.precision)


class Peer:
    """sample_ddp.py's per-batch work on the official model (global RNG, as there)."""

    def __init__(self, official_diffusion, peer, args, precision: str, device: torch.device):
        self.diffusion = official_diffusion.create_diffusion(str(args.steps))
        self.peer, self.args, self.precision, self.device = peer, args, precision, device
        self.name, self.compiled = "ddpm", False

    def __call__(self, b: int) -> torch.Tensor:
        a, p = self.args, self.peer
        z = torch.randn(a.batch, a.channels, a.input_size, a.input_size, device=self.device)  # (B, C, H, W)
        y = torch.randint(0, a.num_classes, (a.batch,), device=self.device)
        return peer_batch(self.diffusion, p.forward, p.forward_with_cfg, y, z, a.cfg, a.num_classes, self.precision)


def time_side(side, batches: int, warmup: int, device: torch.device) -> float:
    """Seconds for `batches` batches after `warmup` untimed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for b in range(warmup):
        side(-1 - b)
    sync()
    t0 = time.perf_counter()
    for b in range(batches):
        side(b)
    sync()
    return time.perf_counter() - t0


def build(args, device: torch.device):
    """{label: side}: ours at the chosen precision, the peer fp32 and (if ours is not fp32) at ours'."""
    precision = resolve_precision(args.precision, device)
    enable_tf32()  # `ditforge sample` does; sample_ddp.py's --tf32 defaults to True
    torch.manual_seed(args.seed)
    model = create_model(args.model, input_size=args.input_size, in_channels=args.channels, num_classes=args.num_classes)
    model = randomize_(model, args.seed).to(device).eval()
    sides = {f"ours {precision}" + (" compile" if args.compile else ""): Ours(model, args, precision, device)}
    skipped = None
    if args.peer == "official":
        try:
            official_diffusion, models, skipped = load_official(args.official)
        except FileNotFoundError as e:
            models, skipped = None, str(e)
        if models is not None:
            peer = models.DiT_models[args.model](input_size=args.input_size, in_channels=args.channels,
                                                 num_classes=args.num_classes)
            try:
                peer.load_state_dict(model.state_dict(), strict=True)  # the official keys are ours
            except RuntimeError as e:
                return sides, precision, f"our weights do not load into the official model: {e}"
            peer = peer.to(device).eval()
            for p in dict.fromkeys(["fp32", precision]):
                sides[f"peer {p}"] = Peer(official_diffusion, peer, args, p, device)
    else:
        skipped = "--peer none"
    return sides, precision, skipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64, help="images kept per batch (sample_ddp's --per-proc-batch-size; its default is 32)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS, help="ours (the peer always runs DDPM)")
    p.add_argument("--legacy-three-channel", action="store_true", help="ours: guide 3 channels as the official code")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="ours under torch.compile (as `sample --compile`)")
    p.add_argument("--batches", type=int, default=2, help="timed batches per side and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per side, first round only")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer", choices=["official", "none"], default="official")
    p.add_argument("--official", default=".peers/DiT", help="folder of a facebookresearch/DiT copy (models.py, diffusion/)")
    p.add_argument("--out-jsonl", help="append the JSON lines to this file")
    args = p.parse_args()

    device = pick_device()
    print(f"$ python {' '.join(sys.argv)}", flush=True)
    sides, precision, skipped = build(args, device)
    common = dict(date=str(datetime.date.today()), host=platform.node(), torch=torch.__version__,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
                  model=args.model, input_size=args.input_size, batch=args.batch, steps=args.steps, cfg=args.cfg)
    lines = []
    if skipped:
        lines.append(dict(common, side="peer", skipped=skipped))
        print(json.dumps(lines[-1]), flush=True)
    warmed = set()
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        rates = {}
        for label in order:
            side = sides[label]
            seconds = time_side(side, args.batches, 0 if label in warmed else args.warmup, device)
            warmed.add(label)
            rates[label] = args.batches * args.batch / seconds
            lines.append(dict(common, side=label.split()[0], round=r, sampler=side.name, precision=side.precision,
                              compile=side.compiled, images=args.batches * args.batch, seconds=round(seconds, 3),
                              images_per_s=round(rates[label], 4)))
            print(json.dumps(lines[-1]), flush=True)
        ours = next(k for k in rates if k.startswith("ours"))
        ratio = {f"ours/{k}": round(rates[ours] / rates[k], 3) for k in rates if k.startswith("peer")}
        if ratio:
            lines.append(dict(common, round=r, ratio=ratio, ours=ours))
            print(json.dumps(lines[-1]), flush=True)
    if args.out_jsonl:
        with open(args.out_jsonl, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
