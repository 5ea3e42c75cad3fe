"""Tiny randomly initialised models for tests (built from configs: no downloads)."""

from __future__ import annotations

import torch
import transformers

LLAMA_BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LLAMA_LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in LLAMA_BLOCK_LINEARS]
GPT2_LINEARS = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
# modules with weights that are not linear layers: kept in full precision, listed as skipped
LLAMA_NORMS = [f"model.layers.{i}.{p}" for i in range(2) for p in ("input_layernorm", "post_attention_layernorm")] + ["model.norm"]
GPT2_NORMS = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("ln_1", "ln_2")] + ["transformer.ln_f"]


def llama_config(intermediate_size: int = 256, tie: bool = True) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def tiny_llama(seed: int = 0, intermediate_size: int = 256, tie: bool = True) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(intermediate_size, tie)).eval()


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg).eval()


def random_ids(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def save_load_generate(model, path, new_tokens: int) -> dict:
    """Save a quantized ``model`` to ``path``, load it back and check it: the same logits as the
    model it came from on a random prompt, and greedy generation of ``new_tokens`` tokens.
    Returns the manifest, for the caller's own checks."""
    import lowbit

    lowbit.save(model, path)
    manifest = lowbit.read_manifest(path)
    loaded = lowbit.load(path)
    ids = random_ids(1, 8, seed=3)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        out = loaded.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    assert out.shape == (1, 8 + new_tokens)
    return manifest
