"""GGUF export (lowbit.io.gguf.writer), import (reader) and the llama.cpp mix rule (mix).

Invariants, each through a real file:

* lossless path: a lowbit layer whose codes fit Q4_0 / Q8_0 / Q4_1 is written
  as those blocks, and gguf-py dequantizes them (after undoing the q/k row
  permutation) to exactly ``QuantLinear.dequantize_weight()``;
* ``import_gguf(export_gguf(m))`` gives ``decode(encode(W))`` for every weight,
  and ``as_is=True`` gives back the very same codes and scales;
* transformers' own GGUF loader reads our files to the same weights (an
  independent check of names, metadata and the q/k permutation);
* bad files raise typed errors that name the tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, quants

import lowbit
from lowbit import Recipe, formats
from lowbit.errors import CheckpointError, TensorMismatchError, TruncatedCheckpointError
from lowbit.io.gguf import blocks, export_gguf, import_gguf, mix
from lowbit.io.gguf.names import gguf_to_hf, inverse_row_permutation, permute_heads
from lowbit.model.swap import set_submodule
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor

from gguf_helpers import rewrite_gguf, write_tokenizer_gguf
from tiny_models import LLAMA_LINEARS, random_ids, tiny_llama


@pytest.fixture(scope="module")
def tok_gguf(tmp_path_factory) -> Path:
    return write_tokenizer_gguf(tmp_path_factory.mktemp("tok") / "tok.gguf")


def _gguf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every 2-D tensor of a GGUF, dequantized by gguf-py and mapped back to HF names and row order."""
    r = GGUFReader(str(path))
    cfg = {f: r.fields[f].contents() for f in ("llama.attention.head_count", "llama.attention.head_count_kv")}
    out = {}
    names = gguf_to_hf(int(r.fields["llama.block_count"].contents()), "output.weight" not in {t.name for t in r.tensors})
    for t in r.tensors:
        if len(t.shape) != 2:
            continue
        w = torch.from_numpy(np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        heads = permute_heads(t.name, int(cfg["llama.attention.head_count"]), int(cfg["llama.attention.head_count_kv"]))
        if heads:
            w = w[inverse_row_permutation(w.shape[0], heads)]
        out[names[t.name]] = w
    return out


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


# ----------------------------------------------------------------------------- lossless export
@pytest.mark.parametrize(
    "scheme,qtype,gtype",
    [
        (QuantScheme(bits=4, group_size=32, scale_dtype="float16"), "Q4_0", "Q4_0"),
        (QuantScheme(bits=8, group_size=32, scale_dtype="float16"), "Q8_0", "Q8_0"),
        # the exact type wins over the mix (which would pick Q4_K, falling back to Q5_0 on rows of 128)
        (QuantScheme(bits=4, group_size=32, scale_dtype="float16"), "Q4_K_M", "Q4_0"),
    ],
    ids=["w4g32-Q4_0", "w8g32-Q8_0", "w4g32-under-Q4_K_M"],
)
def test_lossless_export_dequantizes_to_lowbit_weights(tmp_path, tok_gguf, scheme, qtype, gtype):
    model = tiny_llama(0)
    lowbit.quantize(model, Recipe.uniform(scheme), progress=False)
    path = tmp_path / "m.gguf"
    report = export_gguf(model, path, qtype, source_gguf=tok_gguf)
    assert sorted(report.lossless) == sorted(
        n for n, h in gguf_to_hf(2, True).items() if h in LLAMA_LINEARS
    ), "every quantized linear should take the lossless path"
    weights = _gguf_weights(path)
    types = _types(path)
    for name in LLAMA_LINEARS:
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        assert torch.equal(weights[name], layer.dequantize_weight()), name
    assert {types[n] for n in report.lossless} == {gtype}


def test_lossless_q4_1_when_min_is_fp16_exact(tmp_path, tok_gguf):
    """Affine w4 g32 with integer zeros: Q4_1 blocks when m = -z*s is fp16-exact, else re-encoded."""
    model = tiny_llama(0)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False, scale_dtype="float16")
    g = torch.Generator().manual_seed(0)
    for name in LLAMA_LINEARS:
        lin = model.get_submodule(name)
        n, k = lin.weight.shape
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        # scales with 6 significant bits: z*s (z < 16) stays exact in fp16
        scale = (torch.randint(32, 64, (n, k // 32), generator=g).float() * 2.0**-10).half()
        zero = torch.randint(0, 16, (n, k // 32), generator=g, dtype=torch.uint8)
        qt = QuantizedTensor.from_codes(codes, formats.QParams(scale, zero), scheme)
        set_submodule(model, name, QuantLinear.from_quantized(qt))
    # one layer with a scale that makes -z*s inexact in fp16 -> must not be copied
    odd = model.get_submodule(LLAMA_LINEARS[0])
    odd.scale[0, 0] = torch.tensor(2047 * 2.0**-14, dtype=torch.float16)  # 11 significant bits: 13*s needs 15
    odd.zero[0, 0] = 13
    path = tmp_path / "m.gguf"
    report = export_gguf(model, path, "Q4_1", source_gguf=tok_gguf)
    first = "blk.0.attn_q.weight"
    assert first not in report.lossless and len(report.lossless) == len(LLAMA_LINEARS) - 1
    weights = _gguf_weights(path)
    for name in LLAMA_LINEARS[1:]:
        assert torch.equal(weights[name], model.get_submodule(name).dequantize_weight()), name
    assert _types(path)["blk.1.ffn_down.weight"] == "Q4_1"
    # and back: Q4_1 blocks whose -m/d are integers 0..15 import as affine w4 g32 layers, codes unchanged
    back = import_gguf(path, as_is=True)
    for name in LLAMA_LINEARS[1:]:
        a, b = model.get_submodule(name), back.get_submodule(name)
        assert isinstance(b, QuantLinear) and b.scheme == a.scheme, name
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    assert not isinstance(back.get_submodule(LLAMA_LINEARS[0]), QuantLinear)  # re-encoded: not integer zeros


# ----------------------------------------------------------------------------- round trips
def test_float_export_import_round_trip_and_transformers_agrees(tmp_path, tok_gguf):
    model = tiny_llama(0)
    path = tmp_path / "m.gguf"
    report = export_gguf(model, path, "Q8_0", source_gguf=tok_gguf)
    assert set(report.type_counts()) == {"Q8_0", "F32"}
    back = import_gguf(path)
    for name, p in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        got = back.state_dict()[name]
        if p.dim() == 2:
            want = torch.from_numpy(blocks.decode(blocks.encode(p.numpy(), T.Q8_0), T.Q8_0, p.shape[1]))
            assert torch.equal(got, want), name
        else:
            assert torch.equal(got, p), name
    ids = random_ids()
    with torch.no_grad():
        ref, ours = model(ids).logits, back(ids).logits
    assert (ref - ours).abs().max() < 0.05
    # transformers' own GGUF loader (independent permutation + metadata code) reads the same model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ftype,dtype", [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_float_types_round_trip(tmp_path, tok_gguf, ftype, dtype):
    model = tiny_llama(0)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, ftype, source_gguf=tok_gguf)
    assert set(_types(path).values()) == {ftype, "F32"}  # norms stay F32
    back = import_gguf(path)
    for name, p in model.state_dict().items():
        if p.dim() == 2:
            assert torch.equal(back.state_dict()[name], p.to(dtype).float()), name


def test_as_is_import_keeps_codes(tmp_path, tok_gguf):
    model = tiny_llama(1)
    lowbit.quantize(model, Recipe.uniform(QuantScheme(bits=4, group_size=32, scale_dtype="float16")), progress=False)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, "Q4_0", source_gguf=tok_gguf)
    back = import_gguf(path, as_is=True)
    for name in LLAMA_LINEARS:
        a, b = model.get_submodule(name), back.get_submodule(name)
        assert isinstance(b, QuantLinear) and b.scheme == a.scheme
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale), name
    # the tied embedding is not a lowbit layer: llama.cpp's rule stores it as Q8_0 (row 128 % 256 != 0)
    emb = model.model.embed_tokens.weight.detach().numpy()
    want = torch.from_numpy(blocks.decode(blocks.encode(emb, T.Q8_0), T.Q8_0, emb.shape[1]))
    assert torch.equal(back.model.embed_tokens.weight, want)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    ids = random_ids()
    with torch.no_grad():
        assert (model(ids).logits - back(ids).logits).abs().max() < 0.02


def test_k_quant_mix_on_tiny_model(tmp_path, tok_gguf):
    """ffn_down (row 256) gets Q4_K / Q6_K by layer; 128-wide rows fall back (Q4_K -> Q5_0, Q6_K -> Q8_0)."""
    model = tiny_llama(0)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, "Q4_K_M", source_gguf=tok_gguf)
    types = _types(path)
    # n=2 layers: use_more_bits(0, 2) is False, use_more_bits(1, 2) is True (i >= 7n/8 = 1)
    assert types["blk.0.ffn_down.weight"] == "Q4_K" and types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K, 128 % 256 != 0 -> Q5_0
    assert types["blk.0.attn_v.weight"] == "Q5_0" and types["blk.1.attn_v.weight"] == "Q8_0"  # Q6_K -> Q8_0
    assert types["token_embd.weight"] == "Q8_0"  # tied output, 128 % 256 != 0
    back = import_gguf(path)
    for i, t in ((0, T.Q4_K), (1, T.Q6_K)):
        got = back.state_dict()[f"model.layers.{i}.mlp.down_proj.weight"]
        w = model.state_dict()[f"model.layers.{i}.mlp.down_proj.weight"].numpy()
        assert torch.equal(got, torch.from_numpy(blocks.decode(blocks.encode(w, t), t, 256)))


def test_mix_rule_for_smollm2_shapes():
    n = 30
    more = [i for i in range(n) if mix.use_more_bits(i, n)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    p = lambda name, shape, tied=True: mix.plan_tensor(name, shape, "Q4_K_M", n, tied).qtype  # noqa: E731
    assert p("blk.5.ffn_down.weight", (576, 1536)) == T.Q6_K
    assert p("blk.6.ffn_down.weight", (576, 1536)) == T.Q4_K
    assert p("blk.5.attn_v.weight", (192, 576)) == T.Q8_0  # Q6_K, 576 % 256 -> Q8_0
    assert p("blk.6.attn_v.weight", (192, 576)) == T.Q5_0  # Q4_K -> Q5_0
    assert p("token_embd.weight", (49152, 576)) == T.Q8_0
    assert p("token_embd.weight", (49152, 576), tied=False) == T.Q5_0
    assert p("output.weight", (49152, 512), tied=False) == T.Q6_K
    assert mix.plan_tensor("output.weight", (49152, 512), "Q4_0", n, False).qtype == T.Q6_K
    assert mix.plan_tensor("output.weight", (49152, 512), "Q8_0", n, False).qtype == T.Q8_0
    assert mix.plan_tensor("blk.0.attn_q.weight", (48, 48), "Q4_0", n, True).qtype == T.F16
    assert mix.plan_tensor("blk.0.attn_norm.weight", (576,), "Q4_0", n, True).qtype == T.F32


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def good_file(tmp_path_factory, tok_gguf) -> Path:
    path = tmp_path_factory.mktemp("good") / "m.gguf"
    export_gguf(tiny_llama(0), path, "Q8_0", source_gguf=tok_gguf)
    return path


def test_truncated_file_names_the_tensor(tmp_path, good_file):
    data = good_file.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(TruncatedCheckpointError, match=r"tensor 'output_norm.weight'|truncated"):
        import_gguf(bad)
    bad.write_bytes(data[:200])  # cut inside the metadata
    with pytest.raises(TruncatedCheckpointError, match="truncated"):
        import_gguf(bad)


def test_unsupported_tensor_type_names_the_tensor(tmp_path, good_file):
    r = GGUFReader(str(good_file))
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    type_part = t.field.parts[4]  # the uint32 GGML type of the tensor info
    offset = type_part.ctypes.data - r.data.ctypes.data
    data = bytearray(good_file.read_bytes())
    data[offset : offset + 4] = int(T.Q2_K).to_bytes(4, "little")
    bad = tmp_path / "q2k.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"'blk.0.attn_q.weight' is stored as Q2_K"):
        import_gguf(bad)
    data[offset : offset + 4] = (200).to_bytes(4, "little")
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"'blk.0.attn_q.weight' has GGML type id 200"):
        import_gguf(bad)


def test_shape_metadata_mismatch(tmp_path, good_file):
    rewrite_gguf(good_file, tmp_path / "bad.gguf", set_kv={"llama.feed_forward_length": (512, GGUFValueType.UINT32)})
    with pytest.raises(TensorMismatchError, match=r"'blk.0.ffn_gate.weight' has shape \(256, 128\) but the metadata implies \(512, 128\)"):
        import_gguf(tmp_path / "bad.gguf")


def test_export_is_atomic(tmp_path, tok_gguf, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    calls = {"n": 0}
    real = blocks.encode

    def failing(x, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(x, qtype)

    monkeypatch.setattr(blocks, "encode", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_gguf(tiny_llama(0), path, "Q8_0", source_gguf=tok_gguf)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]



def test_tokenizer_metadata_from_hf_tokenizer(tmp_path):
    """Without a source GGUF the tokenizer KV is built from a fast HF byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gguf_helpers import byte_level_chars

    chars = byte_level_chars()
    vocab = {c: i for i, c in enumerate(chars[:253])}
    vocab["Ġt"] = 253
    vocab["<|im_start|>"], vocab["<|endoftext|>"] = 254, 255
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = tmp_path / "m.gguf"
    export_gguf(tiny_llama(0), path, "Q8_0", tokenizer=tok)
    f = GGUFReader(str(path)).fields
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.ggml.tokens"].contents() == list(vocab)
    assert f["tokenizer.ggml.merges"].contents() == ["Ġ t"]
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[:254] == [1] * 254 and types[254:] == [3, 3]  # normal, then control (special) tokens
    assert f["tokenizer.ggml.bos_token_id"].contents() == 254
    assert f["tokenizer.ggml.eos_token_id"].contents() == 255
    assert f["tokenizer.chat_template"].contents() == tok.chat_template
