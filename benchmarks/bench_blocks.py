"""Cost of the modern block options (RMSNorm, SwiGLU, 2-D RoPE, qk-norm) in a training step.

One fp32 (or bf16-autocast) training step of a DiT (forward, MSE to a random target, backward,
AdamW) on random inputs, for the paper's blocks and for each option alone and all together,
in one process; the options are timed in alternating rounds (the machine is shared) and the
median of the rounds is printed with its ratio to the paper's blocks.

    .venv/bin/python benchmarks/bench_blocks.py                       # DiT-Ti/2 on 1x8x8, batch 128 (the digits)
    .venv/bin/python benchmarks/bench_blocks.py --model DiT-Ti/4 --input-size 28 --precision bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ditforge.models import create_model

OPTIONS = {
    "paper": {}, "rms": {"norm": "rms"}, "swiglu": {"mlp": "swiglu"}, "rope": {"rope": True}, "qk-norm": {"qk_norm": True},
    "all four": {"norm": "rms", "mlp": "swiglu", "rope": True, "qk_norm": True},
}


def step_seconds(model: torch.nn.Module, opt: torch.optim.Optimizer, x, t, y, precision: str, steps: int) -> float:
    """Mean seconds of `steps` training steps (after the caller's warm-up)."""
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x, t, y)  # (N, 2C, H, W)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-Ti/2")
    p.add_argument("--input-size", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=10, help="timed steps a round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.input_size, args.input_size, generator=g)  # (N, C, H, W)
    t = torch.randint(0, 1000, (args.batch,), generator=g)  # (N,)
    y = torch.randint(0, 10, (args.batch,), generator=g)  # (N,)
    runs = {}
    for name, kw in OPTIONS.items():
        torch.manual_seed(0)
        model = create_model(args.model, input_size=args.input_size, in_channels=args.channels, num_classes=10, **kw)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step_seconds(model, opt, x, t, y, args.precision, 3)  # warm-up
        runs[name] = (model, opt, [])
    for _ in range(args.rounds):
        for model, opt, times in runs.values():
            times.append(step_seconds(model, opt, x, t, y, args.precision, args.steps))
    base = statistics.median(runs["paper"][2])
    print(f"{args.model} on {args.channels}x{args.input_size}x{args.input_size}, batch {args.batch}, {args.precision}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds of {args.steps} steps")
    for name, (_, _, times) in runs.items():
        ms = statistics.median(times) * 1000
        print(f"{name:>9}: {ms:6.0f} ms a step  ({ms / 1000 / base:.2f}x the paper's blocks)")


if __name__ == "__main__":
    main()
