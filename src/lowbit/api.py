"""The Python API: a few calls that orchestrate the modules below.

    model, tok = lowbit.load_pretrained("default")
    lowbit.quantize(model, lowbit.Recipe.uniform(lowbit.QuantScheme(bits=4, group_size=64)))
    lowbit.save(model, "model.lowbit.safetensors")
    model = lowbit.load("model.lowbit.safetensors")
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any, Optional, Union

from torch import nn

import torch

from lowbit.errors import CalibrationError, SchemeError
from lowbit.io.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from lowbit.kernels.registry import use_kernel
from lowbit.model.swap import QuantizationReport, quantize_model
from lowbit.model.walker import WalkOptions, quantize_sequential
from lowbit.nn import QuantLinear
from lowbit.recipe import Recipe
from lowbit.scheme import QuantScheme

__all__ = [
    "quantize", "quantize_from_disk", "save", "load", "load_pretrained", "use_kernel", "QuantLinear", "read_manifest",
]

DATA_FREE = "data-free"


def _calibration(model: nn.Module, calibration: Any, recipe: Recipe):
    from lowbit.calibration.data import as_calibration, sample_from_model

    if calibration is None:
        who = f"method {recipe.method_name!r}" if recipe.method_needs_calibration else "E2ETuning (recipe.tune)"
        raise CalibrationError(
            f"{who} needs calibration data: pass calibration="
            "lowbit.calibration.from_texts(path_or_texts, tokenizer, n_samples=..., seqlen=...), "
            f"a [n, seqlen] tensor of token ids, or {DATA_FREE!r} to sample it from the model itself"
        )
    if isinstance(calibration, str) and calibration == DATA_FREE:
        bos = getattr(getattr(model, "config", None), "bos_token_id", None)
        return sample_from_model(model, bos_token_id=bos)
    return as_calibration(calibration)


def quantize(
    model: nn.Module,
    recipe: Union[Recipe, QuantScheme],
    *,
    calibration: Any = None,
    adapter=None,
    options: Optional[WalkOptions] = None,
    progress: bool = True,
) -> QuantizationReport:
    """Quantize ``model`` in place; returns (and attaches as ``model.lowbit_report``) the report.

    A bare ``QuantScheme`` means ``Recipe.uniform(scheme)`` (output heads kept in full precision).
    Methods that need calibration (GPTQ, AWQ, SmoothQuant) walk the model block by block
    (``lowbit.model.walker``) over ``calibration``: ``CalibrationData``, an int64 ``[n, seqlen]``
    tensor of token ids, or ``"data-free"`` (32 windows of 512 tokens sampled from the model).
    ``recipe.tune`` (``E2ETuning``) then tunes every layer's scales end to end against a copy of
    the full-precision model kept for the purpose (``lowbit.qat.tune_scales``) on the same windows.
    """
    if isinstance(recipe, QuantScheme):
        recipe = Recipe.uniform(recipe)
    data = _calibration(model, calibration, recipe) if recipe.needs_calibration else None
    # end-to-end tuning distils from the full-precision model: keep a copy before rounding
    reference = copy.deepcopy(model) if recipe.tune is not None else None
    if recipe.method_needs_calibration:
        report = quantize_sequential(
            model, recipe, data, adapter=adapter, options=options or WalkOptions(), progress=progress
        )
    else:
        report = quantize_model(model, recipe, progress=progress)
        if calibration is not None and reference is None:
            report.notes.append(f"method {recipe.method_name!r} uses no calibration data; the data given was not used")
    if reference is not None:
        from lowbit.qat import tune_scales

        result = tune_scales(model, reference, data.ids, recipe.tune, progress=progress)
        del reference
        report.tuning = result.to_dict()
        report.notes.append(result.note())
    model.lowbit_report = report
    return report


def quantize_from_disk(
    model_dir: Union[str, pathlib.Path],
    recipe: Recipe,
    out_path: Union[str, pathlib.Path],
    *,
    calibration: Any = None,
    n_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    options: Optional[WalkOptions] = None,
    progress: bool = True,
) -> QuantizationReport:
    """Quantize a Hugging Face safetensors model directory block by block, never holding the
    whole full-precision model in memory, and save the checkpoint to ``out_path``.

    ``calibration``: a text path / list of strings (sampled into ``n_samples`` x ``seqlen``),
    ``CalibrationData``, or a token-id tensor. (Data-free sampling needs the whole model, so it
    is not offered here.) Methods without calibration (RTN, HQQ) also stream.
    """
    from lowbit.calibration.data import CalibrationData, as_calibration, from_texts
    from lowbit.model.streaming import open_skeleton

    if isinstance(recipe, QuantScheme):
        recipe = Recipe.uniform(recipe)
    if recipe.tune is not None:
        raise SchemeError(
            "E2ETuning needs the whole full-precision model in memory next to the quantized one, and "
            "quantize_from_disk streams block by block: use lowbit.quantize, or a recipe with tune=None"
        )
    model, tokenizer, source = open_skeleton(model_dir)
    if calibration is None and recipe.needs_calibration:
        raise CalibrationError(
            f"method {recipe.method_name!r} needs calibration data; pass calibration=<text file, folder or list of strings>"
        )
    if calibration is None:
        # no statistics needed: one "calibration" window only drives the walk
        data = CalibrationData(
            torch.zeros(1, 2, dtype=torch.long), {"source": "none (method needs no calibration)"}
        )
    elif isinstance(calibration, (CalibrationData, torch.Tensor)):
        data = as_calibration(calibration)
    else:
        data = from_texts(calibration, tokenizer, n_samples=n_samples, seqlen=seqlen, seed=seed)
    report = quantize_sequential(model, recipe, data, options=options or WalkOptions(), source=source, progress=progress)
    if calibration is None:
        report.calibration = None
    model.lowbit_report = report
    save_checkpoint(model, out_path)
    return report


def save(model: nn.Module, path) -> None:
    """Write a quantized model to a self-describing safetensors checkpoint (atomically)."""
    save_checkpoint(model, path)


def load(path, model: Optional[nn.Module] = None, *, kernel: str = "auto", verify: bool = True) -> nn.Module:
    """Load a lowbit checkpoint in one call (Hugging Face models rebuild from the manifest).

    ``verify`` (default True): check the manifest and every tensor against the SHA-256 digests
    recorded when the file was written; any difference is an ``IntegrityError``, and so is a file
    written before lowbit stored digests (format_version 1). ``verify=False`` skips the digest
    check, for files you trust or older files (``lowbit.save`` of the loaded model adds digests);
    the checks of the file's structure and values always run.
    """
    return load_checkpoint(path, model, kernel=kernel, verify=verify)


def load_pretrained(source: str = "default", **kw):
    """A full-precision model and its tokenizer: "default" (SmolLM2-135M-Instruct),
    a ``.gguf`` file, or a local Hugging Face model directory."""
    from lowbit.model.loading import load_pretrained as _load

    return _load(source, **kw)
