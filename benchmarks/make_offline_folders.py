"""Write three labelled image folders from data that installs offline, for the no-flag table of
README "Train on your own images" (issue 30): two 28x28 greyscale sets other than MNIST and one
small colour set, each of about 3,000 images with 3 broken files, as a user's folder might be.

    python benchmarks/make_offline_folders.py fashion OUT   # apt-get install dataset-fashion-mnist
    python benchmarks/make_offline_folders.py letters OUT   # the machine's DejaVu fonts (fonts-dejavu-core)
    python benchmarks/make_offline_folders.py patches OUT --wheel scikit_image-0.26.0-...whl
                                                          # pip download scikit-image==0.26.0 --no-deps

- fashion: the first 300 images of each of Fashion-MNIST's 10 classes (Debian's copy of the IDX
  files, training split), 28x28 grey, named by class (t-shirt, trouser, ...).
- letters: the letters A to J (notMNIST's classes) drawn white on black at 28x28 in each DejaVu
  font of the machine (22 faces here: sans, serif, mono, condensed, bold, oblique, light), with a
  random size (15-23 px), rotation (+-12 degrees), shift (+-2 px) and blur; 300 a class.
- patches: 32x32 colour crops of 8 photographs that scikit-image's wheel ships (astronaut,
  chelsea, coffee, hubble_deep_field, ihc, motorcycle_left, retina, rocket: one class a
  photograph), each crop taken at a random place of the photograph shrunk by a random factor
  (2-6) and flipped at random; 375 a class. The files are read from the wheel (a zip), so
  scikit-image need not be installed.

Every set is drawn from `--seed` (default 0), so the folders are the same on every machine.
"""

from __future__ import annotations

import argparse
import gzip
import io
import random
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
LETTERS = "ABCDEFGHIJ"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "retina.jpg", "rocket.jpg")


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian dims after a 4-byte magic) as an array."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion(per_class: int, rng: random.Random):
    images, labels = _idx(FASHION_DIR / "train-images-idx3-ubyte.gz"), _idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    for c, name in enumerate(FASHION_CLASSES):
        for i in np.flatnonzero(labels == c)[:per_class]:
            yield name, Image.fromarray(images[i], "L")


def letters(per_class: int, rng: random.Random):
    fonts = sorted(FONT_DIR.glob("*.ttf"))
    if not fonts:
        raise SystemExit(f"no TrueType fonts in {FONT_DIR}: apt-get install fonts-dejavu-core")
    for letter in LETTERS:
        for k in range(per_class):
            font = ImageFont.truetype(str(fonts[k % len(fonts)]), rng.randint(15, 23))
            canvas = Image.new("L", (56, 56), 0)
            ImageDraw.Draw(canvas).text((28 + rng.randint(-2, 2), 28 + rng.randint(-2, 2)), letter, fill=255, font=font, anchor="mm")
            canvas = canvas.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
            canvas = canvas.crop((14, 14, 42, 42)).filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.6)))
            yield letter, canvas


def patches(per_class: int, rng: random.Random, wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        photos = {name: Image.open(io.BytesIO(z.read(f"skimage/data/{name}"))).convert("RGB") for name in PHOTOS}
    for name, photo in photos.items():
        for _ in range(per_class):
            f = rng.uniform(2.0, 6.0)
            small = photo.resize((max(32, round(photo.width / f)), max(32, round(photo.height / f))), Image.BOX)
            x, y = rng.randint(0, small.width - 32), rng.randint(0, small.height - 32)
            crop = small.crop((x, y, x + 32, y + 32))
            yield name.split(".")[0], crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("set", choices=("fashion", "letters", "patches"))
    p.add_argument("out")
    p.add_argument("--per-class", type=int, default=None, help="default: 300 (375 for patches)")
    p.add_argument("--broken", type=int, default=3)
    p.add_argument("--wheel", type=Path, help="patches: a scikit-image wheel (pip download scikit-image==0.26.0 --no-deps)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    if args.set == "patches":
        if args.wheel is None or not args.wheel.is_file():
            raise SystemExit(f"patches needs --wheel, a scikit-image wheel file (got {args.wheel})")
        images = patches(args.per_class or 375, rng, args.wheel)
    else:
        images = {"fashion": fashion, "letters": letters}[args.set](args.per_class or 300, rng)
    out = Path(args.out)
    counts: dict[str, int] = {}
    for label, image in images:
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{counts.get(label, 0):05d}.png")
        counts[label] = counts.get(label, 0) + 1
    for b, label in zip(range(args.broken), sorted(counts)):  # a truncated PNG, a text file named .png
        folder = out / label
        if b % 2 == 0:
            good = (folder / "00000.png").read_bytes()
            (folder / f"broken-{b}.png").write_bytes(good[: len(good) // 2])
        else:
            (folder / f"broken-{b}.png").write_text("not an image\n")
    print(f"wrote {sum(counts.values())} images in {len(counts)} class folders and {args.broken} broken files to {out}")


if __name__ == "__main__":
    main()
