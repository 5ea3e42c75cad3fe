"""The sequential block walker: calibration-based quantization one block at a time.

1. Capture the inputs of the first block (hidden states plus every other positional and
   keyword argument: attention mask, position ids, rotary embeddings, ...) by running the
   model on the calibration windows and stopping at the first block.
2. For each block: apply the recipe's transforms (AWQ, SmoothQuant: scales folded into the
   preceding norm or linear), then the rounding (GPTQ collects one Hessian per group of
   linears that share an input; with ``true_sequential`` each group's statistics are collected
   after the earlier groups are quantized, stopping the forward pass as soon as they are in);
   then run the block to produce the next block's inputs, from the quantized block
   (``propagate="quantized"``, the GPTQ reference) or the full-precision one
   (``propagate="full_precision"``, computed before anything changes). ``GPTQ(fp_targets=True)``
   also keeps a full-precision stream of block inputs and a full-precision copy of the block,
   so that each linear is fitted to its full-precision outputs (GPTAQ). ``SignRound`` instead
   tunes all of the block's linears at once against the block's full-precision outputs on the
   same inputs, differentiating through the block (``torch.func.functional_call``).
3. Swap the block's linears for QuantLinear; a ``BlockSource`` may then drop the block's
   full-precision tensors (see ``lowbit.model.streaming``).

Linears outside the blocks (an LM head a rule quantizes) get the rounding without statistics
(GPTQ falls back to RTN there) and the report says so.

The parts, in the order a walk uses them (each imports only parts listed above it):

    options      WalkOptions, BlockSource
    weights      a linear's weight as [out, in] float32, and back
    activations  ActivationStore (memory or disk), BlockInputs (hidden states + call arguments)
    stats        hooks and passes that fill the per-block accumulators
    capture      step 1, and the block structure traced from the captured inputs
    propagate    running a block for the next block's inputs; the full-precision stream
    job          BlockJob: one block, its planned linears, its inputs
    transforms   AWQ and SmoothQuant on one block
    gptq         GPTQ on one block (signround uses it for its start)
    signround    SignRound on one block
    rounding     the rounding step of one block: dispatch on the recipe's rounding
    plan         the planned linears, the report, installing results, rounding without statistics
    driver       quantize_sequential: the walk, top to bottom
"""

from lowbit.model.walker.activations import ActivationStore
from lowbit.model.walker.capture import capture_block_inputs
from lowbit.model.walker.driver import quantize_sequential
from lowbit.model.walker.options import BlockSource, WalkOptions
from lowbit.model.walker.weights import get_weight, set_weight

__all__ = [
    "ActivationStore",
    "BlockSource",
    "WalkOptions",
    "capture_block_inputs",
    "get_weight",
    "quantize_sequential",
    "set_weight",
]
