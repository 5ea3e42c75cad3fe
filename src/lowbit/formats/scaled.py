"""``ScaledFormat``: the formats whose codes have a value of their own, ``w = value(q) * s``.

One float scale ``s`` per group, no zero point (the schemes are symmetric). A subclass
implements the two format-specific steps, on grouped tensors:

* ``choose_scale(g, scheme)``: float32 ``s [rows, G]`` before rounding to the scale dtype;
* ``encode(g, s, scheme)``: uint8 codes of ``g [rows, G, gs]`` for float32 ``s [rows, G, 1]``;
* ``code_values(codes, scheme)``: float32 ``value(q)`` of every code;

and this class turns them into the :class:`~lowbit.formats.base.NumericFormat` protocol:
the scale is rounded to the scale dtype (overflow is a ``FormatError``) *before* the
codes are chosen, and ``dequantize`` is ``value(q) * s`` in float32.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from lowbit.formats.base import NumericFormat, QParams, scale_to_dtype
from lowbit.scheme import QuantScheme


class ScaledFormat(NumericFormat):
    @abstractmethod
    def choose_scale(self, g: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        """float32 scale ``[rows, G]`` of ``g [rows, G, gs]``, before rounding to the scale dtype."""

    @abstractmethod
    def encode(self, g: torch.Tensor, s: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        """uint8 codes of ``g [rows, G, gs]`` for the float32 scale ``s [rows, G, 1]``."""

    @abstractmethod
    def code_values(self, codes: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        """float32 ``value(q)`` of every code (any shape), before the scale."""

    # -- the protocol ---------------------------------------------------------
    def stored_scale(self, g: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        """The scale per group, rounded to the scale dtype (overflow is an error)."""
        return scale_to_dtype(self.choose_scale(g, scheme), g, scheme, "scale_dtype='float32'")

    def choose_params(self, g: torch.Tensor, scheme: QuantScheme) -> QParams:
        return QParams(scale=self.stored_scale(g, scheme), zero=None)

    def quantize(self, g: torch.Tensor, qp: QParams, scheme: QuantScheme) -> torch.Tensor:
        return self.encode(g, qp.scale.to(torch.float32).unsqueeze(-1), scheme)

    def dequantize(self, codes: torch.Tensor, qp: QParams, scheme: QuantScheme) -> torch.Tensor:
        return self.code_values(codes, scheme) * qp.scale.float().unsqueeze(-1)

    def value_table(self, scheme: QuantScheme) -> torch.Tensor:
        return self.code_values(torch.arange(1 << self.bits_per_code(scheme), dtype=torch.uint8), scheme)
