"""ditforge's shareable folder (`ditforge export --format hub`): what a Hugging Face Hub model
repository of a ditforge model holds, readable by `ditforge sample / eval / export` and
`train --init-from` like a run.

    DIR/model.safetensors   the weights only, ditforge's keys (= the official DiT's), dtypes as trained
    DIR/config.json         {"format": "ditforge-hub", "version": 1}, and everything sampling needs:
                            model_args (create_model's), objective_config (the objective's keys of
                            the run's config: objective, diffusion, flow), autoencoder (its
                            describe()), class_names, step; for the record: data_name, license,
                            training (the rest of the run's config, local paths left out), source,
                            files (what this export wrote)
    DIR/README.md           the model card: the Hub's YAML front matter (library_name, license,
                            tags, datasets), the sample grid, the latest `eval --json` figures,
                            the commands to sample it
    DIR/grid.png            the sample grid, when one is given (its own suffix kept)

Writing is atomic for a reader: every file is first written into `DIR/.ditforge-export/`
(flushed), a marker `COMPLETE` is written there, then each file is renamed into `DIR` (config.json
last) and the staging folder removed. A kill before the marker leaves the previous export whole
(the staging folder is ignored and cleared by the next export); a kill after it leaves a folder
that `read_hub` refuses with one line saying to run the export again. Files in `DIR` that are
not the export's (a `.git` of a cloned Hub repository, `.gitattributes`) are kept; the previous
export's own files that this one does not write (an old grid) are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ditforge.data.autoencoder.normalisation import is_plain_scale
from ditforge.errors import CheckpointError, UserError
from ditforge.formats.weights import ModelWeights
from ditforge.models import count_parameters, create_model
from ditforge.checksums import record_file
from ditforge.train.checkpoint import check_weights, fsync_path

FORMAT = {"format": "ditforge-hub", "version": 1}
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
STAGING, COMPLETE = ".ditforge-export", "COMPLETE"
#: The keys of a run's config (TrainConfig.to_dict()) that `objective_from_config` reads.
OBJECTIVE_KEYS = ("objective", "diffusion", "flow")
#: Sections read only for a model of that objective (MeanFlow's: its built-in guidance scale).
OWN_SECTIONS = ("meanflow",)
#: Keys of a run's config not copied into config.json's training record: local paths.
PRIVATE_KEYS = ("run_dir", "data", "init_from")
#: A Hub license identifier (e.g. mit, apache-2.0, cc-by-nc-4.0, openrail++, other).
LICENSE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$")


# -- what the folder is -----------------------------------------------------------------------


def is_hub_folder(path: str | Path) -> bool:
    """A folder `write_hub` wrote: config.json carries the ditforge-hub marker (or is not whole
    JSON beside a model.safetensors: a damaged export, which `read_hub` then names; or an export
    was interrupted while renaming its files into it)."""
    path = Path(path)
    config = path / CONFIG
    if path.is_dir() and (path / STAGING / COMPLETE).is_file():
        return True  # an export interrupted while renaming its files in: read_hub says so
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        record = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return (path / WEIGHTS).is_file()
    return isinstance(record, dict) and record.get("format") == FORMAT["format"]


def diffusers_applies(weights: ModelWeights) -> bool:
    """Whether the diffusers export (`DiTPipeline`) can represent the model: a latent-space DiT of
    the paper's blocks, with a null class, trained with the diffusion objective (issue 26's rules;
    `formats/diffusers.py` holds the exporter and its own checks)."""
    args = weights.model_args
    paper_blocks = (args.get("norm", "layer"), args.get("mlp", "gelu"), args.get("rope", False), args.get("qk_norm", False)) == (
        "layer", "gelu", False, False)
    return (weights.objective_config.get("objective", "diffusion") == "diffusion" and paper_blocks
            and weights.autoencoder.get("kind", "identity") in ("diffusers-kl", "sd-vae")
            and is_plain_scale(weights.autoencoder)  # DiTPipeline only divides by vae.config.scaling_factor
            and args.get("class_dropout_prob", 0.1) > 0)  # DiTPipeline guides with a null row


# -- reading ----------------------------------------------------------------------------------


def read_hub(path: str | Path) -> ModelWeights:
    """The model of a hub folder: the inverse of `write_hub` (weights bit for bit, model_args,
    objective_config, autoencoder, class_names and step as written; `source` is where it was
    read). A missing or damaged file is a one-line CheckpointError naming it."""
    path = Path(path)
    if (path / STAGING / COMPLETE).is_file():
        raise CheckpointError(f"hub folder {str(path)!r} holds an export that was interrupted while its files were "
                              "renamed into place; run the export again")
    record = _read_config(path / CONFIG)
    weights_file = path / WEIGHTS
    if not weights_file.is_file():
        raise CheckpointError(f"hub folder {str(path)!r} has no {WEIGHTS}; export it again")
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(weights_file)!r} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              "export it again") from None
    weights = ModelWeights(
        model_args=record["model_args"], state_dict=state, class_names=[str(n) for n in record["class_names"]],
        objective_config=record["objective_config"], autoencoder=record["autoencoder"], source=str(weights_file),
        step=record["step"],
    )
    model = _meta_model(weights, str(path / CONFIG))
    if len(weights.class_names) != model.num_classes:
        raise CheckpointError(f"{str(path / CONFIG)!r} is damaged: {len(weights.class_names)} class names for "
                              f"{model.num_classes} classes; export the model again")
    check_weights(model, state, str(weights_file))  # one line naming what does not fit
    weights.state_dict = {k: state[k] for k in model.state_dict()}  # the model's key order (safetensors sorts them)
    return weights


#: config.json's entries that read_hub needs, and their types.
_NEEDED = {"model_args": dict, "objective_config": dict, "autoencoder": dict, "class_names": list}


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"hub folder {str(path.parent)!r} has no {CONFIG}; it is not a ditforge hub export")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is damaged ({e}); export the model again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT["format"]:
        raise CheckpointError(f"{str(path)!r} is not a ditforge hub config (no \"format\": \"{FORMAT['format']}\")")
    if record.get("version") != FORMAT["version"]:
        raise CheckpointError(f"{str(path)!r} has version {record.get('version')!r}; this ditforge reads version "
                              f"{FORMAT['version']} (update ditforge)")
    problems = [f"{k!r} is missing" for k in _NEEDED if k not in record]
    problems += [f"{k!r} is not a {t.__name__}" for k, t in _NEEDED.items() if k in record and not isinstance(record[k], t)]
    if "model_args" in record and isinstance(record["model_args"], dict) and "name" not in record["model_args"]:
        problems.append("'model_args' has no 'name'")
    step = record.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        problems.append("'step' is not a whole number")
    if problems:
        raise CheckpointError(f"{str(path)!r} is damaged: {'; '.join(problems)}; export the model again")
    return record


def _meta_model(weights: ModelWeights, where: str):
    try:
        with torch.device("meta"):
            return create_model(**weights.model_args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where!r}: model_args {weights.model_args} do not build a model ({e})") from None


# -- writing ----------------------------------------------------------------------------------


def write_hub(
    weights: ModelWeights,
    out: str | Path,
    *,
    license: str,
    data_name: str,
    grid: str | Path | None = None,
    eval_report: dict[str, Any] | None = None,
    commands: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Write `weights` as a hub folder `out` (module docstring) and return it. `license`: the
    Hub's identifier for the card (e.g. mit, apache-2.0, cc-by-nc-4.0); `data_name`: the training
    data (a name goes into the card's `datasets`, a local path only by its last part); `grid`: a
    sample picture, copied in and shown; `eval_report`: the dict of `ditforge eval --json`, shown
    as a table; `commands`: more commands for the card (e.g. how it was trained). An existing
    non-empty `out` that holds no hub export is refused unless `overwrite` (then the export's
    files replace theirs of the same name, and other files stay)."""
    out = Path(out)
    if not (isinstance(license, str) and LICENSE.match(license)):
        raise UserError(f"license {license!r} is not a Hub license identifier; give one like mit, apache-2.0, cc-by-nc-4.0 or other")
    if not (isinstance(data_name, str) and data_name.strip()):
        raise UserError(f"data name {data_name!r} is empty; give the training data's name (e.g. digits, imagenet-1k)")
    grid = Path(grid) if grid is not None else None
    if grid is not None and not grid.is_file():
        raise UserError(f"sample grid {str(grid)!r} is not a file; give the picture `ditforge sample DIR --out grid.png` wrote")
    if eval_report is not None and not isinstance(eval_report, dict):
        raise UserError(f"eval report must be the JSON object `ditforge eval --json` writes, got {type(eval_report).__name__}")
    previous = _check_out(out, overwrite)
    model = _meta_model(weights, weights.source)
    if len(weights.class_names) != model.num_classes:
        raise UserError(f"{len(weights.class_names)} class names for the {model.num_classes} classes of {weights.source!r}; "
                        "give one name per class")
    state = {str(k): v.detach().cpu().contiguous() for k, v in weights.state_dict.items()}
    check_weights(model, state, weights.source)  # what is written builds strictly from config.json
    grid_name = f"grid{grid.suffix.lower() or '.png'}" if grid is not None else None
    files = [WEIGHTS] + ([grid_name] if grid_name else []) + [CARD, CONFIG]  # config.json renamed in last
    config = dict(
        FORMAT,
        model_args=weights.model_args,
        objective_config={k: weights.objective_config[k] for k in OBJECTIVE_KEYS + OWN_SECTIONS if k in weights.objective_config
                          and (k not in OWN_SECTIONS or k == weights.objective_config.get("objective"))},
        autoencoder=weights.autoencoder,
        class_names=[str(n) for n in weights.class_names],
        step=weights.step,
        data_name=data_name,
        license=license,
        training={k: v for k, v in weights.objective_config.items() if k not in OBJECTIVE_KEYS + PRIVATE_KEYS},
        source=_provenance(weights.source),
        parameters=count_parameters(model),
        files=files,
    )
    card = model_card(config, out.name, weights, grid_name=grid_name, eval_report=eval_report, commands=commands)

    out.mkdir(parents=True, exist_ok=True)
    staging = out / STAGING
    if staging.exists():
        shutil.rmtree(staging)  # a staging folder without COMPLETE: an export killed before any rename
    staging.mkdir()
    save_file(state, str(staging / WEIGHTS), metadata={"format": "pt"})
    if grid is not None:
        shutil.copyfile(grid, staging / grid_name)
    (staging / CARD).write_text(card)
    config["checksums"] = {WEIGHTS: record_file(staging / WEIGHTS)}  # size and CRC-32, for `ditforge verify DIR`
    (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    for name in files:
        fsync_path(staging / name)
    (staging / COMPLETE).write_text("")
    fsync_path(staging / COMPLETE)
    fsync_path(staging)
    for name in files:
        os.replace(staging / name, out / name)
    for name in previous:  # the previous export's own files that this one did not write
        if name not in files and (out / name).is_file() and not (out / name).is_symlink():
            (out / name).unlink()
    shutil.rmtree(staging)
    fsync_path(out)
    return out


def _check_out(out: Path, overwrite: bool) -> list[str]:
    """Refuse an `out` that may not be written; return the previous export's file names."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder for the hub export")
    if not out.is_dir():
        return []
    if is_hub_folder(out):
        listed = []
        for config in (out / CONFIG, out / STAGING / CONFIG):  # the staged one: an interrupted export's
            try:
                files = json.loads(config.read_text()).get("files", [])
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue
            listed += files if isinstance(files, list) else []
        # only plain names this format writes (a config.json is not trusted to name other files)
        return [n for n in listed if isinstance(n, str) and (n in (WEIGHTS, CONFIG, CARD) or re.fullmatch(r"grid\.\w+", n))]
    entries = sorted(p.name for p in out.iterdir() if p.name != STAGING)
    if entries and not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(f"--out {str(out)!r} is not empty ({shown}) and holds no ditforge hub export; choose an empty "
                        "folder or pass --overwrite to write the export's files into it")
    return []


def _provenance(source: str) -> str:
    """Where the weights came from, without the local folders above the working directory (the
    folder is meant to be published)."""
    if not source:
        return ""
    path = Path(source)
    if not path.is_absolute():
        return source
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(Path(*path.parts[-3:]))


# -- the model card ----------------------------------------------------------------------------


def _is_name(data_name: str) -> bool:
    """A data set name, not a local path: a built-in set (digits, mnist) or a Hugging Face dataset
    `hf:NAME` (ditforge's --data grammar, where `a/b` without `hf:` is a folder)."""
    if data_name.startswith("hf:"):
        return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", data_name[3:]))
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*", data_name)) and not Path(data_name).exists()


def model_card(config: dict[str, Any], folder: str, weights: ModelWeights, *, grid_name: str | None = None,
               eval_report: dict[str, Any] | None = None, commands: Sequence[str] = ()) -> str:
    """README.md of a hub folder: the Hub's YAML front matter, then what the model is and how to use it."""
    args, objective = config["model_args"], config["objective_config"]
    kind = objective.get("objective", "diffusion")
    data = config["data_name"]
    named = _is_name(data)
    data_shown = data.removeprefix("hf:") if named else f"a local folder ({Path(data).name})"
    tags = ["diffusion", "dit", "class-conditional", "image-generation", "ditforge"]
    tags += ["flow-matching"] if kind == "flow" else []
    tags += ["latent-diffusion"] if config["autoencoder"].get("kind") != "identity" else ["pixel-space"]
    front = ["---", "library_name: ditforge", f"license: {config['license']}", "tags:"] + [f"- {t}" for t in tags]
    if named:
        front += ["datasets:", f"- {json.dumps(data.removeprefix('hf:'))}"]
    front += ["---", ""]

    title = f"# {args['name']}, class-conditional, trained with ditforge"
    lines = [title, "", _description(config, kind, data_shown), ""]
    if grid_name:
        lines += [f"![Samples, one row per class]({grid_name})", ""]
    if eval_report:
        lines += ["## Evaluation (`ditforge eval --json`)", "", *_eval_table(eval_report), ""]
    lines += ["## Use it", "", "With ditforge installed, in the folder holding this one (downloaded with e.g. "
              f"`hf download USER/REPO --local-dir {folder}`):", "", "```",
              f"ditforge sample {folder} --out grid.png                      # one row per class",
              f"ditforge sample {folder} --classes {' '.join(map(str, range(min(3, len(config['class_names'])))))} "
              "--per-class 8 --cfg 4.0 --out grid.png",
              f"ditforge sample {folder} --num-samples 50000 --cfg 1.5 --out samples.npz   # for FID",
              f"ditforge train --init-from {folder} --data FOLDER           # fine-tune on your classes",
              "```", ""]
    if diffusers_applies(weights):
        lines += ["For diffusers' `DiTPipeline`, export a diffusers folder first: "
                  f"`ditforge export {folder} --format diffusers --out {folder}-diffusers`, then "
                  f"`DiTPipeline.from_pretrained(\"{folder}-diffusers\")`.", ""]
    else:
        lines += [f"No diffusers export: diffusers' `DiTPipeline` has no {_why_not_diffusers(config, kind)}.", ""]
    if commands:
        lines += ["## How it was made", "", "```", *commands, "```", ""]
    names = config["class_names"]
    shown = ", ".join(f"{i}: {n}" for i, n in enumerate(names[:50])) + (f", ... ({len(names)} in all)" if len(names) > 50 else "")
    lines += ["## Classes", "", shown, "", "## Files", "",
              f"- `{WEIGHTS}`: the weights (keys of the official DiT checkpoints)",
              f"- `{CONFIG}`: model arguments, objective, autoencoder, class names (`{FORMAT['format']}` version {FORMAT['version']})",
              ""]
    return "\n".join(front + lines)


def _description(config: dict[str, Any], kind: str, data_shown: str) -> str:
    args, objective, ae = config["model_args"], config["objective_config"], config["autoencoder"]
    blocks = [f"{k} {args[k]}" for k in ("norm", "mlp") if k in args and args[k] not in ("layer", "gelu")]
    blocks += [k for k in ("rope", "qk_norm") if args.get(k)]
    if kind == "flow":
        f = objective.get("flow", {})
        how = f"flow matching (SiT; path {f.get('path', 'linear')}, {f.get('prediction', 'velocity')} prediction)"
    else:
        d = objective.get("diffusion", {})
        how = (f"Gaussian diffusion (DiT; {d.get('noise_schedule', 'linear')} betas, T = {d.get('diffusion_steps', 1000)}"
               f"{', learned sigma' if args.get('learn_sigma', True) else ''})")
    space = (f"in the latent space of `{ae.get('id', 'stabilityai/sd-vae-ft-ema')}` (scale {ae.get('scale')})"
             if ae.get("kind") != "identity" else "in pixel space")
    step = f" for {config['step']} steps" if config.get("step") is not None else ""
    return (f"A {args['name']} ({config['parameters']:,} parameters{'; blocks: ' + ', '.join(blocks) if blocks else ''}) "
            f"on {args.get('input_size')}x{args.get('input_size')}x{args.get('in_channels')} inputs {space}, trained "
            f"with {how}{step} on {data_shown}, {len(config['class_names'])} classes.")


def _why_not_diffusers(config: dict[str, Any], kind: str) -> str:
    args = config["model_args"]
    if config["autoencoder"].get("kind") == "identity":
        return "pixel-space models"
    if kind != "diffusion":
        return f"{kind}-objective models"
    if not is_plain_scale(config["autoencoder"]) or config["autoencoder"].get("kind") not in ("diffusers-kl", "sd-vae"):
        return "latents other than an AutoencoderKL's divided by one scale factor"
    return "RMSNorm / SwiGLU / RoPE / qk-norm blocks" if any(
        (args.get("norm", "layer") != "layer", args.get("mlp", "gelu") != "gelu", args.get("rope"), args.get("qk_norm"))) else "such models"


def _eval_table(report: dict[str, Any]) -> list[str]:
    """The report's scalar figures (numbers, words) as a Markdown table; lists and objects left out."""
    rows = ["| figure | value |", "|---|---|"]
    for key, value in report.items():
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            continue
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append(f"| {key} | {shown.replace('|', '/')} |".replace("\n", " "))
    return rows


def hub_run_config(path: str | Path) -> dict[str, Any]:
    """The run config a hub folder records, as far as it does: its training record, its
    objective's keys and `data` = its data name (what `eval` judges against: a built-in set or
    an `hf:` name is found again; a local folder only by its last part, so `eval` says it is missing)."""
    record = _read_config(Path(path) / CONFIG)
    return dict(record.get("training", {}), **record["objective_config"], data=record.get("data_name", ""))
