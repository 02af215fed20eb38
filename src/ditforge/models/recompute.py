"""Activation recomputation for DiT blocks: what a training step keeps from forward to backward.

A DiT block's matrix products (qkv, attention, output projection, fc1, fc2) are nearly all of
its FLOPs; everything between them (LayerNorm, adaLN modulation, the bf16 casts of autocast,
GELU, gates, residual adds) is cheap pointwise work whose outputs are as big as the products'.
The modes trade memory for recomputation in steps (per image, DiT-XL/2 at 256 px, bf16 on a
GPU; `benchmarks/saved_bytes.py` measures them):

=========  ====================================================================  ===========
mode       recomputed in backward                                                kept / block
=========  ====================================================================  ===========
``none``   nothing (plain autograd)                                              ~14.2 MB
``ops``    the cheap ops only: every matrix product's output is kept, so no       ~6.5 MB
           product is computed twice (selective activation checkpointing with
           torch's op-level policy, the "SAC" of torchtitan; blocks in pairs)
``mlp``    ``ops`` + the MLP half's matrix products (fc1, fc2)                   ~5.3 MB
``attn``   ``ops`` + the attention half's matrix products (qkv, attention, proj) ~5.3 MB
``full``   the whole block from its input (the old ``--grad-checkpoint``)          ~1.2 MB
=========  ====================================================================  ===========

A spec is ``MODE`` or ``MODE:FRACTION``: the first ``round(FRACTION * depth)`` blocks use
MODE and the others ``ops`` (e.g. ``full:0.25``). Every mode gives the same gradients as
``none``: recomputation reruns the same operations on the same inputs.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ditforge.errors import UserError

__all__ = ["MODES", "REST_MODE", "parse_spec", "normalize_spec", "block_modes", "block_groups", "save_products_policy", "keep_products", "run_blocks", "run_halves"]

MODES = ("none", "ops", "mlp", "attn", "full")
REST_MODE = "ops"
HALF_MODES = ("attn", "mlp")
OPS_GROUP = 2  # blocks per region in ``ops`` mode

aten = torch.ops.aten
# Matrix products and fused attention kernels: their outputs are kept, never recomputed.
_PRODUCTS = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.convolution.default,
}
for _name in (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
):
    if hasattr(aten, _name):
        _PRODUCTS.add(getattr(aten, _name).default)


def parse_spec(spec: str | bool) -> tuple[str, float]:
    """``"full"`` -> ("full", 1.0); ``"full:0.25"`` -> ("full", 0.25). A bool is the flag of
    earlier versions (config.json files they wrote): True = ``full``, False = ``none``."""
    if isinstance(spec, bool):
        return ("full" if spec else "none"), 1.0
    mode, _, frac = str(spec).partition(":")
    if mode not in MODES:
        raise UserError(f"unknown grad_checkpoint mode {mode!r} in {spec!r}; choose one of {', '.join(MODES)} (optionally MODE:FRACTION)")
    if not frac:
        return mode, 1.0
    try:
        fraction = float(frac)
    except ValueError:
        fraction = -1.0
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"grad_checkpoint fraction in {spec!r} must be a number in (0, 1], e.g. full:0.5")
    return mode, fraction


def normalize_spec(spec: str | bool) -> str:
    """The canonical text of a spec: ``True`` -> "full", ``"attn:1"`` -> "attn"."""
    mode, fraction = parse_spec(spec)
    return mode if fraction == 1.0 else f"{mode}:{fraction:g}"


def block_modes(spec: str | bool, depth: int) -> list[str]:
    """The mode of each of `depth` blocks: the first round(fraction * depth) get MODE, the rest ``ops``."""
    mode, fraction = parse_spec(spec)
    k = round(fraction * depth)
    return [mode] * k + [REST_MODE] * (depth - k)


def block_groups(spec: str | bool, depth: int) -> list[tuple[tuple[int, ...], str]]:
    """Blocks in the order they run, grouped by the region checkpointed as one: ([indices], mode).

    ``ops`` blocks go in pairs: a pair keeps one fp32 residual input instead of two, and
    recomputes the second block's input from the first one's kept products (a cheap add).
    """
    groups: list[tuple[tuple[int, ...], str]] = []
    for i, mode in enumerate(block_modes(spec, depth)):
        last = groups[-1] if groups else None
        if mode == "ops" and last is not None and last[1] == "ops" and len(last[0]) < OPS_GROUP:
            groups[-1] = ((*last[0], i), mode)
        else:
            groups.append(((i,), mode))
    return groups


def save_products_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of matrix products (and of autocast's weight casts, which autograd keeps
    anyway); recompute everything else in backward."""
    if op in _PRODUCTS:
        return CheckpointPolicy.MUST_SAVE
    if op is aten._to_copy.default and isinstance(args[0], torch.nn.Parameter):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_save_products = functools.partial(create_selective_checkpoint_contexts, save_products_policy)


def keep_products(fn, *args):
    """fn(*args), keeping for backward its inputs and its matrix products' outputs only."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_save_products)


def _recompute_all(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)


def _in_sequence(blocks):
    def run(x, c):
        for block in blocks:
            x = block(x, c)  # (N, T, D)
        return x

    return run


def run_blocks(blocks, x: torch.Tensor, c: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply DiT blocks in turn to x (N, T, D) with conditioning c (N, D), keeping for backward
    what `mode` says (``attn`` / ``mlp``: each block's own forward does it, `run_halves`).
    The result is the same in every mode."""
    if mode == "ops":
        return keep_products(_in_sequence(blocks), x, c)  # (N, T, D)
    if mode == "full":
        return _recompute_all(_in_sequence(blocks), x, c)  # (N, T, D)
    return _in_sequence(blocks)(x, c)  # (N, T, D)


def run_halves(block, x: torch.Tensor, c: torch.Tensor, mode: str) -> torch.Tensor:
    """A DiTBlock's forward with its attention and MLP halves checkpointed on their own:
    ``attn`` recomputes the attention half whole and keeps the MLP's products; ``mlp`` the reverse."""
    if mode not in HALF_MODES:
        raise ValueError(f"run_halves takes one of {HALF_MODES}, got {mode!r}")
    attn_run = _recompute_all if mode == "attn" else keep_products
    mlp_run = _recompute_all if mode == "mlp" else keep_products
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(c)  # six of (N, D)
    x = attn_run(block.attn_residual, x, shift_msa, scale_msa, gate_msa)  # (N, T, D)
    return mlp_run(block.mlp_residual, x, shift_mlp, scale_mlp, gate_mlp)  # (N, T, D)
