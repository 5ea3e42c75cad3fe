"""Reference numerics of every numeric format, in plain torch (CPU-safe).

Pure functions of (weight, scheme), the same for every format: they group the 2-D
weight, look the format up by ``scheme.format`` in a registry and call it
(``lowbit.formats.dispatch``). One module per format family implements the small
protocol of ``lowbit.formats.base`` (read its docstring to add a format):

==================  ===============================================  =====================
module              formats                                          ``w =``
==================  ===============================================  =====================
``integer``         ``int`` (2-8 bits; symmetric, affine, float z)   ``(q - z) * s``
``codebook``        ``nf4``, ``fp4`` (+ QLoRA double quantization)   ``table[q] * absmax``
``fp8``             ``fp8_e4m3``, ``fp8_e5m2``                       ``float8(q) * s``
``ternary``         ``ternary`` (BitNet b1.58)                       ``(q - 1) * mean|w|``
==================  ===============================================  =====================

Codes are unsigned ``uint8``; the scale is rounded to the scheme's ``scale_dtype``
*before* the codes are chosen, so that ``dequantize(quantize(w))`` is exactly what a
saved checkpoint reproduces (``fake_quantize`` is literally that composition).
Also here: the integer clipping search (``search``) and dynamic activation
quantization (``activations``).
"""

from __future__ import annotations

from lowbit.formats.activations import (
    ACT_INT8_MAX,
    fake_quantize_activations_fp8,
    fake_quantize_activations_int8,
    quantize_activations_int8,
)
from lowbit.formats.base import (
    NumericFormat,
    QParams,
    TensorSpec,
    grouped,
    param_shape,
    scale_torch_dtype,
    zero_torch_dtype,
)
from lowbit.formats.base import check_finite as _check_finite
from lowbit.formats.dispatch import (
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
    quantize_weight,
    sqnr_db,
    value_table,
)
from lowbit.formats.registry import numeric_format, registered
from lowbit.formats.search import group_error as _group_error
from lowbit.formats.search import search_qparams

__all__ = [
    "ACT_INT8_MAX",
    "NumericFormat",
    "QParams",
    "TensorSpec",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "fake_quantize_activations_fp8",
    "fake_quantize_activations_int8",
    "grouped",
    "numeric_format",
    "param_shape",
    "quantize",
    "quantize_activations_int8",
    "quantize_weight",
    "registered",
    "scale_torch_dtype",
    "search_qparams",
    "sqnr_db",
    "value_table",
    "zero_torch_dtype",
]
