"""Activation memory of a training step, measured on any device (a CPU is enough).

What a step holds between forward and backward is every tensor storage that its forward
created and that is still alive when the forward has returned the loss: the tensors autograd
saved for backward, the block inputs that checkpointing keeps, and the matrix-product outputs
that selective checkpointing caches (which `torch.autograd.graph.saved_tensors_hooks` does not
see, so we count storages instead). A `TorchDispatchMode` notes each storage an operation
returns (weakly: it keeps nothing alive), with the model part that was running; storages
shared by several tensors (views, q/k/v of one qkv product) are counted once.

Per image = bytes at batch 2 - bytes at batch 1; the rest (autocast's bf16 copies of the
weights, the adaLN inputs' few vectors) does not grow with the batch.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ditforge.train.device import autocast
from ditforge.train.step import step_randomness


class _StorageTracker(TorchDispatchMode):
    """Remembers (weakly) every storage that an operation returns, with the part that made it."""

    def __init__(self, preexisting: set[int]):
        super().__init__()
        self.preexisting = preexisting
        self.part = "other"
        self.seen: dict[int, tuple[StorageWeakRef, int, str]] = {}  # storage id -> (ref, bytes, part)
        self.attention_ops: set[str] = set()  # the fused attention kernels that ran

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if "attention" in name:
            self.attention_ops.add(name)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                old = self.seen.get(ref.cdata)
                if ref.cdata not in self.preexisting and (old is None or old[0].expired()):
                    self.seen[ref.cdata] = (ref, storage.nbytes(), self.part)
        return out

    def alive(self) -> dict[str, int]:
        by_part: dict[str, int] = {}
        for ref, nbytes, part in self.seen.values():
            if not ref.expired():
                by_part[part] = by_part.get(part, 0) + nbytes
        return by_part


def _part_names(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    parts = {"embedders": [model.x_embedder, model.t_embedder, model.y_embedder], "final layer": [model.final_layer]}
    parts.update({f"block {i}": [b] for i, b in enumerate(model.blocks)})
    return parts


def _label_parts(model: torch.nn.Module, tracker: _StorageTracker) -> list:
    handles = []
    for name, modules in _part_names(model).items():
        for m in modules:

            def enter(module, args, name=name):
                tracker.part = name

            handles.append(m.register_forward_pre_hook(enter))
    # what follows the final layer (unpatchify, the loss terms) is the loss's
    handles.append(model.final_layer.register_forward_hook(lambda module, args, output: setattr(tracker, "part", "loss")))
    return handles


def alive_after_forward(
    model, diffusion, cfg, x: torch.Tensor, y: torch.Tensor, precision: str
) -> tuple[dict[str, int], set[str]]:
    """Bytes by model part that the training forward of (x, y) leaves alive for backward, and
    the names of the fused attention operations it ran (none for math or explicit attention).

    The forward is the one of `train/step.py`: the same randomness, autocast and loss; the
    backward then runs too (so checkpointing's recompute path is exercised) and frees it all.
    """
    device = x.device
    cfg = dataclasses.replace(cfg, global_batch=max(cfg.global_batch, x.shape[0]))
    t_all, noise_all, drop_all = step_randomness(cfg, 0, tuple(x.shape[1:]), diffusion.num_timesteps, device)
    n = x.shape[0]
    t, noise = t_all[:n], noise_all[:n]
    drop = drop_all[:n] if cfg.model.class_dropout_prob > 0 else None
    model.train()
    gc.collect()
    preexisting = {StorageWeakRef(p.untyped_storage()).cdata for p in [*model.parameters(), *model.buffers()]}
    preexisting |= {StorageWeakRef(v.untyped_storage()).cdata for v in (x, y, t, noise, drop) if v is not None}
    tracker = _StorageTracker(preexisting)
    handles = _label_parts(model, tracker)
    try:
        with tracker, autocast(precision, device):
            tracker.part = "loss"
            losses = diffusion.training_losses(
                lambda x_t, tt, labels: model(x_t, tt, labels, force_drop_ids=drop), x, t, y, noise=noise
            )
            loss = losses["loss"].mean()
        del losses
        gc.collect()
        by_part = tracker.alive()
    finally:
        for h in handles:
            h.remove()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return by_part, tracker.attention_ops


@dataclass
class SavedBytes:
    """Bytes kept for backward: per image (batch 2 - batch 1) and the batch-independent rest."""

    per_image: int
    fixed: int
    per_image_by_part: dict[str, int] = field(default_factory=dict)
    attention_ops: set[str] = field(default_factory=set)  # fused attention kernels that ran

    def per_block(self) -> list[int]:
        return [v for k, v in self.per_image_by_part.items() if k.startswith("block ")]


def saved_bytes(model, diffusion, cfg, precision: str, device: torch.device) -> SavedBytes:
    """Measure what one training forward keeps for backward, per image, at batches 1 and 2."""
    shape = (model.in_channels, model.input_size, model.input_size)
    g = torch.Generator().manual_seed(0)
    runs, attention_ops = [], set()
    for n in (1, 2):
        x = torch.randn((n, *shape), generator=g).to(device)
        y = torch.randint(0, model.num_classes, (n,), generator=g).to(device)
        by_part, ops = alive_after_forward(model, diffusion, cfg, x, y, precision)
        runs.append(by_part)
        attention_ops |= ops
    parts = list(dict.fromkeys([*runs[1], *runs[0]]))
    by_part = {p: runs[1].get(p, 0) - runs[0].get(p, 0) for p in parts}
    ordered = {p: by_part[p] for p in ["embedders", *[f"block {i}" for i in range(len(model.blocks))], "final layer", "loss"] if p in by_part}
    per_image = sum(by_part.values())
    return SavedBytes(per_image, sum(runs[0].values()) - per_image, ordered, attention_ops)
