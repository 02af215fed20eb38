"""Exponential moving average of the weights (the paper samples from it; decay 0.9999)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """Decay for the update after `step` optimizer steps.

    With warm-up the decay is min(decay, (1 + step) / (10 + step)) (the schedule of
    TensorFlow's ExponentialMovingAverage with num_updates): a flat 0.9999 is still ~90% its
    initial weights after 1,000 steps, useless for short runs. Without it: the paper's flat decay.
    """
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


class EMA:
    """Shadow copy of a model; `update` does ema <- decay * ema + (1 - decay) * model."""

    def __init__(self, model: nn.Module):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """Parameters pair up by order; under FSDP both modules are sharded alike, so each rank
        updates its own shard."""
        shadow = [p.detach() for p in self.module.parameters()]
        params = [p.detach() for p in model.parameters()]
        # lerp(ema, p, 1 - decay) = ema + (1 - decay) (p - ema), one fused op per tensor list
        torch._foreach_lerp_(shadow, params, 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
