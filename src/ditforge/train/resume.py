"""Resume a run from its latest checkpoint, or start it: the first named part of the loop.

Rerunning the same command continues the run (EDM2's rule): the run folder's `config.json`
must describe the same run, up to the fields in `RESUMABLE_CHANGES`, which change how a run
reports or how fast it goes, not what it learns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ditforge.config import TrainConfig
from ditforge.data.training_data import TrainingData
from ditforge.errors import UserError
from ditforge.models import DiT, count_parameters
from ditforge.train import distributed
from ditforge.train.checkpoint import check_weights, latest_checkpoint, read_extra_state, read_training_state
from ditforge.train.step import TrainStep

log = logging.getLogger("ditforge.train")

# Fields that may differ when a run is resumed: they change how it reports, not what it learns.
RESUMABLE_CHANGES = {
    "steps", "log_every", "ckpt_every", "keep_last", "sample_every", "sample_steps", "sample_cfg",
    "sample_sampler",
    "eval_every", "eval_per_class", "eval_fid",
    "grad_accum", "parallel", "compile", "grad_checkpoint", "prefetch",  # same math, other speed or memory
}


@dataclass
class Start:
    """Where the loop begins: the optimizer step, the images seen, the checkpoint resumed (if any)."""

    step: int
    position: int
    checkpoint: Path | None


def check_same_run(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume a folder that holds a run with other settings (before any work is done)."""
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return
    saved = TrainConfig.load(saved_path).to_dict()
    now = cfg.to_dict()
    diff = [k for k in now if k not in RESUMABLE_CHANGES and now[k] != saved.get(k) and k != "run_dir"]
    if diff:
        details = "; ".join(f"{k}: {saved.get(k)!r} in the folder, {now[k]!r} now" for k in diff)
        raise UserError(
            f"run folder {str(run_dir)!r} holds a different run ({details}); "
            "rerun with the same settings to resume, or pass a new --run-dir"
        )


def resume_or_start(
    cfg: TrainConfig, d: distributed.Dist, model: DiT, stepper: TrainStep, data: TrainingData, precision: str
) -> Start:
    """Load the latest checkpoint of `cfg.run_dir` into model, EMA and optimizer, or create the
    folder; either way write the run's `config.json` (rank 0)."""
    run_dir = Path(cfg.run_dir)
    start = Start(0, 0, latest_checkpoint(run_dir))
    if start.checkpoint is not None:
        ckpt = start.checkpoint
        # rank 0 reads the tensors and broadcasts them: no other rank holds the whole checkpoint
        model_sd, ema_sd, opt_sd, state = read_training_state(ckpt, tensors=d.is_main)
        if d.is_main and not stepper.fsdp:
            check_weights(model, model_sd, str(ckpt / "model.safetensors"))
        distributed.load_full_state(model, model_sd, stepper.opt, opt_sd, d)
        distributed.load_full_state(stepper.ema.module, ema_sd, None, None, d)
        if stepper.repa is not None:  # REPA's projector and its optimizer
            proj_sd, proj_opt = read_extra_state(ckpt, "projector") if d.is_main else ({}, {})
            distributed.load_full_state(stepper.repa.projector, proj_sd, stepper.repa_opt, proj_opt, d)
        start.step, start.position = state["step"], state["position"]
        if d.is_main:
            log.info("resumed from %s (step %d, %d images seen)", ckpt, start.step, start.position)
    elif d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "new run in %s: %s, %s parameters, %d %s images %s, %s on %s x %d",
            run_dir, cfg.model.name, f"{count_parameters(model):,}", len(data), data.name,
            "x".join(map(str, data.shape)), precision, d.device.type, d.world_size,
        )
    if d.is_main:
        cfg.save(run_dir / "config.json")
    return start
