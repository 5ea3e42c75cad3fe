"""Quantize a model larger than RAM: read it block by block from its safetensors shards.

``open_skeleton(model_dir)`` builds the model on the ``meta`` device and loads only the
tensors outside the transformer blocks (embeddings, final norm, LM head).
``SafetensorsBlockSource`` is the walker's ``BlockSource``: it reads block ``i``'s tensors
from the shards just before the walker needs them; once the walker has swapped the block's
linears for quantized ones, the full-precision weights are unreferenced and freed. Peak memory
is therefore the non-block tensors + one full-precision block + the quantized blocks so far +
the calibration activations (which can spill to disk: ``WalkOptions(offload="disk")``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import torch
from torch import nn

from lowbit.errors import ModelSourceError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def shard_index(model_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> shard file, from the index (sharded) or the single file."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelSourceError(f"{index} is not a safetensors index ({e!r})") from None
        return {k: model_dir / v for k, v in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    raise ModelSourceError(
        f"{model_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}; layer-by-layer quantization reads "
        "safetensors checkpoints (save the model with save_pretrained(safe_serialization=True))"
    )


class _Reader:
    """Reads named tensors from the shards.

    Each read opens the shard, copies the tensor out and closes it again: safetensors maps a
    shard into memory, and every page a read touches would otherwise stay resident in this
    process (and count in its RSS) for as long as the file stays open or any tensor still views
    the mapping, so a streamed walk would end up holding the whole model after all.
    """

    def __init__(self, index: dict[str, pathlib.Path]) -> None:
        self.index = index

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.index.get(name)
        if path is None:
            raise ModelSourceError(f"tensor {name!r} is in none of the checkpoint's shards")
        with safe_open(str(path), framework="pt") as f:
            t = f.get_tensor(name)
            return t.to(torch.float32, copy=True) if t.is_floating_point() else t.clone()


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Tensors of a few MB come from glibc's heap once its dynamic mmap threshold has grown, and
    freed heap pages stay in the process's RSS unless trimmed: without this, a streamed walk's
    RSS keeps every block's (already freed) full-precision weights.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _assign(module: nn.Module, qualified: str, value: torch.Tensor) -> None:
    owner_name, _, attr = qualified.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    old = getattr(owner, attr)
    if tuple(old.shape) != tuple(value.shape):
        raise ModelSourceError(f"tensor {qualified!r} is {tuple(value.shape)} in the checkpoint, the model expects {tuple(old.shape)}")
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=False))
    else:
        setattr(owner, attr, value)


def _load_tensors(root: nn.Module, prefix: str, reader: _Reader, only_meta: bool = True) -> None:
    for name, t in list(root.named_parameters(recurse=True)) + list(root.named_buffers(recurse=True)):
        if only_meta and t.device.type != "meta":
            continue
        _assign(root, name, reader.get(f"{prefix}{name}"))


class SafetensorsBlockSource:
    """Loads block ``i`` of ``blocks_path`` from the shards on demand (a walker ``BlockSource``)."""

    def __init__(self, reader: _Reader, blocks_path: str) -> None:
        self.reader = reader
        self.blocks_path = blocks_path

    def load(self, index: int, block: nn.Module) -> None:
        _load_tensors(block, f"{self.blocks_path}.{index}.", self.reader)

    def release(self, index: int, block: nn.Module) -> None:
        # the walker has replaced the linears; what is left (norms) is small and stays
        pass


def open_skeleton(model_dir, blocks_path: Optional[str] = None):
    """``(model, tokenizer, source)``: the model on meta with its non-block tensors loaded,
    and the BlockSource that fills in the blocks."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lowbit.model.adapters import find_blocks
    from lowbit.model.loading import model_class

    model_dir = pathlib.Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise ModelSourceError(f"{model_dir} is not a directory holding a Hugging Face model")
    index = shard_index(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    model_class(config, model_dir)  # streaming walks causal LMs; an encoder is an UnsupportedModelError
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.eval()
    blocks_path = blocks_path or find_blocks(model)
    reader = _Reader(index)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(blocks_path + ".") or t.device.type != "meta":
            continue
        if name not in index and tied and t is model.get_output_embeddings().weight:
            continue  # tied head: filled in by tie_weights below
        _assign(model, name, reader.get(name))
    if tied:
        model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, SafetensorsBlockSource(reader, blocks_path)
