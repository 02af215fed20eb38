"""The `export` command: a model, from wherever `formats/read.py` reads one (a run, a checkpoint,
a hub or diffusers folder, an official `.pt`), written in another format (`formats/`):

    ditforge export RUN --format diffusers --out DIR   # DiTPipeline.from_pretrained(DIR)
    ditforge export RUN --format official --out DIR    # facebookresearch/DiT or willisma/SiT sample.py --ckpt
    ditforge export RUN --format hub --out DIR         # a Hugging Face Hub model folder with its card

The EMA weights by default, as `sample` uses. For `hub`, the card shows the run's newest preview
grid (`RUN/samples/`) and its newest evaluation (`RUN/eval/`, which `ditforge eval RUN` writes),
unless `--grid` / `--eval-json` name others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ditforge.errors import UserError
from ditforge.flags import flag
from ditforge.formats.read import read_model
from ditforge.formats.weights import ModelWeights
from ditforge.sampling.options import objective_option

FORMATS = ("diffusers", "official", "hub")


@dataclass
class ExportOptions:
    """What `ditforge export` asks for, each field its option."""

    checkpoint: str = field(metadata=flag(
        "checkpoint", "run folder (latest checkpoint), checkpoint folder, hub or diffusers folder, or official DiT / SiT .pt"))
    format: str = field(metadata=flag(
        "--format", "diffusers: a DiTPipeline folder; official: the DiT / SiT .pt and the arguments of their sample.py; "
        "hub: ditforge's shareable folder with a model card", choices=FORMATS, required=True))
    out: str = field(metadata=flag("--out", "the folder to write (official: a folder or a .pt path)", required=True))
    raw_weights: bool = field(default=False, metadata=flag(
        "--raw-weights", "export the raw weights instead of the EMA", action="store_true"))
    model_name: str | None = field(default=None, metadata=flag(
        "--model", "model name of an official .pt file given as the source (e.g. DiT-XL/2)"))
    objective: str | None = objective_option()
    license: str = field(default="other", metadata=flag(
        "--license", "hub: the model card's license, a Hub identifier (mit, apache-2.0, cc-by-nc-4.0, ...)"))
    data_name: str | None = field(default=None, metadata=flag(
        "--data-name", "hub: the training data's name for the card (default: what the run trained on)"))
    grid: str | None = field(default=None, metadata=flag(
        "--grid", "hub: the sample picture for the card (default: the run's newest preview grid)"))
    eval_json: str | None = field(default=None, metadata=flag(
        "--eval-json", "hub: an `eval --json` report for the card (default: the run's newest, RUN/eval/)"))
    cfg: float = field(default=4.0, metadata=flag("--cfg", "official: the guidance scale written into their sample command"))
    overwrite: bool = field(default=False, metadata=flag(
        "--overwrite", "official, hub: write into an existing folder that holds something else (diffusers: only a "
        "missing or empty --out)", action="store_true"))


@dataclass
class ExportResult:
    out: Path
    format: str
    weights: ModelWeights
    files: list[Path]

    def line(self) -> str:
        how = {
            "diffusers": f"DiTPipeline.from_pretrained({str(self.out)!r})",
            "official": f"their sample.py with the arguments in {self.files[-1].name}" if self.files else "their sample.py",
            "hub": f"ditforge sample {self.out} --out grid.png",
        }[self.format]
        step = "" if self.weights.step is None else f" (step {self.weights.step})"
        return f"wrote {self.out} ({self.format}) from {self.weights.source}{step}; load it with {how}"


def _run_folder(checkpoint: Path) -> Path | None:
    """The run folder of a checkpoint folder `RUN/checkpoints/step-N`, or None."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def _newest(folder: Path, pattern: str, step: int | None) -> Path | None:
    """The file of `step` among `folder/pattern` (step-NNNNNNN.*), else the newest one, else None."""
    files = sorted(folder.glob(pattern)) if folder.is_dir() else []
    if step is not None:
        for f in files:
            if f.stem == f"step-{step:07d}":
                return f
    return files[-1] if files else None


def _read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the eval report {str(path)!r} as JSON ({type(e).__name__}: {e}); give the file "
                        "`ditforge eval RUN --json FILE` wrote") from None
    if not isinstance(report, dict):
        raise UserError(f"eval report {str(path)!r} is not a JSON object; give the file `ditforge eval RUN --json FILE` wrote")
    return report


def _data_name(weights: ModelWeights) -> str:
    """The training data's name for the card: a built-in or `hf:` name as it is, a folder by its
    last part, "unknown" where the source records none (a hub or diffusers folder)."""
    data = str(weights.objective_config.get("data", "")).rstrip("/")
    return (data if data.startswith("hf:") else Path(data).name) or "unknown"


def export(opts: ExportOptions) -> ExportResult:
    """Read `opts.checkpoint` and write it as `opts.format` into `opts.out`."""
    if opts.format not in FORMATS:
        raise UserError(f"unknown export format {opts.format!r}; choose one of: {', '.join(FORMATS)}")
    weights = read_model(opts.checkpoint, opts.model_name, opts.objective, use_ema=not opts.raw_weights)
    out = Path(opts.out)
    if opts.format == "diffusers":
        from ditforge.formats.diffusers import write_diffusers

        files = [write_diffusers(weights, out)]  # into a missing or empty folder only
    elif opts.format == "official":
        from ditforge.formats.official import write_official

        files = write_official(weights, out, cfg_scale=opts.cfg, overwrite=opts.overwrite)
        out = files[0]
    else:
        from ditforge.formats.hub import write_hub
        from ditforge.formats.run import resolve_checkpoint

        run = _run_folder(resolve_checkpoint(opts.checkpoint)) if Path(opts.checkpoint).is_dir() else None
        grid = Path(opts.grid) if opts.grid else (_newest(run / "samples", "step-*.png", weights.step) if run else None)
        report_file = Path(opts.eval_json) if opts.eval_json else (_newest(run / "eval", "step-*.json", weights.step) if run else None)
        files = [write_hub(
            weights, out, license=opts.license, data_name=opts.data_name or _data_name(weights), grid=grid,
            eval_report=_read_report(report_file) if report_file else None, overwrite=opts.overwrite,
        )]
    return ExportResult(out, opts.format, weights, files)
