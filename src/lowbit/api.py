"""The Python API: a few calls that orchestrate the modules below.

    model, tok = lowbit.load_pretrained("default")
    lowbit.quantize(model, lowbit.Recipe.uniform(lowbit.QuantScheme(bits=4, group_size=64)))
    lowbit.save(model, "model.lowbit.safetensors")
    model = lowbit.load("model.lowbit.safetensors")
"""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from lowbit.io.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from lowbit.kernels.registry import use_kernel
from lowbit.model.swap import QuantizationReport, quantize_model
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme, Recipe

__all__ = ["quantize", "save", "load", "load_pretrained", "use_kernel", "QuantLinear", "read_manifest"]


def quantize(
    model: nn.Module, recipe: Union[Recipe, QuantScheme], *, progress: bool = True
) -> QuantizationReport:
    """Quantize ``model`` in place; returns (and attaches as ``model.lowbit_report``) the report.

    A bare ``QuantScheme`` means ``Recipe.uniform(scheme)`` (output heads kept in full precision).
    """
    if isinstance(recipe, QuantScheme):
        recipe = Recipe.uniform(recipe)
    report = quantize_model(model, recipe, progress=progress)
    model.lowbit_report = report
    return report


def save(model: nn.Module, path) -> None:
    """Write a quantized model to a self-describing safetensors checkpoint (atomically)."""
    save_checkpoint(model, path)


def load(path, model: Optional[nn.Module] = None, *, kernel: str = "auto") -> nn.Module:
    """Load a lowbit checkpoint in one call (Hugging Face models rebuild from the manifest)."""
    return load_checkpoint(path, model, kernel=kernel)


def load_pretrained(source: str = "default", **kw):
    """A full-precision model and its tokenizer: "default" (SmolLM2-135M-Instruct),
    a ``.gguf`` file, or a local Hugging Face model directory."""
    from lowbit.model.loading import load_pretrained as _load

    return _load(source, **kw)
