"""The numeric-format protocol, and the pieces every format shares.

A numeric format says how one group of weights becomes small unsigned codes plus
per-group parameters, and back. Weights reach a format already *grouped*: the
2-D weight ``[out, in]`` viewed as ``[rows, n_groups, group]`` (:func:`grouped`):

=========  ==========================  =====================
granular.  view of W                   scale / zero shape
=========  ==========================  =====================
tensor     ``[1, 1, out*in]``          ``[1, 1]``
channel    ``[out, 1, in]``            ``[out, 1]``
group      ``[out, in/G, G]``          ``[out, in/G]``
=========  ==========================  =====================

A format is a :class:`NumericFormat` subclass that implements three methods on
grouped tensors, in plain torch, with no reshaping of its own:

* ``choose_params(g, scheme) -> QParams``: float32 ``g [rows, G, gs]`` (finite) ->
  scale (and zero point) per group, already rounded to what is stored;
* ``quantize(g, qp, scheme) -> codes``: uint8, ``g``'s shape, in ``[0, 2**bits - 1]``;
* ``dequantize(codes, qp, scheme) -> values``: float32, the codes' shape;

and may override ``bits_per_code`` (default ``scheme.bits``), ``stored_tensors``
(default: one ``scale`` per group in the scale dtype) and ``choose_and_quantize``
(default: ``choose_params`` then ``quantize``; round-to-nearest).
``lowbit.formats.dispatch`` owns the rest: it checks finiteness, groups the 2-D
weight, looks the format up by ``scheme.format``, calls it, checks the contract
(dtype and shape of what comes back) and reshapes to ``[out, in]``.

Each format module's docstring carries a bit diagram and states a group's bytes
as a sum (codes + parameters), e.g. ``w4 g128 affine: 64 + 4 + 1`` bytes per 128
weights. The codes themselves are stored by the layout (``lowbit.packing``, the
``qweight`` tensor at ``bits_per_code`` bits each); ``stored_tensors`` lists the
parameter tensors only.

Adding a format
---------------
1. Write ``src/lowbit/formats/<family>.py`` with a ``NumericFormat`` subclass (or a
   ``lowbit.formats.scaled.ScaledFormat`` one when ``w = value(q) * s``) and a
   module-level ``FORMATS = (YourFormat(),)``; each instance lists the
   ``scheme.format`` names it handles in ``names``. The registry
   (``lowbit.formats.registry``) finds it: no other file in this package changes.
2. Add ``tests/test_<family>.py``; ``tests/test_numeric_formats.py`` already runs the
   protocol's contract (dtypes, shapes, code range, stored tensors vs bytes) over
   every registered format.
3. The vocabulary is ``lowbit.scheme``: a new ``scheme.format`` value, its code width
   and default granularity are declared there (``FORMATS``, ``_FORMAT_BITS``,
   ``_DEFAULT_GRANULARITY``), since a scheme is validated without importing numerics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from lowbit.errors import FormatError, SchemeError
from lowbit.scheme import Granularity, QuantScheme

TensorSpec = tuple[tuple[int, ...], torch.dtype]

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
    8-bit form (``lowbit.formats.codebook.DoubleQuantScales``)."""

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


def param_shape(scheme: QuantScheme, out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of a per-group parameter (scale, zero point) of an ``[out, in]`` weight."""
    if scheme.granularity is Granularity.TENSOR:
        return (1, 1)
    return (out_features, scheme.n_groups(in_features))


def check_finite(w: torch.Tensor) -> None:
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise FormatError(
            f"weights contain {bad} NaN/Inf value(s); quantization needs finite weights "
            "(fix the model or the checkpoint it came from before quantizing)"
        )


def scale_to_dtype(scale: torch.Tensor, g: torch.Tensor, scheme: QuantScheme, hint: str) -> torch.Tensor:
    """``scale`` rounded to the scheme's scale dtype; a scale that overflows it is a
    ``FormatError`` naming the weights' magnitude and ``hint`` (what to use instead)."""
    scale_q = scale.to(scale_torch_dtype(scheme))
    if bool(torch.isinf(scale_q).any()):
        raise FormatError(
            f"weights of magnitude up to {float(g.abs().max()):.3g} overflow {scheme.scale_dtype} scales; "
            f"use {hint} for this layer"
        )
    return scale_q


class NumericFormat(ABC):
    """One family of numeric formats (see the module docstring for the protocol).

    ``names``: the ``scheme.format`` values this instance handles. A subclass that
    leaves one of the three abstract methods out cannot be instantiated."""

    names: ClassVar[tuple[str, ...]] = ()

    def bits_per_code(self, scheme: QuantScheme) -> int:
        """Bits of one stored code (the width the layout packs)."""
        return scheme.bits

    @abstractmethod
    def choose_params(self, g: torch.Tensor, scheme: QuantScheme) -> QParams:
        """float32 ``g [rows, G, gs]`` (finite) -> scale (and zero point) ``[rows, G]``, as stored."""

    @abstractmethod
    def quantize(self, g: torch.Tensor, qp: QParams, scheme: QuantScheme) -> torch.Tensor:
        """uint8 codes of ``g``, its shape, in ``[0, 2**bits_per_code - 1]``."""

    @abstractmethod
    def dequantize(self, codes: torch.Tensor, qp: QParams, scheme: QuantScheme) -> torch.Tensor:
        """float32 values of ``codes [rows, G, gs]``, their shape."""

    def choose_and_quantize(self, g: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, QParams]:
        """Round-to-nearest: parameters from the groups' own range, then codes."""
        qp = self.choose_params(g, scheme)
        return self.quantize(g, qp, scheme), qp

    def stored_tensors(self, scheme: QuantScheme, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """Name -> (shape, dtype) of the parameter tensors a layer stores (codes excluded)."""
        return {"scale": (param_shape(scheme, out_features, in_features), scale_torch_dtype(scheme))}

    def value_table(self, scheme: QuantScheme) -> torch.Tensor:
        """float32 value of every code before the scale (lookup-table kernels); formats
        whose codes have no scale-free value (affine integers) raise ``FormatError``."""
        raise FormatError(f"format {scheme.format!r} has no code-value table (its codes are not w / s)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.names)})"
