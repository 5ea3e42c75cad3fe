"""``QuantizedTensor``: packed codes + qparams + logical shape + scheme + layout.

Stored tensors (``N = out``, ``K = in``, ``G`` = number of scale groups):

* ``packed``: uint8 ``[N, packed_row_bytes(K, bits)]`` in layout
  ``lowbit.bitstream.v1`` (``[1, ...]`` rows are still per output row; the
  per-tensor scheme only changes the scale shape);
* ``scale``: scale dtype, ``[N, G]`` (group / channel) or ``[1, 1]`` (tensor);
* ``zero``: uint8 (scale dtype for ``zero_point='float'``), same shape as ``scale``;
  absent for symmetric schemes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowbit import formats, packing
from lowbit.errors import PackingError
from lowbit.scheme import QuantScheme


@dataclass
class QuantizedTensor:
    packed: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    shape: tuple[int, int]
    scheme: QuantScheme
    layout: str = packing.NATIVE_LAYOUT

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.layout not in packing.LAYOUTS:
            raise PackingError(f"unknown layout {self.layout!r}; known: {packing.LAYOUTS}")
        n, k = self.shape
        want = (n, packing.packed_row_bytes(k, self.scheme.bits))
        if tuple(self.packed.shape) != want or self.packed.dtype != torch.uint8:
            raise PackingError(
                f"packed data is {self.packed.dtype} {tuple(self.packed.shape)}, expected uint8 {want} "
                f"for a {n}x{k} weight at {self.scheme.bits} bits"
            )
        if (self.zero is None) != self.scheme.symmetric:
            raise PackingError("zero points must be given exactly when the scheme is affine (symmetric=False)")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, qp: formats.QParams, scheme: QuantScheme) -> "QuantizedTensor":
        return cls(packing.pack(codes, scheme.bits), qp.scale, qp.zero, tuple(codes.shape), scheme)

    @classmethod
    def quantize(cls, w: torch.Tensor, scheme: QuantScheme) -> "QuantizedTensor":
        """Round-to-nearest quantization of a 2-D weight."""
        codes, qp = formats.quantize_weight(w, scheme)
        return cls.from_codes(codes, qp, scheme)

    @property
    def qparams(self) -> formats.QParams:
        return formats.QParams(self.scale, self.zero)

    def codes(self) -> torch.Tensor:
        return packing.unpack(self.packed, self.scheme.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return formats.dequantize(self.codes(), self.qparams, self.scheme, dtype)

    @property
    def nbytes(self) -> int:
        """Exact storage bytes: packed codes + scales + zero points."""
        n = self.packed.numel() * self.packed.element_size() + self.scale.numel() * self.scale.element_size()
        if self.zero is not None:
            n += self.zero.numel() * self.zero.element_size()
        return n

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / (self.shape[0] * self.shape[1])
