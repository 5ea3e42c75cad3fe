"""Reference numerics of the non-integer formats (nf4, fp4, fp8_e4m3, fp8_e5m2, ternary).

Pure functions in plain torch, on weights viewed as ``[rows, n_groups, group]``
(``lowbit.formats.grouped``). Codes are uint8 like the integer formats', and every
format dequantizes as ``w = value(q) * s`` with one float scale ``s`` per group:

==========  ==========================================  =====================================
format      value(q)                                    scale ``s`` (per group)
==========  ==========================================  =====================================
nf4 / fp4   ``codebooks.table(fmt)[q]``                 absmax (bitsandbytes' ``absmax``)
fp8_e4m3    ``q`` read as ``torch.float8_e4m3fn``        ``amax / 448``
fp8_e5m2    ``q`` read as ``torch.float8_e5m2``          ``amax / 57344``
ternary     ``q - 1`` (codes 0, 1, 2 mean -1, 0, +1)    ``mean(|w|)`` (BitNet b1.58's absmean)
==========  ==========================================  =====================================

Codebook codes follow bitsandbytes exactly: ``x * (1 / absmax)`` clamped to [-1, 1],
then the nearest table value (ties to the lower one). FP8 saturates: values beyond the
format's largest finite number become that number, never inf/NaN. Ternary rounds
``w / s`` half to even and clips to [-1, 1].

Double quantization (QLoRA, ``double_quant=True``): the fp32 block absmax values,
flattened row-major, have their mean subtracted, and are quantized with the 8-bit
dynamic map in blocks of 256, each with its own fp32 absmax (bitsandbytes'
``quantize_blockwise``); ``absmax ~= dynamic_map[code] * block_absmax + mean``. As in
bitsandbytes, the 4-bit codes are chosen with the exact absmax, and the weights
dequantize with the double-quantized one.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import torch

from lowbit import codebooks
from lowbit.errors import FormatError
from lowbit.scheme import CODEBOOK_FORMATS, DOUBLE_QUANT_BLOCK, FP8_FORMATS, QuantScheme

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_TINY = 1e-38  # bitsandbytes' floor on absmax before taking its reciprocal


def fp8_max(fmt: str) -> float:
    return float(torch.finfo(FP8_DTYPES[fmt]).max)


@dataclass(frozen=True)
class DoubleQuantScales:
    """8-bit codes of a scale tensor: ``codes`` uint8 (the scale's shape), ``absmax``
    float32 ``[ceil(n / 256)]`` (one per block of 256 scales, row-major), ``offset``
    float32 ``[1]`` (the mean that was subtracted)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    offset: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return dequantize_double(self.codes, self.absmax, self.offset)


def double_quantize(scale: torch.Tensor) -> DoubleQuantScales:
    """QLoRA double quantization of float32 block scales (any shape)."""
    flat = scale.detach().to(torch.float32).reshape(-1)
    n = flat.numel()
    offset = flat.mean().reshape(1)
    centred = flat - offset
    n_blocks = ceil(n / DOUBLE_QUANT_BLOCK)
    padded = torch.zeros(n_blocks * DOUBLE_QUANT_BLOCK, dtype=torch.float32)
    padded[:n] = centred
    blocks = padded.view(n_blocks, DOUBLE_QUANT_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)).clamp(-1, 1)
    codes = codebooks.nearest_codes(scaled.reshape(-1)[:n], "dynamic").to(torch.uint8)
    return DoubleQuantScales(codes.reshape(scale.shape), absmax, offset)


def dequantize_double(codes: torch.Tensor, absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 scales from their 8-bit codes (the inverse of :func:`double_quantize`)."""
    n = codes.numel()
    n_blocks = ceil(n / DOUBLE_QUANT_BLOCK)
    if tuple(absmax.shape) != (n_blocks,) or tuple(offset.shape) != (1,):
        raise FormatError(
            f"double-quantized scales: {n} codes need absmax [{n_blocks}] and offset [1], "
            f"got {tuple(absmax.shape)} and {tuple(offset.shape)}"
        )
    values = codebooks.dynamic_map().to(codes.device)[codes.reshape(-1).long()]
    block_of = torch.arange(n, device=codes.device) // DOUBLE_QUANT_BLOCK
    return (values * absmax.float()[block_of] + offset.float()).reshape(codes.shape)


def choose_scale(g: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """float32 scale per group of ``g [rows, n_groups, group]`` (before any rounding to the scale dtype)."""
    fmt = scheme.format
    if fmt in CODEBOOK_FORMATS:
        return g.abs().amax(dim=-1)
    if fmt in FP8_FORMATS:
        amax = g.abs().amax(dim=-1)
        return torch.where(amax == 0, torch.ones_like(amax), amax / fp8_max(fmt))
    if fmt == "ternary":
        mean = g.abs().mean(dim=-1)
        return torch.where(mean == 0, torch.ones_like(mean), mean)
    raise FormatError(f"float_formats has no numerics for format {fmt!r}")


def quantize_grouped(g: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """uint8 codes of ``g [rows, n_groups, group]`` given float32 ``scale [rows, n_groups]``."""
    fmt = scheme.format
    s = scale.to(torch.float32).unsqueeze(-1)
    if fmt in CODEBOOK_FORMATS:
        scaled = (g * (1.0 / s.clamp(min=_TINY))).clamp(-1, 1)
        return codebooks.nearest_codes(scaled, fmt).to(torch.uint8)
    if fmt in FP8_FORMATS:
        top = fp8_max(fmt)
        return (g / s).clamp(-top, top).to(FP8_DTYPES[fmt]).view(torch.uint8)
    if fmt == "ternary":
        return (torch.round(g / s).clamp(-1, 1) + 1).to(torch.uint8)
    raise FormatError(f"float_formats has no numerics for format {fmt!r}")


def code_values(codes: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """float32 ``value(q)`` of every code (before the scale)."""
    fmt = scheme.format
    if fmt in CODEBOOK_FORMATS:
        return codebooks.table(fmt).to(codes.device)[codes.long()]
    if fmt in FP8_FORMATS:
        return codes.contiguous().view(FP8_DTYPES[fmt]).to(torch.float32)
    if fmt == "ternary":
        if codes.numel() and int(codes.max()) > 2:
            raise FormatError(f"ternary codes must be 0, 1 or 2, found {int(codes.max())}")
        return codes.to(torch.float32) - 1.0
    raise FormatError(f"float_formats has no numerics for format {fmt!r}")


def value_table(scheme: QuantScheme) -> torch.Tensor:
    """float32 ``value(q)`` for every code ``q`` in ``0 .. 2**bits - 1`` (a lookup table for kernels)."""
    if scheme.format == "ternary":
        return torch.tensor([-1.0, 0.0, 1.0, 0.0])  # code 3 is never written
    return code_values(torch.arange(1 << scheme.bits, dtype=torch.uint8), scheme)


def fake_quantize_activations_fp8(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-row (token) FP8 E4M3 rounding of activations ``x [..., K]`` (``activations="fp8_e4m3"``):
    ``s = amax(|x_row|) / 448`` (1 for an all-zero row), ``x ~= float8_e4m3fn(x / s) * s``,
    computed in float32 and returned in ``x``'s dtype. Raises ``FormatError`` on NaN/Inf."""
    if not x.is_floating_point():
        raise FormatError(f"activations must be floating point, got {x.dtype}")
    xf = x.detach().to(torch.float32)
    if xf.shape[-1] == 0:
        return x.clone()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    if amax.numel() and not bool(torch.isfinite(amax).all()):
        raise FormatError("activations contain NaN/Inf values; fp8 activation quantization needs finite inputs")
    top = fp8_max("fp8_e4m3")
    scale = torch.where(amax == 0, torch.ones_like(amax), (amax / top).clamp(min=torch.finfo(torch.float32).tiny))
    q = (xf / scale).clamp(-top, top).to(torch.float8_e4m3fn).to(torch.float32)
    return (q * scale).to(x.dtype)
