"""``from_pretrained`` for lowbit directories (``lowbit.integrations.transformers``).

Pinned here: ``save_pretrained`` writes a directory that both ``lowbit.load`` and
``transformers.AutoModelForCausalLM.from_pretrained`` load, with ``QuantLinear`` layers and
*exactly* the same logits (also for a bf16 model with fp32 scales, which transformers alone
would cast); the quantizer is registered by ``import lowbit`` in either import order without
``import lowbit`` importing transformers; registration is idempotent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import random_ids, tiny_gpt2, tiny_llama

import lowbit
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(255)} | {"<unk>": 255}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def quantized(model, scheme):
    lowbit.quantize(model, scheme, progress=False)
    return model


@pytest.mark.parametrize(
    "make,scheme",
    [
        (lambda: tiny_llama(), QuantScheme(bits=4, group_size=32)),
        (lambda: tiny_llama(tie=False).to(torch.bfloat16), QuantScheme(bits=4, group_size=32, symmetric=False)),
        (lambda: tiny_gpt2(), QuantScheme(bits=8, granularity="channel")),
    ],
    ids=["llama-w4-fp32", "llama-bf16-fp32scales", "gpt2-w8"],
)
def test_from_pretrained_equals_lowbit_load(tmp_path, make, scheme):
    from transformers import AutoModelForCausalLM

    from lowbit.integrations.transformers import save_pretrained

    m = quantized(make(), scheme)
    save_pretrained(m, tmp_path, tokenizer=tiny_tokenizer())
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "lowbit" and set(cfg["layers"]) == {n for n, x in m.named_modules() if isinstance(x, QuantLinear)}
    assert (tmp_path / "tokenizer.json").is_file()
    ref = lowbit.load(tmp_path / "model.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    layers = {n: x for n, x in hf.named_modules() if isinstance(x, QuantLinear)}
    assert set(layers) == set(cfg["layers"])
    for n, x in layers.items():
        y = ref.get_submodule(n)
        for attr in ("qweight", "scale", "zero", "bias"):
            a, b = getattr(x, attr), getattr(y, attr)
            assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and torch.equal(a, b))), (n, attr)
    ids = random_ids()
    assert torch.equal(logits(hf, ids), logits(ref, ids))
    assert hf.lowbit_manifest["layers"] == ref.lowbit_manifest["layers"]


def _run(code: str) -> str:
    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_lowbit_registers_in_either_order(tmp_path):
    from lowbit.integrations.transformers import save_pretrained

    save_pretrained(quantized(tiny_llama(), QuantScheme(bits=4, group_size=32)), tmp_path)
    load = f"""
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        print(type(m.model.layers[0].mlp.up_proj).__name__)
    """
    out = _run(
        "import sys, lowbit\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n" + textwrap.dedent(load)
    )
    assert out.split()[-1] == "QuantLinear"
    out = _run("from transformers import AutoModelForCausalLM\nimport lowbit\n" + textwrap.dedent(load))
    assert out.split()[-1] == "QuantLinear"


def test_registration_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from lowbit.integrations import _TransformersHook, register_transformers_on_import
    from lowbit.integrations.transformers import LowbitConfig, LowbitHfQuantizer, register

    register()
    register()
    register_transformers_on_import()
    assert AUTO_QUANTIZER_MAPPING["lowbit"] is LowbitHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["lowbit"] is LowbitConfig
    assert sum(isinstance(f, _TransformersHook) for f in sys.meta_path) == 0  # transformers is loaded: no hook left
