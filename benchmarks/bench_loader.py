"""Reading training latents: our sharded, memory-mapped store against one .npy file per image.

Builds, in a temporary folder, a latent store of --records records of 4x32x32 latents (random
data written through `LatentWriter`: no VAE needed) and the one-file-per-image layout of the
same records (each file holds the same float16 mean and log-variance of the image and its
flip, as `np.save` writes them; labels in one array in memory, which favours that layout).
Then times random batches (indices and flips drawn at random, as training draws them) from
each, two ways:

- `read`: the records' stored mean and log-variance for the chosen flip (`LatentStore.gather`
  vs `np.load` per file);
- `sample`: training latents mean + std * eps, float32 (`LatentStore.get_batch` vs `np.load`
  per file plus the same arithmetic).

With `--pixels S` each record of the store also keeps an S x S RGB image (what `extract
--keep-pixels` stores for REPA), and a third reader times `LatentStore.pixels` (the images of a
batch in the view of their latents: flipped copies where chosen) as images/s.

Both layouts are timed in a new process (as `ditforge train` opens a store that `ditforge
extract` wrote), from the page cache (the steady state of training on a set that fits in
memory), after untimed warm-up batches (the first ~20 batches of a new process run up to 2x
slower for either layout), in rounds that alternate the readers. Prints latents/s of each
(median of the rounds), the ratios, and the command and machine.

    .venv/bin/python benchmarks/bench_loader.py                      # 50,000 records, about 3.5 GB of temp files
    .venv/bin/python benchmarks/bench_loader.py --records 5000 --reps 10   # a quick look

Recorded (2026-11-26, this project's machine: 2 shared cores of an AMD EPYC VM, torch 2.13 CPU,
one torch thread, load average 0.5-1.3):

    $ python benchmarks/bench_loader.py --dir /tmp/bl
    # 50,000 records: store 1.53 GiB in 49 shards, per-file 1.53 GiB in 50,000 files
    # random batches of 256: 10 untimed + 40 timed, 3 rounds alternating, median (min-max)
    read    ours   407,993 (379,363-408,198) latents/s   per-file    11,240 (11,175-11,538) latents/s   ratio  36.3x
    sample  ours    36,170 (24,046-37,482) latents/s   per-file     7,836 (7,560-8,365) latents/s   ratio   4.6x

A gathered record costs ~2.5 us (one 16 KiB copy out of the map); a per-file record ~90 us
(open, header parse, read, close). `sample` is bound by drawing 256 x 4096 normal numbers
(`torch.randn`, ~5 ms on one core), which both layouts pay; a GPU trainer can take `gather()`'s
float16 records and draw eps on the GPU instead.

An earlier version of this script timed 20 batches right after writing both layouts, in the
same process, without warm-up, and recorded 9.3x (53,524 vs 5,753 latents/s) on a machine
with a load average of 4: that measured the start-up of the process more than the readers.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ditforge.data.store import LatentStore, LatentWriter, finalize_store

SHAPE = (4, 32, 32)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build(root: Path, records: int, shard_size: int, seed: int, pixels: int = 0) -> None:
    """The store (via LatentWriter) and the per-file layout of the same stored values."""
    files = root / "per_file"
    files.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    writer = LatentWriter(root / "store", shard_size=shard_size, num_items=records)
    labels = torch.randint(0, 1000, (records,), generator=g)
    for start in range(0, records, shard_size):
        n = min(shard_size, records - start)
        mean = torch.randn(n, 2, *SHAPE, generator=g)  # (n, 2, C, h, w): image and flip
        std = (0.5 * (torch.rand(n, 2, *SHAPE, generator=g) * 10 - 25)).exp()  # SD-VAE-like tiny std
        images = torch.randint(0, 256, (n, 3, pixels, pixels), generator=g, dtype=torch.uint8) if pixels else None
        writer.add(torch.arange(start, start + n), labels[start : start + n], mean, std, images)
        record = torch.stack([mean.half(), (2 * std.log()).half()], dim=2).numpy()  # (n, 2, 2, C, h, w) as in the store
        for j in range(n):
            np.save(files / f"{start + j}.npy", record[j])
    writer.close()
    os.sync()  # no write-back of the new files during the timings
    finalize_store(root / "store", {"source": "bench_loader (random)", "autoencoder": {"kind": "random"}})
    np.save(root / "labels.npy", labels.numpy())


def per_file_read(files: Path, idx: np.ndarray, flip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.empty((len(idx), *SHAPE), np.float16)
    logvar = np.empty_like(mean)
    for j, (i, f) in enumerate(zip(idx.tolist(), flip.tolist())):
        rec = np.load(files / f"{i}.npy")  # (2, 2, C, h, w): [image, flip] x [mean, logvar]
        mean[j], logvar[j] = rec[f, 0], rec[f, 1]
    return mean, logvar


def per_file_sample(files: Path, labels: np.ndarray, idx, flip, generator) -> tuple[torch.Tensor, torch.Tensor]:
    mean, logvar = per_file_read(files, idx, flip)
    eps = torch.randn((len(idx), *SHAPE), generator=generator)
    std = torch.from_numpy(logvar).float().mul_(0.5).exp_()
    return eps.mul_(std).add_(torch.from_numpy(mean).float()), torch.from_numpy(labels[idx])


def time_it(fn, batches, warmup: int) -> float:
    """Latents per second of fn over batches[warmup:] (the first `warmup` batches untimed)."""
    for b in batches[:warmup]:
        fn(*b)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        fn(*b)
    return (len(batches) - warmup) * len(batches[0][0]) / (time.perf_counter() - t0)


def measure(root: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """Latents/s of the four readers, `args.rounds` times each, alternating (run in a fresh process)."""
    torch.set_num_threads(args.threads)
    store = LatentStore(root / "store")
    files, labels = root / "per_file", np.load(root / "labels.npy")
    n = len(store)
    rng = np.random.default_rng(args.seed)

    def batches():
        out = [(rng.integers(0, n, args.batch), rng.random(args.batch) < 0.5) for _ in range(args.warmup + args.reps)]
        return [(torch.from_numpy(i), torch.from_numpy(f)) for i, f in out]

    # same values both ways (same noise: sample_posterior seeds seed * 2**40 + position)
    i0, f0 = batches()[0]
    ours, _ = store.get_batch(i0, f0, seed=1, position=0)
    theirs, _ = per_file_sample(files, labels, i0.numpy(), f0.numpy().astype(np.int64), torch.Generator().manual_seed(2**40))
    assert torch.equal(ours, theirs), "the two layouts disagree"

    visits, g2 = itertools.count(), torch.Generator().manual_seed(2)
    readers = {
        "read ours": lambda i, f: store.gather(i, f),
        "read per-file": lambda i, f: per_file_read(files, i.numpy(), f.numpy().astype(np.int64)),
        "sample ours": lambda i, f: store.get_batch(i, f, seed=2, position=next(visits)),
        "sample per-file": lambda i, f: per_file_sample(files, labels, i.numpy(), f.numpy().astype(np.int64), g2),
    }
    if store.pixels_shape is not None:
        readers["pixels ours"] = lambda i, f: store.pixels(i, f)
    rates: dict[str, list[float]] = {k: [] for k in readers}
    for _ in range(args.rounds):  # alternate, so that machine noise hits both layouts alike
        for name, fn in readers.items():
            rates[name].append(time_it(fn, batches(), args.warmup))  # fresh random records each time
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=40, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed batches before each measurement")
    p.add_argument("--rounds", type=int, default=3, help="measurements of each reader, alternating; the median is shown")
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the arithmetic of `sample`)")
    p.add_argument("--dir", default=None, help="where to build (default: a new temp folder, removed after)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pixels", type=int, default=0, help="also keep an RGB image of this size in each record, and time reading them")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: time an existing build, print JSON
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args)))
        return

    root = Path(tempfile.mkdtemp(prefix="bench_loader-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        build(root, args.records, args.shard_size, args.seed, args.pixels)
        build_s = time.perf_counter() - t0
        # Time in a new process, as `ditforge train` opens a store that `ditforge extract` wrote.
        cmd = [sys.executable, __file__, *sys.argv[1:], "--measure", str(root)]
        rates = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        size = lambda path: sum(f.stat().st_size for f in path.rglob("*") if f.is_file())  # noqa: E731
        shards = len(list((root / "store").rglob("*.safetensors")))
        print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
        print(
            f"# {datetime.date.today()} | {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({args.threads} thread{'s' * (args.threads != 1)}), numpy {np.__version__}, Python {platform.python_version()}, {platform.system()}, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"# {args.records:,} records of {SHAPE} (mean + logvar of image and flip, float16): store "
            f"{size(root / 'store') / 2**30:.2f} GiB in {shards} shards, per-file "
            f"{size(root / 'per_file') / 2**30:.2f} GiB in {args.records:,} files; built in {build_s:.0f} s; warm page cache"
        )
        print(f"# random batches of {args.batch}: {args.warmup} untimed + {args.reps} timed, {args.rounds} rounds alternating, median (min-max)")
        for kind in ("read", "sample"):
            a, b = rates[f"{kind} ours"], rates[f"{kind} per-file"]
            span = lambda r: f"{statistics.median(r):>9,.0f} ({min(r):,.0f}-{max(r):,.0f})"  # noqa: E731
            print(f"{kind:6s}  ours {span(a)} latents/s   per-file {span(b)} latents/s   "
                  f"ratio {statistics.median(a) / statistics.median(b):5.1f}x")
        if "pixels ours" in rates:
            r = rates["pixels ours"]
            print(f"pixels  ours {statistics.median(r):>9,.0f} ({min(r):,.0f}-{max(r):,.0f}) images/s of 3x{args.pixels}x{args.pixels} "
                  f"({statistics.median(r) * 3 * args.pixels**2 / 2**20:,.0f} MiB/s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
