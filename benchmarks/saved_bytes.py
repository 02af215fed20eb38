"""Bytes a DiT training step keeps for backward, per image, for each --grad-checkpoint mode.

Measured on the CPU (no GPU needed): the forward and loss of `train/step.py` under autocast at
batches 1 and 2 (`ditforge.train.activation_memory`). On the CPU, bf16 attention of few tokens
runs as two explicit products; `--attention sdpa` (the default here) makes it take
F.scaled_dot_product_attention as on a GPU, whose flash kernel keeps q, k, v, the output and
its log-sum-exp, as CPU flash does.

    python benchmarks/saved_bytes.py --model DiT-XL/2 --input-size 32 --precision bf16
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import ditforge.models.attention as attention_kernels
from ditforge.config import TrainConfig
from ditforge.objectives import objective_of_run
from ditforge.models import create_model
from ditforge.models.recompute import MODES
from ditforge.train.activation_memory import saved_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated --grad-checkpoint specs")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "as-run"],
                   help="sdpa: F.scaled_dot_product_attention as on a GPU; as-run: what this CPU runs")
    p.add_argument("--per-block", action="store_true", help="also print every block's bytes")
    args = p.parse_args()
    if args.attention == "sdpa":
        attention_kernels.CPU_EXPLICIT_ATTENTION_MAX_TOKENS = 0
    torch.manual_seed(0)
    model = create_model(args.model, input_size=args.input_size, in_channels=args.channels)
    cfg = TrainConfig.from_dict(dict(model=dict(name=args.model), global_batch=2))
    objective = objective_of_run(cfg)
    print(f"# {args.model} {args.channels}x{args.input_size}x{args.input_size} {args.precision} on cpu, torch "
          f"{torch.__version__}, attention {args.attention}, load average {os.getloadavg()[0]:.1f}")
    print("| mode | MB / image | MiB / image | vs none | per block (MB) | embedders + final + loss (MB) | "
          "saved_tensors_hooks see (MB) | batch-independent (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for spec in args.modes.split(","):
        model.grad_checkpointing = spec
        t0 = time.perf_counter()
        r = saved_bytes(model, objective, cfg, args.precision, torch.device("cpu"))
        blocks = r.per_block()
        base = base or r.per_image
        rest = r.per_image - sum(blocks)
        span = f"{min(blocks) / 1e6:.2f}-{max(blocks) / 1e6:.2f}" if min(blocks) != max(blocks) else f"{blocks[0] / 1e6:.2f}"
        print(f"| {model.grad_checkpointing} | {r.per_image / 1e6:.1f} | {r.per_image / 2**20:.1f} | "
              f"{r.per_image / base:.2f} | {span} | {rest / 1e6:.2f} | {r.hooks_per_image / 1e6:.1f} | {r.fixed / 1e6:.0f} |"
              f"  <!-- {time.perf_counter() - t0:.0f} s, attention ops {sorted(r.attention_ops)} -->", flush=True)
        if args.per_block:
            print("   " + ", ".join(f"{k}: {v / 1e6:.2f}" for k, v in r.per_image_by_part.items()))


if __name__ == "__main__":
    main()
