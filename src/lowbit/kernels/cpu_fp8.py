"""CPU kernel for FP8 weights (``fp8_e4m3``, ``fp8_e5m2``; per-channel or per-tensor scale).

Computes ``y = x @ W.T`` with ``W[n, k] = value(q[n, k]) * scale[n]``, where ``q`` are the
stored FP8 bytes (``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` bit patterns, as
``lowbit.formats.fp8`` writes them) and ``x`` float32 activations (other float dtypes are
converted; the result comes back in x's dtype). The weights are read once per call, one byte
each, and widened to float32 in registers (``csrc/fp8_linear.c`` says how: an FP8 byte is
the top of a float16, exactly); nothing is dequantized to memory.

Numerics: the same products as the ``reference`` kernel (``F.linear(x, value(q) * scale)``),
summed in another order and with the scale applied to the row sum instead of each weight,
so the two agree up to float32 rounding: the tests bound the difference by
``2 * 2**-24 * (K + 8)`` times ``sum_k |x_k| |w_nk| + |bias_n|``. Activations are *not* rounded: a
layer whose scheme rounds activations to FP8 (``activations="fp8_e4m3"``) gets them rounded
in torch first, exactly as the reference kernel does (``registry._activations``).

Prepared state (``Fp8Prepared``): ``weights`` uint8 ``[N, K]`` contiguous (the layer's own
buffer when it is already contiguous, so no copy), ``scales`` float32 ``[N]`` (a per-tensor
scale repeated; times ``2**8`` for E4M3, whose bytes widen to ``value * 2**-8``).
Threads: ``torch.get_num_threads()`` per call, from the thread pool of ``csrc/pool.c``.
Without the compiled library (or on a CPU without AVX-512 BW/VL and F16C) :func:`available`
says why and ``auto`` uses the reference kernel.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Optional

import torch

from lowbit.errors import KernelError
from lowbit.kernels import clib
from lowbit.kernels.activations import finish

FORMATS = {"fp8_e4m3": (1, 2.0**8), "fp8_e5m2": (0, 1.0)}  # format -> (C flag, factor folded into the scale)


@functools.lru_cache(maxsize=1)
def _library() -> tuple[Optional[ctypes.CDLL], str]:
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    return clib.bind(
        {"lowbit_fp8_linear": (ctypes.c_int, [vp, i64, i64, vp, i64, vp, ctypes.c_int, vp, ctypes.c_int])},
        "lowbit_fp8_cpu_supported", "this CPU lacks AVX-512 F/BW/VL or F16C, which the FP8 kernel needs",
    )


def available() -> tuple[bool, str]:
    """Whether the compiled kernel can run on this machine; if not, why."""
    lib, why = _library()
    return lib is not None, why


@dataclass(frozen=True)
class Fp8Prepared:
    weights: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 [N], including the format's factor
    e4m3: bool
    N: int
    K: int


def prepare(codes: torch.Tensor, scale: torch.Tensor, fmt: str) -> Fp8Prepared:
    """``codes`` uint8 ``[N, K]`` (FP8 bit patterns), ``scale`` ``[N, 1]`` or ``[1, 1]``."""
    if fmt not in FORMATS:
        raise KernelError(f"cpu_fp8 runs {sorted(FORMATS)} weights, not {fmt!r}")
    if codes.dim() != 2 or codes.dtype != torch.uint8 or not codes.is_cpu:
        raise KernelError(f"cpu_fp8 needs uint8 CPU codes [N, K], got {codes.dtype} {tuple(codes.shape)} on {codes.device}")
    n, k = codes.shape
    if tuple(scale.shape) not in ((n, 1), (1, 1)):
        raise KernelError(f"cpu_fp8 needs one scale per output row or per tensor, got shape {tuple(scale.shape)}")
    flag, factor = FORMATS[fmt]
    scales = (scale.to(torch.float32) * factor).expand(n, 1).reshape(n).contiguous()
    return Fp8Prepared(codes.contiguous(), scales, bool(flag), n, k)


def fp8_linear(
    x: torch.Tensor, p: Fp8Prepared, bias: Optional[torch.Tensor] = None, num_threads: Optional[int] = None
) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` for ``x [..., K]``, in float32; returns x's dtype."""
    if not x.is_floating_point() or x.dim() == 0:
        raise KernelError(f"activations must be a floating-point tensor [..., K], got {x.dtype} {tuple(x.shape)}")
    if x.shape[-1] != p.K:
        raise KernelError(f"input has {x.shape[-1]} features, the weight expects K={p.K}")
    if not x.is_cpu:
        raise KernelError(f"cpu_fp8 runs on CPU tensors, got {x.device}")
    lib, why = _library()
    if lib is None:
        raise KernelError(f"cpu_fp8 cannot run: {why}")
    x2 = x.reshape(-1, p.K).to(torch.float32).contiguous()
    B = x2.shape[0]
    y = torch.empty(B, p.N, dtype=torch.float32)
    if B:
        threads = torch.get_num_threads() if num_threads is None else int(num_threads)
        rc = lib.lowbit_fp8_linear(
            x2.data_ptr(), B, p.K, p.weights.data_ptr(), p.N, p.scales.data_ptr(), int(p.e4m3), y.data_ptr(), threads
        )
        if rc != 0:
            raise KernelError(f"cpu_fp8 failed (code {rc}) on x {tuple(x2.shape)} and weight [{p.N}, {p.K}]")
    if bias is None and x2 is x:
        return y
    return finish(y, x, bias, x.shape[:-1])
