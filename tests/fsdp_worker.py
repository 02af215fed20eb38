"""Run by tests/test_gpu_paths.py under `torchrun --nproc_per_node 2` (gloo, CPU): FSDP2 as
`ditforge train --parallel fsdp` wraps it, through the training step it runs.

Counts the gradient reduce-scatters of two optimizer steps with 1 and with 4 micro-batches
(accumulation must reduce once per step, in the last micro-batch's backward), and reads the
dtype of the all-gathered parameters in the forward for fp32 and bf16 training (bf16 gathers
bf16 parameters: `MixedPrecisionPolicy`), and the losses of three clipped steps in fp32 and in
fp16 with loss scaling (the GradScaler on sharded gradients). Rank 0 writes the report as JSON
to argv[1].
"""

import json
import sys

import torch
import torch.distributed as dist

from ditforge.config import TrainConfig
from ditforge.models import create_model
from ditforge.train import distributed
from ditforge.train.step import TrainStep

STEPS = 2


def count_reduce_scatters() -> dict:
    """Wrap the collectives FSDP2 reduces gradients with (by torch version); count outer calls."""
    state = {"calls": 0, "depth": 0}
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        real = getattr(dist, name, None)
        if real is None:
            continue

        def counted(*args, _real=real, **kwargs):
            state["calls"] += state["depth"] == 0
            state["depth"] += 1
            try:
                return _real(*args, **kwargs)
            finally:
                state["depth"] -= 1

        setattr(dist, name, counted)
    return state


def build(d: distributed.Dist, grad_accum: int, precision: str, grad_clip: float = 0.0) -> tuple[TrainStep, TrainConfig]:
    cfg = TrainConfig.from_dict(dict(model=dict(name="DiT-Ti/4"), global_batch=16, grad_accum=grad_accum, parallel="fsdp",
                                     optim=dict(grad_clip=grad_clip)))
    torch.manual_seed(0)
    model = create_model(cfg.model.name, input_size=8, in_channels=1, num_classes=10)
    return TrainStep(cfg, model, d, precision), cfg


def batches(cfg: TrainConfig, d: distributed.Dist):
    micro = distributed.split_batch(cfg.global_batch, d, cfg.grad_accum)
    g = torch.Generator().manual_seed(d.rank)
    out = [(torch.randn(micro, 1, 8, 8, generator=g), torch.randint(0, 10, (micro,), generator=g)) for _ in range(cfg.grad_accum)]
    offsets = [d.rank * micro * cfg.grad_accum + i * micro for i in range(cfg.grad_accum)]
    return out, offsets


def main(out: str) -> None:
    d = distributed.init()
    counter = count_reduce_scatters()
    report = {"steps": STEPS, "reduce_scatters": {}, "param_dtype": {}}
    for accum in (1, 4):
        stepper, cfg = build(d, accum, "fp32")
        report["groups"] = len(stepper.model.blocks) + 1  # one FSDP group per block, and the root
        data = batches(cfg, d)
        counter["calls"] = 0
        for step in range(STEPS):
            stepper(step, *data)
        report["reduce_scatters"][str(accum)] = counter["calls"]
    for precision in ("fp32", "bf16"):
        stepper, cfg = build(d, 1, precision)
        seen = []
        hook = stepper.model.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.append(str(m.qkv.weight.dtype)))
        stepper(0, *batches(cfg, d))
        hook.remove()
        report["param_dtype"][precision] = seen[0]
    # fp16 with loss scaling and clipping: GradScaler unscales the sharded (DTensor) gradients
    report["losses"] = {}
    for precision in ("fp32", "fp16"):
        stepper, cfg = build(d, 1, precision, grad_clip=0.5)
        data = batches(cfg, d)
        report["losses"][precision] = [float(stepper(step, *data)) for step in range(3)]
    if d.is_main:
        with open(out, "w") as f:
            json.dump(report, f)
    distributed.shutdown()
    distributed.end_process(0)  # as `ditforge` ends: FSDP2 keeps the group alive past shutdown (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
