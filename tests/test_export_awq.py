"""AWQ GEMM export/import (``lowbit.io.awq``), through real directories.

Oracles written from AutoAWQ's description: the packer (``WQLinear_GEMM.from_linear``: word
``col`` takes ``intweight[:, col*8 + [0,2,4,6,1,3,5,7][i]] << 4i``) must produce our words
exactly, and the loaders' unpack (shifts 0, 4, ..., 28, then the reverse order
``[0, 4, 1, 5, 2, 6, 3, 7]``) followed by ``(q - z) * s`` must give lowbit's dequantized weight.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import random_ids, tiny_llama
from export_helpers import assert_same_layers, logits, quantized

import lowbit
from lowbit import Recipe, Rule
from lowbit.errors import FormatError, SchemeError
from lowbit.io.awq import export_awq, import_awq
from lowbit.scheme import QuantScheme

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]


def ref_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's loop: [rows, cols] 4-bit values -> [rows, cols/8] unsigned words (int64)."""
    rows, cols = intweight.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    v = intweight.to(torch.int64)
    for col in range(cols // 8):
        for i in range(8):
            out[:, col] |= v[:, col * 8 + ORDER[i]] << (4 * i)
    return out


def ref_unpack(words: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4)
    w = words.to(torch.int64) & 0xFFFFFFFF
    nib = ((w[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(w.shape[0], -1)
    rev = torch.arange(nib.shape[1]).view(-1, 8)[:, REVERSE].reshape(-1)
    return nib[:, rev]


def test_files_match_autoawq_packing_and_dequant(tmp_path):
    from safetensors.torch import load_file

    m = quantized(QuantScheme(bits=4, group_size=32, symmetric=False, scale_dtype="float16"))
    export_awq(m, tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    for p in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"):
        qt = m.get_submodule(p).quantized_tensor()
        n, k = qt.shape
        codes, zero = qt.codes(), qt.zero  # [N, K], [N, G]
        assert t[f"{p}.qweight"].dtype == torch.int32 and tuple(t[f"{p}.qweight"].shape) == (k, n // 8)
        assert torch.equal(t[f"{p}.qweight"].to(torch.int64) & 0xFFFFFFFF, ref_pack(codes.t()))
        assert torch.equal(t[f"{p}.qzeros"].to(torch.int64) & 0xFFFFFFFF, ref_pack(zero.t()))
        assert t[f"{p}.scales"].dtype == torch.float16 and torch.equal(t[f"{p}.scales"], qt.scale.t())
        q, z = ref_unpack(t[f"{p}.qweight"]), ref_unpack(t[f"{p}.qzeros"])  # [K, N], [G, N]
        g = torch.arange(k) // 32
        w = (q.float() - z[g].float()) * t[f"{p}.scales"].float()[g]
        assert torch.equal(w.t(), qt.dequantize(torch.float32))


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(bits=4, group_size=32, symmetric=False, scale_dtype="float16"),
        QuantScheme(bits=4, group_size=64, scale_dtype="float16"),  # symmetric: zeros stored as 8
    ],
    ids=lambda s: s.short_name,
)
def test_round_trip_is_exact(tmp_path, scheme):
    m = quantized(scheme)
    export_awq(m, tmp_path)
    m2 = import_awq(tmp_path)
    assert_same_layers(m, m2)
    ids = random_ids()
    assert torch.equal(logits(m, ids), logits(m2, ids))
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert {k: cfg[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version", "modules_to_not_convert")} == {
        "quant_method": "awq", "bits": 4, "group_size": scheme.group_size, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": ["lm_head"],
    }


def test_import_without_lowbit_record_is_affine(tmp_path):
    m = quantized(QuantScheme(bits=4, group_size=64, scale_dtype="float16"))
    export_awq(m, tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["quantization_config"]["lowbit"]
    cfg_path.write_text(json.dumps(cfg))
    m2 = import_awq(tmp_path)
    layer = m2.model.layers[0].self_attn.q_proj
    assert not layer.scheme.symmetric and bool((layer.zero == 8).all())
    ids = random_ids()
    assert torch.equal(logits(m, ids), logits(m2, ids))  # same weights, same kernels? at least same numbers
    ref = m.model.layers[0].self_attn.q_proj.dequantize_weight()
    assert torch.equal(layer.dequantize_weight(), ref)


def test_refusals_name_the_layer(tmp_path):
    with pytest.raises(SchemeError, match=r"q_proj.*4-bit codes.*3 bits"):
        export_awq(quantized(QuantScheme(bits=3, group_size=32, scale_dtype="float16")), tmp_path)
    with pytest.raises(SchemeError, match=r"q_proj.*group-wise"):
        export_awq(quantized(QuantScheme(bits=4, granularity="channel", scale_dtype="float16")), tmp_path)
    with pytest.raises(FormatError, match="not representable in torch.float16"):
        export_awq(quantized(QuantScheme(bits=4, group_size=32)), tmp_path)
    with pytest.raises(SchemeError, match="float zero points"):
        export_awq(quantized(QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="float", scale_dtype="float16")), tmp_path)
    mixed = tiny_llama()
    lowbit.quantize(mixed, Recipe(rules=(Rule("lm_head", None), Rule(r".*mlp.*", QuantScheme(bits=4, group_size=64, scale_dtype="float16")),
                                         Rule(".*", QuantScheme(bits=4, group_size=32, scale_dtype="float16")))), progress=False)
    with pytest.raises(SchemeError, match="one global quantization setting"):
        export_awq(mixed, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_transformers_awq_config_accepts_the_export(tmp_path):
    from transformers import AwqConfig

    export_awq(quantized(QuantScheme(bits=4, group_size=32, scale_dtype="float16")), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["modules_to_not_convert"] == ["lm_head"]
    # transformers checks the installed autoawq version before it accepts modules_to_not_convert
    # (autoawq is not installable here without replacing torch/transformers): validate the rest
    a = AwqConfig.from_dict({**cfg, "modules_to_not_convert": None})
    assert (a.bits, a.group_size, a.zero_point, str(a.version.value if hasattr(a.version, "value") else a.version)) == (4, 32, True, "gemm")


def test_autoawq_packer_and_dequantizer_agree(tmp_path):
    """AutoAWQ's own ``WQLinear_GEMM.from_linear`` (fed lowbit's dequantized weight, scales and
    zeros) writes our exact words, and its ``dequantize_gemm`` reproduces our weights.
    Skipped unless autoawq imports (it needs a transformers older than 4.57 at import time)."""
    gemm = pytest.importorskip("awq.modules.linear.gemm")
    packing_utils = pytest.importorskip("awq.utils.packing_utils")
    from safetensors.torch import load_file

    m = quantized(QuantScheme(bits=4, group_size=32, symmetric=False, scale_dtype="float16"))
    export_awq(m, tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    p = "model.layers.0.mlp.down_proj"
    qt = m.get_submodule(p).quantized_tensor()
    w = packing_utils.dequantize_gemm(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"], 4, 32)
    assert torch.equal(w.t(), qt.dequantize(torch.float32).half())
    lin = torch.nn.Linear(qt.shape[1], qt.shape[0], bias=False)
    lin.weight.data = qt.dequantize(torch.float32).half()
    q = gemm.WQLinear_GEMM.from_linear(lin, 4, 32, scales=qt.scale.t().contiguous().half(), zeros=qt.zero.t().contiguous().half())
    for k in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(q, k), t[f"{p}.{k}"]), k
