"""compressed-tensors export/import (``lowbit.io.compressed_tensors``), through real directories.

Pinned here:

* int32 packing equals compressed-tensors' own ``pack_to_int32`` bit for bit (bits 1..8, ragged
  widths, packed along dim 1 and dim 0) and unpacks back;
* lowbit -> export -> import gives identical schemes, codes, scales and zero points, and the
  imported model's logits equal the quantized model's exactly;
* the compressed-tensors package itself: our ``quantization_config`` validates as its
  ``QuantizationConfig``; its compressor, fed the dequantized weight and our qparams, produces
  exactly our tensors (byte for byte); its decompressor reproduces lowbit's dequantized weight;
* transformers 4.57 loads the directory (decompressing with compressed-tensors) and its logits
  match lowbit's reference-kernel logits;
* what cannot be exported raises a typed error that names the layer.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import random_ids, tiny_llama
from export_helpers import assert_same_layers, logits, quantized

import lowbit
from lowbit import Recipe, Rule, packing
from lowbit.errors import CheckpointError, FormatError, SchemeError
from lowbit.io.compressed_tensors import export_compressed_tensors, import_compressed_tensors
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme

SCHEMES = [
    QuantScheme(bits=4, group_size=32),
    QuantScheme(bits=4, group_size=32, symmetric=False),
    QuantScheme(bits=2, group_size=64, symmetric=False, scale_dtype="bfloat16"),
    QuantScheme(bits=8, granularity="channel", scale_dtype="float16"),
    QuantScheme(bits=4, granularity="tensor", symmetric=False),
    QuantScheme(bits=8, granularity="channel", activations="int8"),
    QuantScheme(format="fp8_e4m3"),
    QuantScheme(format="fp8_e4m3", granularity="tensor", activations="fp8_e4m3", scale_dtype="bfloat16"),
]
FP8_SCHEMES = SCHEMES[-2:]


# ----------------------------------------------------------------------------- packing
def test_pack_int32_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        for rows, cols in [(3, 64), (5, 37), (2, 1), (4, 100)]:
            q = torch.randint(0, 1 << bits, (rows, cols), generator=g).to(torch.uint8)
            signed = (q.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
            ours = packing.pack_int32(q, bits)
            assert torch.equal(ours, helpers.pack_to_int32(signed, bits)), (bits, rows, cols)
            assert torch.equal(packing.unpack_int32(ours, bits, cols), q)
            dim0 = packing.pack_int32(q.t().contiguous(), bits).t()
            assert torch.equal(dim0, helpers.pack_to_int32(signed, bits, packed_dim=0))


def test_pack_int32_word_layout_by_hand():
    # 4 bits: element 8j+i in bits 4i..4i+3 of word j
    q = torch.arange(16, dtype=torch.uint8).view(1, 16)
    w = packing.pack_int32(q, 4)
    assert (int(w[0, 0]) & 0xFFFFFFFF) == 0x76543210
    assert (int(w[0, 1]) & 0xFFFFFFFF) == 0xFEDCBA98
    # 3 bits: element 10 straddles words 0 and 1 (2 low bits at 30..31, high bit at bit 0)
    q = torch.zeros(1, 32, dtype=torch.uint8)
    q[0, 10] = 0b101
    w = packing.pack_int32(q, 3)
    assert [int(x) & 0xFFFFFFFF for x in w[0]] == [0b01 << 30, 0b1, 0]


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.short_name)
def test_round_trip_is_exact(tmp_path, scheme):
    m = quantized(scheme)
    export_compressed_tensors(m, tmp_path)
    m2 = import_compressed_tensors(tmp_path)
    assert_same_layers(m, m2)
    ids = random_ids()
    assert torch.equal(logits(m, ids), logits(m2, ids))
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["quantization_status"] == "compressed"
    assert cfg["ignore"] == ["lm_head"]
    want = {"int8": "int-quantized"}.get(scheme.activations, "pack-quantized")
    if scheme.format == "fp8_e4m3":
        want = "float-quantized"
    assert cfg["format"] == want


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(255)} | {"<unk>": 255}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_mixed_schemes_get_one_group_each(tmp_path):
    recipe = Recipe(
        rules=(Rule(r"lm_head", None), Rule(r".*mlp\..*", QuantScheme(bits=8, granularity="channel")), Rule(".*", QuantScheme(bits=4, group_size=64)))
    )
    m = tiny_llama(tie=False)
    lowbit.quantize(m, recipe, progress=False)
    export_compressed_tensors(m, tmp_path, tokenizer=tiny_tokenizer())
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "generation_config.json").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert len(cfg["config_groups"]) == 2
    targets = sorted(t for g in cfg["config_groups"].values() for t in g["targets"])
    assert targets == sorted(n for n, x in m.named_modules() if isinstance(x, QuantLinear))
    m2 = import_compressed_tensors(tmp_path)
    assert_same_layers(m, m2)
    ids = random_ids()
    assert torch.equal(logits(m, ids), logits(m2, ids))


def test_tensor_layout_on_disk(tmp_path):
    from safetensors.torch import load_file

    m = quantized(QuantScheme(bits=4, group_size=32, symmetric=False))
    export_compressed_tensors(m, tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    layer = m.model.layers[0].mlp.up_proj  # [256, 128]
    p = "model.layers.0.mlp.up_proj"
    assert t[f"{p}.weight_packed"].dtype == torch.int32 and tuple(t[f"{p}.weight_packed"].shape) == (256, 16)
    assert t[f"{p}.weight_shape"].tolist() == [256, 128] and t[f"{p}.weight_shape"].dtype == torch.int64
    assert tuple(t[f"{p}.weight_zero_point"].shape) == (32, 4) and t[f"{p}.weight_zero_point"].dtype == torch.int32
    assert torch.equal(t[f"{p}.weight_scale"], layer.scale)
    # element 8j+i of a row sits in bits 4i..4i+3 of word j, offset-binary (= lowbit's code)
    codes = layer.quantized_tensor().codes()
    w = t[f"{p}.weight_packed"].to(torch.int64) & 0xFFFFFFFF
    nib = torch.stack([(w >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(256, 128)
    assert torch.equal(nib.to(torch.uint8), codes)
    assert f"{p}.weight" not in t and "lm_head.weight" not in t  # tied head stored once (embed_tokens)


# ----------------------------------------------------------------------------- the package itself
@pytest.mark.parametrize("scheme", SCHEMES[:5], ids=lambda s: s.short_name)
def test_compressed_tensors_compressor_agrees_byte_for_byte(tmp_path, scheme):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    m = quantized(scheme)
    export_compressed_tensors(m, tmp_path)
    cfg = QuantizationConfig.model_validate(json.loads((tmp_path / "config.json").read_text())["quantization_config"])
    group = next(iter(cfg.config_groups.values()))
    compressor = BaseCompressor.get_value_from_registry(cfg.format)
    stored = load_file(str(tmp_path / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = m.get_submodule(name)
        qt = layer.quantized_tensor()
        mine = {k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.startswith(name + ".")}
        state = {"weight": qt.dequantize(torch.float32).to(qt.scale.dtype), "weight_scale": mine["weight_scale"]}
        if not scheme.symmetric:
            zp = (qt.zero.to(torch.int16) - (1 << (scheme.bits - 1))).to(torch.int8)
            state["weight_zero_point"] = zp.reshape(mine["weight_scale"].shape)
        theirs = compressor.compress(state, group)
        assert sorted(theirs) == sorted(mine), name
        for k in mine:
            assert theirs[k].dtype == mine[k].dtype and torch.equal(theirs[k], mine[k]), (name, k)
        back = compressor.decompress(dict(mine), group)["weight"]
        # compressed-tensors dequantizes in the scale dtype: (q - z) * s rounded once to it
        assert torch.equal(back, qt.dequantize(torch.float32).to(back.dtype)), name


@pytest.mark.parametrize("scheme", FP8_SCHEMES, ids=lambda s: s.short_name)
def test_fp8_export_agrees_with_compressed_tensors_float_compressor(tmp_path, scheme):
    """float-quantized: its compressor rounds our dequantized weights with our scales to our very
    bytes, and its decompressor gives back our weights; the config names FP8 weights (and
    dynamic per-token FP8 activations when the scheme has them)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    m = quantized(scheme)
    export_compressed_tensors(m, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert raw["format"] == "float-quantized"
    cfg = QuantizationConfig.model_validate(raw)
    group = next(iter(cfg.config_groups.values()))
    assert group.weights.type == "float" and group.weights.num_bits == 8
    assert (group.input_activations is not None) == (scheme.activations == "fp8_e4m3")
    if group.input_activations is not None:
        a = group.input_activations
        assert (a.type, a.num_bits, a.strategy, a.dynamic) == ("float", 8, "token", True)
    compressor = BaseCompressor.get_value_from_registry(cfg.format)
    stored = load_file(str(tmp_path / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        qt = m.get_submodule(name).quantized_tensor()
        mine = {k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.startswith(name + ".")}
        assert mine["weight"].dtype == torch.float8_e4m3fn
        assert torch.equal(mine["weight"].view(torch.uint8), qt.codes())
        state = {"weight": qt.dequantize(torch.float32), "weight_scale": mine["weight_scale"].float()}
        theirs = compressor.compress(state, group)
        assert torch.equal(theirs["weight"].view(torch.uint8), mine["weight"].view(torch.uint8)), name
        back = compressor.decompress({k: v.float() if k == "weight_scale" else v for k, v in mine.items()}, group)["weight"]
        assert torch.equal(back.float(), qt.dequantize(torch.float32)), name


def test_transformers_loads_the_export(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    ids = random_ids()
    schemes = [QuantScheme(bits=4, group_size=32), QuantScheme(bits=8, granularity="channel"), *FP8_SCHEMES]
    for i, scheme in enumerate(schemes):
        m = quantized(scheme)
        export_compressed_tensors(m, tmp_path / str(i))
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / str(i), dtype=torch.float32)
        with lowbit.use_kernel("reference"):
            ref = logits(m, ids)
        got = logits(hf, ids)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- refusals
def test_unexportable_schemes_name_the_layer(tmp_path):
    with pytest.raises(SchemeError, match=r"q_proj.*3-bit"):
        export_compressed_tensors(quantized(QuantScheme(bits=3, group_size=32)), tmp_path)
    with pytest.raises(SchemeError, match=r"float zero points"):
        export_compressed_tensors(quantized(QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="float")), tmp_path)
    with pytest.raises(SchemeError, match="int-quantized.*4 bits"):
        export_compressed_tensors(quantized(QuantScheme(bits=4, group_size=32)), tmp_path, format="int-quantized")
    with pytest.raises(SchemeError, match=r"q_proj.*E4M3"):
        export_compressed_tensors(quantized(QuantScheme(format="fp8_e5m2")), tmp_path)
    with pytest.raises(SchemeError, match=r"float-quantized.*integers"):
        export_compressed_tensors(quantized(QuantScheme(bits=8, granularity="channel")), tmp_path, format="float-quantized")
    with pytest.raises(CheckpointError, match="no QuantLinear"):
        export_compressed_tensors(tiny_llama(), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_import_refuses_activation_ordered_groups(tmp_path):
    from safetensors.torch import load_file, save_file

    m = quantized(QuantScheme(bits=4, group_size=32))
    export_compressed_tensors(m, tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    k = 128
    t["model.layers.0.self_attn.q_proj.weight_g_idx"] = (torch.arange(k).flip(0) // 32).to(torch.int32)
    save_file(t, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="q_proj.*activation-ordered"):
        import_compressed_tensors(tmp_path)


@pytest.mark.parametrize(
    "args",
    [
        dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32),
        dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
        dict(num_bits=8, type="float", symmetric=True, strategy="channel"),
    ],
    ids=["w4g32-asym", "w8c-sym", "fp8c"],
)
def test_import_checkpoint_written_by_compressed_tensors(tmp_path, args):
    """A directory made entirely by the compressed-tensors package (apply config, min-max qparams
    from its ``calculate_qparams``, ``compress_model``, ``save_pretrained`` + ``update_config``)
    imports into lowbit layers whose dequantized weights equal its own decompressor's."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from safetensors.torch import load_file

    qargs = QuantizationArgs(**args)
    model = tiny_llama()
    cfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=qargs)}, ignore=["lm_head"])
    apply_quantization_config(model, cfg)
    for mod in model.modules():
        if hasattr(mod, "weight_scale"):
            w = mod.weight.data
            g = w.view(w.shape[0], -1, args.get("group_size", w.shape[1]))
            s, z = calculate_qparams(g.amin(-1), g.amax(-1), qargs)
            mod.weight_scale.data.copy_(s.reshape(mod.weight_scale.shape))
            if hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.data.copy_(z.reshape(mod.weight_zero_point.shape))
    fmt = "float-quantized" if args["type"] == "float" else "pack-quantized"
    comp = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    comp.compress_model(model)
    model.save_pretrained(tmp_path)
    comp.update_config(str(tmp_path))

    m2 = import_compressed_tensors(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    scheme = next(iter(comp.quantization_config.config_groups.values()))
    decompress = BaseCompressor.get_value_from_registry(fmt).decompress
    layers = {n: x for n, x in m2.named_modules() if isinstance(x, QuantLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        state = {k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.startswith(name + ".")}
        assert torch.equal(decompress(state, scheme)["weight"].float(), layer.dequantize_weight(torch.float32)), name
    assert layer.scheme.bits == args["num_bits"] and layer.scheme.symmetric == args["symmetric"]
    assert layer.scheme.format == ("fp8_e4m3" if args["type"] == "float" else "int")
