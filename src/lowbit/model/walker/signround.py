"""SignRound on one block: all of the block's planned linears tuned at once against the
block's full-precision outputs on the same inputs, differentiating through the block
(``torch.func.functional_call``), one calibration batch per step (``lowbit.methods.signround``)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from lowbit.methods import signround as signround_m
from lowbit.model.adapters import InputGroup
from lowbit.model.walker.activations import ActivationStore, block_out
from lowbit.model.walker.gptq import gptq_block
from lowbit.model.walker.job import BlockJob
from lowbit.model.walker.propagate import block_outputs
from lowbit.model.walker.weights import get_weight, set_weight, stored_form
from lowbit.methods.signround import SignRound


def signround_block(job: BlockJob, groups: list[InputGroup], spec: SignRound, fp_out: Optional[ActivationStore] = None) -> dict[str, tuple]:
    """Tune the block's planned linears jointly; returns ``{rel: (QuantizedTensor, original weight)}``.

    ``fp_out``: the targets when the walker already has them: the same outputs
    (``propagate="full_precision"``), or, with ``SignRound(fp_targets=True)`` (AutoRound's
    choice), the full-precision block's outputs on the full-precision stream, so that a block
    also makes up for the error of the blocks before it. Without them the block's own outputs,
    computed before anything changes it, are the targets."""
    rels = [rel for g in groups for rel in g.linears if job.planned(rel)]
    if not rels:
        return {}
    block, inputs = job.block, job.inputs
    mods = {rel: job.module(rel) for rel in rels}
    weights = {rel: get_weight(m) for rel, m in mods.items()}
    schemes = {rel: job.layers[rel].scheme for rel in rels}
    for rel in rels:
        signround_m.check_scheme(schemes[rel], job.layers[rel].name)
    own_targets = fp_out is None
    targets = None

    def loss_fn(dq: dict[str, torch.Tensor], b: int) -> torch.Tensor:
        overrides = {f"{rel}.weight": stored_form(mods[rel], w) for rel, w in dq.items()}
        args, kwargs = inputs.extras[b]
        y = block_out(torch.func.functional_call(block, overrides, (inputs.hidden[b], *args), kwargs))
        return torch.nn.functional.mse_loss(y.float(), targets[b].float())

    try:
        targets = block_outputs(block, inputs, job.options) if own_targets else fp_out
        starts = None
        if spec.start is not None:
            # GPTQ's result as the start; it leaves the modules holding GPTQ's weights, which
            # does not matter: the loss overrides every planned weight
            found_gptq = gptq_block(job, groups, spec.start)
            starts = {rel: signround_m.start_from(weights[rel], qt) for rel, (qt, _) in found_gptq.items()}
            del found_gptq
        with _frozen(block):
            found = signround_m.tune(weights, schemes, loss_fn, len(inputs.hidden), spec, starts, job.name)
    finally:
        if own_targets and targets is not None:
            targets.close()
    losses = ", ".join(f"{k} {v / len(inputs.hidden):.4g}" for k, v in found.losses.items())
    start = "gptq" if spec.start is not None else "rtn"
    job.notes.append(
        f"{job.name}: signround from {start} kept the {found.chosen!r} parameters (block output MSE: {losses})"
    )
    results = {}
    for rel in rels:
        qt = signround_m.finalize(weights[rel], found.params[rel], schemes[rel], found.starts[rel])
        set_weight(mods[rel], qt.dequantize())
        results[rel] = (qt, weights[rel])
    return results


@contextmanager
def _frozen(block: nn.Module):
    """The block's own parameters take no gradient while SignRound differentiates through it."""
    saved = [(p, p.requires_grad) for p in block.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
