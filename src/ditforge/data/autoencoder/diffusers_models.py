"""diffusers' autoencoders, from a hub id or a folder written by `save_pretrained`, the class
chosen from the folder's config (`_class_name`):

| class | kind | latent at 256 px (published config) | posterior | normalisation from the config |
|---|---|---|---|---|
| `AutoencoderKL` | `diffusers-kl` | SD 4x32x32, FLUX / SD3 16x32x32 | Gaussian | `(z - shift_factor) * scaling_factor`; `(z - latents_mean) * scaling_factor / latents_std` where the config has them |
| `AutoencoderDC` | `diffusers-dc` | DC-AE f32c32 32x8x8 | none (deterministic) | `z * scaling_factor` |
| `AutoencoderKLQwenImage` | `diffusers-kl-qwenimage` | 16x32x32 (one frame of a video VAE) | Gaussian | `(z - latents_mean) / latents_std` |

The downsample factor is 2 ** (number of encoder levels - 1). Encoding and decoding run under
`torch.no_grad()`, and on CUDA under autocast to `autocast_dtype` (None: full precision);
the posterior's mean and std come back in float32.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch

from ditforge.data.autoencoder.base import Autoencoder
from ditforge.data.autoencoder.normalisation import LatentNorm
from ditforge.errors import UserError
from ditforge.train.device import pick_device

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
# Short names of the two VAEs the DiT paper used (the original code's `--vae ema|mse`).
VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


class DiffusersAutoencoder(Autoencoder):
    """What the diffusers autoencoders share: loading, device, precision, the record."""

    kind = ""
    class_name = ""  # the diffusers class

    def __init__(
        self,
        name_or_path: str = DEFAULT_VAE,
        norm: LatentNorm | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        autocast_dtype: torch.dtype | None = torch.float16,
        latent_norm: str = "scale",
        scale: float | None = None,
    ):
        """`norm`: a recorded normalisation; else the config's, `scale` (if given) instead of its
        scale, `latent_norm` "channel" for statistics an extraction will add."""
        self.name_or_path, self.is_local = resolve_name(name_or_path)
        self.vae = _from_pretrained(self.class_name, self.name_or_path, self.is_local, dtype)
        self.device = torch.device(device) if device is not None else pick_device()
        self.vae.to(self.device).eval().requires_grad_(False)
        self.autocast_dtype = autocast_dtype
        self._read_config(self.vae.config)
        if norm is None:
            shift, config_scale = self._config_norm(self.vae.config)
            norm = LatentNorm(shift, config_scale if scale is None else float(scale), kind=latent_norm)
        self.norm = norm
        self.norm.check_channels(self.channels, f"VAE {self.name_or_path!r}")

    def _read_config(self, config) -> None:
        raise NotImplementedError

    def _config_norm(self, config) -> tuple[Any, Any]:
        """(shift, scale) the config gives."""
        raise NotImplementedError

    def _precision(self):
        if self.device.type == "cuda" and self.autocast_dtype is not None:
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, next(self.vae.parameters()).dtype)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = super().encode(images)
        return mean.to(images.device), std.to(images.device)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._precision():
            return self.vae.decode(self._input(z)).sample.float()  # (N, C_img, H, W)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.name_or_path,
            **self.norm.record(),
            "channels": self.channels,
            "in_channels": self.in_channels,
            "downsample": self.downsample,
        }


class DiffusersKL(DiffusersAutoencoder):
    """A diffusers `AutoencoderKL`: the SD VAEs (scale 0.18215), FLUX's and SD3's (16 channels,
    a shift), any with `latents_mean` / `latents_std` in its config."""

    kind = "diffusers-kl"
    class_name = "AutoencoderKL"

    def _read_config(self, config) -> None:
        self.in_channels = int(config.in_channels)
        self.channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)

    def _config_norm(self, config) -> tuple[Any, Any]:
        scale = getattr(config, "scaling_factor", None)
        if scale is None:
            raise UserError(f"VAE {self.name_or_path!r} has no scaling_factor in its config; its latents' scale is unknown")
        shift = getattr(config, "shift_factor", None)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            if shift:
                raise UserError(f"VAE {self.name_or_path!r} has both a shift_factor and latents_mean in its config; "
                                "which one its latents use is unknown")
            return tuple(float(m) for m in mean), tuple(float(scale) / float(s) for s in std)
        return float(shift or 0.0), float(scale)

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), self._precision():
            dist = self.vae.encode(self._input(images)).latent_dist  # DiagonalGaussianDistribution of z
            # in float32 even under autocast (std from the log-variance)
            return dist.mean.float(), (0.5 * dist.logvar.float()).exp()  # (N, C, H/f, W/f) each


class DiffusersDC(DiffusersAutoencoder):
    """A diffusers `AutoencoderDC` (deep compression, Chen et al. 2024; SANA's f32c32):
    deterministic, so std is 0 and a store keeps the means only."""

    kind = "diffusers-dc"
    class_name = "AutoencoderDC"
    means_only = True

    def _read_config(self, config) -> None:
        self.in_channels = int(config.in_channels)
        self.channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.encoder_block_out_channels) - 1)

    def _config_norm(self, config) -> tuple[Any, Any]:
        return 0.0, float(getattr(config, "scaling_factor", 1.0))

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), self._precision():
            mean = self.vae.encode(self._input(images)).latent.float()  # (N, C, H/f, W/f)
        return mean, torch.zeros_like(mean)


class DiffusersQwenImage(DiffusersAutoencoder):
    """A diffusers `AutoencoderKLQwenImage` (Qwen-Image's VAE, a Wan-style video VAE): an image
    is one frame, (N, C, 1, H, W); 16 latent channels, normalised by the config's per-channel
    `latents_mean` and `latents_std`."""

    kind = "diffusers-kl-qwenimage"
    class_name = "AutoencoderKLQwenImage"

    def _read_config(self, config) -> None:
        self.in_channels = int(getattr(config, "input_channels", 3))
        self.channels = int(config.z_dim)
        self.downsample = 2 ** (len(config.dim_mult) - 1)

    def _config_norm(self, config) -> tuple[Any, Any]:
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return 0.0, 1.0
        return tuple(float(m) for m in mean), tuple(1.0 / float(s) for s in std)

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), self._precision():
            dist = self.vae.encode(self._input(images)[:, :, None]).latent_dist  # (N, C, 1, h, w)
            return dist.mean.float()[:, :, 0], (0.5 * dist.logvar.float()[:, :, 0]).exp()

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._precision():
            return self.vae.decode(self._input(z)[:, :, None]).sample.float()[:, :, 0]  # (N, C_img, H, W)


CLASSES: dict[str, type[DiffusersAutoencoder]] = {c.class_name: c for c in (DiffusersKL, DiffusersDC, DiffusersQwenImage)}
KINDS: dict[str, type[DiffusersAutoencoder]] = {c.kind: c for c in CLASSES.values()}


def resolve_name(name_or_path: str) -> tuple[str, bool]:
    """(the hub id or the folder's absolute path, whether it is a folder); an alias expanded."""
    name_or_path = VAE_ALIASES.get(name_or_path, name_or_path)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local.resolve()), True
    if _looks_like_path(name_or_path):
        what = "is a file" if local.exists() else "does not exist"
        raise UserError(f"--vae {name_or_path}: {what}; expected a folder written by a diffusers autoencoder's save_pretrained()")
    return name_or_path, False


def class_of(name_or_path: str) -> type[DiffusersAutoencoder]:
    """The autoencoder class a hub id or folder holds, from its config's `_class_name` (a config
    without one: `AutoencoderKL`, as diffusers' own VAE folders of old)."""
    name, is_local = resolve_name(name_or_path)
    if is_local and not (Path(name) / "config.json").is_file():
        raise UserError(f"--vae {name}: not a diffusers AutoencoderKL folder (no config.json); expected a folder "
                        f"written by save_pretrained() of one of: {', '.join(CLASSES)}")
    config = _load(lambda: _diffusers().AutoencoderKL.load_config(name), name, is_local)
    class_name = config.get("_class_name") or "AutoencoderKL"
    if class_name not in CLASSES:
        raise UserError(f"--vae {name}: its config is a {class_name}; ditforge encodes with one of: {', '.join(CLASSES)}")
    return CLASSES[class_name]


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise UserError("the VAE needs the diffusers package: pip install diffusers") from None
    return diffusers


def _load_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from huggingface_hub import errors as hub_errors

        for name in ("HfHubHTTPError", "HFValidationError", "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            if hasattr(hub_errors, name):
                errors.append(getattr(hub_errors, name))
    except ImportError:
        pass
    return tuple(errors)


def _load(load, name_or_path: str, is_local: bool, class_name: str = "diffusers autoencoder"):
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # diffusers passes a retired argument
            return load()
    except _load_errors() as e:
        reason = _first_line(e)
        if is_local:
            raise UserError(
                f"--vae {name_or_path}: not a {class_name} folder ({reason}); "
                f"expected a folder written by {class_name.removeprefix('diffusers ')}.save_pretrained() (config.json + weights)"
            ) from None
        raise UserError(
            f"cannot load the VAE {name_or_path!r}: it is not in the local Hugging Face cache and the hub cannot "
            f"be reached ({reason}); pass --vae PATH, a local folder saved with save_pretrained()"
        ) from None


def _from_pretrained(class_name: str, name_or_path: str, is_local: bool, dtype: torch.dtype):
    cls = getattr(_diffusers(), class_name)
    # low_cpu_mem_usage=False: the same weights either way, without the `accelerate` nag.
    return _load(lambda: cls.from_pretrained(name_or_path, torch_dtype=dtype, low_cpu_mem_usage=False),
                 name_or_path, is_local, class_name)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())  # one line, whatever the library put in
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _looks_like_path(spec: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else with separators is meant as a folder."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec or Path(spec).exists()
