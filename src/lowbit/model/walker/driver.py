"""``quantize_sequential``: the walk, top to bottom.

Capture the first block's inputs; then for each block: load it (a ``BlockSource`` streams it
in), find its structure, apply the transforms and the rounding on its inputs, run it to get the
next block's inputs, swap its linears for QuantLinear, release it. Last, round the planned
linears outside the blocks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration.data import CalibrationData
from lowbit.errors import DataError
from lowbit.model.adapters import ModelAdapter, find_blocks
from lowbit.model.swap import QuantizationReport
from lowbit.model.walker.capture import block_structure, capture_block_inputs
from lowbit.model.walker.job import BlockJob
from lowbit.model.walker.options import BlockSource, WalkOptions
from lowbit.model.walker.plan import WalkPlan
from lowbit.model.walker.propagate import Streams, block_outputs, full_precision_pair, needs_fp_stream
from lowbit.model.walker.rounding import round_block
from lowbit.model.walker.transforms import apply_transforms
from lowbit.recipe import Recipe


def quantize_sequential(
    model: nn.Module,
    recipe: Recipe,
    calibration: CalibrationData,
    *,
    adapter: Optional[ModelAdapter] = None,
    options: WalkOptions = WalkOptions(),
    source: Optional[BlockSource] = None,
    progress: bool = True,
) -> QuantizationReport:
    """Quantize ``model`` in place block by block with calibration statistics."""
    if not isinstance(calibration, CalibrationData):
        raise DataError("calibration must be CalibrationData (see lowbit.calibration)")
    plan = WalkPlan(model, recipe, calibration)
    adapter = adapter or ModelAdapter(find_blocks(model))
    blocks = adapter.block_list(model)
    # eval mode: no dropout in the statistics or in SignRound's objective
    with torch.no_grad(), _eval_mode(model):
        inputs = capture_block_inputs(model, blocks, calibration, options)
        streams = Streams.start(inputs, options, full_precision=needs_fp_stream(recipe.rounding))
        del inputs
        try:
            structure = adapter.structure
            desc = f"quantizing ({recipe.method_name})"
            for i, block in enumerate(tqdm(blocks, desc=desc, disable=not progress, unit="block")):
                name = f"{adapter.blocks}.{i}"
                if source is not None:
                    source.load(i, block)
                if structure is None or i == 0:
                    structure = block_structure(adapter, block, streams.inputs)
                job = BlockJob(
                    block, name, structure, plan.block_layers(name, structure), streams.inputs, options,
                    plan.report.notes, adapter.no_clip,
                )
                plan.install(job.layers, _quantize_block(job, recipe, streams))
                del job  # nothing may keep the replaced modules alive past release
                plan.round_uncalibrated(
                    plan.not_installed_in(name), "saw no calibration tokens (never called in the traced forward pass)"
                )
                if source is not None:
                    source.release(i, block)
        finally:
            streams.close()
        plan.round_uncalibrated(plan.outside(adapter.blocks), "lies outside the transformer blocks")
    return plan.report


def _quantize_block(job: BlockJob, recipe: Recipe, streams: Streams) -> dict[str, tuple]:
    """One block's transforms and rounding, then its outputs become the next block's inputs.
    Returns the rounding's ``{rel: (QuantizedTensor, original weight)}``."""
    fp_out, fp_pair = None, None
    try:
        if job.options.propagate == "full_precision":  # the outputs before anything changes
            fp_out = block_outputs(job.block, job.inputs, job.options)
        if streams.fp is not None:  # fp targets: the block as it is now, on the full-precision stream
            fp_pair = full_precision_pair(job.block, streams.fp, recipe.rounding, job.options)
        apply_transforms(job, recipe.transforms)
        results = round_block(job, recipe.rounding, fp_pair, fp_out)
        outputs = fp_out if fp_out is not None else block_outputs(job.block, job.inputs, job.options)
    except BaseException:  # this block's own spills; the streams are closed by the caller
        for store in (fp_out, None if fp_pair is None else fp_pair.outputs):
            if store is not None:
                store.close()
        raise
    streams.advance(outputs, None if fp_pair is None else fp_pair.outputs)
    return results


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
