"""Ternary format (BitNet b1.58): codes 0, 1, 2 mean -1, 0, +1, stored at 2 bits.

``w = (q - 1) * s`` with the absmean scale ``s = mean(|w|)`` per tensor (default),
channel or group (an all-zero one gets ``s = 1``); ``q = clamp(round(w / s), -1, 1) + 1``
(round half to even)::

    code (2 bits)  |b1 b0|   00 = -1, 01 = 0, 10 = +1, 11 never written
    one row of K weights, per-tensor scale        bytes
    codes  |q0|q1|...|q(K-1)|  2 bits each         K/4
    scale  |s|  scale dtype, once per tensor       4 (float32) or 2
      ternary per tensor:  N*K/4 + 4 bytes (2 bits per weight)

Dequantizing a code 3 is a ``FormatError`` (the file is corrupt), and the lookup table
that kernels use maps it to 0.
"""

from __future__ import annotations

import torch

from lowbit.errors import FormatError
from lowbit.formats.scaled import ScaledFormat
from lowbit.scheme import QuantScheme


class TernaryFormat(ScaledFormat):
    names = ("ternary",)

    def choose_scale(self, g: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        mean = g.abs().mean(dim=-1)
        return torch.where(mean == 0, torch.ones_like(mean), mean)

    def encode(self, g: torch.Tensor, s: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        return (torch.round(g / s).clamp(-1, 1) + 1).to(torch.uint8)

    def code_values(self, codes: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        if codes.numel() and int(codes.max()) > 2:
            raise FormatError(f"ternary codes must be 0, 1 or 2, found {int(codes.max())}")
        return codes.to(torch.float32) - 1.0

    def value_table(self, scheme: QuantScheme) -> torch.Tensor:
        return torch.tensor([-1.0, 0.0, 1.0, 0.0])  # code 3 is never written


FORMATS = (TernaryFormat(),)
