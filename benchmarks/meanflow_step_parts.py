"""Where a MeanFlow distillation step's time goes on this machine: the plain forward with gradient
of the batch, the frozen teacher's forward of it, and the written-out JVP (`models/dit.py`
`network_jvp`, value and tangent, no gradient) of the rows that take one; and whether stacking a
linear layer's value and tangent into one matrix product of twice the rows is faster than two.

    .venv/bin/python benchmarks/meanflow_step_parts.py [--model DiT-Ti/2 --size 8 --batch 128 --share 0.25]

(benchmarks/README, "Where a distillation step's time goes".) fp32, random weights and inputs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ditforge.models import create_model
from ditforge.objectives import model_options

BLOCKS = dict(norm="rms", mlp="swiglu", rope=True, qk_norm=True)


def ms(fn, calls: int = 8, warmup: int = 2) -> float:
    """Milliseconds a call of `fn`, the mean of `calls` after `warmup`."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="DiT-Ti/2")
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--share", type=float, default=0.25, help="the share of rows at r = t (no JVP): the fine-tune's")
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    make = lambda: create_model(a.model, input_size=a.size, in_channels=1, num_classes=10, **BLOCKS, **model_options("meanflow"))
    model, teacher = make(), make().eval()
    n, j = a.batch, round(a.batch * (1 - a.share))
    x, s, h, y = torch.randn(n, 1, a.size, a.size), torch.rand(n), torch.rand(n) * 0.5, torch.randint(0, 10, (n,))
    dx = torch.randn_like(x)

    def jvp():
        with torch.no_grad():
            model.network_jvp(x[:j], s[:j], h[:j], model.y_embedder(y[:j], False), dx[:j], -torch.ones(j), torch.ones(j))

    def teach():
        with torch.no_grad():
            teacher(x, s, y, interval=torch.zeros_like(h))

    print(f"{a.model} at 1x{a.size}x{a.size}, batch {n}, fp32: forward with gradient {ms(lambda: model(x, s, y, interval=h)):.1f} ms, "
          f"teacher's forward {ms(teach):.1f} ms, JVP of {j} rows {ms(jvp):.1f} ms")
    tokens = n * (a.size // int(a.model.split("/")[1])) ** 2
    width = model.pos_embed.shape[-1]
    for k, m in ((width, 4 * width), (width, 3 * width), (width, width)):
        v, t, w, b = torch.randn(tokens, k), torch.randn(tokens, k), torch.randn(m, k), torch.randn(m)
        two = ms(lambda: (F.linear(v, w, b), F.linear(t, w)), calls=50, warmup=5)
        one = ms(lambda: F.linear(torch.cat([v, t]), w), calls=50, warmup=5)
        print(f"linear {tokens}x{k} -> {m}, value and tangent: two products {two:.2f} ms, one stacked {one:.2f} ms")


if __name__ == "__main__":
    main()
