"""Dynamic per-row (token) activation quantization: int8 (W8A8) and fp8 E4M3.

Not a weight format (it defines no ``FORMATS``): the run-time numerics that the
reference kernels apply to a layer's input when its scheme sets ``activations``.
"""

from __future__ import annotations

import torch

from lowbit.errors import FormatError
from lowbit.formats.fp8 import fp8_max

ACT_INT8_MAX = 127  # the grid is -127..127 (symmetric; -128 is never used)


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row int8 quantization of activations ``x [..., K]`` (the ``activations="int8"`` scheme).

    Returns ``q`` int8 ``[..., K]`` and ``scale`` float32 ``[..., 1]`` with
    ``x ~= q * scale``: ``scale = amax(|x_row|) / 127`` (a row of zeros gets scale 1),
    ``q = clamp(round(x / scale), -127, 127)`` computed in float32 (round half to even).
    A row whose amax is so small that ``amax / 127`` underflows float32's normal range
    uses the smallest normal scale instead. Raises ``FormatError`` on NaN/Inf activations.
    """
    if not x.is_floating_point():
        raise FormatError(f"activations must be floating point, got {x.dtype}")
    xf = x.detach().to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True) if xf.shape[-1] > 0 else xf.new_zeros(*xf.shape[:-1], 1)
    if amax.numel() and not bool(torch.isfinite(amax).all()):
        raise FormatError(
            "activations contain NaN/Inf values; int8 activation quantization needs finite inputs "
            "(check the model's inputs or the layers before this one)"
        )
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where(amax == 0, torch.ones_like(amax), (amax / ACT_INT8_MAX).clamp(min=tiny))
    q = torch.round(xf / scale).clamp_(-ACT_INT8_MAX, ACT_INT8_MAX).to(torch.int8)
    return q, scale


def fake_quantize_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """``q * scale`` of ``quantize_activations_int8(x)``, computed in float32, returned in ``x``'s dtype.

    No gradient flows through it (the rounding is piecewise constant): it is the
    inference-time numerics that the reference kernels apply to W8A8 layers.
    """
    q, scale = quantize_activations_int8(x)
    return (q.to(torch.float32) * scale).to(x.dtype)


def fake_quantize_activations_fp8(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-row (token) FP8 E4M3 rounding of activations ``x [..., K]`` (``activations="fp8_e4m3"``):
    ``s = amax(|x_row|) / 448`` (1 for an all-zero row), ``x ~= float8_e4m3fn(x / s) * s``,
    computed in float32 and returned in ``x``'s dtype. Raises ``FormatError`` on NaN/Inf."""
    if not x.is_floating_point():
        raise FormatError(f"activations must be floating point, got {x.dtype}")
    xf = x.detach().to(torch.float32)
    if xf.shape[-1] == 0:
        return x.clone()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    if amax.numel() and not bool(torch.isfinite(amax).all()):
        raise FormatError("activations contain NaN/Inf values; fp8 activation quantization needs finite inputs")
    top = fp8_max("fp8_e4m3")
    scale = torch.where(amax == 0, torch.ones_like(amax), (amax / top).clamp(min=torch.finfo(torch.float32).tiny))
    q = (xf / scale).clamp(-top, top).to(torch.float8_e4m3fn).to(torch.float32)
    return (q * scale).to(x.dtype)
