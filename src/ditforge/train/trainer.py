"""The training loop: data -> diffusion loss -> AdamW -> EMA -> logs, previews, checkpoints.

`train(cfg)` starts a run in `cfg.run_dir`, or resumes it from its latest checkpoint when the
folder already holds one (rerunning the same command continues the run). Everything that
decides the next step is restored: weights, EMA, optimizer moments and step, the data position
and the RNG state, so a resumed run ends with the same weights as an uninterrupted one.

The loop reads top to bottom over named parts, each in its own module: `find_run` and
`resume_or_start` (train/resume.py), `init_from.prepare` (the weights of --init-from at a fresh
start, train/init_from.py), the step (train/step.py), `Reporter` (log line,
TensorBoard, finiteness of the losses; train/reporter.py), `Checkpointer` (finiteness of the
weights, train/checkpointer.py) and `Previewer` (preview grids, in-training evaluation;
train/previewer.py). Host syncs (`.item()`) happen only at log and checkpoint steps: the step
itself queues work. SIGTERM, SIGUSR1 or a first Ctrl-C (`preemption.py`) ends the loop after the
step in flight with a checkpoint of it (`stop_at`); under torchrun at the next step where the
ranks agree (every `AGREE_EVERY` steps, the only extra sync).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ditforge import __version__
from ditforge.config import TrainConfig
from ditforge.data.loader import InfiniteLoader, Prefetcher
from ditforge.data.training_data import TrainingData, open_training_data
from ditforge.errors import UserError, on_every_rank
from ditforge.folder_lock import FolderLock, folder_lock_file
from ditforge.models import DiT, create_model
from ditforge.objectives import model_options, objective_of_run
from ditforge.preemption import StopRequest, Stopped
from ditforge.repa.aligner import build_aligner, training_source
from ditforge.train import distributed, init_from
from ditforge.train.checkpointer import Checkpointer
from ditforge.train.device import enable_tf32, keep_freed_host_memory, resolve_precision
from ditforge.train.previewer import Previewer
from ditforge.train.reporter import Reporter
from ditforge.train.resume import find_run, resume_or_start
from ditforge.train.step import TrainStep

log = logging.getLogger("ditforge.train")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_loss: float
    checkpoint: Path | None
    preview: Path | None
    is_main: bool = True  # rank 0 (the process that writes and reports)


def build_model(cfg: TrainConfig, data: TrainingData) -> tuple[DiT, dict[str, Any]]:
    """The DiT for this data: input size and channels follow from the data, never from a flag."""
    c, h, w = data.shape
    check_patch(cfg.model.name, data.shape, cfg.data)
    args = dict(
        name=cfg.model.name,
        input_size=h,
        in_channels=c,
        num_classes=data.num_classes,
        learn_sigma=cfg.model.learn_sigma,
        class_dropout_prob=cfg.model.class_dropout_prob,
        **cfg.model.block_options(),
        **model_options(objective_of_run(cfg)),  # MeanFlow's interval (and iMF's scale) input; nothing for the others
    )
    try:
        return create_model(**args), args
    except ValueError as e:
        raise UserError(f"model {cfg.model.name} does not fit data of shape {c}x{h}x{w}: {e}") from None


def check_patch(name: str, shape: tuple[int, int, int], data: str) -> None:
    """A one-line UserError unless the patch size of model `name` (DiT-XL/2: 2) divides the
    (C, h, w) grid of the data; it names the patch sizes that do and a model with one."""
    from ditforge.models.dit import MODEL_PATCH_SIZES

    c, h, w = shape
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if not patch.isdigit() or size not in MODEL_PATCH_SIZES or (h % int(patch) == 0 and w % int(patch) == 0):
        return
    fits = [p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0]
    models = [f"DiT-{size}/{p}" for p in MODEL_PATCH_SIZES[size] if p in fits]
    raise UserError(
        f"model {name}: patch size {patch} does not divide the {h}x{w} grid of the data {data!r} ({c}x{h}x{w}); "
        f"patch sizes that do: {', '.join(map(str, fits))}" + (f"; e.g. --model {models[-1]}" if models else
                                                             f"; DiT-{size} has patch sizes {', '.join(map(str, MODEL_PATCH_SIZES[size]))} only")
    )


def run_metadata(cfg: TrainConfig, model_args: dict[str, Any], data: TrainingData, precision: str,
                 device: torch.device, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every checkpoint records besides tensors: enough to rebuild the model and decode its
    samples, and the resolved precision and the device type it was trained with (a resume on
    another device keeps the one and says that the other changed, train/resume.py), and `source`,
    what the run's initial weights came from (--init-from: train/init_from.py `Init.record`)."""
    return dict(
        ditforge_version=__version__,
        config=cfg.to_dict(),
        precision=precision,
        device=device.type,
        model_args=model_args,
        data=dict(name=data.name, class_names=data.class_names, shape=list(data.shape), count=len(data), identity=data.identity),
        autoencoder=data.autoencoder,
        init_from=source,  # None: random initial weights
    )


def open_loader(cfg: TrainConfig, data: TrainingData, position: int, d: distributed.Dist, source=None) -> InfiniteLoader | Prefetcher:
    """This rank's batches from `position` images on (from `source`, default the data's); read
    ahead in a thread on a GPU."""
    loader = InfiniteLoader(data.source if source is None else source, cfg.global_batch, cfg.seed, cfg.hflip, position, d.rank, d.world_size, cfg.grad_accum)
    if cfg.prefetch == "on" or (cfg.prefetch == "auto" and d.device.type == "cuda"):
        # read the next steps' batches while the step runs (on a CPU the thread only competes: off by default)
        return Prefetcher(loader, pin_memory=d.device.type == "cuda")
    return loader


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    d = distributed.init()
    # one writer per run folder, for the whole run, taken before anything is read, tidied or
    # written (folder_lock.py); rank 0 holds it for the job, and its refusal is every rank's
    lock = FolderLock(folder_lock_file(cfg.run_dir), "ditforge train", cfg.run_dir)
    with distributed.leaving(d):  # torn down at the end; with a barrier first when the ranks end together
        try:
            distributed.raise_together(d, lock.acquire if d.is_main else lambda: None)
            with StopRequest(partial(distributed.max_over_ranks, d=d) if d.enabled else None) as stop:  # SIGTERM & co (preemption.py)
                return _train(cfg, d, progress, stop)
        finally:
            lock.release()


def stop_at(step: int, cfg: TrainConfig, stop: StopRequest, checkpointer: Checkpointer, reporter: Reporter,
            position: int, d: distributed.Dist) -> Stopped:
    """Checkpoint `step` (unless its regular checkpoint was just written) and return the error that
    ends the run there: a stop signal came (preemption.py), and every rank stops at this step."""
    if step % cfg.ckpt_every:
        reporter.check_finite(step, checkpointer.last)
        checkpointer.save(step, position)  # with the data position and RNG, as every checkpoint
    error = Stopped(f"stopped by {stop.signal_name} after step {step} of {cfg.steps}; its checkpoint is {checkpointer.last}",
                    distributed=d.enabled)
    return on_every_rank(error, d.is_main)  # rank 0 says it


def _train(cfg: TrainConfig, d: distributed.Dist, progress: bool, stop: StopRequest) -> TrainResult:
    run_dir = Path(cfg.run_dir)
    found = find_run(cfg, d)  # the same run? its latest checkpoint, on every rank
    precision = resolve_precision(cfg.precision, d.device, found.recorded("precision"))
    enable_tf32()
    keep_freed_host_memory()
    distributed.split_batch(cfg.global_batch, d, cfg.grad_accum)  # fail early on an uneven split
    data = open_training_data(cfg)
    if data.skipped and d.is_main:
        log.warning("skipped %d unreadable image(s), e.g. %s (%s)", len(data.skipped), *data.skipped[0])

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model, model_args = build_model(cfg, data)
    init = init_from.prepare(cfg, d, model, model_args, data, found)  # --init-from at a fresh start: rank 0 reads it
    aligner = build_aligner(cfg, model, data, d.device)  # REPA (None when off)
    teacher = init.teacher(model, d)  # the frozen source a distillation learns from (None without)
    stepper = TrainStep(cfg, model, d, precision, aligner, teacher)
    init.load(model, stepper.ema.module, d)  # the same weights into model and EMA on every rank (a no-op without)
    start = resume_or_start(cfg, d, model, stepper, data, precision, found)
    loader = open_loader(cfg, data, start.position, d, training_source(cfg, aligner, data, d.device))
    meta = run_metadata(cfg, model_args, data, precision, d.device, init.record)
    extras = {"projector": (aligner.projector, stepper.repa_opt)} if aligner is not None else None
    checkpointer = Checkpointer(run_dir, d, model, stepper.ema.module, stepper.opt, meta, cfg.keep_last, start.checkpoint, extras)
    previewer = Previewer(cfg, d, data, stepper.ema.module, model_args, precision)
    reporter = Reporter(run_dir, d, start.step, cfg.steps, cfg.global_batch, progress)

    step = start.step
    scheduled = cfg.optim.lr_schedule != "constant" or cfg.optim.lr_warmup > 0  # the log lines show the rate
    try:
        while step < cfg.steps:
            reporter.add(stepper(step, loader.next_step(), loader.offsets()), stepper.terms)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                reporter.check_finite(step, checkpointer.last)
                reporter.log(step, stepper.opt.param_groups[0]["lr"] if scheduled else None)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                reporter.check_finite(step, checkpointer.last)
                checkpointer.save(step, loader.position)  # refuses weights that the last update made NaN
            if cfg.eval_every and step % cfg.eval_every == 0:
                reporter.evaluation(step, previewer.evaluate())
            if cfg.sample_every and step % cfg.sample_every == 0 and step != cfg.steps:
                previewer.preview(step)
            if step < cfg.steps and stop.agreed(step):  # a collective every AGREE_EVERY steps under torchrun
                raise stop_at(step, cfg, stop, checkpointer, reporter, loader.position, d)
    finally:
        loader.close()
        reporter.close()
    return TrainResult(run_dir, step, reporter.last_loss, checkpointer.last, previewer.preview(step), d.is_main)
