"""SmoothQuant (Xiao et al. 2022): the numerics only.

Activation outliers live in a few input channels and ruin per-token int8
activation quantization. SmoothQuant divides each input channel ``j`` by
``s_j`` (folded into the producer: a norm's weight or a preceding linear's
rows) and multiplies column ``j`` of every consuming weight by ``s_j``
(``lowbit.methods.awq.scale_input_channels``); the product ``X W^T`` is
unchanged, but the activation range is flattened and part of the difficulty
moves into the weights, which quantize per output channel:

    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)

with ``max_i`` over the rows of all the linears that share the input. The
folding helpers are AWQ's (re-exported here): pure tensor math, no modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lowbit.errors import CalibrationError, FormatError
from lowbit.methods.awq import fold_into_linear_rows, fold_into_norm, scale_input_channels
from lowbit.validation import check_range

__all__ = [
    "SmoothQuant", "smoothquant_scales", "fold_into_norm", "fold_into_linear_rows", "scale_input_channels", "SCALE_MIN",
]

SCALE_MIN = 1e-5  # floor of the weight maxima and of the scales (as in the reference implementation)


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant (Xiao et al. 2022): move activation outliers into the weights with
    s_j = max|X_j|^alpha / max|W_j|^(1-alpha), folded into the preceding operation.
    Meant for W8A8 schemes (``QuantScheme(bits=8, granularity="channel", activations="int8")``)."""

    alpha: float = 0.5
    name = "smoothquant"
    kind = "transform"
    needs_calibration = True

    def __post_init__(self) -> None:
        check_range("SmoothQuant", "alpha", self.alpha, 0.0, 1.0)


def smoothquant_scales(act_abs_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-input-channel smoothing scales, float32 ``[K]``, finite and ``>= 1e-5``.

    ``act_abs_max [K]``: max |x| per input channel over the calibration tokens;
    ``weights``: the ``[N_i, K]`` weights of the linears that read that input;
    ``alpha`` in [0, 1]: how much of the difficulty moves into the weights (0.5 usual).

    The per-channel weight maximum is floored at ``1e-5`` before the power and the
    result is floored at ``1e-5``. A channel whose activations were always exactly 0
    gets ``s = 1`` (there is nothing to smooth, and a tiny ``s`` would blow up the folded
    norm weight, e.g. past float16's range). Raises ``CalibrationError`` when the
    activation statistics hold NaN/Inf and ``FormatError`` for NaN/Inf weights.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise CalibrationError(f"SmoothQuant alpha must lie in [0, 1], got {alpha}")
    if act_abs_max.dim() != 1:
        raise CalibrationError(f"act_abs_max must be 1-D [in_features], got shape {tuple(act_abs_max.shape)}")
    k = act_abs_max.shape[0]
    if len(weights) == 0:
        raise CalibrationError("SmoothQuant needs at least one weight that reads the smoothed input")
    act = act_abs_max.detach().to(torch.float64).abs()
    bad = ~torch.isfinite(act)
    if bool(bad.any()):
        raise CalibrationError(
            f"activation statistics hold NaN/Inf in {int(bad.sum())} of {k} channels; SmoothQuant needs finite "
            "calibration activations (check the calibration data and the layers before this one, or "
            "calibrate in float32)"
        )
    wmax = torch.zeros(k, dtype=torch.float64, device=act.device)
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise CalibrationError(
                f"weights must be [out, {k}] to match the activation statistics, got {tuple(w.shape)}"
            )
        wa = w.detach().abs()
        if not bool(torch.isfinite(wa).all()):
            raise FormatError("weights contain NaN/Inf values; fix the model before smoothing it")
        if w.shape[0]:
            wmax = torch.maximum(wmax, wa.amax(dim=0).to(torch.float64))
    a = float(alpha)
    s = act.pow(a) / wmax.clamp(min=SCALE_MIN).pow(1.0 - a)
    s = s.clamp(min=SCALE_MIN)
    s = torch.where(act == 0, torch.ones_like(s), s)
    s = s.clamp(max=torch.finfo(torch.float32).max)  # float64 -> float32 stays finite
    return s.to(torch.float32)
