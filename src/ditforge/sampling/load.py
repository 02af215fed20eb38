"""A model to sample from, in whichever format it was saved: a ditforge run or checkpoint
folder, a hub folder (`export --format hub`), a diffusers DiT folder, or an official DiT or SiT
`.pt` (`formats/read.py` tells which), and the decoder of its autoencoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ditforge.errors import UserError
from ditforge.formats.read import read_model
from ditforge.models import DiT
from ditforge.objectives import OBJECTIVES, DiffusionObjective, Objective


@dataclass
class SamplingModel:
    model: DiT
    class_names: list[str]
    objective: Objective = field(default_factory=DiffusionObjective)
    source: str = ""
    step: int | None = None
    autoencoder: dict[str, Any] = field(default_factory=lambda: {"kind": "identity"})


def load_for_sampling(
    path: str | Path, model_name: str | None = None, use_ema: bool = True, objective: str | None = None
) -> SamplingModel:
    """The model at `path` (its objective as recorded), or of an official weights file
    (``model_name`` and ``objective`` say what it is: a DiT by default, a SiT for the names
    ``SiT-XL/2`` etc., whose flat state dicts have DiT's keys)."""
    if objective is not None and objective not in OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    w = read_model(path, model_name, objective, use_ema)
    folder = str(Path(w.source).parent) if w.source.endswith(".safetensors") else w.source  # the checkpoint or hub folder
    return SamplingModel(w.build(), w.class_names, w.objective, source=folder, step=w.step, autoencoder=w.autoencoder)


def load_decoder(autoencoder: dict[str, Any] | str, device: torch.device,
                 vae: str | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The decode function of a recorded autoencoder (`describe()` output, or a `--vae` string):
    it undoes exactly the normalisation the record says (shift, scale, channel statistics). None
    for the identity recorded by pixel-space runs. `vae` (`sample --vae`) swaps the weights that
    decode, keeping the record's normalisation."""
    from ditforge.data.autoencoder import load_autoencoder, with_recorded_normalisation

    if vae is not None:
        record = autoencoder if isinstance(autoencoder, dict) else {}
        return with_recorded_normalisation(vae, record, device=device).decode
    if isinstance(autoencoder, dict) and autoencoder.get("kind") == "identity" and "channel_mean" not in autoencoder:
        return None
    return load_autoencoder(autoencoder, device=device).decode
