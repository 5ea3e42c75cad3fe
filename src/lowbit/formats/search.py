"""Clipping search for the integer formats: per-group ranges shrunk where that lowers the error.

Not a format (it defines no ``FORMATS``): an alternative ``choose_params`` for
``lowbit.formats.integer`` that GPTQ (``clip_search=True``) and AWQ use.
"""

from __future__ import annotations

from typing import Optional

import torch

from lowbit.errors import FormatError
from lowbit.formats.base import QParams, check_finite, grouped
from lowbit.formats.integer import IntFormat, int_qparams
from lowbit.formats.registry import numeric_format
from lowbit.scheme import QuantScheme


def search_qparams(
    w: torch.Tensor,
    scheme: QuantScheme,
    *,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    column_weights: Optional[torch.Tensor] = None,
) -> QParams:
    """Integer qparams with each group's range clipped where that lowers its weight error.

    For ``f = 1 - i / grid`` (``i = 0 .. int(max_shrink * grid) - 1``; ``f = 1`` is
    ``choose_qparams``), the group's range (``[f*lo, f*hi]``, or ``f*amax`` when symmetric)
    gives qparams; each group keeps the first ``f`` with the least ``sum c_k |deq - w|**norm``
    over the group, so clipping is used only when it strictly helps. With ``c = 1`` this is
    the GPTQ reference's ``Quantizer(mse=True)`` search (its defaults: grid 100, shrink up to
    0.8, norm 2.4); ``column_weights`` ``c [in]`` (>= 0) weighs each input column, e.g. by its
    mean square activation (``diag(H)``), so that columns with large inputs are not clipped
    for the sake of the weight error alone. Integer formats only (``FormatError`` otherwise)."""
    if not isinstance(numeric_format(scheme), IntFormat):
        raise FormatError(f"the clipping search needs an integer format, not {scheme.format!r}")
    if grid < 1 or not 0.0 < max_shrink <= 1.0 or norm <= 0:
        raise FormatError(f"search_qparams needs grid >= 1, 0 < max_shrink <= 1, norm > 0 (got {grid}, {max_shrink}, {norm})")
    check_finite(w)
    wf = w.detach().to(torch.float32)
    if column_weights is not None:
        column_weights = column_weights.detach().to(device=wf.device, dtype=torch.float32).reshape(-1)
        if column_weights.numel() != wf.shape[1] or not bool((column_weights >= 0).all()):
            raise FormatError(
                f"column_weights must hold {wf.shape[1]} non-negative numbers (one per input column), "
                f"got {column_weights.numel()}"
            )
    g = grouped(wf, scheme)
    best = int_qparams(g, scheme, 1.0)
    best_err = group_error(wf, best, scheme, norm, column_weights)
    for i in range(1, max(1, int(max_shrink * grid))):
        cand = int_qparams(g, scheme, 1.0 - i / grid)
        err = group_error(wf, cand, scheme, norm, column_weights)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = QParams(
            scale=torch.where(better, cand.scale, best.scale),
            zero=None if best.zero is None else torch.where(better, cand.zero, best.zero),
        )
    return best


def group_error(
    w: torch.Tensor, qp: QParams, scheme: QuantScheme, norm: float, column_weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``sum_k c_k |dequantize(quantize(w)) - w|**norm`` per group, ``[rows, G]`` (``c = 1`` if None)."""
    fmt = numeric_format(scheme)
    g = grouped(w.detach().to(torch.float32), scheme)
    deq = fmt.dequantize(fmt.quantize(g, qp, scheme), qp, scheme).reshape(w.shape)
    err = (deq - w).abs_().pow_(norm)
    if column_weights is not None:
        err.mul_(column_weights)
    return grouped(err, scheme).sum(dim=-1)
