"""Model knowledge as data: where the blocks are, which linears share an input, and which
preceding operation a per-input-channel scale (AWQ, SmoothQuant) folds into.

One generic adapter serves Llama-family models (Llama, Qwen2, Mistral, SmolLM), GPT-2 (Conv1D),
OPT and GPT-NeoX; nothing is keyed on class names:

* the blocks are the ``nn.ModuleList`` holding the most linear layers (there must be exactly
  one list of repeated blocks; encoder-decoder models have two and need an explicit adapter);
* the rest is traced from one forward pass of the first block: linears called with the *same*
  input tensor form an ``InputGroup`` (q/k/v, gate/up); the module whose output *is* that
  tensor is the fold target when it is a norm (a ``weight`` of the input width, no matmul);
* a scale can also fold into the rows of a preceding linear when the block computes
  ``next(f(x) * prev(x))`` or attention over ``prev``'s output; a trace cannot see that, so
  such pairs are the data in ``LINEAR_FOLD_PAIRS`` (used only when the shapes agree, e.g. not
  ``v_proj -> o_proj`` under grouped-query attention);
* AWQ's clipping search leaves attention queries and keys alone (``NO_CLIP``): their errors are
  multiplied together inside the softmax.

Pass your own ``ModelAdapter(blocks=..., structure=BlockStructure(...))`` for anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lowbit.errors import UnsupportedModelError
from lowbit.model.swap import linear_kind

# (preceding linear, next linear) whose scale folds exactly into the preceding linear's rows
LINEAR_FOLD_PAIRS = (
    ("self_attn.v_proj", "self_attn.o_proj"),  # Llama, Qwen2, Mistral (without GQA)
    ("self_attn.v_proj", "self_attn.out_proj"),  # OPT
    ("mlp.up_proj", "mlp.down_proj"),  # gated MLPs: down(act(gate(x)) * up(x))
)
NO_CLIP = ("q_proj", "k_proj", "query_key_value", "c_attn", "query", "key", "Wqkv")

ADAPTER_HELP = (
    "lowbit needs to know (a) the dotted path of the nn.ModuleList of transformer blocks, and (b) for "
    "each block, which linears read the same input and the norm (or linear) that produces it; pass "
    "lowbit.model.ModelAdapter(blocks='path.to.layers', structure=BlockStructure(groups=(InputGroup(...), ...)))"
)


@dataclass(frozen=True)
class InputGroup:
    """Linears of a block that read the same input tensor (names relative to the block).

    linears:    in forward order.
    fold_into:  relative name of the module whose output is that input and that can absorb a
                per-channel 1/s (a norm, or a linear via ``LINEAR_FOLD_PAIRS``); None: no fold.
    inspect:    the smallest module holding all the linears (AWQ measures its output error);
                "" is the block itself.
    """

    linears: tuple[str, ...]
    fold_into: Optional[str] = None
    inspect: str = ""


@dataclass(frozen=True)
class BlockStructure:
    """The input groups of one block in forward order (the true-sequential stages)."""

    groups: tuple[InputGroup, ...]

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g.linears)


@dataclass(frozen=True)
class ModelAdapter:
    blocks: str
    structure: Optional[BlockStructure] = None  # None: traced from the first block
    no_clip: tuple[str, ...] = NO_CLIP

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        try:
            blocks = model.get_submodule(self.blocks)
        except AttributeError:
            raise UnsupportedModelError(f"adapter names blocks {self.blocks!r}, which the model lacks; {ADAPTER_HELP}") from None
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UnsupportedModelError(f"{self.blocks!r} is not a non-empty nn.ModuleList; {ADAPTER_HELP}")
        return blocks


def _count_linears(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if linear_kind(m) is not None)


def find_blocks(model: nn.Module) -> str:
    """Dotted path of the one ``nn.ModuleList`` of repeated blocks that holds linears."""
    lists = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and all(_count_linears(b) > 0 for b in mod):
            lists.append((name, mod))
    # keep outermost lists only (a block may itself hold a list of experts)
    outer = [(n, m) for n, m in lists if not any(n != o and n.startswith(o + ".") for o, _ in lists)]
    if not outer:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no nn.ModuleList of blocks with linear layers; {ADAPTER_HELP}"
        )
    if len(outer) > 1:
        raise UnsupportedModelError(
            f"{type(model).__name__} has several stacks of blocks ({[n for n, _ in outer]}), e.g. an "
            f"encoder and a decoder; the generic adapter handles one; {ADAPTER_HELP}"
        )
    name, blocks = outer[0]
    total = _count_linears(model)
    inside = _count_linears(blocks)
    if inside < total / 2:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the block list {name!r} holds only {inside} of {total} linear layers; "
            f"{ADAPTER_HELP}"
        )
    return name


def _is_norm_like(mod: nn.Module, width: int) -> bool:
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (width,):
        return False
    return linear_kind(mod) is None and not isinstance(mod, nn.Embedding)


def _common_prefix(names: tuple[str, ...]) -> str:
    parts = [n.split(".")[:-1] for n in names] if len(names) > 1 else [names[0].split(".")]
    common = []
    for segs in zip(*parts):
        if all(s == segs[0] for s in segs):
            common.append(segs[0])
        else:
            break
    return ".".join(common)


@torch.no_grad()
def trace_block(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> BlockStructure:
    """Input groups of ``block`` from one forward pass with ``args``/``kwargs``."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    calls: list[tuple[str, torch.Tensor]] = []
    keep: list[torch.Tensor] = []  # hold references so that ids are not recycled mid-trace
    handles = []
    names = {m: n for n, m in block.named_modules()}

    def out_hook(mod, inp, out):
        if isinstance(out, torch.Tensor):
            keep.append(out)
            outputs.setdefault(id(out), (names[mod], out))
        if linear_kind(mod) is not None:
            x = inp[0]
            keep.append(x)
            calls.append((names[mod], x))

    try:
        for m in block.modules():
            if m is not block:
                handles.append(m.register_forward_hook(out_hook))
        block(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported with what an adapter needs
        raise UnsupportedModelError(f"tracing a block failed ({type(e).__name__}: {e}); {ADAPTER_HELP}") from e
    finally:
        for h in handles:
            h.remove()
    seen: dict[int, list[str]] = {}
    order: list[int] = []
    inputs: dict[int, torch.Tensor] = {}
    for name, x in calls:
        if name in (n for ns in seen.values() for n in ns):
            continue  # a linear called twice (weight sharing inside a block) keeps its first input
        if id(x) not in seen:
            seen[id(x)] = []
            order.append(id(x))
            inputs[id(x)] = x
        seen[id(x)].append(name)
    groups = []
    modules = dict(block.named_modules())
    for key in order:
        lin = tuple(seen[key])
        width = inputs[key].shape[-1]
        fold = None
        producer = outputs.get(key)
        if producer is not None and _is_norm_like(modules[producer[0]], width):
            fold = producer[0]
        elif len(lin) == 1:
            for prev, nxt in LINEAR_FOLD_PAIRS:
                if lin[0] == nxt and prev in modules:
                    prev_w = modules[prev]
                    out_f = prev_w.weight.shape[1] if linear_kind(prev_w) == "Conv1D" else prev_w.weight.shape[0]
                    if out_f == width:
                        fold = prev
        groups.append(InputGroup(lin, fold, _common_prefix(lin)))
    if not groups:
        raise UnsupportedModelError(f"a block ran without calling any linear layer; {ADAPTER_HELP}")
    return BlockStructure(tuple(groups))
