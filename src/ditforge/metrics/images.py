"""Reading images for the metrics: uint8 (N, H, W, 3) batches from an `.npz` (memory-mapped
where it can be) or from an image folder, and a reference given as either or as statistics.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from ditforge.errors import UnreadableImage, UserError
from ditforge.metrics.inception import MissingFileError
from ditforge.metrics.reference import RefStats, is_reference_file, load_reference, open_npz


def _mmap_npz_member(path: Path, name: str) -> np.ndarray | None:
    """Memory-map member `name` of an uncompressed .npz (what np.savez and ditforge write);
    None when it can't be mapped (compressed, Fortran order, object dtype)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = npy_format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(fh)
        else:
            return None
        if fortran or dtype.hasobject:
            return None
        offset = fh.tell()
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))


def _check_image_array(arr: np.ndarray, where: str) -> None:
    if arr.dtype != np.uint8:
        raise UserError(f"{where}: arr_0 must be uint8 pixels 0..255, got dtype {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise UserError(f"{where}: arr_0 must be (N, H, W, 3) RGB images, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise UserError(f"{where}: arr_0 holds no images")


def read_npz_images(path: str | os.PathLike) -> np.ndarray:
    """`arr_0` of an ADM sample batch: uint8 (N, H, W, 3), memory-mapped when the .npz is
    uncompressed (np.savez, ditforge's writers), so a 50,000-image file is read as it is used."""
    path = Path(path)
    with open_npz(path, "image batch") as f:
        if "arr_0" not in f.files:
            raise UserError(f"{str(path)!r} has no 'arr_0' array of images (it holds {sorted(f.files)})")
    try:
        arr = _mmap_npz_member(path, "arr_0")
        if arr is None:
            with np.load(path, allow_pickle=False) as f:
                arr = f["arr_0"]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{str(path)!r}: arr_0 cannot be read ({type(e).__name__}: {e})") from e
    _check_image_array(arr, str(path))
    return arr


def image_files(folder: Path) -> list[Path]:
    from ditforge.data.sources import IMAGE_EXTENSIONS

    return sorted(
        Path(d) / name
        for d, dirs, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
    )


def iter_folder_images(folder: str | os.PathLike, image_size: int | None = None, batch_size: int = 64) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of every image under `folder` (recursively, any class sub-folders),
    converted to RGB; with `image_size`, ADM's centre crop to image_size x image_size (the crop the
    training data gets). Without it all images must share one size. Unreadable files are skipped
    with a warning."""
    from ditforge.data.sources import center_crop_arr, open_image, to_rgb

    folder = Path(folder)
    files = image_files(folder)
    if not files:
        raise UserError(f"no images under {str(folder)!r} (looked recursively for the usual image extensions)")
    shape, batch, skipped = None, [], []
    for file in files:
        try:
            im = open_image(file)
        except UnreadableImage as e:
            skipped.append(f"{file}: {e}")
            continue
        im = to_rgb(im)
        arr = center_crop_arr(im, image_size) if image_size else np.asarray(im)
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise UserError(
                f"images under {str(folder)!r} differ in size ({file} is {arr.shape[1]}x{arr.shape[0]}, "
                f"earlier ones {shape[1]}x{shape[0]}); pass an image size to centre-crop them all alike"
            )
        batch.append(arr)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s) under {str(folder)!r}, e.g. {skipped[0]}", stacklevel=2)
    if shape is None:
        raise UserError(f"none of the {len(files)} image files under {str(folder)!r} could be read, e.g. {skipped[0]}")


def load_reference_images(path_or_folder: str | os.PathLike, image_size: int | None = None) -> np.ndarray | RefStats:
    """Reference images as uint8 (N, H, W, 3), from an image folder (recursively) or an .npz with
    `arr_0` (ADM sample or reference batch); a reference statistics file from `save_reference` is
    recognised by its format key and returned as RefStats (there is nothing left to compute)."""
    path = Path(path_or_folder)
    if not path.exists():
        raise MissingFileError(f"reference {str(path)!r} not found (expected an image folder or an .npz)")
    if path.is_dir():
        return np.concatenate(list(iter_folder_images(path, image_size)))
    if is_reference_file(path):
        return load_reference(path)
    images = read_npz_images(path)
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        raise UserError(
            f"{str(path)!r} holds {images.shape[2]}x{images.shape[1]} images, not the {image_size}x{image_size} asked for"
        )
    return images

