"""A model as every format reader returns it: what `create_model` needs, the weights under
ditforge's keys (which are the official DiT's), and what sampling needs besides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ditforge.models import DiT, create_model
from ditforge.objectives import Objective, objective_from_config
from ditforge.train.checkpoint import load_weights


@dataclass
class ModelWeights:
    model_args: dict[str, Any]  # create_model(**model_args): name, input_size, in_channels, num_classes, ...
    state_dict: dict[str, torch.Tensor]  # ditforge's (= the official DiT's) keys and shapes
    class_names: list[str]
    objective_config: dict[str, Any] = field(default_factory=lambda: {"objective": "diffusion"})  # TrainConfig keys
    autoencoder: dict[str, Any] = field(default_factory=lambda: {"kind": "identity"})  # Autoencoder.describe()
    source: str = ""  # the path it was read from, for messages and records
    step: int | None = None  # the training step, where the format records one
    format: str = ""  # which format it was read from: "ditforge", "hub", "diffusers" or "official" (`read.read_model`)

    @property
    def objective(self) -> Objective:
        return objective_from_config(self.objective_config, self.model_args.get("learn_sigma", True))

    def build(self) -> DiT:
        """A model of `model_args` holding these weights (strict: every key and shape must fit)."""
        model = create_model(**self.model_args)
        load_weights(model, self.state_dict, self.source)
        return model
