"""The training loop: data -> diffusion loss -> AdamW -> EMA -> logs, previews, checkpoints.

`train(cfg)` starts a run in `cfg.run_dir`, or resumes it from its latest checkpoint when the
folder already holds one (rerunning the same command continues the run). Everything that
decides the next step is restored: weights, EMA, optimizer moments and step, the data position
and the RNG state, so a resumed run ends with the same weights as an uninterrupted one.

Host syncs (`.item()`) happen only at log and checkpoint steps: the step itself queues work.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditforge import __version__
from ditforge.config import TrainConfig
from ditforge.data.loader import InfiniteLoader, Prefetcher
from ditforge.data.sources import is_builtin
from ditforge.data.training_data import TrainingData, open_training_data
from ditforge.errors import NonFiniteLossError, UserError
from ditforge.evaluate import evaluate_builtin
from ditforge.evaluate_run import evaluate_run
from ditforge.models import DiT, count_parameters, create_model
from ditforge.pictures import make_grid, save_png_atomic
from ditforge.progress import PLAIN_INTERVAL_S, Progress
from ditforge.sample import generate
from ditforge.train import distributed
from ditforge.train.checkpoint import check_weights, latest_checkpoint, read_training_state, save_checkpoint
from ditforge.train.device import enable_tf32, keep_freed_host_memory, resolve_precision
from ditforge.train.step import TrainStep

log = logging.getLogger("ditforge.train")

# Fields that may differ when a run is resumed: they change how it reports, not what it learns.
RESUMABLE_CHANGES = {
    "steps", "log_every", "ckpt_every", "keep_last", "sample_every", "sample_steps", "sample_cfg",
    "sample_sampler",
    "eval_every", "eval_per_class", "eval_fid",
    "grad_accum", "parallel", "compile", "grad_checkpoint", "prefetch",  # same math, other speed or memory
}
PREVIEW_CLASSES = 10
PREVIEW_PER_CLASS = 8


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
    args = dict(
        name=cfg.model.name,
        input_size=h,
        in_channels=c,
        num_classes=data.num_classes,
        learn_sigma=cfg.model.learn_sigma,
        class_dropout_prob=cfg.model.class_dropout_prob,
    )
    try:
        return create_model(**args), args
    except ValueError as e:
        raise UserError(f"model {cfg.model.name} does not fit data of shape {c}x{h}x{w}: {e}") from None


def _check_same_run(cfg: TrainConfig, run_dir: Path) -> None:
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


def preview_classes(num_classes: int) -> list[int]:
    if num_classes <= PREVIEW_CLASSES:
        return list(range(num_classes))
    return [round(i * (num_classes - 1) / (PREVIEW_CLASSES - 1)) for i in range(PREVIEW_CLASSES)]


def save_preview(model: DiT, cfg: TrainConfig, data: TrainingData, path: Path, decode=None, precision: str = "fp32") -> Path:
    classes = preview_classes(data.num_classes)
    x, _ = generate(
        model,
        classes,
        PREVIEW_PER_CLASS,
        cfg_scale=cfg.sample_cfg,
        steps=int(cfg.sample_steps),
        sampler=cfg.sample_sampler,
        seed=cfg.seed,
        noise_schedule=cfg.diffusion.noise_schedule,
        diffusion_steps=cfg.diffusion.diffusion_steps,
        precision=precision,
    )
    if decode is not None:
        x = decode(x.to(next(model.parameters()).device)).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png_atomic(make_grid(x, [data.class_names[c] for c in classes], PREVIEW_PER_CLASS), path)


def log_run_report(writer, report, step: int) -> None:
    """One log line and the TensorBoard scalars of an `evaluate_run` report."""
    log.info("step %d | %s", step, report.line())
    writer.add_scalar("eval/class_accuracy", report.class_accuracy, step)
    writer.add_scalar("eval/accuracy_ratio", report.accuracy_ratio, step)
    for c in report.classes:
        writer.add_scalar(f"eval/class_accuracy/{c['name']}", c["samples"], step)
    if report.fid is not None:
        writer.add_scalar("eval/fid", report.fid, step)
        writer.add_scalar("eval/precision", report.precision, step)
        writer.add_scalar("eval/recall", report.recall, step)


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    d = distributed.init()
    try:
        return _train(cfg, d, progress)
    finally:
        distributed.shutdown()


def _train(cfg: TrainConfig, d: distributed.Dist, progress: bool) -> TrainResult:
    device = d.device
    precision = resolve_precision(cfg.precision, device)
    enable_tf32()
    keep_freed_host_memory()
    run_dir = Path(cfg.run_dir)
    _check_same_run(cfg, run_dir)
    distributed.split_batch(cfg.global_batch, d, cfg.grad_accum)  # fail early on an uneven split
    fsdp = d.enabled and cfg.parallel == "fsdp"

    data = open_training_data(cfg)
    if data.skipped and d.is_main:
        log.warning("skipped %d unreadable image(s), e.g. %s (%s)", len(data.skipped), *data.skipped[0])

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model, model_args = build_model(cfg, data)
    stepper = TrainStep(cfg, model, d, precision)
    ema, opt = stepper.ema, stepper.opt
    meta = dict(
        ditforge_version=__version__,
        config=cfg.to_dict(),
        model_args=model_args,
        data=dict(name=data.name, class_names=data.class_names, shape=list(data.shape), count=len(data)),
        autoencoder=data.autoencoder,
    )

    step, position = 0, 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        # rank 0 reads the tensors and broadcasts them: no other rank holds the whole checkpoint
        model_sd, ema_sd, opt_sd, state = read_training_state(ckpt, tensors=d.is_main)
        if d.is_main and not fsdp:
            check_weights(model, model_sd, str(ckpt / "model.safetensors"))
        distributed.load_full_state(model, model_sd, opt, opt_sd, d)
        distributed.load_full_state(ema.module, ema_sd, None, None, d)
        step, position = state["step"], state["position"]
        if d.is_main:
            log.info("resumed from %s (step %d, %d images seen)", ckpt, step, position)
    else:
        if d.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            log.info(
                "new run in %s: %s, %s parameters, %d %s images %s, %s on %s x %d",
                run_dir, cfg.model.name, f"{count_parameters(model):,}", len(data), data.name,
                "x".join(map(str, data.shape)), precision, device.type, d.world_size,
            )
    if d.is_main:
        cfg.save(run_dir / "config.json")
    loader = InfiniteLoader(data.source, cfg.global_batch, cfg.seed, cfg.hflip, position, d.rank, d.world_size, cfg.grad_accum)
    if cfg.prefetch == "on" or (cfg.prefetch == "auto" and device.type == "cuda"):
        # read the next steps' batches while the step runs (on a CPU the thread only competes: off by default)
        loader = Prefetcher(loader, pin_memory=device.type == "cuda")

    writer = bar = None
    if d.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
        # a bar on a terminal, a line a minute in a log; the duration estimate either way
        bar = Progress(cfg.steps, step, "train", log.info, tty=None if progress else False,
                       interval_s=PLAIN_INTERVAL_S if progress else float("inf"))

    def checkpoint_now() -> Path | None:
        states = (
            distributed.full_model_state(model),
            distributed.full_model_state(ema.module),
            distributed.full_optimizer_state(model, opt),
        )  # collectives under FSDP: every rank takes part
        path = None
        if d.is_main:
            path = save_checkpoint(run_dir, step, *states, dict(meta, position=loader.position), cfg.keep_last)
        distributed.barrier(d)
        return path

    def sampling_model() -> DiT | None:
        """The EMA weights as a plain module on rank 0 (gathered from the shards under FSDP)."""
        if not fsdp:
            return ema.module if d.is_main else None
        full = distributed.full_model_state(ema.module)  # a collective: every rank calls it
        if not d.is_main:
            return None
        plain = create_model(**model_args).to(device)
        plain.load_state_dict(full)
        return plain

    decoder = []  # the autoencoder, loaded on rank 0 at the first preview of a latent run

    def decode():
        if data.autoencoder.get("kind") == "identity":
            return None
        if not decoder:
            from ditforge.data.autoencoder import load_autoencoder

            decoder.append(load_autoencoder(data.autoencoder, device=device))
        return decoder[0].decode

    def preview(path: Path) -> Path | None:
        m = sampling_model()
        if m is None:
            return None
        return save_preview(m, cfg, data, path, decode(), precision)

    def evaluate_now() -> None:
        m = sampling_model()
        if m is None:
            return
        if not is_builtin(cfg.data):
            report = evaluate_run(
                m, cfg.to_dict(), run_dir, data.class_names, cfg.eval_per_class, cfg.sample_cfg, int(cfg.sample_steps),
                cfg.sample_sampler, seed=cfg.seed, noise_schedule=cfg.diffusion.noise_schedule,
                diffusion_steps=cfg.diffusion.diffusion_steps, decode=decode(), with_fid=cfg.eval_fid, precision=precision,
            )
            log_run_report(writer, report, step)
            return
        report = evaluate_builtin(
            m, cfg.data, cfg.eval_per_class, cfg.sample_cfg, int(cfg.sample_steps), cfg.sample_sampler, seed=cfg.seed,
            noise_schedule=cfg.diffusion.noise_schedule, diffusion_steps=cfg.diffusion.diffusion_steps, precision=precision,
        )
        log.info("step %d | %s", step, report.line())
        writer.add_scalar("eval/class_accuracy", report.class_accuracy, step)
        writer.add_scalar("eval/frechet_distance", report.fd_generated, step)

    running = torch.zeros((), device=device)  # sum of step losses since the last log line
    finite = torch.ones((), dtype=torch.bool, device=device)  # every loss since the last check finite?
    since, t_last, last_loss, saved = 0, time.perf_counter(), float("nan"), ckpt

    def check_finite(at: int) -> None:
        if not distributed.all_true(finite, d):
            msg = f"the loss became NaN or Inf before step {at}; stopped. "
            msg += f"The last good checkpoint is {saved}." if saved else "No checkpoint had been written."
            raise NonFiniteLossError(msg + " Try a lower --lr, --grad-clip 1.0, or --precision bf16 instead of fp16.")

    try:
        while step < cfg.steps:
            loss = stepper(step, loader.next_step(), loader.offsets())
            running += loss
            finite &= torch.isfinite(loss)
            step += 1
            since += 1
            if bar is not None:
                bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                check_finite(step)
                last_loss = (distributed.all_reduce_mean(running, d) / since).item()
                now = time.perf_counter()
                steps_per_s = since / (now - t_last)
                imgs_per_s = steps_per_s * cfg.global_batch
                if d.is_main:
                    log.info(
                        "step %d/%d | loss %.4f | %.2f steps/s | %.0f images/s",
                        step, cfg.steps, last_loss, steps_per_s, imgs_per_s,
                    )
                    writer.add_scalar("train/loss", last_loss, step)
                    writer.add_scalar("train/steps_per_s", steps_per_s, step)
                    writer.add_scalar("train/images_per_s", imgs_per_s, step)
                running.zero_()
                since, t_last = 0, time.perf_counter()
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                check_finite(step)
                saved = checkpoint_now() or saved
            if cfg.eval_every and step % cfg.eval_every == 0:
                evaluate_now()
            if cfg.sample_every and step % cfg.sample_every == 0 and step != cfg.steps:
                preview(run_dir / "samples" / f"step-{step:07d}.png")
    finally:
        loader.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()

    last_preview = preview(run_dir / "samples" / f"step-{step:07d}.png")
    return TrainResult(run_dir, step, last_loss, saved, last_preview, d.is_main)
