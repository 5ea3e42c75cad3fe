"""Reference numerics of the integer formats, in plain torch (CPU-safe).

Pure functions of (weight, scheme). Weights are 2-D ``[out, in]``; the
granularity reshapes them to ``[rows, n_groups, group]``:

=========  ==========================  =====================
granular.  view of W                   scale / zero shape
=========  ==========================  =====================
tensor     ``[1, 1, out*in]``          ``[1, 1]``
channel    ``[out, 1, in]``            ``[out, 1]``
group      ``[out, in/G, G]``          ``[out, in/G]``
=========  ==========================  =====================

Codes are unsigned ``uint8`` in ``[0, 2**bits - 1]``; ``w = (q - z) * s``.
Integer zero points are uint8 and the affine grid always holds 0 exactly;
float zero points (``zero_point="float"``) are stored in the scale dtype and
map the group's min and max exactly onto codes 0 and ``2**bits - 1``.
The scale is rounded to the scheme's ``scale_dtype`` *before* the codes are
chosen, so that ``dequantize(quantize(w))`` is exactly what a saved checkpoint
reproduces (``fake_quantize`` is literally that composition).
Rounding is ``torch.round`` (half to even).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from lowbit import float_formats
from lowbit.errors import FormatError, SchemeError
from lowbit.scheme import Granularity, QuantScheme

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def scale_torch_dtype(scheme: QuantScheme) -> torch.dtype:
    return _DTYPES[scheme.scale_dtype]


def zero_torch_dtype(scheme: QuantScheme) -> torch.dtype:
    """uint8 for integer zero points, the scale dtype for float ones."""
    return _DTYPES[scheme.scale_dtype] if scheme.zero_point == "float" else torch.uint8


@dataclass(frozen=True)
class QParams:
    """``scale`` in the scheme's scale dtype; ``zero`` uint8, or the scale dtype for float
    zero points (None when symmetric). With ``double_quant`` schemes ``scale`` is the
    float32 scale the weights dequantize with and ``double_quant`` holds its stored
    8-bit form (``lowbit.float_formats.DoubleQuantScales``)."""

    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    double_quant: Optional[Any] = None


def grouped(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``w [out, in]`` viewed as ``[rows, n_groups, group]`` (see the table above)."""
    if w.dim() != 2:
        raise SchemeError(f"weights must be 2-D [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if scheme.granularity is Granularity.TENSOR:
        return w.reshape(1, 1, out_f * in_f)
    if scheme.granularity is Granularity.CHANNEL:
        return w.reshape(out_f, 1, in_f)
    scheme.check_layer("<tensor>", in_f)
    return w.reshape(out_f, in_f // scheme.group_size, scheme.group_size)


def _check_finite(w: torch.Tensor) -> None:
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise FormatError(
            f"weights contain {bad} NaN/Inf value(s); quantization needs finite weights "
            "(fix the model or the checkpoint it came from before quantizing)"
        )


def _float_format_scale(g: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The non-integer formats' scale, rounded to the scale dtype (overflow is an error)."""
    scale_q = float_formats.choose_scale(g, scheme).to(scale_torch_dtype(scheme))
    if bool(torch.isinf(scale_q).any()):
        raise FormatError(
            f"weights of magnitude up to {float(g.abs().max()):.3g} overflow {scheme.scale_dtype} scales; "
            "use scale_dtype='float32' for this layer"
        )
    return scale_q


def choose_qparams(w: torch.Tensor, scheme: QuantScheme) -> QParams:
    """Scale (and zero point when affine) for every group of ``w``."""
    _check_finite(w)
    g = grouped(w.detach().to(torch.float32), scheme)
    if scheme.format != "int":
        scale_q = _float_format_scale(g, scheme)
        if scheme.double_quant:
            dq = float_formats.double_quantize(scale_q)
            return QParams(scale=dq.dequantize(), zero=None, double_quant=dq)
        return QParams(scale=scale_q, zero=None)
    return _int_qparams(g, scheme, 1.0)


def _int_qparams(g: torch.Tensor, scheme: QuantScheme, shrink) -> QParams:
    """Integer qparams of grouped weights ``g [rows, G, gs]`` for their range scaled by ``shrink``
    (1.0, or a ``[rows, G]`` tensor of factors in (0, 1]): ``shrink < 1`` clips the range."""
    sdtype = scale_torch_dtype(scheme)
    qmax = scheme.qmax
    if scheme.symmetric:
        amax = g.abs().amax(dim=-1) * shrink
        scale = amax / (qmax / 2)
    elif scheme.zero_point == "float":
        lo = g.amin(dim=-1) * shrink
        hi = g.amax(dim=-1) * shrink
        scale = hi / qmax - lo / qmax
    else:
        lo = g.amin(dim=-1).clamp(max=0.0) * shrink  # the grid must hold 0 exactly
        hi = g.amax(dim=-1).clamp(min=0.0) * shrink
        scale = hi / qmax - lo / qmax  # no overflow for |w| near float32 max
    scale_q = scale.to(sdtype)
    if bool(torch.isinf(scale_q).any()):
        raise FormatError(
            f"weights of magnitude up to {float(g.abs().max()):.3g} overflow {scheme.scale_dtype} scales; "
            "use scale_dtype='float32' (or 'bfloat16') for this layer"
        )
    tiny = torch.finfo(sdtype).tiny
    # all-zero groups get scale 1 (codes = zero point, dequantize to exact 0);
    # scales that underflowed the scale dtype are raised to its smallest normal.
    scale_q = torch.where(scale == 0, torch.ones_like(scale_q), scale_q)
    scale_q = torch.where((scale_q.float() < tiny) & (scale != 0), torch.full_like(scale_q, tiny), scale_q)
    if scheme.symmetric:
        zero = None
        reach = torch.full_like(scale_q, scheme.zero_code, dtype=torch.float32)
    elif scheme.zero_point == "float":
        zero = (-lo / scale_q.float()).to(sdtype)
        reach = torch.maximum(zero.float().abs(), (qmax - zero.float()).abs())
    else:
        zero = torch.round(-lo / scale_q.float()).clamp(0, qmax).to(torch.uint8)
        reach = torch.maximum(zero.float(), qmax - zero.float())
    # the grid's far end (0 - z) * s or (qmax - z) * s must be a finite float32,
    # else dequantize turns a finite weight near float32 max into -inf/inf
    if not bool(torch.isfinite(reach * scale_q.float()).all()):
        raise FormatError(
            f"weights of magnitude up to {float(g.abs().max()):.3g} are too close to the float32 limit: "
            f"the end of the {scheme.bits}-bit grid overflows float32; scale the weights down "
            "(or use more bits) for this layer"
        )
    return QParams(scale=scale_q, zero=zero)


def search_qparams(
    w: torch.Tensor,
    scheme: QuantScheme,
    *,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    column_weights: Optional[torch.Tensor] = None,
) -> QParams:
    """Integer qparams with each group's range clipped where that lowers its weight error.

    For ``f = 1 - i / grid`` (``i = 0 .. int(max_shrink * grid) - 1``; ``f = 1`` is
    ``choose_qparams``), the group's range (``[f*lo, f*hi]``, or ``f*amax`` when symmetric)
    gives qparams; each group keeps the first ``f`` with the least ``sum c_k |deq - w|**norm``
    over the group, so clipping is used only when it strictly helps. With ``c = 1`` this is
    the GPTQ reference's ``Quantizer(mse=True)`` search (its defaults: grid 100, shrink up to
    0.8, norm 2.4); ``column_weights`` ``c [in]`` (>= 0) weighs each input column, e.g. by its
    mean square activation (``diag(H)``), so that columns with large inputs are not clipped
    for the sake of the weight error alone. Integer formats only (``FormatError`` otherwise)."""
    if scheme.format != "int":
        raise FormatError(f"the clipping search needs an integer format, not {scheme.format!r}")
    if grid < 1 or not 0.0 < max_shrink <= 1.0 or norm <= 0:
        raise FormatError(f"search_qparams needs grid >= 1, 0 < max_shrink <= 1, norm > 0 (got {grid}, {max_shrink}, {norm})")
    _check_finite(w)
    wf = w.detach().to(torch.float32)
    if column_weights is not None:
        column_weights = column_weights.detach().to(device=wf.device, dtype=torch.float32).reshape(-1)
        if column_weights.numel() != wf.shape[1] or not bool((column_weights >= 0).all()):
            raise FormatError(
                f"column_weights must hold {wf.shape[1]} non-negative numbers (one per input column), "
                f"got {column_weights.numel()}"
            )
    g = grouped(wf, scheme)
    best = _int_qparams(g, scheme, 1.0)
    best_err = _group_error(wf, best, scheme, norm, column_weights)
    for i in range(1, max(1, int(max_shrink * grid))):
        cand = _int_qparams(g, scheme, 1.0 - i / grid)
        err = _group_error(wf, cand, scheme, norm, column_weights)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = QParams(
            scale=torch.where(better, cand.scale, best.scale),
            zero=None if best.zero is None else torch.where(better, cand.zero, best.zero),
        )
    return best


def _group_error(
    w: torch.Tensor, qp: QParams, scheme: QuantScheme, norm: float, column_weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``sum_k c_k |dequantize(quantize(w)) - w|**norm`` per group, ``[rows, G]`` (``c = 1`` if None)."""
    err = (dequantize(quantize(w, qp, scheme, check_finite=False), qp, scheme) - w).abs_().pow_(norm)
    if column_weights is not None:
        err.mul_(column_weights)
    return grouped(err, scheme).sum(dim=-1)


def _zero_f32(qp: QParams, scheme: QuantScheme) -> torch.Tensor:
    if qp.zero is None:
        return torch.full_like(qp.scale, scheme.zero_code, dtype=torch.float32)
    return qp.zero.to(torch.float32)


def quantize(w: torch.Tensor, qp: QParams, scheme: QuantScheme, *, check_finite: bool = True) -> torch.Tensor:
    """Integer codes (uint8, same shape as ``w``) for the given qparams.

    ``check_finite=False`` skips the NaN/Inf scan, for callers (GPTQ's column loop) that
    checked the whole weight once already."""
    if check_finite:
        _check_finite(w)
    g = grouped(w.detach().to(torch.float32), scheme)
    if scheme.format != "int":
        return float_formats.quantize_grouped(g, qp.scale, scheme).reshape(w.shape)
    s = qp.scale.float().unsqueeze(-1)
    z = _zero_f32(qp, scheme).unsqueeze(-1)
    if scheme.zero_point == "float" and qp.zero is not None:
        q = torch.round(g / s + z)  # z is not an integer: round after the shift
    else:
        q = torch.round(g / s) + z  # integer z: shift after rounding (exact)
    return q.clamp_(0, scheme.qmax).to(torch.uint8).reshape(w.shape)


def dequantize(
    codes: torch.Tensor, qp: QParams, scheme: QuantScheme, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(q - z) * s`` computed in float32, then cast to ``dtype`` (``value(q) * s`` for the
    non-integer formats, see ``lowbit.float_formats``)."""
    s = qp.scale.float().unsqueeze(-1)
    if scheme.format != "int":
        return (float_formats.code_values(grouped(codes, scheme), scheme) * s).reshape(codes.shape).to(dtype)
    g = grouped(codes, scheme).to(torch.float32)
    z = _zero_f32(qp, scheme).unsqueeze(-1)
    return ((g - z) * s).reshape(codes.shape).to(dtype)


def quantize_weight(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, QParams]:
    """Round-to-nearest: qparams from the weight's own range, then codes.

    Double-quantized schemes choose the codes with the exact block scales and store the
    8-bit ones, as bitsandbytes does (so ``quantize(w, qp)`` with the returned ``qp``
    may pick other codes)."""
    if scheme.double_quant:
        _check_finite(w)
        g = grouped(w.detach().to(torch.float32), scheme)
        exact = _float_format_scale(g, scheme)
        dq = float_formats.double_quantize(exact)
        codes = float_formats.quantize_grouped(g, exact, scheme).reshape(w.shape)
        return codes, QParams(scale=dq.dequantize(), zero=None, double_quant=dq)
    qp = choose_qparams(w, scheme)
    return quantize(w, qp, scheme), qp


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


# ---------------------------------------------------------------------------
# W8A8 activations: dynamic symmetric int8, one scale per row (token)
# ---------------------------------------------------------------------------
ACT_INT8_MAX = 127  # the grid is -127..127 (symmetric; -128 is never used)


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row int8 quantization of activations ``x [..., K]`` (the ``activations="int8"`` scheme).

    Returns ``q`` int8 ``[..., K]`` and ``scale`` float32 ``[..., 1]`` with
    ``x ~= q * scale``: ``scale = amax(|x_row|) / 127`` (a row of zeros gets scale 1),
    ``q = clamp(round(x / scale), -127, 127)`` computed in float32 (round half to even).
    A row whose amax is so small that ``amax / 127`` underflows float32's normal range
    uses the smallest normal scale instead. Raises ``FormatError`` on NaN/Inf activations.
    """
    if not x.is_floating_point():
        raise FormatError(f"activations must be floating point, got {x.dtype}")
    xf = x.detach().to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True) if xf.shape[-1] > 0 else xf.new_zeros(*xf.shape[:-1], 1)
    if amax.numel() and not bool(torch.isfinite(amax).all()):
        raise FormatError(
            "activations contain NaN/Inf values; int8 activation quantization needs finite inputs "
            "(check the model's inputs or the layers before this one)"
        )
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where(amax == 0, torch.ones_like(amax), (amax / ACT_INT8_MAX).clamp(min=tiny))
    q = torch.round(xf / scale).clamp_(-ACT_INT8_MAX, ACT_INT8_MAX).to(torch.int8)
    return q, scale


def fake_quantize_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """``q * scale`` of ``quantize_activations_int8(x)``, computed in float32, returned in ``x``'s dtype.

    No gradient flows through it (the rounding is piecewise constant): it is the
    inference-time numerics that the reference kernels apply to W8A8 layers.
    """
    q, scale = quantize_activations_int8(x)
    return (q.to(torch.float32) * scale).to(x.dtype)
