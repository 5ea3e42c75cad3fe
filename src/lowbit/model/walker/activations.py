"""Block inputs between blocks: hidden states per calibration batch (in memory or spilled to
disk) plus the other arguments each block is called with."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, Iterator, Optional

import torch
from torch import nn

from lowbit.model.walker.options import WalkOptions


class ActivationStore:
    """Per-batch hidden states, in memory or spilled to disk (one file per batch)."""

    def __init__(self, offload: str = "memory", directory: Optional[str] = None) -> None:
        self._items: list[Any] = []
        self._dir = tempfile.mkdtemp(prefix="lowbit-acts-", dir=directory) if offload == "disk" else None

    def append(self, t: torch.Tensor) -> None:
        if self._dir is None:
            self._items.append(t)
        else:
            path = f"{self._dir}/{len(self._items)}.pt"
            torch.save(t.contiguous(), path)
            self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        return item if self._dir is None else torch.load(item, weights_only=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        self._items.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def new_store(options: WalkOptions) -> ActivationStore:
    """An empty store where ``options`` say block inputs and outputs live."""
    return ActivationStore(options.offload, options.offload_dir)


def block_out(res: Any) -> torch.Tensor:
    """The hidden states of a block's (or module's) output: the first item of a tuple."""
    return res[0] if isinstance(res, (tuple, list)) else res


class BlockInputs:
    """A block's inputs: hidden states per batch plus the other call arguments (attention mask,
    position ids, rotary embeddings, ...), which are the same for every block."""

    def __init__(self, hidden: ActivationStore, extras: list[tuple[tuple, dict]]) -> None:
        self.hidden = hidden
        self.extras = extras

    def call(self, block: nn.Module, i: int) -> torch.Tensor:
        """``block`` on batch ``i``: its output hidden states."""
        args, kwargs = self.extras[i]
        return block_out(block(self.hidden[i], *args, **kwargs))


def copy_inputs(inputs: BlockInputs, options: WalkOptions) -> BlockInputs:
    """A second store holding the same block inputs (the full-precision stream starts equal)."""
    store = new_store(options)
    for t in inputs.hidden:
        store.append(t)
    return BlockInputs(store, inputs.extras)
