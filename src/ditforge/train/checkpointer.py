"""Checkpoints of a running training: check the weights, gather the full states, write them,
remember the last one.

A checkpoint is written only when its weights are finite. The losses that the reporter checks
are computed before each update, so the update of a checkpoint step itself is seen by no loss:
the weights of the model and of the EMA are checked here instead (one `isfinite` per tensor, at
checkpoint steps only; under FSDP each rank checks its shards and the verdict is all-reduced).
So "the last good checkpoint" that a diverged run names always holds finite weights.

Under FSDP the gathers are collectives, so every rank calls `save`; rank 0 alone writes the
folder (atomically, keeping the last `keep_last`, `train/checkpoint.py`) and every rank waits
for it, so no rank runs ahead of a checkpoint that is not on disk yet. Every rank records the
folder's path (a function of the step), so every rank names the same last checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ditforge.errors import NonFiniteLossError, on_every_rank
from ditforge.models import DiT
from ditforge.train import distributed
from ditforge.train.checkpoint import checkpoint_dir, save_checkpoint


def weights_finite(modules: list[torch.nn.Module], d: distributed.Dist) -> bool:
    """Whether every parameter of `modules` is finite on every rank: a host sync and a collective
    under torchrun (each rank looks at its own shard of an FSDP2 parameter)."""
    from torch.distributed.tensor import DTensor

    flags = [
        torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()
        for module in modules
        for p in module.parameters()
    ]
    return distributed.all_true(torch.stack(flags).all(), d)


class Checkpointer:
    """Saves model, EMA and optimizer with the run's metadata; `last` is the last good checkpoint
    (the one resumed from until a new one is written), the same on every rank."""

    def __init__(
        self,
        run_dir: Path,
        d: distributed.Dist,
        model: DiT,
        ema: DiT,
        opt: torch.optim.Optimizer,
        meta: dict[str, Any],
        keep_last: int,
        last: Path | None = None,
        extras: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] | None = None,
    ):
        self.run_dir, self.d, self.model, self.ema, self.opt = run_dir, d, model, ema, opt
        self.meta, self.keep_last, self.last = meta, keep_last, last
        self.extras = extras or {}  # name -> (module, optimizer) trained beside the model (REPA's projector)

    def save(self, step: int, position: int) -> Path | None:
        """Write checkpoint `step` (with `position` images seen); its folder on rank 0, else None.
        Raises `NonFiniteLossError` naming `last` (on every rank) if the weights are not finite."""
        modules = [self.model, self.ema, *(module for module, _ in self.extras.values())]
        if not weights_finite(modules, self.d):
            error = NonFiniteLossError.stopped(
                f"the weights became NaN or Inf in the update of step {step}; its checkpoint was not written", self.last)
            raise on_every_rank(error, self.d.is_main)  # every rank stops; rank 0 says so
        states = (
            distributed.full_model_state(self.model),
            distributed.full_model_state(self.ema),
            distributed.full_optimizer_state(self.model, self.opt),
        )  # collectives under FSDP: every rank takes part
        extras = {
            name: (distributed.full_model_state(module), distributed.full_optimizer_state(module, opt))
            for name, (module, opt) in self.extras.items()
        }
        # rank 0 writes; a write it fails (a full disk: `write_failures.py`) stops every rank with its
        # one line, and every rank waits for it (a collective, as the barrier it replaces)
        path = distributed.raise_together(self.d, lambda: save_checkpoint(
            self.run_dir, step, *states, dict(self.meta, position=position), self.keep_last, extras) if self.d.is_main else None)
        self.last = checkpoint_dir(self.run_dir, step)
        return path
