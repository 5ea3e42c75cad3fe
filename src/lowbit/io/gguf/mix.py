"""Which GGML type each tensor of a llama GGUF gets, for a whole-file type ("ftype").

This follows llama.cpp's own rule (``src/llama-quant.cpp``: ``llama_tensor_get_type``,
``llama_tensor_get_type_impl``, ``tensor_type_fallback``, ``tensor_allows_quantization``),
restricted to a dense llama model and to the ftypes lowbit can write:

* 1-D tensors (norms) stay F32; the float ftypes (F32/F16/BF16) store every
  2-D weight in that type.
* ``output.weight`` -- or ``token_embd.weight`` when the embeddings are tied
  (no ``output.weight``) -- gets Q8_0 if its row length is not a multiple of
  the ftype's block size, else Q6_K unless the ftype is Q8_0. This applies to
  every quantized ftype, Q4_0 included (llama.cpp's ``llama-quantize`` does it).
* Q4_K_M: ``attn_v`` and ``ffn_down`` of layer ``i`` (of ``n``) get Q6_K when
  ``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (integer
  division); everything else Q4_K.
* Fallback for rows not divisible by the block size: Q4_K -> Q5_0, Q6_K ->
  Q8_0, and F16 when even that does not divide (llama.cpp throws for the
  32-block types; lowbit falls back to F16 instead and says so in the plan).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from lowbit.errors import SchemeError

# ftype name -> (default tensor type, general.file_type)
FTYPES: dict[str, tuple[T, int]] = {
    "F32": (T.F32, FT.ALL_F32),
    "F16": (T.F16, FT.MOSTLY_F16),
    "BF16": (T.BF16, FT.MOSTLY_BF16),
    "Q8_0": (T.Q8_0, FT.MOSTLY_Q8_0),
    "Q4_0": (T.Q4_0, FT.MOSTLY_Q4_0),
    "Q4_1": (T.Q4_1, FT.MOSTLY_Q4_1),
    "Q5_0": (T.Q5_0, FT.MOSTLY_Q5_0),
    "Q5_1": (T.Q5_1, FT.MOSTLY_Q5_1),
    "Q6_K": (T.Q6_K, FT.MOSTLY_Q6_K),
    "Q4_K_M": (T.Q4_K, FT.MOSTLY_Q4_K_M),
}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
BLOCK = {T.Q8_0: 32, T.Q4_0: 32, T.Q4_1: 32, T.Q5_0: 32, T.Q5_1: 32, T.Q4_K: 256, T.Q6_K: 256}
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorPlan:
    name: str
    qtype: T
    reason: str  # why this type (the rule that picked it), for reports


def check_ftype(ftype: str) -> tuple[T, int]:
    try:
        return FTYPES[ftype]
    except KeyError:
        raise SchemeError(f"unknown GGUF qtype {ftype!r}; use one of {sorted(FTYPES)}") from None


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def plan_tensor(name: str, shape: tuple[int, ...], ftype: str, n_layers: int, tied: bool) -> TensorPlan:
    """The type of tensor ``name`` (GGUF name, ``shape`` in torch order ``[out, in]``)."""
    default, _ = check_ftype(ftype)
    if len(shape) < 2:
        return TensorPlan(name, T.F32, "1-D tensors stay F32")
    if default in FLOAT_TYPES:
        return TensorPlan(name, default, f"ftype {ftype}")
    ncols = shape[-1]
    new, reason = default, f"ftype {ftype}"
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if ncols % BLOCK[default] != 0:
            new, reason = T.Q8_0, f"output tensor, row of {ncols} not a multiple of {BLOCK[default]}"
        elif default != T.Q8_0:
            new, reason = T.Q6_K, "output tensor"
    elif ftype == "Q4_K_M" and (name.endswith("attn_v.weight") or name.endswith("ffn_down.weight")):
        m = _LAYER.match(name)
        if m and use_more_bits(int(m.group(1)), n_layers):
            new, reason = T.Q6_K, "Q4_K_M: use_more_bits layer"
    if ncols % BLOCK[new] != 0:
        fb = _FALLBACK.get(new)
        if fb is None or ncols % BLOCK[fb] != 0:
            fb = T.F16
        reason = f"{reason}; row of {ncols} not a multiple of {BLOCK[new]}: {new.name} -> {fb.name}"
        new = fb
    return TensorPlan(name, new, reason)
