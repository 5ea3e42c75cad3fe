"""CPU 4-bit kernel: PyTorch's ``_weight_int4pack_mm_for_cpu`` (bf16 activations).

What the op wants (torch 2.13, read in ``aten/src/ATen/native/cpu/int4mm_kernel.cpp``
and ``LinearAlgebra.cpp``, and confirmed by experiment in
``tests/test_kernels_cpu.py``):

* ``_convert_weight_to_int4pack_for_cpu(w, innerKTiles)``: ``w`` is **int32**
  ``[N, K]``, one code in ``[0, 15]`` per element (uint8 / int64 / pre-packed
  nibbles are rejected: "expect weight to be kInt"). ``N % 16 == 0``,
  ``K % 2 == 0``. Returns uint8 ``[N, K // 2]`` in a CPU-ISA-specific nibble
  order (on AVX-512, blocks of 64 rows with lanes 0|2 and 1|3 paired).
  ``innerKTiles`` is ignored on CPU (the packed bytes are identical for 1..8).
* ``_weight_int4pack_mm_for_cpu(x, packed, qGroupSize, qScaleAndZeros)``:
  ``x`` 2-D contiguous ``[M, K]``; ``qGroupSize`` in {32, 64, 128, 256} and
  dividing ``K``; ``qScaleAndZeros`` ``[K // qGroupSize, N, 2]`` with
  ``[..., 0] = scale`` and ``[..., 1] = zero``, of the **same dtype as x**.
  Output ``[M, N]`` in x's dtype. Any M >= 1.
* Kernel numerics (AVX-512 path, bf16 only; fp32/fp16 go to a scalar loop
  that is ~50x slower): per weight ``w = fma(float(c - 8), float(scale),
  float(zero))`` in fp32 (``c`` the stored nibble), ``acc = fma(x, w, acc)``
  in fp32 over k, output rounded to bf16.

lowbit's integer zero point ``z`` therefore maps to the kernel's float zero as
``zero = s * (8 - z)``: ``(c - 8) * s + s * (8 - z) = (c - z) * s``. The product
``s_bf16 * (8 - z)`` is exact in fp32 but must be stored in bf16: it is exact
when ``8 - z`` is 0 or a power of two (in particular for symmetric schemes,
``z = 8``, where zero = 0) or when ``s`` has few mantissa bits, and otherwise is
rounded with error <= 2**-8 * |s * (8 - z)| <= s / 32 (1/32 of a quantization
step, the same for every weight of the group). The tests bound this.

A float zero point (``zero_point="float"``, any real ``z``) takes the same path:
``8 - z`` and the product are then also rounded in fp32 (relative error
<= 2**-23 together), so the float zero is within ``(2**-8 + 2**-23) * |s * (8 - z)|``
of exact; ``|8 - z|`` is no longer bounded by 8 (``z`` may lie outside [0, 15]).
``tests/test_float_zero.py`` checks this bound.

Scheme group sizes that are multiples of 32 (including per-channel, group =
K) are run with the largest op group size in {256, 128, 64, 32} dividing them,
repeating each scale/zero over its sub-groups: exact, costs only scale memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowbit.errors import KernelError
from lowbit.kernels.activations import bf16_rows, finish

OP_GROUP_SIZES = (256, 128, 64, 32)


@dataclass(frozen=True)
class Int4Prepacked:
    """A weight ready for ``int4_linear``.

    packed:            uint8 ``[N, K // 2]``, the op's nibble layout.
    scales_and_zeros:  bfloat16 ``[K // group_size, N, 2]`` (scale, float zero).
    group_size:        the group size handed to the op (in ``OP_GROUP_SIZES``;
                       may be a divisor of the scheme's group size).
    N, K:              out_features, in_features.
    """

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int
    N: int
    K: int

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_and_zeros.numel() * 2


def op_group_size(K: int, group_size: int) -> Optional[int]:
    """The op group size used for a scheme group of ``group_size`` (None if none fits)."""
    for g in OP_GROUP_SIZES:
        if group_size % g == 0 and K % g == 0:
            return g
    return None


def int4_supported(N: int, K: int, group_size: int, bits: int) -> tuple[bool, str]:
    """Whether ``int4_linear`` can run an ``[N, K]`` weight; if not, why."""
    if bits != 4:
        return False, f"cpu_int4 runs 4-bit codes only, got bits={bits}"
    if N <= 0 or K <= 0:
        return False, f"empty weight [{N}, {K}]"
    if N % 16 != 0:
        return False, f"out_features N={N} must be a multiple of 16 (_convert_weight_to_int4pack_for_cpu)"
    if group_size <= 0 or K % group_size != 0:
        return False, f"group_size {group_size} must divide in_features K={K}"
    if op_group_size(K, group_size) is None:
        return False, (
            f"group_size {group_size} must be a multiple of 32: the op accepts groups of "
            f"{OP_GROUP_SIZES} and scheme groups are run as whole numbers of those"
        )
    return True, ""


def prepack_int4(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    group_size: int,
) -> Int4Prepacked:
    """Pack codes ``q [N, K]`` (values 0..15) with ``scale``/``zero`` ``[N, K // group_size]``.

    ``zero=None`` means symmetric (z = 8). Scales are rounded to bfloat16 once,
    here; the float zero is ``bf16(s_bf16 * (8 - z))`` (see module doc).
    """
    if q.dim() != 2 or q.is_floating_point():
        raise KernelError(f"codes must be an integer tensor [N, K], got {q.dtype} {tuple(q.shape)}")
    N, K = q.shape
    ok, why = int4_supported(N, K, group_size, 4)
    if not ok:
        raise KernelError(why)
    G = K // group_size
    if tuple(scale.shape) != (N, G):
        raise KernelError(f"scale must be [N, K // group_size] = {(N, G)}, got {tuple(scale.shape)}")
    if zero is not None and tuple(zero.shape) != (N, G):
        raise KernelError(f"zero must be [N, K // group_size] = {(N, G)}, got {tuple(zero.shape)}")
    q = q.cpu()
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise KernelError(f"4-bit codes must lie in [0, 15], got [{int(q.min())}, {int(q.max())}]")

    s = scale.cpu().to(torch.bfloat16).to(torch.float32)  # the kernel sees bf16 scales
    z = torch.full_like(s, 8.0) if zero is None else zero.cpu().to(torch.float32)
    zf = (s * (8.0 - z)).to(torch.bfloat16).to(torch.float32)  # exact in fp32, one rounding to bf16

    g = op_group_size(K, group_size)
    reps = group_size // g
    if reps > 1:
        s = s.repeat_interleave(reps, dim=1)
        zf = zf.repeat_interleave(reps, dim=1)
    sz = torch.stack([s, zf], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K//g, N, 2]

    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    return Int4Prepacked(packed=packed, scales_and_zeros=sz, group_size=g, N=N, K=K)


def int4_linear(x: torch.Tensor, prepacked: Int4Prepacked, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` for ``x [..., K]``; computes in bf16, returns x's dtype.

    The bias is added after the cast back, in x's dtype (as ``F.linear`` would).
    """
    p = prepacked
    x2, lead = bf16_rows(x, p.K, "cpu_int4")
    if x2.shape[0] == 0:
        y = x2.new_zeros((0, p.N))
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, p.packed, p.group_size, p.scales_and_zeros)
    return finish(y, x, bias, lead)
