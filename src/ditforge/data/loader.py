"""Batches for training: an infinite, resumable order over a data set.

The order is a pure function of (seed, epoch): epoch e visits the set in the permutation drawn
from a generator seeded with `seed * 1_000_003 + e`. The loader's whole state is therefore one
number, the count of images already delivered (`position`), and a run resumed from a
checkpoint continues with exactly the images an uninterrupted run would have seen (EDM2's
rule: progress is counted in images). Flips are drawn from the same per-epoch generator.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, flip) for one epoch: a permutation of range(n) and a bool per visit."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)  # (n,)
    flip = torch.rand(n, generator=g) < 0.5  # (n,)
    return order, flip


class TensorSource:
    """An in-memory labelled set (pixel space): `get_batch` gathers and flips."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):  # (N, C, H, W), (N,)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def get_batch(self, idx: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[idx]  # (B, C, H, W)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx]

    def get_batches(self, picks, *, seed: int, position: int, global_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) of each (indices, flip, offset) pick: pixels draw no noise."""
        return [self.get_batch(idx, flip) for idx, flip, _ in picks]


class StoreSource:
    """A latent store (data/store/) as a training source: posterior samples, stored flips."""

    def __init__(self, store):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def get_batches(self, picks, *, seed: int, position: int, global_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(z, y) of each (indices, flip, offset) pick, z drawn by `data.store.sample_posterior`."""
        return self.store.sample(picks, seed=seed, position=position, global_batch=global_batch)  # (b, C, h, w) float32, (b,)


class InfiniteLoader:
    """Global batches forever, split over ranks and accumulation steps.

    `position` counts images delivered (over all ranks) since the start of training. Step s
    covers positions [s G, (s + 1) G) of the endless sequence of epochs; its G images are cut
    into world_size x grad_accum micro-batches of b, and micro-batch m of rank r is the slice
    at offset (m * world_size + r) * b. Any world size and accumulation therefore sees the same
    global batch, so a 2-process run matches a 1-process run with the same global batch.
    """

    def __init__(
        self,
        source,  # len(), get_batches(picks, seed=, position=, global_batch=) -> [(x, y)]
        global_batch: int,
        seed: int = 0,
        hflip: bool = False,
        position: int = 0,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
    ):
        if len(source) == 0:
            raise ValueError("the data set is empty")
        if global_batch <= 0 or global_batch % (world_size * grad_accum):
            raise ValueError(
                f"global batch {global_batch} must be a positive multiple of world size x accumulation "
                f"({world_size} x {grad_accum})"
            )
        self.source, self.global_batch, self.seed, self.hflip = source, global_batch, seed, hflip
        self.position, self.rank, self.world_size, self.grad_accum = position, rank, world_size, grad_accum
        self.micro_batch = global_batch // (world_size * grad_accum)
        self._epoch_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def _epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, *epoch_permutation(len(self), self.seed, epoch))
        return self._epoch_cache[1], self._epoch_cache[2]

    def indices(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Data indices and flip flags of the images at global positions start..start+count-1."""
        n = len(self)
        idx, flips = [], []
        pos, end = start, start + count
        while pos < end:
            epoch, offset = divmod(pos, n)
            take = min(end - pos, n - offset)
            order, flip = self._epoch(epoch)
            idx.append(order[offset : offset + take])
            flips.append(flip[offset : offset + take])
            pos += take
        flip = torch.cat(flips) if self.hflip else torch.zeros(count, dtype=torch.bool)
        return torch.cat(idx), flip

    def offsets(self) -> list[int]:
        """Offsets, within a global batch, of this rank's micro-batches."""
        b = self.micro_batch
        return [(m * self.world_size + self.rank) * b for m in range(self.grad_accum)]

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches (x, y) of the next global batch; advances `position`.

        A latent store samples each visit's latent from its stored posterior, with noise that
        is a function of (seed, position) and the micro-batch's offset, so it too is the same
        for any world size and after a resume (`data.store.sample_posterior`)."""
        picks = [(*self.indices(self.position + off, self.micro_batch), off) for off in self.offsets()]
        out = self.source.get_batches(picks, seed=self.seed, position=self.position, global_batch=self.global_batch)
        self.position += self.global_batch
        return out

    def close(self) -> None:
        """Nothing to release (the same interface as `Prefetcher`)."""


class Prefetcher:
    """An `InfiniteLoader` run ahead in a background thread: the next `depth` steps' batches are
    read, sampled and (for a GPU) pinned while the current step trains.

    Pinned batches make `.to(device, non_blocking=True)` a true asynchronous copy; from pageable
    memory the copy waits for all the work queued on the GPU, so the host could not run ahead.
    Batches are a function of the position alone, so training is the same with or without it.
    `position` is that of the next batch handed out (what a checkpoint records).
    """

    def __init__(self, loader: InfiniteLoader, depth: int = 2, pin_memory: bool = False):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.loader, self.pin_memory = loader, pin_memory
        self.position = loader.position
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ditforge-prefetch", daemon=True)
        self._thread.start()

    def offsets(self) -> list[int]:
        return self.loader.offsets()

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batches = self.loader.next_step()
                if self.pin_memory:
                    batches = [tuple(t.pin_memory() for t in b) for b in batches]  # (x, y[, REPA features or stored pixels])
                if not self._put(("batches", batches)):
                    return
        except BaseException as e:  # handed to the training thread, raised there
            self._put(("error", e))

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same as `InfiniteLoader.next_step()` at `position`, usually ready already."""
        kind, value = self._queue.get()
        if kind == "error":
            self._stop.set()
            raise value
        self.position += self.loader.global_batch
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
