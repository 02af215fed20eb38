"""Pictures and judgements of a model while it trains: the preview grids and the in-training
evaluation, both of the EMA weights.

Under FSDP the EMA is sharded, so every rank takes part in gathering it and rank 0 alone samples
from a plain copy. A latent run's autoencoder is loaded on rank 0 at the first picture it needs,
never for a run that takes no pictures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ditforge.config import TrainConfig
from ditforge.data.training_data import TrainingData
from ditforge.evaluation.builtin import BuiltinReport
from ditforge.evaluation.report import evaluate_model
from ditforge.evaluation.run_report import RunReport
from ditforge.models import DiT, create_model
from ditforge.objectives import objective_of_run
from ditforge.pictures import save_png_atomic
from ditforge.sampling.generate import preview_classes, sample_picture
from ditforge.sampling.load import load_decoder
from ditforge.train import distributed

PREVIEW_PER_CLASS = 8


def save_preview(model: DiT, cfg: TrainConfig, data: TrainingData, path: Path, decode=None, precision: str = "fp32") -> Path:
    picture = sample_picture(
        model, preview_classes(data.num_classes), data.class_names, PREVIEW_PER_CLASS, cfg.sample_cfg,
        int(cfg.sample_steps), cfg.sample_sampler, cfg.seed, objective_of_run(cfg), decode, precision=precision,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png_atomic(picture, path)


class Previewer:
    """Samples of the EMA `ema` (a module built from `model_args`) for the run in `cfg.run_dir`."""

    def __init__(
        self,
        cfg: TrainConfig,
        d: distributed.Dist,
        data: TrainingData,
        ema: DiT,
        model_args: dict[str, Any],
        precision: str,
    ):
        self.cfg, self.d, self.data, self.ema = cfg, d, data, ema
        self.model_args, self.precision = model_args, precision
        self.run_dir = Path(cfg.run_dir)
        self.fsdp = d.enabled and cfg.parallel == "fsdp"
        self._decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # loaded at a latent run's first picture

    def sampling_model(self) -> DiT | None:
        """The EMA weights as a plain module on rank 0 (gathered from the shards under FSDP)."""
        if not self.fsdp:
            return self.ema if self.d.is_main else None
        full = distributed.full_model_state(self.ema)  # a collective: every rank calls it
        if not self.d.is_main:
            return None
        plain = create_model(**self.model_args).to(self.d.device)
        plain.load_state_dict(full)
        return plain

    def decode(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Model inputs -> pictures in [-1, 1]; None when the model works on pixels."""
        if self._decode is None:
            self._decode = load_decoder(self.data.autoencoder, self.d.device)  # None again for pixels: cheap
        return self._decode

    def preview(self, step: int) -> Path | None:
        """The preview grid of `step` in `RUN/samples/` (rank 0; None elsewhere)."""
        m = self.sampling_model()
        if m is None:
            return None
        path = self.run_dir / "samples" / f"step-{step:07d}.png"
        return save_preview(m, self.cfg, self.data, path, self.decode(), self.precision)

    def evaluate(self) -> RunReport | BuiltinReport | None:
        """The class accuracy (and FID when asked) of fresh samples (rank 0; None elsewhere)."""
        m = self.sampling_model()
        if m is None:
            return None
        cfg = self.cfg
        return evaluate_model(
            m, cfg.to_dict(), self.run_dir, self.data.class_names, cfg.eval_per_class, cfg.sample_cfg,
            int(cfg.sample_steps), cfg.sample_sampler, cfg.seed, objective_of_run(cfg), self.decode(),
            with_fid=cfg.eval_fid, precision=self.precision,
        )
