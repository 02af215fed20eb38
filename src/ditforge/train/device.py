"""The device and numeric precision a run uses; the only place that decides them."""

from __future__ import annotations

import contextlib

import torch

from ditforge.errors import UserError


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that support it, fp32 otherwise; explicit choices are checked."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs a CUDA GPU (its loss scaling is GPU-only); use bf16 or fp32 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bf16; use --precision fp16 or fp32")
    return precision


def autocast(precision: str, device: torch.device):
    """Mixed precision context: the matmuls in bf16/fp16, reductions and the loss in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def enable_tf32() -> None:
    """TF32 matmuls and convolutions on Ampere+ GPUs (10-bit mantissa inputs, fp32 accumulate)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
