"""Training data opened for `ditforge train`: a latent store, or images held in memory.

Both become a `TrainingData`: the model input's shape, the class names, a source that
`InfiniteLoader` draws batches from, and the autoencoder that turns model inputs back into
pictures (recorded in every checkpoint, so `sample` never has to be told), and the data's
identity (`data_identity`, recorded in every checkpoint, so `eval` can tell whether the data
changed since training).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ditforge.data.loader import StoreSource, TensorSource
from ditforge.data.sources import folder_identity, is_builtin, load_data
from ditforge.errors import UserError

if TYPE_CHECKING:  # only a type: the data reads two fields of the run's config, which sits above data
    from ditforge.config import TrainConfig


@dataclass
class TrainingData:
    """What training needs of its data, whether pixels in memory or a latent store."""

    name: str
    shape: tuple[int, int, int]  # (C, H, W) of the model's input
    class_names: list[str]
    source: TensorSource | StoreSource  # what InfiniteLoader draws batches from
    autoencoder: dict[str, Any]  # how model inputs become pictures (recorded in every checkpoint)
    skipped: list[tuple[str, str]]  # (file, reason) of each unreadable image left out
    identity: dict[str, Any] | None = None  # `data_identity`: {"digest", "items"}; None for a built-in set

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.source)


def is_latent_store(data: str) -> bool:
    return (Path(data) / "manifest.json").is_file()


def data_identity(data: str) -> dict[str, Any] | None:
    """What the data's train / held-out split is taken over, cheaply: {"digest": sha256 hex,
    "items": count}. An image folder: its image files' relative paths and sizes
    (`sources.folder_identity`, items = files); a latent store: its manifest, canonical JSON (the
    source, autoencoder, classes, shards and their item ranges, skipped files; items = records; the
    records' bytes are not read); None for a built-in set (fixed by its package)."""
    if is_builtin(data):
        return None
    path = Path(data)
    if is_latent_store(data):
        manifest = json.loads((path / "manifest.json").read_text())
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        return {"digest": digest, "items": int(manifest.get("count", 0))}
    if not path.is_dir():
        raise UserError(f"data {data!r} is neither a built-in set, a latent store nor an existing image folder")
    return folder_identity(path)


def open_training_data(cfg: TrainConfig) -> TrainingData:
    """A latent store written by `ditforge extract`, or images (built-in set or folder) in memory."""
    if is_latent_store(cfg.data):
        from ditforge.data.store import LatentStore

        store = LatentStore(cfg.data)
        size = store.manifest.get("image_size")
        if cfg.image_size is not None and cfg.image_size != size:
            raise UserError(
                f"the latent store {cfg.data!r} was extracted at {size} px, not --image-size {cfg.image_size}; "
                "leave --image-size out, or extract again at that size"
            )
        skipped = [(s.get("file"), s.get("reason")) for s in store.manifest.get("skipped", [])]
        return TrainingData(Path(cfg.data).name, tuple(store.latent_shape), store.class_names,
                            StoreSource(store), store.autoencoder, skipped, data_identity(cfg.data))
    images = load_data(cfg.data, "train", cfg.image_size)
    return TrainingData(images.name, images.shape, images.class_names, TensorSource(images.images, images.labels),
                        {"kind": "identity"}, images.skipped, data_identity(cfg.data))
