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
from ditforge.train.step import conditioned, step_randomness


class _StorageTracker(TorchDispatchMode):
    """Remembers (weakly) every storage that an operation returns, with the part that made it."""

    def __init__(self, preexisting: set[int]):
        super().__init__()
        self.preexisting = preexisting
        self.part = "other"
        self.seen: dict[int, tuple[StorageWeakRef, int, str]] = {}  # storage id -> (ref, bytes, part)
        self.alive_by_part: dict[str, int] = {}
        self.attention_ops: set[str] = set()  # the fused attention kernels that ran
        self.packed: dict[int, int] = {}  # storage id -> bytes, of tensors autograd's pack hook saw

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

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """saved_tensors_hooks' pack hook: notes what autograd itself saves (outside checkpointed regions)."""
        key = StorageWeakRef(t.untyped_storage()).cdata
        if key not in self.preexisting:
            self.packed[key] = t.untyped_storage().nbytes()
        return t

    def alive(self) -> dict[str, int]:
        by_part: dict[str, int] = {}
        for ref, nbytes, part in self.seen.values():
            if not ref.expired():
                by_part[part] = by_part.get(part, 0) + nbytes
        return by_part


def _label_parts(model: torch.nn.Module, tracker: _StorageTracker) -> list:
    """Forward hooks that tell the tracker which part of the model runs: the embedders (and the
    positional add that follows them), each block, the final layer, then the loss."""
    parts = [("embedders", m) for m in (model.x_embedder, model.t_embedder, model.y_embedder)]
    parts += [(f"block {i}", b) for i, b in enumerate(model.blocks)] + [("final layer", model.final_layer)]

    def label(name):
        def hook(*_):
            tracker.part = name

        return hook

    handles = [m.register_forward_pre_hook(label(name)) for name, m in parts]
    handles.append(model.final_layer.register_forward_hook(label("loss")))
    return handles


def alive_after_forward(model, objective, cfg, x: torch.Tensor, y: torch.Tensor, precision: str) -> _StorageTracker:
    """The tracker of the training forward of (x, y): `alive()` gives the bytes by model part
    that it leaves alive for backward, `packed` what autograd's saved-tensor hooks saw, and
    `attention_ops` the fused attention kernels it ran (none for math or explicit attention).

    The forward is the one of `train/step.py`: the same randomness, autocast and loss; the
    backward then runs too (so checkpointing's recompute path is exercised) and frees it all.
    """
    device = x.device
    cfg = dataclasses.replace(cfg, global_batch=max(cfg.global_batch, x.shape[0]))
    t_all, noise_all, drop_all = step_randomness(cfg, 0, tuple(x.shape[1:]), objective, device)
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
        with tracker, torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t), autocast(precision, device):
            tracker.part = "loss"
            losses = objective.training_losses(conditioned(model, drop), x, t, y, noise=noise, drop=drop)
            loss = losses["loss"].mean()
        del losses
        gc.collect()
        tracker.alive_by_part = tracker.alive()
    finally:
        for h in handles:
            h.remove()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return tracker


@dataclass
class SavedBytes:
    """Bytes kept for backward: per image (batch 2 - batch 1) and the batch-independent rest."""

    per_image: int
    fixed: int
    per_image_by_part: dict[str, int] = field(default_factory=dict)
    attention_ops: set[str] = field(default_factory=set)  # fused attention kernels that ran
    hooks_per_image: int = 0  # what saved_tensors_hooks see: misses selective checkpointing's kept products

    def per_block(self) -> list[int]:
        return [v for k, v in self.per_image_by_part.items() if k.startswith("block ")]


def saved_bytes(model, objective, cfg, precision: str, device: torch.device) -> SavedBytes:
    """Measure what one training forward keeps for backward, per image, at batches 1 and 2."""
    shape = (model.in_channels, model.input_size, model.input_size)
    g = torch.Generator().manual_seed(0)

    def run(n: int) -> _StorageTracker:
        x = torch.randn((n, *shape), generator=g).to(device)
        y = torch.randint(0, model.num_classes, (n,), generator=g).to(device)
        return alive_after_forward(model, objective, cfg, x, y, precision)

    run(1)  # fills lazy caches (the objective's coefficient tables), which would count as kept
    one, two = run(1), run(2)
    by_part = {p: two.alive_by_part.get(p, 0) - one.alive_by_part.get(p, 0) for p in {**two.alive_by_part, **one.alive_by_part}}
    order = ["embedders", *[f"block {i}" for i in range(len(model.blocks))], "final layer", "loss"]
    per_image = sum(by_part.values())
    return SavedBytes(
        per_image,
        sum(one.alive_by_part.values()) - per_image,
        {p: by_part[p] for p in order if p in by_part},
        one.attention_ops | two.attention_ops,
        sum(two.packed.values()) - sum(one.packed.values()),
    )
