"""Integer formats (``format="int"``, 2 to 8 bits): symmetric, affine, float zero points.

Codes are unsigned ``q`` in ``[0, 2**bits - 1]``; ``w = (q - z) * s``::

    one group of G weights, b bits each        bytes
    codes  |q0|q1|...|q(G-1)|  (layout-packed)  G*b/8
    scale  |s|  scale dtype                     4 (float32) or 2
    zero   |z|  affine only: uint8, or the      1, or 4 / 2 for
                scale dtype (zero_point=float)   float zero points

    w4 g128 affine, float32 scale:  64 + 4 + 1 = 69 bytes / 128 weights (4.31 bits)
    w8 per channel symmetric:       K + 4 bytes per row of K weights

* symmetric: ``z = 2**(bits-1)`` is fixed (not stored), ``s = amax / (qmax / 2)``;
* affine, integer zero point: ``s = (max - min) / qmax`` over the range widened to
  hold 0, ``z = clamp(round(-min / s), 0, qmax)``: the grid holds 0 exactly;
* affine, float zero point: ``s = max / qmax - min / qmax``, ``z = -min / s`` in the
  scale dtype: min and max land exactly on codes 0 and ``qmax``.

The scale is rounded to the scheme's ``scale_dtype`` *before* the codes are chosen,
so that ``dequantize(quantize(w))`` is exactly what a saved checkpoint reproduces.
Rounding is ``torch.round`` (half to even). An all-zero group gets scale 1 (codes =
zero point, dequantize to exact 0); a scale that underflows the scale dtype is raised
to its smallest normal.
"""

from __future__ import annotations

import torch

from lowbit.errors import FormatError
from lowbit.formats.base import (
    NumericFormat,
    QParams,
    TensorSpec,
    param_shape,
    scale_to_dtype,
    scale_torch_dtype,
    zero_torch_dtype,
)
from lowbit.scheme import QuantScheme


def int_qparams(g: torch.Tensor, scheme: QuantScheme, shrink) -> QParams:
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
    scale_q = scale_to_dtype(scale, g, scheme, "scale_dtype='float32' (or 'bfloat16')")
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


def _zero_f32(qp: QParams, scheme: QuantScheme) -> torch.Tensor:
    if qp.zero is None:
        return torch.full_like(qp.scale, scheme.zero_code, dtype=torch.float32)
    return qp.zero.to(torch.float32)


class IntFormat(NumericFormat):
    names = ("int",)

    def choose_params(self, g: torch.Tensor, scheme: QuantScheme) -> QParams:
        return int_qparams(g, scheme, 1.0)

    def quantize(self, g: torch.Tensor, qp: QParams, scheme: QuantScheme) -> torch.Tensor:
        s = qp.scale.float().unsqueeze(-1)
        z = _zero_f32(qp, scheme).unsqueeze(-1)
        if scheme.zero_point == "float" and qp.zero is not None:
            q = torch.round(g / s + z)  # z is not an integer: round after the shift
        else:
            q = torch.round(g / s) + z  # integer z: shift after rounding (exact)
        return q.clamp_(0, scheme.qmax).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor, qp: QParams, scheme: QuantScheme) -> torch.Tensor:
        s = qp.scale.float().unsqueeze(-1)
        z = _zero_f32(qp, scheme).unsqueeze(-1)
        return (codes.to(torch.float32) - z) * s

    def stored_tensors(self, scheme: QuantScheme, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        specs = super().stored_tensors(scheme, out_features, in_features)
        if not scheme.symmetric:
            specs["zero"] = (param_shape(scheme, out_features, in_features), zero_torch_dtype(scheme))
        return specs


FORMATS = (IntFormat(),)
