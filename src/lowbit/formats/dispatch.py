"""The entry points on 2-D weights: check, group, look the format up, call it, check, reshape.

Every function here works for every registered format (``lowbit.formats.registry``):
none of them branches on the format's name. A weight is ``[out, in]``; codes come back
uint8 of the same shape, values float32 (then cast). ``fake_quantize`` is literally
``dequantize(*quantize_weight(w))``, so simulated numerics equal stored numerics.
"""

from __future__ import annotations

import torch

from lowbit.errors import FormatError
from lowbit.formats.base import NumericFormat, QParams, grouped
from lowbit.formats.base import check_finite as _check_finite  # quantize's keyword shadows the name
from lowbit.formats.registry import numeric_format
from lowbit.scheme import QuantScheme


def _checked_codes(fmt: NumericFormat, codes: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if codes.dtype != torch.uint8 or codes.shape != g.shape:
        raise FormatError(
            f"{fmt!r} broke the format contract: quantize returned {codes.dtype} {tuple(codes.shape)}, "
            f"expected torch.uint8 {tuple(g.shape)}"
        )
    return codes


def choose_qparams(w: torch.Tensor, scheme: QuantScheme) -> QParams:
    """Scale (and zero point when affine) for every group of ``w``."""
    _check_finite(w)
    g = grouped(w.detach().to(torch.float32), scheme)
    return numeric_format(scheme).choose_params(g, scheme)


def quantize(w: torch.Tensor, qp: QParams, scheme: QuantScheme, *, check_finite: bool = True) -> torch.Tensor:
    """Codes (uint8, same shape as ``w``) for the given qparams.

    ``check_finite=False`` skips the NaN/Inf scan, for callers (GPTQ's column loop) that
    checked the whole weight once already."""
    if check_finite:
        _check_finite(w)
    g = grouped(w.detach().to(torch.float32), scheme)
    fmt = numeric_format(scheme)
    return _checked_codes(fmt, fmt.quantize(g, qp, scheme), g).reshape(w.shape)



def dequantize(
    codes: torch.Tensor, qp: QParams, scheme: QuantScheme, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weights the codes stand for, computed in float32, then cast to ``dtype``
    (``(q - z) * s`` for integers, ``value(q) * s`` for the other formats)."""
    fmt = numeric_format(scheme)
    g = grouped(codes, scheme)
    values = fmt.dequantize(g, qp, scheme)
    if values.dtype != torch.float32 or values.shape != g.shape:
        raise FormatError(
            f"{fmt!r} broke the format contract: dequantize returned {values.dtype} {tuple(values.shape)}, "
            f"expected torch.float32 {tuple(g.shape)}"
        )
    return values.reshape(codes.shape).to(dtype)


def quantize_weight(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, QParams]:
    """Round-to-nearest: qparams from the weight's own range, then codes.

    Double-quantized schemes choose the codes with the exact block scales and store the
    8-bit ones, as bitsandbytes does (so ``quantize(w, qp)`` with the returned ``qp``
    may pick other codes)."""
    _check_finite(w)
    g = grouped(w.detach().to(torch.float32), scheme)
    fmt = numeric_format(scheme)
    codes, qp = fmt.choose_and_quantize(g, scheme)
    return _checked_codes(fmt, codes, g).reshape(w.shape), qp


def value_table(scheme: QuantScheme) -> torch.Tensor:
    """float32 ``value(q)`` for every code ``q`` in ``0 .. 2**bits - 1`` (a lookup table for
    kernels), for the formats with ``w = value(q) * s``; ``FormatError`` for the others."""
    return numeric_format(scheme).value_table(scheme)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scheme):  # noqa: D401
        codes, qp = quantize_weight(w, scheme)
        return dequantize(codes, qp, scheme, dtype=w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Quantize then dequantize, in ``w``'s dtype, with a straight-through
    gradient (d out / d w = identity): the base of QAT."""
    return _StraightThrough.apply(w, scheme)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if float(noise) == 0.0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
