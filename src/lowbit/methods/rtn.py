"""Round-to-nearest: qparams from each group's own range, codes by rounding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor


@dataclass(frozen=True)
class RTN:
    """Round to nearest: each group's own range, no calibration data."""

    name = "rtn"
    kind = "rounding"
    needs_calibration = False



def rtn(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedTensor:
    """Quantize a 2-D ``[out, in]`` weight by round-to-nearest."""
    return QuantizedTensor.quantize(weight, scheme)
