"""REPA in a training run: the frozen encoder, the trained projector, the features of a batch.

The training step (``train/step.py``) asks the model for its tokens after block ``depth`` beside
its output (``DiT.forward(..., return_hidden=depth)``, through `HiddenTokens`), and adds
``weight * Aligner.loss(hidden, target)`` to the objective's loss. The projector is trained with
the model (its own AdamW with the run's settings) and saved in each checkpoint beside it
(``projector.safetensors``), never in the model's state dict: sampling and export see the DiT alone.

Encoder features are computed without gradients once per batch, or, when the data are pixels in
memory without random flips, once per image before training (`FeatureSource`). On a latent store
the encoder reads the images that `extract --keep-pixels` stored beside the latents, in the view
(flipped or not) of each latent drawn (`StorePixelSource`): the set-up of REPA's own code, which
keeps the images and runs DINOv2 on them every batch. Storing the features instead would cost
DINOv2-B's 256 x 768 values a view (768 KiB for two views in float16) against 192 KiB of pixels
at 256 px, and fix the encoder and its resolution at extraction. Measured on the
built-in digits (DiT-Ti/2, batch 128, Inception at 99 px, one CPU core of a busy machine): 2.0 s a
step with cached features, 4.7 s reading the encoder every step; the 1,438 training images are
read once in about the time of 11 uncached steps.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from ditforge.errors import UserError
from ditforge.repa.encoders import FrozenEncoder, load_encoder
from ditforge.repa.projector import Projector, alignment_loss

log = logging.getLogger("ditforge.train")

__all__ = ["Aligner", "HiddenTokens", "FeatureSource", "StorePixelSource", "build_aligner", "training_source", "CACHE_LIMIT_BYTES"]

#: `--repa-cache auto` keeps the features of every image in memory up to this size.
CACHE_LIMIT_BYTES = 2 * 2**30


class Aligner:
    """Encoder (frozen), projector (trained), the block whose tokens are aligned and the weight."""

    def __init__(self, encoder: FrozenEncoder, projector: Projector, depth: int, weight: float, grid: int):
        self.encoder, self.projector, self.depth, self.weight, self.grid = encoder, projector, depth, weight, grid

    def target(self, images: Tensor) -> Tensor:
        """Encoder features of clean images (N, C, H, W) in [-1, 1] on the model's token grid: (N, T, E)."""
        return self.encoder.features(images, self.grid)

    def batch_target(self, x: Tensor, extra: list[Tensor]) -> Tensor:
        """The target (b, T, E) of a micro-batch (x, y, *extra) as the training source gives it:
        features cached per image (`FeatureSource`: float (b, T, E)), the encoder on the stored
        images of a latent store (`StorePixelSource`: uint8 (b, C, H, W)), or on x itself (pixels)."""
        if not extra:
            return self.target(x)
        (given,) = extra
        if given.dtype == torch.uint8:
            return self.target(given.to(x.device, non_blocking=True).float().div_(127.5).sub_(1.0))
        return given

    def loss(self, hidden: Tensor, target: Tensor, projector: nn.Module | None = None) -> Tensor:
        """Per-sample alignment loss (N,) of the tokens after block `depth` (N, T, D); `projector` is
        the module to call (a DDP wrapper of `self.projector` under torchrun)."""
        projected = (projector or self.projector)(hidden)  # (N, T, E)
        return alignment_loss(projected, target.to(projected.device))  # (N,)


class HiddenTokens:
    """The model as the objectives call it, ``model(x_t, t, y) -> out``, that keeps the tokens after
    block `depth` of its (single) call in `hidden`."""

    def __init__(self, model: nn.Module, depth: int, force_drop_ids: Tensor | None):
        self.model, self.depth, self.force_drop_ids = model, depth, force_drop_ids
        self.hidden: Tensor | None = None

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        out, self.hidden = self.model(x_t, t, y, force_drop_ids=self.force_drop_ids, return_hidden=self.depth)
        return out  # (N, C', H, W); hidden (N, T, D)


class FeatureSource:
    """An in-memory pixel source whose batches carry each image's cached encoder features:
    ``get_batches`` gives (x, y, features) with features (b, T, E)."""

    def __init__(self, source: Any, features: Tensor):  # a TensorSource, (N, T, E)
        if len(source) != features.shape[0]:
            raise ValueError(f"{len(source)} images but {features.shape[0]} feature rows")
        self.source, self.features = source, features

    def __len__(self) -> int:
        return len(self.source)

    def get_batches(self, picks, *, seed: int, position: int, global_batch: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        batches = self.source.get_batches(picks, seed=seed, position=position, global_batch=global_batch)
        return [(x, y, self.features[idx]) for (x, y), (idx, _, _) in zip(batches, picks)]


class StorePixelSource:
    """A latent store's source whose batches also carry the stored images of their latents, in
    the same view: ``get_batches`` gives (z, y, pixels) with pixels uint8 (b, C_img, H, W)."""

    def __init__(self, source: Any):  # a StoreSource over a store with pixels
        self.source, self.store = source, source.store

    def __len__(self) -> int:
        return len(self.source)

    def get_batches(self, picks, *, seed: int, position: int, global_batch: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        batches = self.source.get_batches(picks, seed=seed, position=position, global_batch=global_batch)
        return [(z, y, self.store.pixels(idx, flip)) for (z, y), (idx, flip, _) in zip(batches, picks)]


def build_aligner(cfg: Any, model: nn.Module, data: Any, device: torch.device) -> Aligner | None:
    """The run's `Aligner` (None when ``cfg.repa.encoder`` is empty). Call after the model is built:
    the projector draws its initial weights from the global RNG, after the model's."""
    r = cfg.repa
    if not r.encoder:
        return None
    if in_latent_space(data) and data.source.store.pixels_shape is None:
        raise UserError(
            f"REPA's encoder reads images, and the latent store {cfg.data!r} keeps none: extract it again with "
            "--keep-pixels (or train on the image folder itself, or leave --repa-encoder out)"
        )
    encoder = load_encoder(r.encoder, r.resolution, device)
    projector = Projector(model.hidden_size, r.projector_dim, encoder.dim).to(device)
    return Aligner(encoder, projector, r.depth, r.weight, model.input_size // model.patch_size)


def training_source(cfg: Any, aligner: Aligner | None, data: Any, device: torch.device) -> Any:
    """What the loader draws from: the data's source; with REPA's cache a `FeatureSource` over it;
    on a latent store a `StorePixelSource` (the encoder reads its kept images, not the latents)."""
    if aligner is None:
        return data.source
    if use_cache(cfg, aligner, data):
        return FeatureSource(data.source, cached_features(aligner, data.source.images, device))
    return StorePixelSource(data.source) if in_latent_space(data) else data.source


def in_latent_space(data: Any) -> bool:
    """Whether the model's inputs are an autoencoder's latents (a latent store's), not pixels: then
    the encoder needs the images the store kept. A pixel-space store (`--vae identity`) needs none."""
    return data.autoencoder.get("kind", "identity") != "identity"


def use_cache(cfg: Any, aligner: Aligner, data: Any) -> bool:
    """Whether to read the encoder once per image (`FeatureSource`) rather than once per batch."""
    mode = cfg.repa.cache
    images = getattr(data.source, "images", None)
    if mode == "off":
        return False
    problem = "its images are flipped at random (--hflip)" if cfg.hflip else (
        None if images is not None else "it is not held in memory as pixels")
    if problem:
        if mode == "on":
            raise UserError(f"--repa-cache on: the features of {cfg.data!r} cannot be cached, {problem}; use --repa-cache auto or off")
        return False
    size = len(data) * aligner.grid**2 * aligner.encoder.dim * 4
    return mode == "on" or size <= CACHE_LIMIT_BYTES


def cached_features(aligner: Aligner, images: Tensor, device: torch.device, batch_size: int = 64) -> Tensor:
    """Encoder features of every image (N, C, H, W): (N, T, E) float32 on the CPU."""
    import time

    start = time.perf_counter()
    out = [aligner.target(images[i : i + batch_size].to(device)).cpu() for i in range(0, images.shape[0], batch_size)]
    log.info("REPA: %s features of %d images in %.1f s, cached for the run", aligner.encoder.spec, images.shape[0],
             time.perf_counter() - start)
    return torch.cat(out)  # (N, T, E)
