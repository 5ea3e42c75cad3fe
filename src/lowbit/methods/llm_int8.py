"""LLM.int8()-style mixed decomposition with outlier columns chosen from calibration data.

``llm_int8(w, scheme, act_absmax, spec)``: the input columns ``j`` with
``act_absmax[j] > spec.threshold`` (the largest magnitude any calibration token put
on that input) are the outliers. Their weights are kept as float16 columns
(``outlier_weight [N, O]``, ``outlier_idx [O]`` ascending); the remaining columns are
rounded to the W8A8 scheme with one scale per output row computed from those columns
only (the vector-wise quantization of the paper), and the outlier columns' codes are
the zero code. At run time (``lowbit.kernels``) the outlier activation columns skip the
int8 rounding and its per-token scale, and meet their float16 weights in float.

bitsandbytes picks outlier columns per batch at run time; fixing them from calibration
keeps the stored layout static and its size known when the file is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import CalibrationError, SchemeError
from lowbit.methods.rtn import rtn
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor
from lowbit.validation import check_range


@dataclass(frozen=True)
class LLMInt8:
    """LLM.int8() mixed decomposition (Dettmers et al. 2022), with the outlier columns chosen
    once from calibration data: input columns whose largest calibration activation magnitude
    exceeds ``threshold`` keep their weights in float16 and meet their activations unrounded;
    the other columns are rounded to the W8A8 scheme (int8 weights per output row, int8
    activations per token). Needs a W8A8 scheme (``activations="int8"``)."""

    threshold: float = 6.0
    name = "llm_int8"
    kind = "rounding"
    needs_calibration = True

    def __post_init__(self) -> None:
        check_range("LLMInt8", "threshold", self.threshold, 1e-6, 1e6)



def outlier_columns(act_absmax: torch.Tensor, threshold: float) -> torch.Tensor:
    """int32 indices (ascending) of the input columns whose activation magnitude exceeds ``threshold``."""
    if not bool(torch.isfinite(act_absmax).all()):
        raise CalibrationError("activation statistics contain NaN/Inf; check the calibration data and the model")
    return (act_absmax > threshold).nonzero().reshape(-1).to(torch.int32)


def llm_int8(weight: torch.Tensor, scheme: QuantScheme, act_absmax: torch.Tensor, spec: LLMInt8) -> QuantizedTensor:
    if scheme.activations != "int8":
        raise SchemeError(f"llm_int8 needs a W8A8 scheme (activations='int8'), got {scheme.short_name}")
    n, k = weight.shape
    if tuple(act_absmax.shape) != (k,):
        raise CalibrationError(f"activation statistics have shape {tuple(act_absmax.shape)}, the layer has {k} inputs")
    idx = outlier_columns(act_absmax.float(), spec.threshold)
    w = weight.detach().to(torch.float32)
    inliers = w.clone()
    inliers[:, idx.long()] = 0.0
    qt = rtn(inliers, scheme)
    if idx.numel() == 0:
        return qt
    return QuantizedTensor(
        qt.packed, qt.scale, qt.zero, qt.shape, scheme,
        outlier_idx=idx, outlier_weight=w[:, idx.long()].to(torch.float16),
    )
