"""CPU 8-bit kernel: PyTorch's ``_weight_int8pack_mm`` (bf16 activations).

For 8-bit **symmetric per-channel** weights only: lowbit's codes ``q`` in
[0, 255] with ``z = 128`` become the signed weight ``q - 128`` (int8), and the
op computes ``y[m, n] = sum_k x[m, k] * (w[n, k] * scales[n])``.

What the op wants (torch 2.13, read in ``aten/src/ATen/native/cpu/int8mm_kernel.cpp``,
confirmed by experiment in ``tests/test_kernels_cpu.py``):

* ``x`` ``[M, K]`` and ``scales`` ``[N]`` of the **same** dtype (bf16, fp16 or
  fp32; mixed dtypes are rejected), ``mat2`` int8 ``[N, K]`` (uint8 rejected).
* On AVX-512 only bf16 has a vectorized kernel; it loads x and w with
  **aligned** 256/128-bit loads, 16 k at a time, so it needs ``K % 16 == 0``
  and 32-byte aligned rows, else it *segfaults* (not an error). This module
  guarantees both: ``int8_supported`` rejects ``K % 16 != 0`` and
  ``int8_linear`` copies an activation whose storage is not 64-byte aligned.
* Numerics (AVX-512 bf16): ``w = float(int8) * float(scale_bf16)`` (exact in
  fp32), ``acc = fma(x, w, acc)`` over 16 lanes, lanes summed, output rounded to
  bf16. Scales are rounded to bf16 once, at prepack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowbit.errors import KernelError
from lowbit.kernels.activations import bf16_rows, finish

_ALIGN = 64


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % _ALIGN == 0


@dataclass(frozen=True)
class Int8Prepacked:
    """A weight ready for ``int8_linear``.

    weight:  int8 ``[N, K]`` (= q - 128), contiguous, 64-byte aligned.
    scales:  bfloat16 ``[N]``.
    N, K:    out_features, in_features.
    """

    weight: torch.Tensor
    scales: torch.Tensor
    N: int
    K: int

    def __post_init__(self) -> None:
        # The op's aligned loads crash on a misaligned weight (e.g. one
        # mmapped from a file at an odd offset): copy once, here.
        if not self.weight.is_contiguous() or not _aligned(self.weight):
            object.__setattr__(self, "weight", self.weight.contiguous().clone())
        if not self.scales.is_contiguous():
            object.__setattr__(self, "scales", self.scales.contiguous())

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * 2


def int8_supported(N: int, K: int, group_size: int, bits: int, symmetric: bool = True) -> tuple[bool, str]:
    """Whether ``int8_linear`` can run an ``[N, K]`` weight; if not, why."""
    if bits != 8:
        return False, f"cpu_int8 runs 8-bit codes only, got bits={bits}"
    if not symmetric:
        return False, "cpu_int8 runs symmetric weights only (zero point 128); use the reference kernel"
    if N <= 0 or K <= 0:
        return False, f"empty weight [{N}, {K}]"
    if group_size != K:
        return False, f"cpu_int8 needs one scale per output channel (group_size == K={K}), got group_size={group_size}"
    if K % 16 != 0:
        return False, f"in_features K={K} must be a multiple of 16 (the op reads 16 columns at a time)"
    return True, ""


def prepack_int8(q: torch.Tensor, scale: torch.Tensor) -> Int8Prepacked:
    """Codes ``q [N, K]`` (0..255, symmetric, z = 128) and ``scale [N, 1]`` (or ``[N]``)."""
    if q.dim() != 2 or q.is_floating_point():
        raise KernelError(f"codes must be an integer tensor [N, K], got {q.dtype} {tuple(q.shape)}")
    N, K = q.shape
    ok, why = int8_supported(N, K, K, 8)
    if not ok:
        raise KernelError(why)
    if scale.numel() != N or scale.shape[0] != N:
        raise KernelError(f"scale must be [N, 1] = {(N, 1)} (one per output channel), got {tuple(scale.shape)}")
    q = q.cpu()
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 255):
        raise KernelError(f"8-bit codes must lie in [0, 255], got [{int(q.min())}, {int(q.max())}]")
    w = (q.to(torch.int16) - 128).to(torch.int8).contiguous()
    s = scale.cpu().reshape(N).to(torch.bfloat16).contiguous()
    return Int8Prepacked(weight=w, scales=s, N=N, K=K)


def int8_linear(x: torch.Tensor, prepacked: Int8Prepacked, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` for ``x [..., K]``; computes in bf16, returns x's dtype."""
    p = prepacked
    if p.K % 16 != 0:  # a hand-built Int8Prepacked; the op would crash
        raise KernelError(f"in_features K={p.K} must be a multiple of 16")
    x2, lead = bf16_rows(x, p.K, "cpu_int8")
    if not _aligned(x2):
        x2 = x2.clone()
    if x2.shape[0] == 0:
        y = x2.new_zeros((0, p.N))
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2, p.weight, p.scales)
    return finish(y, x, bias, lead)
