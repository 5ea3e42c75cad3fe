"""Llama hyperparameters from GGUF metadata: each value type- and range-checked, and checked
against the tensors the file holds, before a model is built from them.

Keys (llama.cpp's names), their types and what is required::

    general.architecture                    string  "llama"
    llama.block_count                       int     1..MAX; exactly the blk.N indices 0..N-1 of the tensors
    llama.embedding_length                  int     1..MAX
    llama.feed_forward_length               int     1..MAX
    llama.attention.head_count              int     1..MAX
    llama.attention.head_count_kv           int     optional (= head_count); divides head_count
    llama.rope.dimension_count              int     optional; the head size, even; without it (and without
                                                    key_length) head_count must divide embedding_length
    llama.attention.key_length/value_length int     optional; equal to the head size
    llama.context_length                    int     1..MAX
    llama.vocab_size                        int     optional (= token_embd rows); equal to token_embd rows
    llama.rope.freq_base                    float   optional (10000); finite, 1 < x <= 1e12
    llama.attention.layer_norm_rms_epsilon  float   finite, 0 < x < 1
    llama.rope.scaling.type / .factor       -       absent, "none", or factor 1 (scaled RoPE is not supported)
    llama.expert_count / expert_used_count  int     absent or 0 (mixture-of-experts is not supported)
    tokenizer.ggml.bos/eos_token_id         int     optional; 0..vocab-1

A key one or two characters away from one of these (a bit flip in ``llama.``) is a
``CheckpointError``: read as absent, its default would apply silently. Any other ``llama.*`` key is
refused (``UnsupportedModelError``): llama.cpp defines many
(``logit_scale``, ``attention.scale``, ``embedding_scale``...) that change the model, and a key
lowbit does not interpret could make its outputs differ from llama.cpp's without a word. Only
``rope.scaling.original_context_length`` and ``rope.scaling.finetuned``, which change nothing
without scaling, are accepted unread.

"int" is any GGUF integer type (not BOOL), "float" FLOAT32/FLOAT64: a string, an array or a
float where an integer belongs is a ``CheckpointError`` naming the key. Tensor-shape
consistency (``attn_q`` is ``[heads * head size, hidden]``...) is checked by the reader
from these values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from gguf import GGUFValueType as V

from lowbit.errors import CheckpointError, TensorMismatchError, UnsupportedModelError

INT_TYPES = frozenset({V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64})
FLOAT_TYPES = frozenset({V.FLOAT32, V.FLOAT64})

MAX_BLOCKS = 1 << 16
MAX_HIDDEN = 1 << 20
MAX_FFN = 1 << 22
MAX_HEADS = 1 << 14
MAX_CONTEXT = 1 << 27
MAX_VOCAB = 1 << 24
MAX_ROPE_BASE = 1e12
DEFAULT_ROPE_BASE = 10000.0

LLAMA_KEYS = frozenset(
    "llama." + k
    for k in (
        "block_count", "embedding_length", "feed_forward_length", "context_length", "vocab_size",
        "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
        "attention.layer_norm_rms_epsilon", "rope.dimension_count", "rope.freq_base",
        "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.finetuned",
        "expert_count", "expert_used_count",
    )
)

_BLOCK = re.compile(r"blk\.(\d+)\.")
_FIX = "the metadata is corrupt or was written by a broken converter; re-download or re-export the file"


@dataclass(frozen=True)
class LlamaHParams:
    n_layers: int
    hidden: int
    ffn: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context: int
    vocab: int
    rope_base: float
    rms_eps: float
    tied: bool
    bos: Optional[int] = None
    eos: Optional[int] = None


# ---------------------------------------------------------------------------
# typed scalar access
# ---------------------------------------------------------------------------
def _types_name(field) -> str:
    if field.types and field.types[0] == V.ARRAY:
        sub = field.types[-1].name if len(field.types) > 1 else "empty"
        return f"an array ({sub})"
    return field.types[0].name if field.types else "no type"


def scalar(fields: Mapping[str, Any], key: str, kind: str, required: bool = True):
    """The value of ``key`` as ``kind`` ("int", "float" or "str"), or None when absent and not required."""
    f = fields.get(key)
    if f is None:
        if required:
            raise CheckpointError(f"GGUF metadata key {key!r} is missing; the file is not a complete llama GGUF")
        return None
    allowed = {"int": INT_TYPES, "float": FLOAT_TYPES, "str": frozenset({V.STRING})}[kind]
    if len(f.types) != 1 or f.types[0] not in allowed:
        want = {"int": "an integer", "float": "a FLOAT32/FLOAT64", "str": "a string"}[kind]
        raise CheckpointError(f"GGUF metadata key {key!r} holds {_types_name(f)} where {want} belongs; {_FIX}")
    if kind == "str":
        raw = bytes(f.parts[-1])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"GGUF metadata key {key!r} is not valid UTF-8 ({raw[:40]!r}); {_FIX}") from None
    value = f.parts[-1].tolist()[0]
    return int(value) if kind == "int" else float(value)


def int_in_range(fields, key: str, lo: int, hi: int, required: bool = True) -> Optional[int]:
    v = scalar(fields, key, "int", required)
    if v is not None and not lo <= v <= hi:
        raise CheckpointError(f"GGUF metadata {key} is {v}; it must be an integer from {lo} to {hi}; {_FIX}")
    return v


def float_in_range(fields, key: str, lo: float, hi: float, hi_inclusive: bool, required: bool = True):
    """A finite float with ``lo < v < hi`` (``<= hi`` when ``hi_inclusive``)."""
    v = scalar(fields, key, "float", required)
    if v is None:
        return None
    ok = math.isfinite(v) and v > lo and (v <= hi if hi_inclusive else v < hi)
    if not ok:
        bound = f"{lo} < x {'<=' if hi_inclusive else '<'} {hi:g}"
        raise CheckpointError(f"GGUF metadata {key} is {v!r}; it must be finite with {bound}; {_FIX}")
    return v


# ---------------------------------------------------------------------------
# consistency
# ---------------------------------------------------------------------------
def block_indices(names) -> set[int]:
    out = set()
    for n in names:
        m = _BLOCK.match(n)
        if m:
            out.add(int(m.group(1)))
    return out


def check_block_count(n_layers: int, names) -> None:
    """``llama.block_count`` must be exactly the blocks 0..N-1 that tensors exist for."""
    found = block_indices(names)
    if found != set(range(n_layers)):
        have = f"{len(found)} blocks (indices {min(found)}..{max(found)})" if found else "no blk.N tensors"
        raise TensorMismatchError(
            f"GGUF metadata llama.block_count is {n_layers} but the file has tensors for {have}; "
            "the metadata and the tensors disagree: re-download or re-export the file"
        )


def head_dim_of(fields, hidden: int, n_head: int) -> int:
    """The head size: rope.dimension_count, else key_length, else hidden / head_count; then
    key_length / value_length must agree with it, and it must be even (RoPE rotates pairs)."""
    rope = int_in_range(fields, "llama.rope.dimension_count", 1, MAX_HIDDEN, required=False)
    key_len = int_in_range(fields, "llama.attention.key_length", 1, MAX_HIDDEN, required=False)
    value_len = int_in_range(fields, "llama.attention.value_length", 1, MAX_HIDDEN, required=False)
    head_dim = rope or key_len
    if head_dim is None:
        if hidden % n_head:
            raise CheckpointError(
                f"GGUF metadata llama.attention.head_count {n_head} does not divide llama.embedding_length {hidden} "
                f"and no llama.rope.dimension_count gives the head size; {_FIX}"
            )
        head_dim = hidden // n_head
    for key, v in (("llama.attention.key_length", key_len), ("llama.attention.value_length", value_len)):
        if v is not None and v != head_dim:
            raise UnsupportedModelError(
                f"GGUF metadata {key} is {v} but the rotary head size is {head_dim}; lowbit imports llama models "
                "whose key, value and rotary sizes are one head size (re-export the file, or this is not a llama model)"
            )
    if head_dim % 2:
        raise CheckpointError(f"GGUF metadata gives an odd head size {head_dim}; RoPE needs an even one; {_FIX}")
    return head_dim


def heads_kv_of(fields, n_head: int) -> int:
    n_kv = int_in_range(fields, "llama.attention.head_count_kv", 1, MAX_HEADS, required=False) or n_head
    if n_head % n_kv:
        raise CheckpointError(
            f"GGUF metadata llama.attention.head_count_kv {n_kv} does not divide llama.attention.head_count {n_head} "
            f"(each kv head serves a whole group of query heads); {_FIX}"
        )
    return n_kv


def vocab_of(fields, tensor_dims: Mapping[str, tuple]) -> int:
    emb = tensor_dims.get("token_embd.weight")
    if emb is None or len(emb) != 2:
        raise TensorMismatchError(
            "tensor 'token_embd.weight' is missing or not 2-D; the file is not a complete llama GGUF"
        )
    rows = int(emb[1])
    vocab = int_in_range(fields, "llama.vocab_size", 1, MAX_VOCAB, required=False)
    if vocab is not None and vocab != rows:
        raise TensorMismatchError(
            f"GGUF metadata llama.vocab_size is {vocab} but token_embd.weight has {rows} rows; "
            "the metadata and the tensors disagree: re-download or re-export the file"
        )
    if not 1 <= rows <= MAX_VOCAB:
        raise TensorMismatchError(f"token_embd.weight has {rows} rows; a vocabulary has 1 to {MAX_VOCAB} tokens")
    return rows


def check_rope_scaling(fields) -> None:
    kind = scalar(fields, "llama.rope.scaling.type", "str", required=False)
    factor = scalar(fields, "llama.rope.scaling.factor", "float", required=False)
    if (kind not in (None, "none")) or (factor not in (None, 0.0, 1.0)):
        raise UnsupportedModelError(
            f"GGUF metadata asks for scaled RoPE (llama.rope.scaling.type={kind!r}, factor={factor!r}); "
            "import_gguf supports plain RoPE only"
        )


def damaged_key_of(key: str) -> Optional[str]:
    """The ``llama.*`` key that ``key`` is one or two flipped characters away from, if any: a
    damaged ``llama.rope.freq_base`` (``lhama.rope.freq_base``) would otherwise read as absent and
    its default would apply without a word."""
    for known in LLAMA_KEYS:
        if len(known) == len(key) and key != known and sum(a != b for a, b in zip(key, known)) <= 2:
            return known
    return None


def check_known_keys(fields) -> None:
    """Every ``llama.*`` key is one lowbit interprets (see the module docstring), and no other
    key is a damaged copy of one."""
    for key in sorted(fields):
        if key in LLAMA_KEYS:
            continue
        near = damaged_key_of(key)
        if near is not None:
            raise CheckpointError(
                f"GGUF metadata key {key!r} looks like a damaged {near!r} (same length, at most two characters "
                f"differ); read as absent it would silently change the model; {_FIX}"
            )
    unknown = sorted(k for k in fields if k.startswith("llama.") and k not in LLAMA_KEYS)
    if unknown:
        raise UnsupportedModelError(
            f"GGUF metadata key {unknown[0]!r} ({len(unknown)} unknown llama.* keys in all) is not one lowbit "
            "interprets; it may change the model, so import_gguf refuses the file (if the key is corrupt, "
            "re-download the file; the keys lowbit knows are listed in lowbit.io.gguf.hparams.LLAMA_KEYS)"
        )


def check_no_experts(fields) -> None:
    for key in ("llama.expert_count", "llama.expert_used_count"):
        n = int_in_range(fields, key, 0, MAX_HEADS, required=False)
        if n:
            raise UnsupportedModelError(
                f"GGUF metadata {key} is {n}: a mixture-of-experts model, which import_gguf does not support"
            )


def token_id(fields, key: str, vocab: int) -> Optional[int]:
    return int_in_range(fields, key, 0, vocab - 1, required=False)


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------
def llama_hparams(fields: Mapping[str, Any], tensor_dims: Mapping[str, tuple]) -> LlamaHParams:
    """Checked hyperparameters from gguf-py ``ReaderField``s and the tensors' GGUF dims (``ne`` order)."""
    arch = scalar(fields, "general.architecture", "str")
    if arch != "llama":
        raise UnsupportedModelError(f"GGUF architecture {arch!r}: import_gguf reads 'llama' files only")
    check_known_keys(fields)
    n_layers = int_in_range(fields, "llama.block_count", 1, MAX_BLOCKS)
    check_block_count(n_layers, tensor_dims)
    hidden = int_in_range(fields, "llama.embedding_length", 1, MAX_HIDDEN)
    n_head = int_in_range(fields, "llama.attention.head_count", 1, MAX_HEADS)
    check_rope_scaling(fields)
    check_no_experts(fields)
    vocab = vocab_of(fields, tensor_dims)
    return LlamaHParams(
        n_layers=n_layers,
        hidden=hidden,
        ffn=int_in_range(fields, "llama.feed_forward_length", 1, MAX_FFN),
        n_head=n_head,
        n_head_kv=heads_kv_of(fields, n_head),
        head_dim=head_dim_of(fields, hidden, n_head),
        context=int_in_range(fields, "llama.context_length", 1, MAX_CONTEXT),
        vocab=vocab,
        rope_base=float_in_range(fields, "llama.rope.freq_base", 1.0, MAX_ROPE_BASE, True, required=False)
        or DEFAULT_ROPE_BASE,
        rms_eps=float_in_range(fields, "llama.attention.layer_norm_rms_epsilon", 0.0, 1.0, False),
        tied="output.weight" not in tensor_dims,
        bos=token_id(fields, "tokenizer.ggml.bos_token_id", vocab),
        eos=token_id(fields, "tokenizer.ggml.eos_token_id", vocab),
    )
