"""FP8 formats ``fp8_e4m3`` / ``fp8_e5m2``: the code is the byte of a float8 value.

``w = float8(q) * s`` with ``s = amax / fmax`` per tensor or output channel (an all-zero
one gets ``s = 1``); ``fmax`` is 448 (``torch.float8_e4m3fn``) or 57344 (``torch.float8_e5m2``)::

    code byte   e4m3: |S|E E E E|M M M|      e5m2: |S|E E E E E|M M|
    one row of K weights, per-channel scale        bytes
    codes  |q0|q1|...|q(K-1)|  8 bits each          K
    scale  |s|  scale dtype                         4 (float32) or 2
      fp8 per channel, float32 scale:  K + 4 bytes per row of K weights

Quantization saturates: values beyond the format's largest finite number become that
number, never inf/NaN (``clamp`` to ``+-fmax``, then torch's round-to-nearest-even cast).
"""

from __future__ import annotations

import torch

from lowbit.formats.scaled import ScaledFormat
from lowbit.scheme import FP8_FORMATS, QuantScheme

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def fp8_max(fmt: str) -> float:
    return float(torch.finfo(FP8_DTYPES[fmt]).max)


class Fp8Format(ScaledFormat):
    names = FP8_FORMATS

    def choose_scale(self, g: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        amax = g.abs().amax(dim=-1)
        return torch.where(amax == 0, torch.ones_like(amax), amax / fp8_max(scheme.format))

    def encode(self, g: torch.Tensor, s: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        top = fp8_max(scheme.format)
        return (g / s).clamp(-top, top).to(FP8_DTYPES[scheme.format]).view(torch.uint8)

    def code_values(self, codes: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        return codes.contiguous().view(FP8_DTYPES[scheme.format]).to(torch.float32)


FORMATS = (Fp8Format(),)
