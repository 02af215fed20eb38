"""Resume a run from its latest checkpoint, or start it: the first named part of the loop.

Rerunning the same command continues the run (EDM2's rule): the run folder's `config.json`
must describe the same run, up to the fields in `RESUMABLE_CHANGES`, which change how a run
reports or how fast it goes, not what it learns.

Under torchrun rank 0 alone reads the run's files before the others need them (`config.json`,
the checkpoint's tensors, which it then broadcasts), and what it finds wrong is every rank's
error (`distributed.raise_together`): no rank waits in a collective for one that has failed,
and the user reads one line. Every checkpoint records the precision and the device type it was
trained with; a run resumed on another device type says that it is no longer bit-identical
(the step's noise generator runs on the device) and keeps its precision where it can
(`device.resolve_precision`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditforge.config import TrainConfig
from ditforge.data.training_data import TrainingData
from ditforge.errors import DamagedFileError, UserError
from ditforge.models import DiT, count_parameters
from ditforge.train import distributed
from ditforge.train.checkpoint import (
    RESUME_KEYS,
    check_weights,
    latest_checkpoint,
    read_extra_state,
    read_state,
    read_training_state,
    set_aside_damaged,
    tidy_checkpoints,
)
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
class Found:
    """What a run folder holds before anything is built: its latest checkpoint (None: a new run)
    and that checkpoint's state.json."""

    checkpoint: Path | None
    state: dict[str, Any] | None

    def recorded(self, key: str) -> Any:
        """What the checkpoint recorded under `key` (`precision`, `device`); None if nothing did
        (a new run, or a checkpoint written before the record existed)."""
        return (self.state or {}).get(key)


@dataclass
class Start:
    """Where the loop begins: the optimizer step, the images seen, the checkpoint resumed (if any)."""

    step: int
    position: int
    checkpoint: Path | None


def saved_config(run_dir: Path) -> tuple[TrainConfig | None, str | None]:
    """The config a run folder holds (None in a new folder), and a note when `config.json` was
    damaged and the config came from the latest checkpoint instead, which records it whole
    (an earlier version wrote config.json in place, so a kill could cut it short)."""
    path = run_dir / "config.json"
    if not path.exists():
        return None, None
    try:
        return TrainConfig.load(path), None
    except DamagedFileError as e:
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise UserError(f"{e}, and no checkpoint of the run records its config: delete it to start the run afresh") from None
        note = f"{e}: the run's config is taken from {latest}, and {path.name} is written whole again"
        return TrainConfig.from_dict(read_state(latest, ("config",))["config"]), note


def check_same_run(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume a folder that holds a run with other settings (before any work is done)."""
    saved_cfg, note = saved_config(run_dir)
    if saved_cfg is None:
        return
    if note:
        log.warning("%s", note)
    saved = saved_cfg.to_dict()
    now = cfg.to_dict()
    diff = [k for k in now if k not in RESUMABLE_CHANGES and now[k] != saved.get(k) and k != "run_dir"]
    if diff:
        details = "; ".join(f"{k}: {saved.get(k)!r} in the folder, {now[k]!r} now" for k in diff)
        raise UserError(
            f"run folder {str(run_dir)!r} holds a different run ({details}); "
            "rerun with the same settings to resume, or pass a new --run-dir"
        )
    if cfg.steps != saved_cfg.steps and cfg.optim.lr_schedule != "constant":
        log.warning("the %s learning rate decays to 0 at step %d now, not at %d: the steps left follow the new length",
                    cfg.optim.lr_schedule, cfg.steps, saved_cfg.steps)


def find_run(cfg: TrainConfig, d: distributed.Dist) -> Found:
    """What `cfg.run_dir` holds, first of all: rank 0 clears what killed saves left in its
    checkpoints folder (`tidy_checkpoints`), refuses a folder that holds another run
    (`check_same_run`) and checks the latest checkpoint's files against the sizes and checksums
    its state.json records, setting a damaged one aside as `step-N.damaged` with one line, so the
    previous good one is resumed (`set_aside_damaged`); then every rank finds the latest
    checkpoint and reads its state.json.
    An error on any rank is every rank's (a collective under torchrun)."""
    run_dir = Path(cfg.run_dir)

    def tidy_and_check() -> None:
        if d.is_main:  # the only reader of config.json, and the only writer of the checkpoints folder
            for line in tidy_checkpoints(run_dir):
                log.warning("%s", line)
            check_same_run(cfg, run_dir)
            for line in set_aside_damaged(run_dir):  # the latest checkpoint's files checked; a damaged one set aside
                log.warning("%s", line)

    def latest() -> Found:  # after the tidy: every rank sees the same folders
        ckpt = latest_checkpoint(run_dir)
        return Found(ckpt, read_state(ckpt, RESUME_KEYS) if ckpt is not None else None)

    distributed.raise_together(d, tidy_and_check)
    return distributed.raise_together(d, latest)


def _read_checkpoint(ckpt: Path, d: distributed.Dist, model: DiT, stepper: TrainStep):
    """(model, EMA, optimizer, state.json, projector and its optimizer) of `ckpt`: the tensors on
    rank 0 only, which broadcasts them (no other rank holds the whole checkpoint); the RNG
    states restored on every rank."""
    model_sd, ema_sd, opt_sd, state = read_training_state(ckpt, tensors=d.is_main)
    if d.is_main and not stepper.fsdp:
        check_weights(model, model_sd, str(ckpt / "model.safetensors"))
    projector = ({}, {})
    if stepper.repa is not None and d.is_main:  # REPA's projector and its optimizer
        projector = read_extra_state(ckpt, "projector")
    return model_sd, ema_sd, opt_sd, state, projector


def resume_or_start(
    cfg: TrainConfig, d: distributed.Dist, model: DiT, stepper: TrainStep, data: TrainingData, precision: str,
    found: Found | None = None,
) -> Start:
    """Load the latest checkpoint of `cfg.run_dir` (`found`, default `find_run`'s) into model, EMA
    and optimizer, or create the folder; either way write the run's `config.json` (rank 0)."""
    run_dir = Path(cfg.run_dir)
    found = find_run(cfg, d) if found is None else found
    start = Start(0, 0, found.checkpoint)
    if start.checkpoint is not None:
        ckpt = start.checkpoint
        # a corrupt file or weights that do not fit, found by rank 0: every rank's error, before the broadcasts
        model_sd, ema_sd, opt_sd, state, (proj_sd, proj_opt) = distributed.raise_together(
            d, lambda: _read_checkpoint(ckpt, d, model, stepper))
        distributed.load_full_state(model, model_sd, stepper.opt, opt_sd, d)
        distributed.load_full_state(stepper.ema.module, ema_sd, None, None, d)
        if stepper.repa is not None:
            distributed.load_full_state(stepper.repa.projector, proj_sd, stepper.repa_opt, proj_opt, d)
        start.step, start.position = state["step"], state["position"]
        if d.is_main:
            log.info("resumed from %s (step %d, %d images seen, %s on %s)", ckpt, start.step, start.position,
                     precision, d.device.type)
            _say_what_changed(found, start.step, precision, d)
    elif d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "new run in %s: %s, %s parameters, %d %s images %s, %s on %s x %d",
            run_dir, cfg.model.name, f"{count_parameters(model):,}", len(data), data.name,
            "x".join(map(str, data.shape)), precision, d.device.type, d.world_size,
        )
    if d.is_main:
        cfg.save(run_dir / "config.json")  # atomic, and only when it changes
    return start


def _say_what_changed(found: Found, step: int, precision: str, d: distributed.Dist) -> None:
    """A line for each way the resumed run differs from the one that wrote its checkpoint."""
    device, trained_in = found.recorded("device"), found.recorded("precision")
    if device is not None and device != d.device.type:
        log.warning(
            "the run moves from %s to %s at step %d: the training noise is drawn on the device, so from here on "
            "it is no longer bit-identical to an uninterrupted run on %s", device, d.device.type, step, device)
    if trained_in is not None and trained_in != precision:
        log.warning("trained in %s up to step %d, continues in %s: %s does not run on %s", trained_in, step, precision,
                    trained_in, d.device.type)
