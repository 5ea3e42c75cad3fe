"""Compatibility names for the non-integer formats, which now live in ``lowbit.formats``.

``lowbit.formats.codebook`` (nf4 / fp4, double quantization), ``lowbit.formats.fp8``,
``lowbit.formats.ternary`` and ``lowbit.formats.activations`` hold the numerics; new code
should import from there (or use the format-agnostic ``lowbit.formats`` entry points).
"""

from __future__ import annotations

import torch

from lowbit.errors import FormatError
from lowbit.formats.activations import fake_quantize_activations_fp8
from lowbit.formats.codebook import DoubleQuantScales, dequantize_double, double_quantize
from lowbit.formats.dispatch import value_table
from lowbit.formats.fp8 import FP8_DTYPES, fp8_max
from lowbit.formats.registry import numeric_format
from lowbit.formats.scaled import ScaledFormat
from lowbit.scheme import QuantScheme

__all__ = [
    "FP8_DTYPES",
    "DoubleQuantScales",
    "choose_scale",
    "code_values",
    "dequantize_double",
    "double_quantize",
    "fake_quantize_activations_fp8",
    "fp8_max",
    "quantize_grouped",
    "value_table",
]


def _scaled(scheme: QuantScheme) -> ScaledFormat:
    fmt = numeric_format(scheme)
    if not isinstance(fmt, ScaledFormat):
        raise FormatError(f"float_formats has no numerics for format {scheme.format!r}")
    return fmt


def choose_scale(g: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """float32 scale per group of ``g [rows, n_groups, group]`` (before any rounding to the scale dtype)."""
    return _scaled(scheme).choose_scale(g, scheme)


def quantize_grouped(g: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """uint8 codes of ``g [rows, n_groups, group]`` given float32 ``scale [rows, n_groups]``."""
    return _scaled(scheme).encode(g, scale.to(torch.float32).unsqueeze(-1), scheme)


def code_values(codes: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """float32 ``value(q)`` of every code (before the scale)."""
    return _scaled(scheme).code_values(codes, scheme)
