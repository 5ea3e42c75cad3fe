"""Tensor names and row order of a llama model in GGUF vs. Hugging Face transformers.

GGUF llama tensors (``[out, in]`` in torch order; GGUF stores ``ne = [in, out]``)::

    token_embd.weight                 [vocab, hidden]      model.embed_tokens.weight
    output_norm.weight                [hidden]             model.norm.weight
    output.weight                     [vocab, hidden]      lm_head.weight (absent when tied)
    blk.{i}.attn_norm.weight          [hidden]             model.layers.{i}.input_layernorm.weight
    blk.{i}.attn_q.weight             [heads*hd, hidden]   model.layers.{i}.self_attn.q_proj.weight (rows permuted)
    blk.{i}.attn_k.weight             [kv*hd, hidden]      model.layers.{i}.self_attn.k_proj.weight (rows permuted)
    blk.{i}.attn_v.weight             [kv*hd, hidden]      model.layers.{i}.self_attn.v_proj.weight
    blk.{i}.attn_output.weight        [hidden, heads*hd]   model.layers.{i}.self_attn.o_proj.weight
    blk.{i}.ffn_norm.weight           [hidden]             model.layers.{i}.post_attention_layernorm.weight
    blk.{i}.ffn_gate.weight           [ffn, hidden]        model.layers.{i}.mlp.gate_proj.weight
    blk.{i}.ffn_up.weight             [ffn, hidden]        model.layers.{i}.mlp.up_proj.weight
    blk.{i}.ffn_down.weight           [hidden, ffn]        model.layers.{i}.mlp.down_proj.weight

Row permutation of q/k: llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``)
turns HF's rotate-half RoPE layout into GGML's interleaved-pair layout, per head,
``w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape(out, in)`` (``n_head`` = kv
heads for k); transformers' GGUF loader (``modeling_gguf_pytorch_utils.py``,
``LlamaTensorProcessor._reverse_permute_weights``) undoes it with
``reshape(n_head, hd/2, 2, in).swapaxes(2, 1)``. Only whole rows move, so
the quantization blocks (which run along a row) move with them unchanged.
"""

from __future__ import annotations

import torch

LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
NORMS = ("attn_norm", "ffn_norm")


def gguf_to_hf(n_layers: int, tied: bool) -> dict[str, str]:
    """GGUF tensor name -> HF module path (the module owning ``.weight``), in file order."""
    out = {"token_embd.weight": "model.embed_tokens"}
    for i in range(n_layers):
        for g, h in LAYER_MAP.items():
            out[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}"
    out["output_norm.weight"] = "model.norm"
    if not tied:
        out["output.weight"] = "lm_head"
    return out


def row_permutation(out_features: int, n_head: int) -> torch.Tensor:
    """Index ``p`` with ``gguf_rows = hf_rows[p]`` (convert_hf_to_gguf's permute, as a gather)."""
    hd2 = out_features // n_head // 2
    idx = torch.arange(out_features).reshape(n_head, 2, hd2).transpose(1, 2).reshape(-1)
    return idx


def inverse_row_permutation(out_features: int, n_head: int) -> torch.Tensor:
    """Index ``q`` with ``hf_rows = gguf_rows[q]``."""
    return torch.argsort(row_permutation(out_features, n_head))


def permute_heads(name: str, n_head: int, n_head_kv: int) -> int | None:
    """Number of heads to permute a GGUF tensor's rows over, or None (no permutation)."""
    if name.endswith("attn_q.weight"):
        return n_head
    if name.endswith("attn_k.weight"):
        return n_head_kv
    return None
