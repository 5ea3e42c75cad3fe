"""``QuantizedTensor``: packed codes + qparams + logical shape + scheme + layout.

Stored tensors (``N = out``, ``K = in``, ``G`` = number of scale groups; see
:func:`stored_tensor_specs`, which every reader and writer of these tensors uses):

* ``packed``: uint8 ``[N, packed_row_bytes(K, bits)]`` in layout
  ``lowbit.bitstream.v1`` (``[1, ...]`` rows are still per output row; the
  per-tensor scheme only changes the scale shape);
* ``scale``: scale dtype, ``[N, G]`` (group / channel) or ``[1, 1]`` (tensor);
  uint8 codes of the same shape for ``double_quant`` schemes, with
  ``scale_absmax`` float32 ``[ceil(N*G / 256)]`` and ``scale_offset`` float32 ``[1]``;
* ``zero``: uint8 (scale dtype for ``zero_point='float'``), same shape as ``scale``;
  absent for symmetric schemes;
* LLM.int8 layers (W8A8 schemes quantized by the ``LLMInt8`` method) with ``n_outliers = O > 0``:
  ``outlier_idx`` int32 ``[O]`` (ascending input columns) and ``outlier_weight``
  float16 ``[N, O]``; the int8 codes of those columns are the zero code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowbit import formats, packing
from lowbit.errors import PackingError
from lowbit.formats.base import TensorSpec
from lowbit.formats.codebook import DoubleQuantScales
from lowbit.scheme import QuantScheme


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stored_tensor_specs(scheme: QuantScheme, out_features: int, in_features: int, n_outliers: int = 0) -> dict[str, TensorSpec]:
    """Name -> (shape, dtype) of every tensor a layer of this scheme stores (bias excluded):
    the packed codes (``qweight``, at the format's ``bits_per_code``), the format's own
    parameter tensors (``NumericFormat.stored_tensors``) and LLM.int8 outlier columns."""
    n, k = out_features, in_features
    fmt = formats.numeric_format(scheme)
    specs: dict[str, TensorSpec] = {"qweight": ((n, packing.packed_row_bytes(k, fmt.bits_per_code(scheme))), torch.uint8)}
    specs.update(fmt.stored_tensors(scheme, n, k))  # scale (+ zero, + double-quant tensors)
    if n_outliers:
        if scheme.activations != "int8":
            raise PackingError(f"n_outliers={n_outliers}: outlier columns (LLM.int8) need a W8A8 scheme, not {scheme.short_name}")
        specs["outlier_idx"] = ((n_outliers,), torch.int32)
        specs["outlier_weight"] = ((n, n_outliers), torch.float16)
    return specs


@dataclass
class QuantizedTensor:
    packed: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    shape: tuple[int, int]
    scheme: QuantScheme
    layout: str = packing.NATIVE_LAYOUT
    scale_absmax: Optional[torch.Tensor] = None  # double_quant only
    scale_offset: Optional[torch.Tensor] = None  # double_quant only
    outlier_idx: Optional[torch.Tensor] = None  # LLM.int8 only
    outlier_weight: Optional[torch.Tensor] = None  # LLM.int8 only

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.layout not in packing.LAYOUTS:
            raise PackingError(f"unknown layout {self.layout!r}; known: {packing.LAYOUTS}")
        n, k = self.shape
        if (self.zero is None) != self.scheme.symmetric:
            raise PackingError("zero points must be given exactly when the scheme is affine (symmetric=False)")
        if (self.outlier_idx is None) != (self.outlier_weight is None):
            raise PackingError("outlier_idx and outlier_weight come together (LLM.int8 schemes)")
        specs = stored_tensor_specs(self.scheme, n, k, self.n_outliers)
        for name, (shape, dtype) in specs.items():
            t = self.packed if name == "qweight" else getattr(self, name)
            if t is None:
                raise PackingError(f"a {self.scheme.short_name} tensor needs {name!r} ({_dt(dtype)} {list(shape)})")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise PackingError(
                    f"{name} is {_dt(t.dtype)} {tuple(t.shape)}, expected {_dt(dtype)} {shape} "
                    f"for a {n}x{k} weight of scheme {self.scheme.short_name}"
                )
        for name in ("scale_absmax", "scale_offset", "outlier_idx", "outlier_weight"):
            if name not in specs and getattr(self, name) is not None:
                raise PackingError(f"scheme {self.scheme.short_name} stores no {name!r}")

    @property
    def n_outliers(self) -> int:
        return 0 if self.outlier_idx is None else int(self.outlier_idx.numel())

    @classmethod
    def from_codes(cls, codes: torch.Tensor, qp: formats.QParams, scheme: QuantScheme) -> "QuantizedTensor":
        packed = packing.pack(codes, scheme.bits)
        if qp.double_quant is not None:
            dq = qp.double_quant
            return cls(packed, dq.codes, None, tuple(codes.shape), scheme, scale_absmax=dq.absmax, scale_offset=dq.offset)
        return cls(packed, qp.scale, qp.zero, tuple(codes.shape), scheme)

    @classmethod
    def quantize(cls, w: torch.Tensor, scheme: QuantScheme) -> "QuantizedTensor":
        """Round-to-nearest quantization of a 2-D weight."""
        codes, qp = formats.quantize_weight(w, scheme)
        return cls.from_codes(codes, qp, scheme)

    @property
    def qparams(self) -> formats.QParams:
        if self.scale_absmax is not None:
            dq = DoubleQuantScales(self.scale, self.scale_absmax, self.scale_offset)
            return formats.QParams(dq.dequantize(), None, dq)
        return formats.QParams(self.scale, self.zero)

    def codes(self) -> torch.Tensor:
        return packing.unpack(self.packed, self.scheme.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = formats.dequantize(self.codes(), self.qparams, self.scheme, torch.float32)
        if self.outlier_idx is not None:
            w[:, self.outlier_idx.long()] = self.outlier_weight.to(torch.float32)
        return w.to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (the keys of :func:`stored_tensor_specs`)."""
        out = {"qweight": self.packed, "scale": self.scale}
        for name in ("zero", "scale_absmax", "scale_offset", "outlier_idx", "outlier_weight"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t
        return out

    @property
    def nbytes(self) -> int:
        """Exact storage bytes: packed codes + scales + zero points (+ double-quant and outlier tensors)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / (self.shape[0] * self.shape[1])
