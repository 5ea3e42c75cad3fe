"""CPU W8A8 kernel: int8 activations x int8 weights on integers, ``torch._int_mm``.

For schemes ``QuantScheme(bits=8, granularity="channel" | "tensor", activations="int8")``
(symmetric weights, lowbit codes ``q`` in [0, 255] with zero point 128).

Numerics, for ``x [M, K]`` and a weight ``[N, K]``:

1. activations: ``xq, sx = formats.quantize_activations_int8(x)`` -- int8 ``[M, K]``
   in [-127, 127] and float32 ``[M, 1]`` (one dynamic scale per row/token);
2. ``acc = torch._int_mm(xq, wq)`` with ``wq = (q - 128).T`` int8 ``[K, N]``:
   int32, exact (``|acc| <= K * 127 * 128 < 2**31`` for ``K <= MAX_K``);
3. ``y = (float(acc) * sx) * sw`` in float32 (``sw`` float32 ``[N]``, the weight scale),
   cast to x's dtype, then ``+ bias`` in x's dtype (as ``F.linear`` would).

So the only rounding after the integer matmul is three float32 roundings
(int32 -> float32, two products) and the output cast; the reference twin
(``fake_quantize_activations_int8(x)`` then dequantize + ``F.linear``) computes the
same mathematical value with float32 accumulation. ``tests/test_kernels_w8a8.py``
bounds their difference elementwise.

What ``torch._int_mm`` wants on CPU (torch 2.13, checked by experiment in
``tests/test_kernels_w8a8.py``): 2-D int8 ``[M, K]`` and ``[K, N]`` giving int32
``[M, N]``; any ``M >= 0`` (M = 1 included), any ``K`` and ``N`` (no multiple-of-8
or ``M > 16`` rule: those are CUDA constraints), non-contiguous operands accepted;
a uint8 left operand is also accepted and read as *unsigned* (``int8_matmul``
refuses it). No padding is needed on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowbit.errors import KernelError
from lowbit.formats import ACT_INT8_MAX, quantize_activations_int8
from lowbit.kernels.activations import finish

# |xq| <= 127 and |q - 128| <= 128: K products of at most 127 * 128 must fit int32.
MAX_K = (2**31 - 1) // (ACT_INT8_MAX * 128)


@dataclass(frozen=True)
class W8A8Prepacked:
    """A weight ready for ``w8a8_linear``.

    weight:  int8 ``[K, N]`` (= (q - 128) transposed), contiguous.
    scales:  float32 ``[N]`` (one per output channel; a per-tensor scale is repeated).
    N, K:    out_features, in_features.
    """

    weight: torch.Tensor
    scales: torch.Tensor
    N: int
    K: int

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * 4


def w8a8_supported(N: int, K: int, bits: int, symmetric: bool, per_channel: bool, activations) -> tuple[bool, str]:
    """Whether ``w8a8_linear`` can run an ``[N, K]`` weight of this scheme; if not, why."""
    if activations != "int8":
        return False, "cpu_w8a8 runs W8A8 schemes only (activations='int8'); weight-only layers use cpu_int8"
    if bits != 8:
        return False, f"cpu_w8a8 runs 8-bit codes only, got bits={bits}"
    if not symmetric:
        return False, "cpu_w8a8 runs symmetric weights only (zero point 128)"
    if not per_channel:
        return False, "cpu_w8a8 needs one weight scale per output channel (granularity 'channel' or 'tensor')"
    if N <= 0 or K <= 0:
        return False, f"empty weight [{N}, {K}]"
    if K > MAX_K:
        return False, f"in_features K={K} > {MAX_K} could overflow the int32 accumulator"
    return True, ""


def prepack_w8a8(q: torch.Tensor, scale: torch.Tensor) -> W8A8Prepacked:
    """Codes ``q [N, K]`` (0..255, symmetric, z = 128) and ``scale [N, 1]`` (or ``[N]``)."""
    if q.dim() != 2 or q.is_floating_point():
        raise KernelError(f"codes must be an integer tensor [N, K], got {q.dtype} {tuple(q.shape)}")
    N, K = q.shape
    ok, why = w8a8_supported(N, K, 8, True, True, "int8")
    if not ok:
        raise KernelError(why)
    if scale.numel() != N or scale.shape[0] != N:
        raise KernelError(f"scale must be [N, 1] = {(N, 1)} (one per output channel), got {tuple(scale.shape)}")
    q = q.cpu()
    if int(q.min()) < 0 or int(q.max()) > 255:
        raise KernelError(f"8-bit codes must lie in [0, 255], got [{int(q.min())}, {int(q.max())}]")
    w = (q.to(torch.int16) - 128).to(torch.int8).t().contiguous()
    s = scale.cpu().reshape(N).to(torch.float32).contiguous()
    return W8A8Prepacked(weight=w, scales=s, N=N, K=K)


def int8_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Exact ``xq @ wq`` for int8 ``[M, K]`` and ``[K, N]``, as int32 ``[M, N]``."""
    if xq.dtype != torch.int8 or wq.dtype != torch.int8 or xq.dim() != 2 or wq.dim() != 2:
        raise KernelError(f"int8_matmul takes 2-D int8 tensors, got {xq.dtype} {tuple(xq.shape)} and {wq.dtype} {tuple(wq.shape)}")
    if xq.shape[1] != wq.shape[0]:
        raise KernelError(f"inner dimensions differ: [{xq.shape[0]}, {xq.shape[1]}] @ [{wq.shape[0]}, {wq.shape[1]}]")
    if xq.shape[1] > MAX_K:
        raise KernelError(f"K={xq.shape[1]} > {MAX_K} could overflow the int32 accumulator")
    if xq.shape[0] == 0:
        return torch.zeros(0, wq.shape[1], dtype=torch.int32, device=xq.device)
    return torch._int_mm(xq, wq)


def w8a8_linear(x: torch.Tensor, prepacked: W8A8Prepacked, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = fq(x) @ W.T (+ bias)`` for ``x [..., K]`` (fq: per-row int8); returns x's dtype."""
    p = prepacked
    if not x.is_floating_point():
        raise KernelError(f"activations must be floating point, got {x.dtype}")
    if x.shape[-1] != p.K:
        raise KernelError(f"input has {x.shape[-1]} features, the weight expects K={p.K}")
    if x.device.type != "cpu":
        raise KernelError(f"cpu_w8a8 runs on CPU tensors, got {x.device}")
    lead = x.shape[:-1]
    xq, sx = quantize_activations_int8(x.reshape(-1, p.K))
    acc = int8_matmul(xq, p.weight)
    y = acc.to(torch.float32) * sx * p.scales
    return finish(y, x, bias, lead)
