"""The rounding of one block's planned linears, after its transforms: dispatch on the recipe's
rounding spec. GPTQ and SignRound have their own modules; LLM.int8 needs each input's
per-channel maxima; the others (RTN, HQQ, after a transform) need no statistics."""

from __future__ import annotations

from typing import Optional

from lowbit.methods import round_weight
from lowbit.model.adapters import InputGroup
from lowbit.model.walker.activations import ActivationStore
from lowbit.model.walker.gptq import gptq_block
from lowbit.model.walker.job import BlockJob
from lowbit.model.walker.propagate import FullPrecisionPair
from lowbit.model.walker.signround import signround_block
from lowbit.model.walker.stats import channel_stats
from lowbit.model.walker.weights import get_weight
from lowbit.methods.gptq import GPTQ
from lowbit.methods.llm_int8 import LLMInt8
from lowbit.methods.signround import SignRound


def round_block(
    job: BlockJob, rounding, fp_pair: Optional[FullPrecisionPair] = None, fp_out: Optional[ActivationStore] = None
) -> dict[str, tuple]:
    """Round the block's planned linears: ``{rel: (QuantizedTensor, original weight)}``.

    ``fp_pair`` (the full-precision block, its input stream and its outputs) makes GPTQ fit the
    full-precision outputs (``GPTQ.fp_targets``) and gives ``SignRound(fp_targets=True)`` its
    targets; ``fp_out`` (the block's outputs before any change, ``propagate="full_precision"``)
    are SignRound's targets otherwise."""
    groups = job.rounded_groups()
    if isinstance(rounding, LLMInt8):
        return _llm_int8(job, groups, rounding)
    if isinstance(rounding, SignRound):
        if rounding.fp_targets:  # AutoRound's targets: the full-precision stream's outputs
            fp_out = fp_pair.outputs
        return signround_block(job, groups, rounding, fp_out)
    if not isinstance(rounding, GPTQ):
        return _without_statistics(job, groups, rounding)
    return gptq_block(job, groups, rounding, fp_pair)


def _llm_int8(job: BlockJob, groups: list[InputGroup], rounding: LLMInt8) -> dict[str, tuple]:
    stats = channel_stats(job.block, job.inputs, groups)
    results: dict[str, tuple] = {}
    for g in groups:
        for rel in g.linears:
            if job.planned(rel):
                w = get_weight(job.module(rel))
                qt = round_weight(w, job.layers[rel].scheme, rounding, act_absmax=stats[g].abs_max)
                results[rel] = (qt, w)
    return results


def _without_statistics(job: BlockJob, groups: list[InputGroup], rounding) -> dict[str, tuple]:
    results: dict[str, tuple] = {}
    for g in groups:
        for rel in g.linears:
            if job.planned(rel):
                w = get_weight(job.module(rel))
                results[rel] = (round_weight(w, job.layers[rel].scheme, rounding), w)
    return results
