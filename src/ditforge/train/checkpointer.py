"""Checkpoints of a running training: gather the full states, write them, remember the last one.

Under FSDP the gathers are collectives, so every rank calls `save`; rank 0 alone writes the
folder (atomically, keeping the last `keep_last`, `train/checkpoint.py`) and every rank waits
for it, so no rank runs ahead of a checkpoint that is not on disk yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ditforge.models import DiT
from ditforge.train import distributed
from ditforge.train.checkpoint import save_checkpoint


class Checkpointer:
    """Saves model, EMA and optimizer with the run's metadata; `last` is the last good checkpoint
    (the one resumed from until a new one is written; on ranks other than 0 it stays that)."""

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
        """Write checkpoint `step` (with `position` images seen); its folder on rank 0, else None."""
        states = (
            distributed.full_model_state(self.model),
            distributed.full_model_state(self.ema),
            distributed.full_optimizer_state(self.model, self.opt),
        )  # collectives under FSDP: every rank takes part
        extras = {
            name: (distributed.full_model_state(module), distributed.full_optimizer_state(module, opt))
            for name, (module, opt) in self.extras.items()
        }
        path = None
        if self.d.is_main:
            path = save_checkpoint(self.run_dir, step, *states, dict(self.meta, position=position), self.keep_last, extras)
        distributed.barrier(self.d)
        self.last = path or self.last
        return path
