"""How codes are chosen. Pure functions of (weight, scheme, statistics).

Rounding methods return a ``QuantizedTensor``: ``rtn(w, scheme)``,
``hqq(w, scheme, spec)``, ``gptq(w, scheme, hessian, spec)``. Transforms
(``awq``, ``smoothquant``) compute per-input-channel scales that the model
walker folds into the preceding operation before the rounding step.
"""

from __future__ import annotations

from typing import Optional

import torch

from lowbit.errors import CalibrationError
from lowbit.methods.rtn import rtn
from lowbit.scheme import GPTQ, HQQ, RTN, QuantScheme
from lowbit.tensor import QuantizedTensor

__all__ = ["round_weight", "rtn"]


def round_weight(
    weight: torch.Tensor, scheme: QuantScheme, spec, hessian: Optional[torch.Tensor] = None
) -> QuantizedTensor:
    """Quantize a 2-D ``[out, in]`` weight with the rounding step ``spec`` (RTN, HQQ or GPTQ)."""
    if isinstance(spec, RTN):
        return rtn(weight, scheme)
    if isinstance(spec, HQQ):
        from lowbit.methods.hqq import hqq

        return hqq(weight, scheme, spec)
    if isinstance(spec, GPTQ):
        if hessian is None:
            raise CalibrationError(
                "GPTQ needs the layer's Hessian from calibration data; quantize through "
                "lowbit.quantize(model, recipe, calibration=...) rather than a bare rounding call"
            )
        from lowbit.methods.gptq import gptq

        return gptq(weight, scheme, hessian, spec)
    raise CalibrationError(f"{type(spec).__name__} is not a rounding method (use rtn, hqq or gptq)")
