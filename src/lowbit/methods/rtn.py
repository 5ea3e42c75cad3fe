"""Round-to-nearest: qparams from each group's own range, codes by rounding."""

from __future__ import annotations

import torch

from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor


def rtn(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedTensor:
    """Quantize a 2-D ``[out, in]`` weight by round-to-nearest."""
    return QuantizedTensor.quantize(weight, scheme)
