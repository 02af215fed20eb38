"""Which format a path holds, and its model: the one reader that `sample`, `eval`, `export` and
`train --init-from` share.

| path | format | reader |
|---|---|---|
| a run folder (its latest checkpoint) or a checkpoint folder | ditforge's own | `run.read_checkpoint` |
| a folder with `config.json` marked `ditforge-hub` | `export --format hub` | `hub.read_hub` |
| a folder with `model_index.json` (or `transformer/config.json`) of a DiT | diffusers | `diffusers.read_diffusers` |
| a `.pt` file | the official DiT / SiT state dict | `official.read_official` |
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ditforge.errors import CheckpointError, UserError
from ditforge.formats.run import is_checkpoint_folder, read_checkpoint, resolve_checkpoint
from ditforge.train.checkpoint import SAMPLING_KEYS, read_state
from ditforge.formats.weights import ModelWeights


def read_model(
    path: str | Path, model_name: str | None = None, objective: str | None = None, use_ema: bool = True
) -> ModelWeights:
    """The model at `path`, in whichever format it is (table above). `model_name` and `objective`
    say what an official `.pt` is (a DiT by default, a SiT for SiT-* names); for the other
    formats, which record both, they are checked against the record. `use_ema`: a ditforge
    checkpoint's EMA weights (the default) or its raw ones."""
    where = Path(path)
    weights = _read_export(where)
    if weights is None:
        where = resolve_checkpoint(where)
        if where.is_file():
            from ditforge.formats.official import read_official

            weights = read_official(where, model_name, objective)
            weights.format = "official"
            return weights
        weights = read_checkpoint(where, use_ema)
        weights.format = "ditforge"
    _check_record(weights, str(where), model_name, objective)
    return weights


def _read_export(folder: Path) -> ModelWeights | None:
    """The model of a hub or diffusers folder; None for anything else. Each reader is imported
    only for a folder that may be its format (diffusers' import is slow)."""
    if _may_be(folder, "config.json"):  # a run folder has one too, beside checkpoints/
        from ditforge.formats import hub

        if hub.is_hub_folder(folder):
            weights = hub.read_hub(folder)
            weights.format = "hub"
            return weights
    if _may_be(folder, "model_index.json") or _may_be(folder, "transformer/config.json"):
        from ditforge.formats import diffusers

        if diffusers.is_diffusers_folder(folder):
            weights = diffusers.read_diffusers(folder)
            weights.format = "diffusers"
            return weights
    return None


def _may_be(folder: Path, marker: str) -> bool:
    """Whether `folder` is a folder with the file `marker` and no ditforge checkpoints."""
    return (folder / marker).is_file() and not (folder / "checkpoints").is_dir() and not (folder / "state.json").exists()


def _check_record(weights: ModelWeights, where: str, model_name: str | None, objective: str | None) -> None:
    """The model and objective a recorded format names, against what the user asked for."""
    recorded = weights.model_args["name"]
    if model_name is not None and model_name != recorded:
        raise CheckpointError(f"checkpoint {where!r} holds a {recorded}, not the requested {model_name}; drop --model or name {recorded}")
    trained = weights.objective.name
    if objective is not None and objective != trained:
        raise CheckpointError(f"checkpoint {where!r} was trained with the {trained} objective, not {objective}; drop --objective")
    if not weights.class_names:
        raise UserError(f"{where!r} records no class names")


def recorded_model(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(model_args, objective config) that a run, checkpoint or hub folder records, read from its
    JSON alone (no tensors: cheap on every rank); None for the formats that record no model
    arguments of ours (diffusers folders, official `.pt` files) or a path that is none of these."""
    where = Path(path)
    if _may_be(where, "config.json"):
        from ditforge.formats import hub

        if hub.is_hub_folder(where):
            record = json.loads((where / hub.CONFIG).read_text())
            return record["model_args"], record["objective_config"]
    try:
        ckpt = resolve_checkpoint(where)
    except CheckpointError:
        return None
    if not is_checkpoint_folder(ckpt):
        return None
    state = read_state(ckpt, SAMPLING_KEYS)
    return state["model_args"], state["config"]
