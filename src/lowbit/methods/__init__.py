"""How codes are chosen. Pure functions of (weight, scheme, statistics).

Rounding methods return a ``QuantizedTensor``: ``rtn(w, scheme)``,
``hqq(w, scheme, spec)``, ``gptq(w, scheme, hessian, spec)``,
``llm_int8(w, scheme, act_absmax, spec)``. ``signround`` tunes a whole block at once
(``signround.tune`` with a loss function the walker supplies). Transforms
(``awq``, ``smoothquant``) compute per-input-channel scales that the model
walker folds into the preceding operation before the rounding step.
"""

from __future__ import annotations

from typing import Optional

import torch

from lowbit.errors import CalibrationError
from lowbit.methods.gptq import GPTQ
from lowbit.methods.hqq import HQQ
from lowbit.methods.llm_int8 import LLMInt8
from lowbit.methods.rtn import RTN, rtn
from lowbit.methods.signround import SignRound
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor

__all__ = ["round_weight", "rtn"]


def round_weight(
    weight: torch.Tensor,
    scheme: QuantScheme,
    spec,
    hessian: Optional[torch.Tensor] = None,
    act_absmax: Optional[torch.Tensor] = None,
) -> QuantizedTensor:
    """Quantize a 2-D ``[out, in]`` weight with the rounding step ``spec`` (RTN, HQQ, GPTQ or
    LLMInt8); GPTQ needs the layer's ``hessian``, LLMInt8 its inputs' ``act_absmax``."""
    if isinstance(spec, RTN):
        return rtn(weight, scheme)
    if isinstance(spec, HQQ):
        from lowbit.methods.hqq import hqq

        return hqq(weight, scheme, spec)
    if isinstance(spec, GPTQ):
        from lowbit.methods.gptq import gptq

        return gptq(weight, scheme, _needed(hessian, "GPTQ", "Hessian"), spec)
    if isinstance(spec, LLMInt8):
        from lowbit.methods.llm_int8 import llm_int8

        return llm_int8(weight, scheme, _needed(act_absmax, "llm_int8", "activation statistics"), spec)
    if isinstance(spec, SignRound):
        raise CalibrationError(
            "signround tunes a whole block against its outputs, not one weight: quantize through "
            "lowbit.quantize(model, recipe, calibration=...), or call lowbit.methods.signround.tune "
            "with your own loss function"
        )
    raise CalibrationError(f"{type(spec).__name__} is not a rounding method (use rtn, hqq, gptq, signround or llm_int8)")


def _needed(statistic, method: str, what: str):
    if statistic is None:
        raise CalibrationError(
            f"{method} needs the layer's {what} from calibration data; quantize through "
            "lowbit.quantize(model, recipe, calibration=...) rather than a bare rounding call"
        )
    return statistic
