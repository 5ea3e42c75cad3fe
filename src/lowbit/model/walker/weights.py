"""Weights as ``[out, in]`` float32, whatever the module stores (GPT-2's Conv1D stores ``[in, out]``)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.model.swap import linear_kind, weight_as_linear


def get_weight(mod: nn.Module) -> torch.Tensor:
    """A float32 copy of the weight as ``[out, in]``."""
    return weight_as_linear(mod, linear_kind(mod)).detach().to(torch.float32).clone()


def set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    mod.weight.data = stored_form(mod, w).contiguous()


def stored_form(mod: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """``w [out, in]`` as the module stores its weight (transposed for GPT-2's Conv1D), in its
    dtype; differentiable (SignRound passes it to ``functional_call``)."""
    return (w if isinstance(mod, nn.Linear) else w.t()).to(mod.weight.dtype)
