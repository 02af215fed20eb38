"""Batch size against time on a CPU: what train/auto.py's batch rule and `eval RUN`'s sampling
batch (`sampling.generate.CPU_SAMPLE_BATCH`) rest on (issue 30).

    python benchmarks/cpu_batch.py [--model DiT-Ti/4] [--side 28] [--channels 1] [--repeats 2]
                                   [--precision auto|fp32|bf16]

For each training batch: seconds per optimizer step of the no-flag run's configuration (the
modern blocks, flow; `--precision auto`, the default, is what `train` picks: bf16 where the CPU
has native bf16, else fp32; `fp32` emulates a CPU without it) through `train.auto.measure_step_seconds`
(a warm-up and 3 timed steps), and images per second. For each sampling batch (rows of one
forward; guidance doubles the images): milliseconds per row of an eval-mode forward. The
allocator setting of every `ditforge` command (`keep_freed_host_memory`) is applied first, as
the commands do. Run it alone: the times are the point.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main() -> None:
    from ditforge.models import create_model
    from ditforge.train.auto import MODERN_BLOCKS, cpu_flags, CPU_BF16_FLAGS, measure_step_seconds
    from ditforge.train.device import keep_freed_host_memory

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-Ti/4")
    p.add_argument("--side", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-batches", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--sample-rows", type=int, nargs="+", default=[64, 128, 256, 1000])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    args = p.parse_args()
    keep_freed_host_memory()
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if any(f in cpu_flags() for f in CPU_BF16_FLAGS) else "fp32"
    shape = (args.channels, args.side, args.side)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "precision": precision, "model": args.model, "shape": shape}))
    for _ in range(args.repeats):
        for b in args.train_batches:
            s = measure_step_seconds(args.model, shape, args.classes, b, precision, dict(MODERN_BLOCKS), "flow", steps=3)
            print(json.dumps({"train_batch": b, "s_per_step": round(s, 3), "images_per_s": round(b / s, 1)}))
    model = create_model(args.model, input_size=args.side, in_channels=args.channels, num_classes=args.classes,
                         learn_sigma=False, **MODERN_BLOCKS).eval()
    for _ in range(args.repeats):
        for rows in args.sample_rows:
            x = torch.randn(rows, *shape)
            t, y = torch.rand(rows), torch.randint(0, args.classes, (rows,))
            with torch.no_grad():
                model(x, t, y)
                t0 = time.perf_counter()
                for _ in range(3):
                    model(x, t, y)
            print(json.dumps({"sample_rows": rows, "ms_per_row": round((time.perf_counter() - t0) / 3 / rows * 1e3, 2)}))


if __name__ == "__main__":
    main()
