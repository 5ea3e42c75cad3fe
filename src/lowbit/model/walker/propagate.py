"""Carrying block inputs from block to block: running a block to get the next block's inputs,
and the full-precision stream that fp targets (GPTAQ, AutoRound) need beside the quantized one.

Which outputs go on depends on ``WalkOptions.propagate``: the quantized block's
(``"quantized"``, the GPTQ reference) or the full-precision block's, computed before anything
changes it (``"full_precision"``). Each stream is an ``ActivationStore``, so ``offload="disk"``
spills it; a stream is closed (its spill files removed) as soon as the next one replaces it.
"""

from __future__ import annotations

import copy
from typing import NamedTuple, Optional

from torch import nn

from lowbit.model.walker.activations import ActivationStore, BlockInputs, copy_inputs, new_store
from lowbit.model.walker.options import WalkOptions
from lowbit.methods.gptq import GPTQ
from lowbit.methods.signround import SignRound


def block_outputs(block: nn.Module, inputs: BlockInputs, options: WalkOptions) -> ActivationStore:
    """``block`` on every batch of its inputs: the next block's hidden states."""
    out = new_store(options)
    for i in range(len(inputs.hidden)):
        out.append(inputs.call(block, i).detach())
    return out


def needs_fp_stream(rounding) -> bool:
    """Whether the rounding fits full-precision targets (``GPTQ``/``SignRound(fp_targets=True)``)."""
    return isinstance(rounding, (GPTQ, SignRound)) and rounding.fp_targets


class FullPrecisionPair(NamedTuple):
    """One block's full-precision reference: the block as it is before anything changes it
    (a copy for GPTQ; SignRound needs only the outputs, computed before it changes the block),
    its input stream, and its outputs on that stream (the next block's full-precision inputs)."""

    block: nn.Module
    inputs: BlockInputs
    outputs: ActivationStore


def full_precision_pair(block: nn.Module, fp_inputs: BlockInputs, rounding, options: WalkOptions) -> FullPrecisionPair:
    fp_block = copy.deepcopy(block) if isinstance(rounding, GPTQ) else block
    return FullPrecisionPair(fp_block, fp_inputs, block_outputs(fp_block, fp_inputs, options))


class Streams:
    """The block inputs a walk carries: ``inputs`` (what the next block is calibrated on) and,
    with fp targets, ``fp`` (the full-precision model's own inputs to the same block)."""

    def __init__(self, inputs: BlockInputs, fp: Optional[BlockInputs] = None) -> None:
        self.inputs, self.fp = inputs, fp

    @classmethod
    def start(cls, inputs: BlockInputs, options: WalkOptions, full_precision: bool) -> "Streams":
        """The first block's inputs; the full-precision stream starts equal to them."""
        return cls(inputs, copy_inputs(inputs, options) if full_precision else None)

    def advance(self, outputs: ActivationStore, fp_outputs: Optional[ActivationStore] = None) -> None:
        """Move on to the next block: its inputs are this block's outputs."""
        self.inputs.hidden.close()
        self.inputs = BlockInputs(outputs, self.inputs.extras)
        if fp_outputs is not None:
            self.fp.hidden.close()
            self.fp = BlockInputs(fp_outputs, self.inputs.extras)

    def close(self) -> None:
        self.inputs.hidden.close()
        if self.fp is not None:
            self.fp.hidden.close()
