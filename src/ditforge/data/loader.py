"""Batches for training: an infinite, resumable order over a data set.

The order is a pure function of (seed, epoch): epoch e visits the set in the permutation drawn
from a generator seeded with `seed * 1_000_003 + e`. The loader's whole state is therefore one
number, the count of images already delivered (`position`), and a run resumed from a
checkpoint continues with exactly the images an uninterrupted run would have seen (EDM2's
rule: progress is counted in images). Flips are drawn from the same per-epoch generator.
"""

from __future__ import annotations

import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, flip) for one epoch: a permutation of range(n) and a bool per visit."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)  # (n,)
    flip = torch.rand(n, generator=g) < 0.5  # (n,)
    return order, flip


class InfiniteLoader:
    """Yields (images, labels) batches forever from in-memory tensors.

    `position` counts images delivered since the start of training; set it (from a
    checkpoint) to resume. Batches run across epoch boundaries without dropping images.
    """

    def __init__(
        self,
        images: torch.Tensor,  # (N, C, H, W)
        labels: torch.Tensor,  # (N,)
        batch_size: int,
        seed: int = 0,
        hflip: bool = False,
        position: int = 0,
    ):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if images.shape[0] == 0:
            raise ValueError("the data set is empty")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.hflip = batch_size, seed, hflip
        self.position = position
        self._epoch_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

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
        return torch.cat(idx), torch.cat(flips)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx, flip = self.indices(self.position, self.batch_size)
        self.position += self.batch_size
        x = self.images[idx]  # (B, C, H, W)
        if self.hflip:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx]

    def __iter__(self):
        while True:
            yield self.next_batch()
