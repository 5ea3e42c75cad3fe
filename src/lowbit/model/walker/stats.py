"""Per-block calibration statistics: forward passes over a block's inputs with hooks on the
first linear of each input group (the group's shared input), and the accumulators they fill.

Nothing here changes a weight. A pass can end early at a ``stop`` module (GPTQ's stages need
only the inputs up to the stage's last group); ``batches`` limits it to some calibration batches.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from lowbit.calibration.stats import ChannelStats, CrossAccumulator, HessianAccumulator
from lowbit.model.adapters import InputGroup
from lowbit.model.walker.activations import BlockInputs, block_out
from lowbit.model.walker.weights import get_weight


class Stop(Exception):
    """Raised from a hook to end a forward pass early."""


@contextmanager
def hooks(pre: dict[nn.Module, Callable[[torch.Tensor], None]], stop: Optional[nn.Module] = None):
    """Forward pre-hooks that see each module's first input; ``stop`` ends the pass after its hook."""
    handles = []

    def make(fn, is_stop):
        def hook(mod, args):
            fn(args[0])
            if is_stop:
                raise Stop

        return hook

    try:
        for mod, fn in pre.items():
            handles.append(mod.register_forward_pre_hook(make(fn, mod is stop)))
        if stop is not None and stop not in pre:
            handles.append(stop.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(Stop())))
        yield
    finally:
        for h in handles:
            h.remove()


def observe(block: nn.Module, inputs: BlockInputs, pre=None, stop=None, batches=None) -> None:
    """Run ``block`` on its inputs (every batch, or ``batches``) with ``pre`` hooks on; the
    outputs are dropped."""
    with hooks(pre or {}, stop):
        for i in range(len(inputs.hidden)) if batches is None else batches:
            try:
                inputs.call(block, i)
            except Stop:
                continue


def first_linear(block: nn.Module, group: InputGroup) -> nn.Module:
    """The group's first linear: its input is the group's shared input."""
    return block.get_submodule(group.linears[0])


def inspected(block: nn.Module, group: InputGroup) -> nn.Module:
    """The smallest module holding all the group's linears (``inspect`` "" is the block itself)."""
    return block.get_submodule(group.inspect) if group.inspect else block


def token_subset(inputs: BlockInputs, max_tokens: int) -> list[int]:
    """The first batches that together hold at least ``max_tokens`` tokens (or all of them)."""
    chosen, tokens = [], 0
    for i in range(len(inputs.hidden)):
        chosen.append(i)
        tokens += inputs.hidden[i].shape[:-1].numel()
        if tokens >= max_tokens:
            break
    return chosen


def channel_stats(block: nn.Module, inputs: BlockInputs, groups: list[InputGroup], batches=None) -> dict[InputGroup, ChannelStats]:
    """Per-input-channel activation magnitudes of each group's input (AWQ, SmoothQuant, LLM.int8)."""
    stats = {g: ChannelStats(get_weight(first_linear(block, g)).shape[1]) for g in groups}
    observe(block, inputs, pre={first_linear(block, g): stats[g].add_batch for g in groups}, batches=batches)
    return stats


def group_inputs(block: nn.Module, inputs: BlockInputs, groups: list[InputGroup], batches) -> dict[InputGroup, list[torch.Tensor]]:
    """Each group's input, one ``[tokens, in]`` tensor per batch (AWQ's clipping search)."""
    xs: dict[InputGroup, list[torch.Tensor]] = {g: [] for g in groups}
    observe(
        block, inputs,
        pre={first_linear(block, g): (lambda x, g=g: xs[g].append(x.reshape(-1, x.shape[-1]).detach())) for g in groups},
        batches=batches,
    )
    return xs


@contextmanager
def record_calls(block: nn.Module, groups: list[InputGroup]) -> Iterator[dict[InputGroup, list]]:
    """While open, each group's ``inspected`` module records every call
    as ``[args, kwargs, output hidden states]``: AWQ replays them to measure a candidate's error."""
    captured: dict[InputGroup, list] = {g: [] for g in groups}
    handles = []
    try:
        for g in groups:
            target = inspected(block, g)

            def pre(mod, args, kwargs, g=g):
                captured[g].append([args, kwargs, None])

            def post(mod, args, kwargs, out, g=g):
                captured[g][-1][2] = block_out(out).detach()

            handles.append(target.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(target.register_forward_hook(post, with_kwargs=True))
        yield captured
    finally:
        for h in handles:
            h.remove()


def stage_hessians(block: nn.Module, inputs: BlockInputs, stage: list[InputGroup], token_cap) -> dict[InputGroup, HessianAccumulator]:
    """One Hessian per group of a GPTQ stage; each pass stops right after the stage's last
    input is seen (forward order = structure order)."""
    firsts = {g: first_linear(block, g) for g in stage}
    accs = {g: HessianAccumulator(get_weight(firsts[g]).shape[1], token_cap=token_cap) for g in stage}
    observe(block, inputs, pre={firsts[g]: accs[g].add_batch for g in stage}, stop=firsts[stage[-1]])
    return accs


def paired_stage_stats(
    block: nn.Module, inputs: BlockInputs, fp_block: nn.Module, fp_inputs: BlockInputs, stage: list[InputGroup], token_cap
) -> tuple[dict[InputGroup, HessianAccumulator], dict[InputGroup, CrossAccumulator]]:
    """GPTAQ's statistics for a stage: for each batch, the full-precision block on the
    full-precision stream, then the block on the quantized stream, pairing each group's input
    token for token (Hessian H of the quantized inputs, cross-covariance C with the fp ones)."""
    firsts = {g: first_linear(block, g) for g in stage}
    accs = {g: HessianAccumulator(get_weight(firsts[g]).shape[1], token_cap=token_cap) for g in stage}
    crosses = {g: CrossAccumulator(get_weight(firsts[g]).shape[1]) for g in stage}
    fp_firsts = {g: first_linear(fp_block, g) for g in stage}
    for i in range(len(inputs.hidden)):
        seen: dict = {}
        with hooks({fp_firsts[g]: (lambda x, g=g: seen.__setitem__(g, x.detach())) for g in stage}, fp_firsts[stage[-1]]):
            try:
                fp_inputs.call(fp_block, i)
            except Stop:
                pass

        def take(x, g):
            accs[g].add_batch(x)
            crosses[g].add_batch(seen[g], x)

        with hooks({firsts[g]: (lambda x, g=g: take(x, g)) for g in stage}, firsts[stage[-1]]):
            try:
                inputs.call(block, i)
            except Stop:
                pass
    return accs, crosses
