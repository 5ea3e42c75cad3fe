"""GPTQ on one block: one Hessian per input group (the linears that share an input share it),
collected stage by stage. With ``true_sequential`` each group is a stage, so a group's
statistics are collected after the earlier groups are quantized; otherwise all groups form one
stage. With a ``FullPrecisionPair`` (``GPTQ(fp_targets=True)``, GPTAQ) each linear is fitted to
the outputs of its full-precision copy on the full-precision stream."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from lowbit.calibration.stats import CrossAccumulator
from lowbit.errors import CalibrationError
from lowbit.methods import round_weight
from lowbit.methods.gptq import fp_target_weight, order_group_size, prepare_hessian
from lowbit.model.adapters import InputGroup
from lowbit.model.walker.job import BlockJob
from lowbit.model.walker.propagate import FullPrecisionPair
from lowbit.model.walker.stats import paired_stage_stats, stage_hessians
from lowbit.model.walker.weights import get_weight, set_weight
from lowbit.methods.gptq import GPTQ


def gptq_block(job: BlockJob, groups: list[InputGroup], rounding: GPTQ, fp_pair: Optional[FullPrecisionPair] = None) -> dict[str, tuple]:
    """GPTQ on the block's planned linears, stage by stage; each linear's module is left
    holding its dequantized result. Returns ``{rel: (QuantizedTensor, original weight)}``."""
    results: dict[str, tuple] = {}
    stages = [[g] for g in groups] if rounding.true_sequential else [groups]
    # the fp targets are computed here; the rounding itself is plain GPTQ on them
    per_layer = dataclasses.replace(rounding, fp_targets=False)
    for stage in stages:
        if fp_pair is None:
            accs, crosses = stage_hessians(job.block, job.inputs, stage, rounding.token_cap), None
        else:
            accs, crosses = paired_stage_stats(job.block, job.inputs, fp_pair.block, fp_pair.inputs, stage, rounding.token_cap)
        for g in stage:
            hessian = accs.pop(g).hessian
            cross = None if crosses is None else crosses.pop(g)
            results.update(_round_group(job, g, hessian, cross, fp_pair, rounding, per_layer))
            del hessian, cross
    return results


def _round_group(
    job: BlockJob,
    g: InputGroup,
    hessian: torch.Tensor,
    cross: Optional[CrossAccumulator],
    fp_pair: Optional[FullPrecisionPair],
    rounding: GPTQ,
    per_layer: GPTQ,
) -> dict[str, tuple]:
    """The group's planned linears on their shared Hessian (and, for fp targets, cross-covariance)."""
    results: dict[str, tuple] = {}
    prepared: dict = {}  # factored once per shared input and column order
    for rel in g.linears:
        if not job.planned(rel):
            continue
        scheme = job.layers[rel].scheme
        key = order_group_size(rounding, scheme)
        if key not in prepared:
            try:
                prepared[key] = prepare_hessian(hessian, rounding, scheme)
            except CalibrationError as e:
                raise CalibrationError(f"GPTQ on {list(g.linears)} of this block: {e}") from None
        h = prepared[key]
        mod = job.module(rel)
        w = get_weight(mod)
        target = w
        if cross is not None:  # the full-precision copy's weight pairs with its inputs
            target = fp_target_weight(get_weight(fp_pair.block.get_submodule(rel)), cross.cross, h)
        qt = round_weight(target, scheme, per_layer, hessian=h)
        set_weight(mod, qt.dequantize())
        results[rel] = (qt, w)
    return results
