"""The first block's inputs: run the model on the calibration windows up to the first block and
keep what it was called with (hidden states plus every other positional and keyword argument:
attention mask, position ids, rotary embeddings, ...). Also the block structure traced from one
sample of those inputs."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from lowbit.calibration.data import CalibrationData
from lowbit.errors import CalibrationError
from lowbit.model.adapters import BlockStructure, ModelAdapter, trace_block
from lowbit.model.walker.activations import BlockInputs, new_store
from lowbit.model.walker.options import WalkOptions
from lowbit.model.walker.stats import Stop


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, calibration: CalibrationData, options: WalkOptions
) -> BlockInputs:
    """Run ``model`` on the calibration windows up to the first block and keep what it received."""
    hidden = new_store(options)
    extras: list[tuple[tuple, dict]] = []

    def grab(mod, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            h, rest = args[0], tuple(args[1:])
        elif "hidden_states" in kwargs:
            h, rest = kwargs.pop("hidden_states"), ()
        else:
            raise CalibrationError("the first block was called without hidden states; pass a ModelAdapter")
        hidden.append(h.detach())
        extras.append((rest, kwargs))
        raise Stop

    forward_kw = {}
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        forward_kw["use_cache"] = False
    device = _input_device(model)
    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in calibration.ids.split(options.batch_size):
            try:
                model(input_ids=ids.to(device), **forward_kw)
            except Stop:
                pass
            else:
                raise CalibrationError("the model finished a forward pass without calling its first block")
    finally:
        handle.remove()
    for args, kwargs in extras:
        if kwargs.get("past_key_values") is not None or kwargs.get("past_key_value") is not None:
            kwargs.pop("past_key_values", None)
            kwargs.pop("past_key_value", None)
    return BlockInputs(hidden, extras)


def _input_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the input embedding's device (streamed blocks may still be on meta)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def block_structure(adapter: ModelAdapter, block: nn.Module, inputs: BlockInputs) -> BlockStructure:
    """The adapter's structure, or else the one traced from ``block`` on the first sample of its
    inputs. The block is traced in both cases (a block the trace cannot run raises here)."""
    args, kwargs = inputs.extras[0]
    h0 = inputs.hidden[0]
    b = h0.shape[0]
    traced = trace_block(block, (h0[:1], *(_first_sample(a, b) for a in args)), {k: _first_sample(v, b) for k, v in kwargs.items()})
    return adapter.structure or traced


def _first_sample(v: Any, batch: int) -> Any:
    """The first sample of a batched call argument (tensors of >= 2 dims whose first dim is the
    batch size, also inside tuples); anything else as it is."""
    if batch > 1 and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == batch:
        return v[:1]
    if isinstance(v, tuple):
        return tuple(_first_sample(x, batch) for x in v)
    return v
