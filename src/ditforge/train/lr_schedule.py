"""The learning rate of each optimizer step: `--lr-schedule` after `--lr-warmup`.

    constant   lr at every step (the paper's DiT, SiT, LightningDiT): the default
    linear     lr down to 0 at the last step, in a straight line
    cosine     lr * (1 + cos(pi * progress)) / 2 (Loshchilov & Hutter 2017, SGDR, without restarts)

A warm-up of W steps first rises linearly, lr * (step + 1) / W for steps 0..W-1, and the decay
runs over the steps after it: progress = (step - W) / (steps - W) at step `step` (0-based) of a
run of `steps`, so the first step after the warm-up takes the full lr and the last one lr / (steps - W)
(linear) or about lr * (pi / (steps - W))^2 / 4 (cosine), not 0. The rate is a function of the
step alone: a resumed run takes the same rates as one that never stopped (nothing to save), and
a run resumed with another `--steps` decays over the new length from where it stands.
"""

from __future__ import annotations

import math

import torch

from ditforge.config import LR_SCHEDULES

__all__ = ["lr_at", "set_lr"]


def lr_at(step: int, lr: float, steps: int, schedule: str = "constant", warmup: int = 0) -> float:
    """The learning rate of optimizer step `step` (0-based) of a run of `steps` steps."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    decay_steps = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)  # 0 at the first step after the warm-up
    if schedule == "linear":
        return lr * (1.0 - progress)  # ... and one step short of 0 at the last
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of `optimizer` the rate `lr` (before its step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
