"""Codebook formats ``nf4`` / ``fp4`` (bitsandbytes), with QLoRA double quantization.

``w = table[q] * absmax`` per block of ``group_size`` (default 64) weights, with the
16-value tables of ``lowbit.codebooks``::

    one block of 64 weights                          bytes
    codes   |q0|q1|...|q63|  4 bits each              32
    absmax  |s|  scale dtype                          4 (float32) or 2
      nf4 g64, float32 absmax:  32 + 4 = 36 bytes / 64 weights (4.5 bits)

    double_quant=True: absmax becomes an 8-bit code of the dynamic map
    scale   |c|  uint8 per block                      1
    scale_absmax  float32 per 256 blocks              4 / 256
    scale_offset  float32 per tensor                  4 (once)
      nf4 g64 dq:  32 + 1 + 4/256 = 33.02 bytes / 64 weights (4.13 bits, + 4 bytes)

Codes follow bitsandbytes exactly: ``x * (1 / absmax)`` clamped to [-1, 1], then the
nearest table value (ties to the lower one).

Double quantization: the fp32 block absmax values, flattened row-major, have their mean
subtracted, and are quantized with the 8-bit dynamic map in blocks of 256, each with its
own fp32 absmax (bitsandbytes' ``quantize_blockwise``);
``absmax ~= dynamic_map[code] * block_absmax + mean``. As in bitsandbytes, the 4-bit codes
are chosen with the exact absmax, and the weights dequantize with the double-quantized one.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import torch

from lowbit import codebooks
from lowbit.errors import FormatError
from lowbit.formats.base import QParams, TensorSpec, param_shape
from lowbit.formats.scaled import ScaledFormat
from lowbit.scheme import CODEBOOK_FORMATS, DOUBLE_QUANT_BLOCK, QuantScheme

_TINY = 1e-38  # bitsandbytes' floor on absmax before taking its reciprocal


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


class CodebookFormat(ScaledFormat):
    names = CODEBOOK_FORMATS

    def choose_scale(self, g: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        return g.abs().amax(dim=-1)

    def encode(self, g: torch.Tensor, s: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        scaled = (g * (1.0 / s.clamp(min=_TINY))).clamp(-1, 1)
        return codebooks.nearest_codes(scaled, scheme.format).to(torch.uint8)

    def code_values(self, codes: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        return codebooks.table(scheme.format).to(codes.device)[codes.long()]

    def choose_params(self, g: torch.Tensor, scheme: QuantScheme) -> QParams:
        scale_q = self.stored_scale(g, scheme)
        if scheme.double_quant:
            dq = double_quantize(scale_q)
            return QParams(scale=dq.dequantize(), zero=None, double_quant=dq)
        return QParams(scale=scale_q, zero=None)

    def choose_and_quantize(self, g: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, QParams]:
        """With ``double_quant`` the codes are chosen with the exact block scales and the 8-bit
        ones are stored, as bitsandbytes does (so ``quantize(g, qp)`` with the returned ``qp``
        may pick other codes)."""
        if not scheme.double_quant:
            return super().choose_and_quantize(g, scheme)
        exact = self.stored_scale(g, scheme)
        dq = double_quantize(exact)
        codes = self.encode(g, exact.to(torch.float32).unsqueeze(-1), scheme)
        return codes, QParams(scale=dq.dequantize(), zero=None, double_quant=dq)

    def stored_tensors(self, scheme: QuantScheme, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        if not scheme.double_quant:
            return super().stored_tensors(scheme, out_features, in_features)
        shape = param_shape(scheme, out_features, in_features)
        n_scales = shape[0] * shape[1]
        return {
            "scale": (shape, torch.uint8),
            "scale_absmax": ((ceil(n_scales / DOUBLE_QUANT_BLOCK),), torch.float32),
            "scale_offset": ((1,), torch.float32),
        }


FORMATS = (CodebookFormat(),)
