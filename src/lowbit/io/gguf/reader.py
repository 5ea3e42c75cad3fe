"""Import a llama GGUF file as a transformers ``LlamaForCausalLM`` (optionally with lowbit layers).

``import_gguf(path, as_is=False)``:

* validates the file before gguf-py builds anything and before any tensor is
  decoded: the structure (``validate.scan_gguf``: counts and lengths bounded by
  the file size, known value and tensor types, dims, tensor data back to back,
  aligned, inside the file, no trailing data), the ``llama.*`` metadata
  (``hparams``: types, ranges, block count equal to the blk.N tensors present),
  every tensor's shape against the metadata, and no tensor missing or
  unexpected; then, per tensor, that its fp16 block scales and its decoded
  weights are finite. Every failure is a typed ``lowbit.errors`` exception
  (``CheckpointError`` and subclasses, ``UnsupportedModelError``,
  ``ModelSourceError``) naming the key or tensor;
* decodes F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q6_K with ``blocks`` and
  undoes llama.cpp's q/k row permutation (see ``names``);
* ``as_is=True``: linear weights stored as Q4_0 / Q8_0 become ``QuantLinear``
  layers with the very same codes and scales (w4 g32 symmetric / w8 g32
  symmetric, fp16 scales), and Q4_1 ones too when every block's ``-m/d`` is an
  integer zero point in 0..15 (w4 g32 affine, fp16 scales); any other tensor is
  dequantized to float32 (``dtype``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as T

from lowbit.errors import CheckpointError, LowbitError, ModelSourceError, TensorMismatchError, UnsupportedModelError
from lowbit.io.gguf import blocks, validate
from lowbit.io.gguf.blocks import F32
from lowbit.io.gguf.hparams import llama_hparams
from lowbit.io.gguf.names import gguf_to_hf, inverse_row_permutation, permute_heads

PathLike = Union[str, os.PathLike]


class _CheckedReader(GGUFReader):
    """gguf-py's reader, run only on a file whose structure ``validate.scan_gguf`` has checked
    (gguf-py trusts every count and offset it reads). ``layout`` is what the scan found."""

    def __init__(self, path: PathLike, supported=None):
        self.layout = validate.scan_gguf(path, supported)
        super().__init__(str(path))


def read_gguf(path: PathLike, *, any_type: bool = False) -> GGUFReader:
    """Open a GGUF file after checking its structure (see ``validate``); typed errors only.
    ``any_type``: accept every GGML type gguf-py knows (for reading metadata only), not just
    the ones lowbit decodes."""
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"GGUF file {path} does not exist")
    try:
        return _CheckedReader(path, tuple(GGML_QUANT_SIZES) if any_type else None)
    except LowbitError:
        raise
    except OSError as exc:
        raise ModelSourceError(f"GGUF file {path} cannot be read ({exc}); check the path and its permissions") from exc
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        # not expected after scan_gguf: a check it lacks
        raise CheckpointError(
            f"{path}: gguf-py could not parse a file that lowbit's checks passed ({type(exc).__name__}: {exc}); "
            "the file is malformed: re-download or re-export it (and please report it to lowbit)"
        ) from exc


def llama_config(reader: GGUFReader):
    """A transformers ``LlamaConfig`` from the ``llama.*`` metadata (checked by ``hparams``)."""
    from transformers import LlamaConfig

    hp = llama_hparams(reader.fields, {t.name: tuple(int(d) for d in t.shape.tolist()) for t in reader.tensors})
    kw = {k: v for k, v in (("bos_token_id", hp.bos), ("eos_token_id", hp.eos)) if v is not None}
    return LlamaConfig(
        vocab_size=hp.vocab,
        hidden_size=hp.hidden,
        intermediate_size=hp.ffn,
        num_hidden_layers=hp.n_layers,
        num_attention_heads=hp.n_head,
        num_key_value_heads=hp.n_head_kv,
        head_dim=hp.head_dim,
        max_position_embeddings=hp.context,
        rms_norm_eps=hp.rms_eps,
        rope_theta=hp.rope_base,
        tie_word_embeddings=hp.tied,
        **kw,
    )


def _expected_shape(gname: str, config) -> tuple[int, ...]:
    h, hd = config.hidden_size, config.head_dim
    if gname in ("token_embd.weight", "output.weight"):
        return (config.vocab_size, h)
    if gname == "output_norm.weight":
        return (h,)
    part = gname.split(".")[2]
    return {
        "attn_norm": (h,),
        "ffn_norm": (h,),
        "attn_q": (config.num_attention_heads * hd, h),
        "attn_k": (config.num_key_value_heads * hd, h),
        "attn_v": (config.num_key_value_heads * hd, h),
        "attn_output": (h, config.num_attention_heads * hd),
        "ffn_gate": (config.intermediate_size, h),
        "ffn_up": (config.intermediate_size, h),
        "ffn_down": (h, config.intermediate_size),
    }[part]


def _as_quant_linear(gtype: T, raw: np.ndarray, shape: tuple[int, int]):
    """A ``QuantLinear`` holding the tensor's own codes, or None when lowbit cannot express it exactly."""
    from lowbit import formats
    from lowbit.nn import QuantLinear
    from lowbit.scheme import QuantScheme
    from lowbit.tensor import QuantizedTensor

    n, k = shape
    b = raw.reshape(-1, GGML_QUANT_SIZES[gtype][1])
    zero = None
    if gtype == T.Q4_0:
        d, q = blocks.unpack_q4_0(b)
        scheme = QuantScheme(bits=4, symmetric=True, group_size=32, scale_dtype="float16")
    elif gtype == T.Q8_0:
        d, q8 = blocks.unpack_q8_0(b)
        q = (q8.astype(np.int16) + 128).astype(np.uint8)
        scheme = QuantScheme(bits=8, symmetric=True, group_size=32, scale_dtype="float16")
    elif gtype == T.Q4_1:
        d, m, q = blocks.unpack_q4_1(b)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(d != 0, -m / d, 0)
        zi = np.rint(z)
        if not (np.all(zi == z) and np.all((zi >= 0) & (zi <= 15)) and np.all((d != 0) | (m == 0))):
            return None
        zero = torch.from_numpy(zi.astype(np.uint8).reshape(n, k // 32))
        scheme = QuantScheme(bits=4, symmetric=False, group_size=32, scale_dtype="float16")
    else:
        return None
    scale = torch.from_numpy(d.astype(np.float16).reshape(n, k // 32))
    codes = torch.from_numpy(np.ascontiguousarray(q).reshape(n, k))
    qt = QuantizedTensor.from_codes(codes, formats.QParams(scale, zero), scheme)
    return QuantLinear.from_quantized(qt)


def import_gguf(path: PathLike, *, as_is: bool = False, dtype: torch.dtype = torch.float32):
    """Load a llama GGUF file as an eval-mode ``LlamaForCausalLM`` (see the module docstring)."""
    from transformers import LlamaForCausalLM

    from lowbit.model.swap import set_submodule

    path = Path(path)
    reader = read_gguf(path)
    config = llama_config(reader)
    tensors = {t.name: t for t in reader.tensors}
    plan = gguf_to_hf(config.num_hidden_layers, config.tie_word_embeddings)
    missing = [n for n in plan if n not in tensors]
    extra = [n for n in tensors if n not in plan]
    if missing:
        raise TensorMismatchError(f"{path.name}: tensors missing for a {config.num_hidden_layers}-layer llama: {missing[:8]}")
    if extra:
        raise UnsupportedModelError(f"{path.name}: tensors import_gguf does not know how to place: {extra[:8]}")
    for gname in plan:
        t = tensors[gname]
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        want = _expected_shape(gname, config)
        if shape != want:
            raise TensorMismatchError(
                f"tensor {gname!r} has shape {shape} but the metadata implies {want}; the file's "
                "hyperparameters and tensors disagree"
            )

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state: dict[str, torch.Tensor] = {}
    for gname, hname in plan.items():
        t = tensors[gname]
        shape = _expected_shape(gname, config)
        heads = permute_heads(gname, config.num_attention_heads, config.num_key_value_heads)
        inv = inverse_row_permutation(shape[0], heads) if heads else None
        raw = np.asarray(t.data)
        if len(shape) == 2:
            raw = raw.reshape(shape[0], -1)
        raw_u8 = raw.view(np.uint8) if raw.dtype != np.uint8 else raw
        validate.check_block_scales(gname, t.tensor_type, raw_u8)
        if as_is and len(shape) == 2 and hname != "model.embed_tokens":
            ql = _as_quant_linear(t.tensor_type, raw_u8, shape)
            if ql is not None:
                if inv is not None:
                    idx = inv.numpy()
                    qt = ql.quantized_tensor()
                    ql.qweight = qt.packed[idx].contiguous()
                    ql.scale = ql.scale[idx].contiguous()
                    if ql.zero is not None:
                        ql.zero = ql.zero[idx].contiguous()
                set_submodule(model, hname, ql)
                continue
        if t.tensor_type in (T.F32, T.F16) and raw.dtype != np.uint8:
            w = raw.astype(F32).reshape(shape)
        else:
            w = blocks.decode(raw_u8.reshape(shape[0] if len(shape) == 2 else 1, -1), t.tensor_type,
                              shape[-1]).reshape(shape)
        validate.check_finite_weights(gname, t.tensor_type, w)
        wt = torch.from_numpy(np.ascontiguousarray(w))
        if inv is not None:
            wt = wt[inv]
        state[f"{hname}.weight"] = wt.to(dtype)
    # meta-built modules (embeddings, norms, plain linears) get their tensors by assignment
    missing_keys, unexpected = model.load_state_dict(state, strict=False, assign=True)
    left = [k for k in missing_keys if not _owned_by_quant(model, k) and not k.startswith("lm_head.")]
    if unexpected or left:
        raise TensorMismatchError(f"internal: state dict mismatch, missing {left[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    _materialize_buffers(model, config)
    model.eval()
    model.config.lowbit_source = f"GGUF file {path.name} (imported by lowbit.io.gguf, as_is={as_is})"
    return model


def _owned_by_quant(model, key: str) -> bool:
    from lowbit.nn import QuantLinear

    mod_name = key.rsplit(".", 1)[0]
    try:
        return isinstance(model.get_submodule(mod_name), QuantLinear)
    except AttributeError:
        return False


def _materialize_buffers(model, config) -> None:
    """Rotary tables were built on meta: rebuild the rotary module on CPU."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise TensorMismatchError(f"internal: buffer {name!r} is still on the meta device after import")
