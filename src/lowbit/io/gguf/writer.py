"""Export a llama-architecture model (float or lowbit-quantized) to a GGUF file llama.cpp runs.

``export_gguf(model, path, qtype="Q4_K_M", source_gguf=None)``:

* tensor types follow llama.cpp's rule for the ftype ``qtype`` (see ``mix``);
* **lossless path**: a ``QuantLinear`` whose codes and scales are exactly a GGML
  block type keeps its codes (no re-rounding), and that type wins over the
  mix's choice (re-encoding already-rounded weights can only lose). Exact fits:

  - symmetric 4-bit, group 32, fp16-representable scales -> Q4_0
    (lowbit ``w = (q - 8) * s`` is Q4_0's ``d * (q - 8)`` with ``d = s``);
  - symmetric 8-bit, group 32, fp16-representable scales -> Q8_0
    (int8 ``q - 128``, ``d = s``);
  - affine 4-bit with integer zero points, group 32, fp16-representable ``s``
    and ``m = -z * s`` -> Q4_1 (``d*q + m == (q - z)*s`` exactly: every product
    of a 4-bit integer and an fp16 value is exact in float32).

  Everything else is dequantized to float32 and encoded by ``blocks``;
* q/k rows are permuted as llama.cpp's HF converter does (see ``names``);
* metadata: ``general.architecture = llama`` and the ``llama.*`` hyperparameters
  from the model config; the tokenizer KV (``tokenizer.*``) is copied from
  ``source_gguf`` when given (the model came from that file), else built from
  the HF ``tokenizer`` (GPT-2 style BPE only).

The file is written to a temporary file in the target directory, fsynced, and
renamed over ``path``: an interrupted export leaves no half-written GGUF.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType, GGUFWriter
from torch import nn

from lowbit.errors import CheckpointError, FormatError, UnsupportedModelError
from lowbit.io.gguf import blocks, mix
from lowbit.io.gguf.blocks import F32
from lowbit.io.atomic import write_atomically
from lowbit.io.gguf.names import NORMS, gguf_to_hf, permute_heads, row_permutation
from lowbit.io.gguf.reader import read_gguf
from lowbit.scheme import Granularity

PathLike = Union[str, os.PathLike]


@dataclass
class ExportReport:
    """What ``export_gguf`` wrote: per tensor its GGML type and how it got there."""

    path: Path
    qtype: str
    tensors: dict[str, str] = field(default_factory=dict)  # name -> GGML type name
    lossless: list[str] = field(default_factory=list)  # tensors whose lowbit codes were copied
    reasons: dict[str, str] = field(default_factory=dict)
    n_bytes: int = 0

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t] = out.get(t, 0) + 1
        return out


# ---------------------------------------------------------------------------
# lossless: lowbit codes -> GGML blocks
# ---------------------------------------------------------------------------
def _fp16_exact(t: torch.Tensor) -> bool:
    t = t.float()
    return bool(torch.isfinite(t).all()) and bool((t.half().float() == t).all())


def lossless_blocks(qt) -> Optional[tuple[T, np.ndarray]]:
    """``(type, uint8 [out, row_bytes])`` when a ``QuantizedTensor``'s codes are exactly a GGML
    block type (see the module docstring), else None. Rows in lowbit (HF) order."""
    s = qt.scheme
    if s.granularity is not Granularity.GROUP or s.group_size != 32 or s.activations is not None:
        return None
    n, k = qt.shape
    scale = qt.scale.float()
    if not _fp16_exact(scale):
        return None
    codes = qt.codes().reshape(n * k // 32, 32).numpy()
    d = scale.reshape(-1).numpy().astype(F32)
    if s.symmetric and s.bits == 4:
        return T.Q4_0, blocks.pack_q4_0(d, codes).reshape(n, -1)
    if s.symmetric and s.bits == 8:
        q = (codes.astype(np.int16) - 128).astype(np.int8)
        return T.Q8_0, blocks.pack_q8_0(d, q).reshape(n, -1)
    if not s.symmetric and s.bits == 4 and s.zero_point == "int":
        m = -(qt.zero.float() * scale)
        if not _fp16_exact(m):
            return None
        return T.Q4_1, blocks.pack_q4_1(d, m.reshape(-1).numpy().astype(F32), codes).reshape(n, -1)
    return None


# ---------------------------------------------------------------------------
# model -> tensors
# ---------------------------------------------------------------------------
def _llama_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        raise UnsupportedModelError(
            f"export_gguf writes llama-architecture models; got model_type="
            f"{getattr(config, 'model_type', None)!r} ({type(model).__name__}); "
            "export a LlamaForCausalLM (SmolLM2, Llama 1/2, TinyLlama...)"
        )
    if getattr(config, "rope_scaling", None):
        raise UnsupportedModelError(
            f"rope_scaling={config.rope_scaling!r} is not exported yet; only plain RoPE llama models are supported"
        )
    for attr in ("attention_bias", "mlp_bias"):
        if getattr(config, attr, False):
            raise UnsupportedModelError(f"config.{attr}=True is not supported by the GGUF exporter")
    return config


def _is_tied(model: nn.Module) -> bool:
    from lowbit.nn import QuantLinear

    head = model.get_submodule("lm_head")
    emb = model.get_submodule("model.embed_tokens")
    return (not isinstance(head, QuantLinear)) and head.weight is emb.weight


def _weight(module: nn.Module) -> tuple[Optional[Any], torch.Tensor]:
    """``(QuantizedTensor or None, float32 weight [out, in])`` of a module owning ``.weight``."""
    from lowbit.nn import QuantLinear

    if isinstance(module, QuantLinear):
        if module.bias is not None:
            raise UnsupportedModelError("QuantLinear with bias: llama GGUF tensors have no linear biases")
        return module.quantized_tensor(), module.dequantize_weight(torch.float32)
    if getattr(module, "bias", None) is not None:
        raise UnsupportedModelError(f"{type(module).__name__} with bias: llama GGUF tensors have no linear biases")
    return None, module.weight.detach().to(torch.float32)


# ---------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------
def _copy_tokenizer_kv(writer: GGUFWriter, source: PathLike) -> Optional[str]:
    """Copy every ``tokenizer.*`` key of ``source``; returns its ``general.name`` (or None)."""
    reader = read_gguf(source, any_type=True)
    n = 0
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        main = f.types[0]
        sub = f.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(name, _contents(f, source), main, sub_type=sub)
        n += 1
    if n == 0:
        raise FormatError(f"source_gguf {source} has no tokenizer.* metadata to copy; pass tokenizer= instead")
    general = reader.fields.get("general.name")
    return _contents(general, source) if general is not None else None


def _contents(field, source: PathLike):
    try:
        return field.contents()
    except UnicodeDecodeError as exc:
        raise CheckpointError(
            f"source_gguf {source}: metadata key {field.name!r} holds a string that is not valid UTF-8 ({exc}); "
            "the file is corrupt: re-download it"
        ) from None


def _hf_tokenizer_kv(writer: GGUFWriter, tokenizer) -> None:
    """GPT-2 style byte-level BPE tokenizer from a fast HF tokenizer (tokens, types, merges, ids, template)."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError("building GGUF tokenizer metadata needs a fast (Rust) HF tokenizer; pass source_gguf=")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedModelError(
            f"tokenizer model {model.get('type')!r}: only byte-level BPE is exported; pass source_gguf= to copy one"
        )
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(tokenizer.all_special_ids)
    added = {t.content: t.special for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    types = []
    for i, tok in enumerate(tokens):
        if tok.startswith("[PAD") and tok not in vocab:
            types.append(5)  # UNUSED
        elif i in special or added.get(tok):
            types.append(3)  # CONTROL
        elif tok in added:
            types.append(4)  # USER_DEFINED
        else:
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(int(tid))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def _add_hparams(writer: GGUFWriter, config, name: str, file_type: int) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads or config.num_attention_heads))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(2)


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------
def export_gguf(
    model: nn.Module,
    path: PathLike,
    qtype: str = "Q4_K_M",
    *,
    tokenizer=None,
    source_gguf: Optional[PathLike] = None,
    keep_lowbit_codes: bool = True,
    name: Optional[str] = None,
) -> ExportReport:
    """Write ``model`` (a llama ``*ForCausalLM``, float or lowbit-quantized) as a GGUF file.

    ``qtype``: the whole-file type, one of ``mix.FTYPES`` (``"Q4_K_M"``, ``"Q8_0"``,
    ``"Q4_0"``, ``"Q4_1"``, ``"Q5_0"``, ``"Q5_1"``, ``"Q6_K"``, ``"F16"``, ``"BF16"``,
    ``"F32"``); per-tensor types follow llama.cpp's rule (``mix.plan_tensor``).
    ``source_gguf``: copy the tokenizer metadata from this GGUF (the file the model
    was loaded from); else ``tokenizer`` (a fast HF tokenizer) is converted.
    ``keep_lowbit_codes``: store lowbit layers whose codes fit Q4_0/Q8_0/Q4_1 exactly
    in that type, without re-rounding (see the module docstring).
    Returns an ``ExportReport``. The write is atomic.
    """
    config = _llama_config(model)
    _, file_type = mix.check_ftype(qtype)
    if source_gguf is None and tokenizer is None:
        raise FormatError(
            "export_gguf needs tokenizer metadata: pass source_gguf= (the GGUF the model came from, "
            "e.g. lowbit.model.loading.default_model_path()) or tokenizer= (a fast HF tokenizer)"
        )
    path = Path(path)
    n_layers = int(config.num_hidden_layers)
    n_head = int(config.num_attention_heads)
    n_head_kv = int(config.num_key_value_heads or n_head)
    tied = _is_tied(model)
    report = ExportReport(path=path, qtype=qtype)

    writer = GGUFWriter(path=None, arch="llama")
    if source_gguf is not None:
        source_name = _copy_tokenizer_kv(writer, source_gguf)
    else:
        source_name = None
        _hf_tokenizer_kv(writer, tokenizer)
    name = name or source_name or getattr(config, "_name_or_path", "") or "lowbit-export"
    _add_hparams(writer, config, f"{name} (lowbit {qtype})", file_type)

    for gname, hname in gguf_to_hf(n_layers, tied).items():
        module = model.get_submodule(hname)
        if gname.split(".")[-2] in NORMS or gname == "output_norm.weight":
            data = module.weight.detach().to(torch.float32).contiguous().numpy()
            writer.add_tensor(gname, data)
            report.tensors[gname] = "F32"
            report.reasons[gname] = "1-D tensors stay F32"
            continue
        qt, w = _weight(module)
        heads = permute_heads(gname, n_head, n_head_kv)
        perm = row_permutation(w.shape[0], heads) if heads else None
        exact = lossless_blocks(qt) if (qt is not None and keep_lowbit_codes) else None
        if exact is not None:
            gtype, data = exact
            if perm is not None:
                data = data[perm.numpy()]
            report.lossless.append(gname)
            report.reasons[gname] = f"lowbit {qt.scheme.short_name} codes copied as {gtype.name}"
        else:
            plan = mix.plan_tensor(gname, tuple(w.shape), qtype, n_layers, tied)
            gtype = plan.qtype
            if perm is not None:
                w = w[perm]
            data = blocks.encode(w.contiguous().numpy(), gtype)
            report.reasons[gname] = plan.reason
        writer.add_tensor(gname, np.ascontiguousarray(data), raw_dtype=gtype)
        report.tensors[gname] = gtype.name

    _write_atomic(writer, path)
    report.n_bytes = path.stat().st_size
    return report


def _write_atomic(writer: GGUFWriter, path: Path) -> None:
    def write(tmp: Path) -> None:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    write_atomically(path, write)
