"""The transforms of one block, before its rounding: AWQ and SmoothQuant compute a scale per
input channel of each input group and fold it into the operation that produces the group's
input (a norm, or the rows of a preceding linear); the group's linears take the inverse, so
the block computes the same function. AWQ may then clip the scaled weights."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.calibration.stats import ChannelStats
from lowbit.methods import awq as awq_m
from lowbit.methods.smoothquant import smoothquant_scales
from lowbit.model.adapters import InputGroup
from lowbit.model.walker.activations import block_out
from lowbit.model.walker.job import BlockJob
from lowbit.model.walker.stats import channel_stats, group_inputs, inspected, record_calls, token_subset
from lowbit.model.walker.weights import get_weight, set_weight
from lowbit.methods.awq import AWQ
from lowbit.methods.smoothquant import SmoothQuant


def apply_transforms(job: BlockJob, specs: tuple) -> None:
    """Apply the recipe's transforms to the block, in the recipe's order."""
    for spec in specs:
        if isinstance(spec, AWQ):
            awq_block(job, spec)
        elif isinstance(spec, SmoothQuant):
            smoothquant_block(job, spec)


def foldable(job: BlockJob, group: InputGroup, what: str) -> bool:
    """Whether a scale for ``group`` can be folded; the report says why not when it has linears to
    quantize (no norm or linear to fold into, or some of its linears stay in full precision)."""
    mine = [rel for rel in group.linears if job.planned(rel)]
    if not mine:
        return False
    if group.fold_into is None:
        job.notes.append(
            f"{job.name}: {what} skips {list(group.linears)}: their input comes from no norm or linear "
            "a scale can fold into"
        )
        return False
    if len(mine) != len(group.linears):
        job.notes.append(
            f"{job.name}: {what} skips {list(group.linears)}: some of them stay in full precision"
        )
        return False
    return True


def fold(block: nn.Module, group: InputGroup, s: torch.Tensor) -> None:
    """Divide the group's input by ``s`` (in the norm or linear that produces it) and multiply
    the input channels of the group's linears by ``s``."""
    prev = block.get_submodule(group.fold_into)
    if hasattr(prev, "weight") and prev.weight.dim() == 1:
        w, b = awq_m.fold_into_norm(prev.weight.detach().float(), None if getattr(prev, "bias", None) is None else prev.bias.detach().float(), s)
        prev.weight.data = w.to(prev.weight.dtype)
        if b is not None:
            prev.bias.data = b.to(prev.bias.dtype)
    else:
        w, b = awq_m.fold_into_linear_rows(get_weight(prev), None if prev.bias is None else prev.bias.detach().float(), s)
        set_weight(prev, w)
        if b is not None:
            prev.bias.data = b.to(prev.bias.dtype)
    for rel in group.linears:
        mod = block.get_submodule(rel)
        set_weight(mod, awq_m.scale_input_channels(get_weight(mod), s))


# -- AWQ ------------------------------------------------------------------------------------
def awq_block(job: BlockJob, spec: AWQ) -> None:
    """Search each foldable group's scales against the output error of its ``inspect`` module on
    the recorded calls, fold them all, then (``spec.clip``) search the clipping."""
    groups = [g for g in job.structure.groups if foldable(job, g, "AWQ")]
    batches = token_subset(job.inputs, spec.max_tokens)
    with record_calls(job.block, groups) as captured:
        stats = channel_stats(job.block, job.inputs, groups, batches)
    scales = {g: _search_scales(job, g, stats[g], captured[g], spec) for g in groups}
    del captured
    for g in groups:
        fold(job.block, g, scales[g])
    if spec.clip:
        _awq_clip(job, spec, batches)


def _search_scales(job: BlockJob, g: InputGroup, stats: ChannelStats, calls: list, spec: AWQ) -> torch.Tensor:
    """AWQ's grid search for one group; the linears get their original weights back."""
    mods = [job.module(rel) for rel in g.linears]
    originals = [get_weight(m) for m in mods]
    target = inspected(job.block, g)

    def loss_fn(candidates):
        for m, w in zip(mods, candidates):
            set_weight(m, w)
        total, count = 0.0, 0
        for args, kwargs, ref in calls:
            y = block_out(target(*args, **kwargs))
            total += float((y.float() - ref.float()).pow(2).sum())
            count += ref.numel()
        return total / max(count, 1)

    schemes = [job.layers[rel].scheme for rel in g.linears]
    try:
        found = awq_m.search_scales(stats.abs_mean, originals, schemes[0], spec, loss_fn)
    finally:
        for m, w in zip(mods, originals):
            set_weight(m, w)
    ratio = "none better than unscaled, kept s=1" if found.ratio is None else f"ratio {found.ratio:.2f}"
    job.notes.append(
        f"{job.name}: AWQ {list(g.linears)} -> fold into {g.fold_into}, {ratio}, "
        f"output error {found.loss:.3g} vs {found.loss_at_one:.3g} unscaled"
    )
    return found.scales


def _awq_clip(job: BlockJob, spec: AWQ, batches: list[int]) -> None:
    """Clip each clippable linear's (scaled) weight to the range that best keeps its outputs on
    the group's (scaled) inputs."""
    targets = [g for g in job.structure.groups if any(job.clips(rel) for rel in g.linears)]
    xs = group_inputs(job.block, job.inputs, targets, batches)
    for g in targets:
        x = torch.cat(xs.pop(g))[: spec.max_tokens].float()
        for rel in g.linears:
            if not job.clips(rel):
                continue
            mod = job.module(rel)
            w = get_weight(mod)
            max_val = awq_m.search_clip(w, x, job.layers[rel].scheme, spec)
            set_weight(mod, awq_m.apply_clip(w, max_val, job.layers[rel].scheme))


# -- SmoothQuant ----------------------------------------------------------------------------
def smoothquant_block(job: BlockJob, spec: SmoothQuant) -> None:
    """Fold SmoothQuant's scales (from the inputs' per-channel maxima) into each foldable group."""
    groups = [g for g in job.structure.groups if foldable(job, g, "SmoothQuant")]
    stats = channel_stats(job.block, job.inputs, groups)
    for g in groups:
        weights = [get_weight(job.module(rel)) for rel in g.linears]
        fold(job.block, g, smoothquant_scales(stats[g].abs_max, weights, spec.alpha))
