"""Shared plumbing of the CPU kernels that take bf16 activations."""

from __future__ import annotations

from typing import Optional

import torch

from lowbit.errors import KernelError


def bf16_rows(x: torch.Tensor, k: int, kernel: str) -> tuple[torch.Tensor, torch.Size]:
    """Check ``x [..., k]`` and flatten it to contiguous bf16 rows ``[M, k]``; also return the leading shape."""
    if not x.is_floating_point():
        raise KernelError(f"activations must be floating point, got {x.dtype}")
    if x.shape[-1] != k:
        raise KernelError(f"input has {x.shape[-1]} features, the weight expects K={k}")
    if x.device.type != "cpu":
        raise KernelError(f"{kernel} runs on CPU tensors, got {x.device}")
    return x.reshape(-1, k).to(torch.bfloat16).contiguous(), x.shape[:-1]


def finish(y: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], lead: torch.Size) -> torch.Tensor:
    """Cast the kernel output back to x's dtype, add the bias there (as F.linear would), restore the shape."""
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, y.shape[-1])
