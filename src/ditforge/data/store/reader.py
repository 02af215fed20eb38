"""Reading a latent store: the memory-mapped `LatentStore` and the training posterior sample.

Reading maps each shard once (`torch.UntypedStorage.from_file`, which keeps no file
descriptor open) and gathers records by memory copy. The layout is in `format.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditforge.data.autoencoder.normalisation import LatentNorm
from ditforge.data.store.format import FORMAT, MANIFEST, MANIFEST_CHECKSUM, NORMALISED_VERSION, SHARD_DIR, STORE_DTYPES, map_shard
from ditforge.checksums import check_file, check_size, own_checksum_damage
from ditforge.errors import UserError


class LatentStore:
    """A finished store, memory-mapped: `get_batch` draws training latents from it.

    Each shard is mapped once, at open; a batch is gathered by one memory copy per record
    from the maps. The object pickles as its folder (a DataLoader worker maps the shards anew).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._open()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.root)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root = Path(state["root"])
        self._open()

    def _open(self) -> None:
        root = self.root
        path = root / MANIFEST
        if not path.is_file():
            if (root / SHARD_DIR).is_dir():
                raise UserError(f"{str(root)!r} is an unfinished latent store (no {MANIFEST} yet); rerun the extraction to finish it")
            if not root.exists():
                raise UserError(f"latent store {str(root)!r} does not exist")
            raise UserError(f"{str(root)!r} is not a latent store (no {MANIFEST}); create one with `ditforge extract`")
        try:
            manifest = json.loads(path.read_text())
            if isinstance(manifest, dict) and (damage := own_checksum_damage(manifest, MANIFEST_CHECKSUM)):
                raise ValueError(damage)
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
            if not isinstance(manifest.get("version"), int) or manifest["version"] > NORMALISED_VERSION:
                raise ValueError(f"version {manifest.get('version')!r}; this ditforge reads up to {NORMALISED_VERSION}")
            shape = tuple(int(s) for s in manifest["latent_shape"])
            entries = [(str(s["file"]), int(s["count"])) for s in manifest["shards"]]
            count = int(manifest["count"])
            if manifest["dtype"] not in STORE_DTYPES or len(shape) != 3 or sum(c for _, c in entries) != count:
                raise ValueError("dtype, latent shape or counts do not agree")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{str(path)!r} is corrupt ({type(e).__name__}: {e}); extract the store again") from None
        self.manifest = manifest
        self.latent_shape: tuple[int, int, int] = shape
        self._posterior: list[np.ndarray] = []
        # 2 rows a view (mean, log-variance), 1 for a deterministic autoencoder's means-only records
        self._rows = 1 if manifest.get("means_only") else 2
        # the channel statistics the model's inputs are normalised by (`--latent-norm channel`), or None
        self._channel = LatentNorm.from_record(self.autoencoder_record(manifest)).channel_part(torch.zeros(()))
        self._pixels: list[np.ndarray] = []  # (n, C_img, H, W) uint8 per shard, with `extract --keep-pixels`
        pixels_shape = manifest.get("pixels_shape")
        self.pixels_shape: tuple[int, int, int] | None = tuple(int(s) for s in pixels_shape) if pixels_shape else None
        labels, items = [], []
        self._maps = []  # keeps the mapped tensors (and their storages) alive
        # each shard's size and checksum as written (none in stores extracted before they were
        # recorded): sizes and headers checked here, each shard's checksum the first time a batch
        # reads from it (`_check_shards`)
        self._sums = [{k: s[k] for k in ("size", "crc32") if k in s} for s in manifest["shards"]]
        self._checked: set[int] = set()
        for k, (file, n) in enumerate(entries):
            shard = root / file
            if not shard.is_file():
                raise UserError(f"latent store {str(root)!r}: shard {file!r} listed in {MANIFEST} is missing")
            if damage := check_size(shard, self._sums[k]):
                raise UserError(f"latent store {str(root)!r}: shard {file!r} is damaged: {damage}; {repair_hint(root)}")
            tensors, _ = map_shard(shard)
            expected = (n, 2, self._rows, *shape)
            if "posterior" not in tensors or tuple(tensors["posterior"].shape) != expected or tensors["label"].shape != (n,):
                raise UserError(f"latent store {str(root)!r}: shard {file!r} does not match {MANIFEST} (expected records {expected})")
            if self.pixels_shape is not None:
                pix = tensors.get("pixels")
                if pix is None or tuple(pix.shape) != (n, *self.pixels_shape) or pix.dtype != torch.uint8:
                    raise UserError(f"latent store {str(root)!r}: shard {file!r} lacks the pixels {MANIFEST} lists (uint8 {(n, *self.pixels_shape)})")
                self._pixels.append(pix.numpy())
            self._maps.append(tensors)
            self._posterior.append(tensors["posterior"].numpy())
            labels.append(tensors["label"].clone())
            items.append(tensors["item"].clone())
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)  # (N,) class ids, in memory
        self.items = torch.cat(items) if items else torch.zeros(0, dtype=torch.int64)  # (N,) item list positions
        self._offsets = np.concatenate([[0], np.cumsum([n for _, n in entries])]).astype(np.int64)
        self._np_dtype = np.float16 if manifest["dtype"] == "float16" else np.float32
        self.deterministic = bool(manifest.get("posterior_std_zero", False)) or self._rows == 1

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def class_names(self) -> list[str]:
        names = self.manifest.get("class_names")
        return list(names) if names is not None else [str(i) for i in range(self.num_classes)]

    @property
    def num_classes(self) -> int:
        return int(self.manifest.get("num_classes", 0))

    @property
    def autoencoder(self) -> dict[str, Any]:
        """The `describe()` of the autoencoder that made the store, with the channel statistics
        (for `load_autoencoder`: its decode undoes what the model's inputs are)."""
        return self.autoencoder_record(self.manifest)

    @staticmethod
    def autoencoder_record(manifest: dict[str, Any]) -> dict[str, Any]:
        return dict(manifest.get("autoencoder") or {"kind": "identity"})

    def normalise(self, mean: torch.Tensor, std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Records as stored (float32 (B, C, h, w)) -> the model's inputs: (x - channel_mean) /
        channel_std with the manifest's channel statistics, unchanged without them."""
        if self._channel is None:
            return mean, std
        m, s = self._channel
        return (mean - m) / s, None if std is None else std / s

    def gather(self, indices: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, logvar, labels) of records `indices`, flipped where `flip`, as stored (float16
        or float32, (B, C, h, w); logvar -inf for means-only records; before `normalise`)."""
        mean, logvar = self._gather(indices, flip)
        return torch.from_numpy(mean), torch.from_numpy(logvar), self.labels[torch.as_tensor(indices).reshape(-1)]

    def _locate(self, indices: torch.Tensor, flip: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
        """(shard, row in shard, flip) of each record of `indices`, checked."""
        idx = torch.as_tensor(indices).reshape(-1).numpy().astype(np.int64, copy=False)
        f = torch.as_tensor(flip).reshape(-1).numpy().astype(np.int64)
        if f.shape != idx.shape:
            raise ValueError(f"{idx.size} indices but {f.size} flip flags")
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"record indices {idx.min()}..{idx.max()} outside the store's {n} records")
        shard = np.searchsorted(self._offsets, idx, side="right") - 1  # (B,)
        self._check_shards(shard.tolist())
        return shard.tolist(), (idx - self._offsets[shard]).tolist(), f.tolist()

    def _check_shards(self, shards: list[int]) -> None:
        """The checksum of each shard in `shards` that this process has not read from yet, against
        the manifest's: so every record that trains was checked once per process, and damage stops
        training with one line naming the shard. One read of each shard per process (from the page
        cache, mostly), about the store's size at 2 GB/s spread over the first batches; a check
        of values (finite, in range) would be cheaper but misses most flipped bits."""
        for k in set(shards) - self._checked:
            if self._sums[k] and (damage := check_file(self.root / self.manifest["shards"][k]["file"], self._sums[k])):
                raise UserError(f"latent store {str(self.root)!r}: shard {self.manifest['shards'][k]['file']!r} is damaged: "
                                f"{damage}; {repair_hint(self.root)}")
            self._checked.add(k)

    def _gather(self, indices: torch.Tensor, flip: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Stored (mean, logvar) of records `indices`, flipped where `flip`: (B, C, h, w) each."""
        located = self._locate(indices, flip)
        out = np.empty((len(located[0]), self._rows, *self.latent_shape), dtype=self._np_dtype)  # (B, 2 or 1, C, h, w)
        posterior = self._posterior
        for j, (s, i, k) in enumerate(zip(*located)):
            out[j] = posterior[s][i, k]  # one contiguous copy: mean and logvar of the chosen view
        return out[:, 0], out[:, 1] if self._rows == 2 else np.full_like(out[:, 0], -np.inf)

    def pixels(self, indices: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """The kept images of records `indices`, flipped where `flip` (the view of their latents):
        uint8 (B, C_img, H, W). Only for a store extracted with `--keep-pixels`."""
        if self.pixels_shape is None:
            raise UserError(f"latent store {str(self.root)!r} keeps no pixels; extract it again with --keep-pixels")
        located = self._locate(indices, flip)
        out = np.empty((len(located[0]), *self.pixels_shape), dtype=np.uint8)  # (B, C_img, H, W)
        for j, (s, i, k) in enumerate(zip(*located)):
            out[j] = self._pixels[s][i, :, :, ::-1] if k else self._pixels[s][i]
        return torch.from_numpy(out)

    def posterior(self, indices: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, labels) of the model's inputs of records `indices` (flipped where `flip`),
        float32 (B, C, h, w): normalised by the manifest's channel statistics where it has them."""
        mean, logvar = self._gather(indices, flip)
        std = torch.from_numpy(logvar).float().mul_(0.5).exp_()
        mean, std = self.normalise(torch.from_numpy(mean).float(), std)
        return mean, std, self.labels[torch.as_tensor(indices).reshape(-1)]

    def sample(
        self, picks: Sequence[tuple[torch.Tensor, torch.Tensor, int]], *, seed: int, position: int, global_batch: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Training latents and labels of micro-batches of one global batch: [(z, labels)], z
        (b, C, h, w) float32, labels (b,) int64.

        picks: (indices, flip, offset) per micro-batch, offset its first row in the global batch
        of `global_batch` images that starts at image `position` of the run; z is drawn by
        `sample_posterior`. A store whose std is all zero (pixel space, DC-AE) draws nothing: z =
        mean. With channel statistics in the manifest, z is then normalised by them (`normalise`).
        """
        gathered = [(*self._gather(idx, flip), off) for idx, flip, off in picks]
        labels = [self.labels[torch.as_tensor(idx).reshape(-1)] for idx, _, _ in picks]
        if self.deterministic:
            latents = [torch.from_numpy(mean).float() for mean, _, _ in gathered]
        else:
            parts = [(torch.from_numpy(mean), torch.from_numpy(logvar), off) for mean, logvar, off in gathered]
            latents = sample_posterior(parts, seed=seed, position=position, global_batch=global_batch)
        latents = [self.normalise(z)[0] for z in latents]
        return list(zip(latents, labels))

    def get_batch(self, indices: torch.Tensor, flip: torch.Tensor, seed: int = 0, position: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Training latents (B, C, h, w) float32 and labels (B,) int64 of records `indices`, as one
        global batch of B images at `position` (see `sample`)."""
        ((z, labels),) = self.sample([(indices, flip, 0)], seed=seed, position=position, global_batch=len(torch.as_tensor(indices).reshape(-1)))
        return z, labels


def sample_posterior(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, int]], *, seed: int, position: int, global_batch: int
) -> list[torch.Tensor]:
    """Posterior samples z = mean + exp(0.5 logvar) * eps, eps ~ N(0, I), of a global batch's micro-batches.

    Latent diffusion trains on latents of the autoencoder's posterior q(z | x) = N(mean,
    diag(exp(logvar))) (Rombach et al. 2022, sec. 3.1), sampled by the reparameterisation of
    Kingma & Welling 2014 (eq. 10), z = mu + sigma * eps, fresh at every visit.

    | name | symbol |
    |---|---|
    | `mean` | mu (posterior mean x scale) |
    | `logvar` | log sigma^2 (-inf where sigma = 0) |
    | `eps` | eps ~ N(0, I) |

    parts: (mean, logvar, offset) per micro-batch: mean and logvar (b, C, h, w), float16 or
    float32 as stored, and the micro-batch's first row in the global batch. eps is one
    (global_batch, C, h, w) draw from a `torch.Generator` seeded `seed * 2**40 + position`
    (position: images of the run before this batch), of which a micro-batch takes rows
    [offset, offset + b): the latents of an image are the same for any world size or gradient
    accumulation, and after a resume. Returns z per part, (b, C, h, w) float32.
    """
    g = torch.Generator().manual_seed(seed * 2**40 + position)
    eps = torch.randn((global_batch, *parts[0][0].shape[1:]), generator=g)  # (G, C, h, w)
    out = []
    for mean, logvar, offset in parts:
        std = logvar.float().mul(0.5).exp_()  # (b, C, h, w) sigma
        out.append(std.mul_(eps[offset : offset + mean.shape[0]]).add_(mean.float()))  # z = mu + sigma * eps
    return out


def repair_hint(root: str | Path) -> str:
    """What to do about a damaged shard of the store `root`."""
    return (f"`ditforge verify {root}` lists every damaged file, and the extraction's own command with --repair "
            "re-encodes only the damaged shards")
