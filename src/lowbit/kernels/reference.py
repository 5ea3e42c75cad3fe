"""Reference kernel: dequantize the integer codes, then ``F.linear``.

lowbit's integer convention (shared by every kernel):

* ``q``: unsigned codes ``[N, K]`` (out x in), values in ``[0, 2**bits - 1]``,
  unpacked (one code per element, any integer dtype, usually uint8);
* ``scale``: ``[N, K // group_size]`` (float32 / float16 / bfloat16);
* ``zero``: integer zero points, same shape as ``scale`` (any dtype holding
  integers), or ``None`` for symmetric schemes, meaning ``z = 2**(bits-1)``;
* per-channel is one group of size ``K`` (``scale`` is ``[N, 1]``).

Dequantization: ``W[n, k] = (q[n, k] - z[n, g]) * s[n, g]`` with
``g = k // group_size``, computed in float32 as ``(q.float() - z.float()) *
s.float()``. This is the numerics every fast kernel is tested against.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lowbit.errors import KernelError


def _check(q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int, group_size: int) -> None:
    if q.dim() != 2:
        raise KernelError(f"codes must be 2-D [out, in], got shape {tuple(q.shape)}")
    if q.is_floating_point() or q.is_complex():
        raise KernelError(f"codes must be an integer tensor, got {q.dtype}")
    n, k = q.shape
    if group_size <= 0 or k % group_size != 0:
        raise KernelError(f"group_size {group_size} must be positive and divide in_features {k}")
    want = (n, k // group_size)
    if tuple(scale.shape) != want:
        raise KernelError(f"scale must have shape {want} (out, in // group_size), got {tuple(scale.shape)}")
    if zero is not None and tuple(zero.shape) != want:
        raise KernelError(f"zero must have shape {want} like scale, got {tuple(zero.shape)}")
    if not 1 <= bits <= 8:
        raise KernelError(f"bits must be in 1..8, got {bits}")


def dequantize_codes(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``W = (q - z) * s`` per group, computed in float32, returned as ``dtype``.

    Shapes: ``q [N, K]``, ``scale``/``zero`` ``[N, K // group_size]``;
    ``zero=None`` means the symmetric zero point ``2**(bits-1)``.
    """
    _check(q, scale, zero, bits, group_size)
    n, k = q.shape
    g = k // group_size
    qf = q.to(torch.float32).reshape(n, g, group_size)
    if zero is None:
        zf = torch.full((n, g, 1), float(2 ** (bits - 1)), dtype=torch.float32, device=q.device)
    else:
        zf = zero.to(torch.float32).reshape(n, g, 1)
    sf = scale.to(torch.float32).reshape(n, g, 1)
    w = (qf - zf) * sf
    return w.reshape(n, k).to(dtype)


def reference_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear(x, dequantize_codes(...).to(x.dtype), bias)`` for ``x [..., K]``."""
    w = dequantize_codes(q, scale, zero, bits, group_size).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
