"""Module swap: ``quantize_model`` on tiny random models (Llama, GPT-2 with
Conv1D, plain Sequential). The quantized model must compute exactly what the
same model computes with every weight replaced by ``fake_quantize(weight)``."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from tiny_models import GPT2_LINEARS, GPT2_NORMS, LLAMA_LINEARS, LLAMA_NORMS, tiny_gpt2
from tiny_models import tiny_llama as _tiny_llama
from lowbit import Recipe, Rule
from lowbit.errors import SchemeError, UnsupportedModelError
from lowbit.formats import fake_quantize, sqnr_db
from lowbit.kernels.registry import use_kernel
from lowbit.model.swap import quantize_model
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

W4G32 = QuantScheme(bits=4, group_size=32)
W4G32_ASYM = QuantScheme(bits=4, symmetric=False, group_size=32)
W3G32_ASYM = QuantScheme(bits=3, symmetric=False, group_size=32, scale_dtype="bfloat16")
W8C = QuantScheme(bits=8, granularity="channel")
W2T = QuantScheme(bits=2, granularity="tensor", symmetric=False)


def tiny_llama(seed: int = 0, intermediate_size: int = 256, tie: bool = False):
    return _tiny_llama(seed, intermediate_size, tie)


def tokens(seed: int = 0, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def fake_quantized_copy(model: nn.Module, recipe: Recipe) -> nn.Module:
    """The same model with each quantized weight replaced by fake_quantize(weight)."""
    ref = copy.deepcopy(model)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, nn.Linear):
            w = mod.weight.detach()
        elif isinstance(mod, Conv1D):
            w = mod.weight.detach().t()  # Conv1D stores [in, out]
        else:
            continue
        scheme = recipe.scheme_for(name, w.shape[1])
        if scheme is None:
            continue
        fq = fake_quantize(w.float(), scheme)
        # a new Parameter: also unties a weight shared with an embedding
        mod.weight = nn.Parameter(fq.t().contiguous() if isinstance(mod, Conv1D) else fq, requires_grad=False)
    return ref




def check_swapped(model, report, expected_quantized, expected_skipped):
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))
    assert quantized == sorted(expected_quantized)
    assert sorted(r.name for r in report.layers) == sorted(expected_quantized)
    assert sorted(s.name for s in report.skipped) == sorted(expected_skipped)
    # no full-precision linear remains except the skipped ones
    left = sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)))
    assert set(left) <= set(expected_skipped)


@pytest.mark.parametrize("scheme", [W4G32, W4G32_ASYM, W3G32_ASYM, W8C, W2T], ids=lambda s: s.short_name)
def test_llama(scheme):
    model = tiny_llama()
    recipe = Recipe.uniform(scheme)
    ref = fake_quantized_copy(model, recipe)
    ids = tokens()
    with torch.no_grad():
        fp_logits = model(ids).logits
    report = quantize_model(model, recipe, progress=False)
    check_swapped(model, report, LLAMA_LINEARS, ["model.embed_tokens", "lm_head", *LLAMA_NORMS])
    assert isinstance(model.lm_head, nn.Linear)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "embedding" in reasons["model.embed_tokens"]
    assert "rule 0" in reasons["lm_head"]
    for rec in report.layers:
        layer = model.get_submodule(rec.name)
        assert rec.source == "Linear" and rec.rule == 1
        assert (rec.in_features, rec.out_features) == (layer.in_features, layer.out_features)
        assert rec.scheme == scheme.to_dict()
        assert rec.nbytes == scheme.storage_bytes(rec.out_features, rec.in_features) == layer.nbytes
        w_ref = ref.get_submodule(rec.name).weight
        assert torch.equal(layer.dequantize_weight(), w_ref)
    assert report.quantized_bytes == sum(r.nbytes for r in report.layers)
    with torch.no_grad(), use_kernel("reference"):
        q_logits = model(ids).logits
        r_logits = ref(ids).logits
    assert q_logits.shape == (2, 16, 256)
    torch.testing.assert_close(q_logits, r_logits, rtol=0, atol=1e-5)
    # and quantization changed something (the comparison is not vacuous)
    assert not torch.allclose(q_logits, fp_logits, atol=1e-4)


def test_llama_report_sqnr_matches_formats():
    model = tiny_llama(seed=1)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in LLAMA_LINEARS}
    report = quantize_model(model, Recipe.uniform(W4G32), progress=False)
    for rec in report.layers:
        w = originals[rec.name]
        assert rec.sqnr_db == pytest.approx(sqnr_db(w, fake_quantize(w, W4G32)), abs=1e-9)
        assert 15.0 < rec.sqnr_db < 25.0  # 4-bit g32 on random init weights
        assert rec.bits_per_weight == pytest.approx(4 + 32 / 32)
    d = report.to_dict()
    assert Recipe.from_dict(d["recipe"]) == report.recipe
    assert len(d["layers"]) == 14 and len(d["skipped"]) == 2 + len(LLAMA_NORMS)


def test_gpt2_conv1d():
    model = tiny_gpt2()
    recipe = Recipe.uniform(W4G32_ASYM)
    ref = fake_quantized_copy(model, recipe)
    ids = tokens(1)
    report = quantize_model(model, recipe, progress=False)
    check_swapped(model, report, GPT2_LINEARS, ["transformer.wte", "transformer.wpe", "lm_head", *GPT2_NORMS])
    shapes = {r.name: (r.source, r.in_features, r.out_features) for r in report.layers}
    assert shapes["transformer.h.0.attn.c_attn"] == ("Conv1D", 64, 192)
    assert shapes["transformer.h.1.mlp.c_fc"] == ("Conv1D", 64, 256)
    assert shapes["transformer.h.1.mlp.c_proj"] == ("Conv1D", 256, 64)
    for name in GPT2_LINEARS:
        q = model.get_submodule(name)
        # the transposed Conv1D weight: QuantLinear holds it as [out, in]
        assert torch.equal(q.dequantize_weight(), ref.get_submodule(name).weight.t())
        assert torch.equal(q.bias, ref.get_submodule(name).bias)
    with torch.no_grad(), use_kernel("reference"):
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_gpt2_quantizing_the_tied_head_unties_it():
    model = tiny_gpt2(seed=2)
    assert model.lm_head.weight is model.transformer.wte.weight
    recipe = Recipe.uniform(W8C, skip=())
    ref = fake_quantized_copy(model, recipe)
    assert ref.lm_head.weight is not ref.transformer.wte.weight
    wte_before = model.transformer.wte.weight.detach().clone()
    ids = tokens(2)
    report = quantize_model(model, recipe, progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    assert model.config.tie_word_embeddings is False
    assert any("lm_head" in n and "shared" in n for n in report.notes)
    # the embedding keeps its full-precision weight
    assert torch.equal(model.transformer.wte.weight, wte_before)
    with torch.no_grad(), use_kernel("reference"):
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_sequential_of_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32, bias=False), nn.Tanh(), nn.Linear(32, 8))
    recipe = Recipe(rules=(Rule("4", W8C), Rule(".*", W3G32_ASYM)))
    ref = fake_quantized_copy(model, recipe)
    x = torch.randn(5, 64)
    report = quantize_model(model, recipe, progress=False)
    check_swapped(model, report, ["0", "2", "4"], [])
    assert model[2].bias is None and model[0].bias is not None
    assert [r.rule for r in report.layers] == [1, 1, 0]
    assert model[4].scheme == W8C and model[0].scheme == W3G32_ASYM
    with torch.no_grad(), use_kernel("reference"):
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-6)


def test_recipe_without_catch_all_names_the_layer():
    model = tiny_llama()
    recipe = Recipe(rules=(Rule(r"lm_head", None), Rule(r".*q_proj", W4G32)))
    with pytest.raises(SchemeError, match=re.escape("'model.layers.0.self_attn.k_proj'")):
        quantize_model(model, recipe, progress=False)


def test_recipe_error_leaves_the_model_untouched():
    model = tiny_llama()
    recipe = Recipe(rules=(Rule(r"lm_head", None), Rule(r".*q_proj", W4G32)))
    with pytest.raises(SchemeError):
        quantize_model(model, recipe, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_quantizing_twice_is_refused():
    model = tiny_llama()
    quantize_model(model, Recipe.uniform(W4G32), progress=False)
    with pytest.raises(UnsupportedModelError, match="already"):
        quantize_model(model, Recipe.uniform(W4G32), progress=False)


def test_indivisible_group_in_a_model():
    model = tiny_llama(intermediate_size=192)  # down_proj has in_features=192
    with pytest.raises(SchemeError) as ei:
        quantize_model(model, Recipe.uniform(QuantScheme(bits=4, group_size=128)), progress=False)
    msg = str(ei.value)
    assert "model.layers.0.mlp.down_proj" in msg and "192" in msg and "[8, 12, 16, 24, 32, 48, 64, 96]" in msg

    model = tiny_llama(intermediate_size=192)
    recipe = Recipe.uniform(QuantScheme(bits=4, group_size=128), indivisible_groups="shrink")
    ref = fake_quantized_copy(model, recipe)
    report = quantize_model(model, recipe, progress=False)
    sizes = {r.name: r.scheme["group_size"] for r in report.layers}
    assert sizes["model.layers.0.mlp.down_proj"] == 64 and sizes["model.layers.1.mlp.down_proj"] == 64
    assert sizes["model.layers.0.mlp.up_proj"] == 128
    assert sum("down_proj" in n and "group_size 64" in n for n in report.notes) == 2
    ids = tokens(3)
    with torch.no_grad(), use_kernel("reference"):
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_model_without_linears():
    with pytest.raises(UnsupportedModelError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.Embedding(10, 4), nn.ReLU(), nn.LayerNorm(4)), Recipe.uniform(W4G32))
    with pytest.raises(UnsupportedModelError):
        quantize_model(nn.Linear(64, 64), Recipe.uniform(W4G32))


class TinyCNN(nn.Module):
    """Convolutions, a norm, an embedding, a bare parameter and one linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.act = nn.ReLU()
        self.pos = nn.Embedding(4, 32)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 32)
        self.gain = nn.Parameter(torch.ones(32))  # on the model itself


def test_every_module_with_weights_is_quantized_or_listed_as_skipped(tmp_path):
    import lowbit

    model = TinyCNN()
    report = lowbit.quantize(model, Recipe.uniform(W4G32), progress=False)  # the head rule may match nothing
    assert [r.name for r in report.layers] == ["fc"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert sorted(reasons) == ["<model>", "bn", "conv1", "conv2", "norm", "pos"]
    assert reasons["conv1"].startswith("Conv2d: kept in full precision") and "linear layers only" in reasons["conv1"]
    assert reasons["bn"] == "BatchNorm2d: kept in full precision (not a linear layer)"
    assert reasons["norm"] == "LayerNorm: kept in full precision (not a linear layer)"
    assert "embedding" in reasons["pos"] and "TinyCNN" in reasons["<model>"]
    # ... and the manifest records them with the same reasons
    lowbit.save(model, tmp_path / "cnn.safetensors")
    assert {s["name"]: s["reason"] for s in lowbit.read_manifest(tmp_path / "cnn.safetensors")["skipped"]} == reasons


@pytest.mark.parametrize("pattern, names", [
    (r"conv.*", ["conv1 (Conv2d)", "conv2 (Conv2d)"]),
    (r"pos", ["pos (Embedding)"]),
    (r"norm", ["norm (LayerNorm)"]),
])
@pytest.mark.parametrize("scheme", [W8C, None], ids=["quantize", "skip"])
def test_rule_aimed_at_a_module_lowbit_cannot_quantize_is_an_error(pattern, names, scheme):
    model = TinyCNN()
    recipe = Recipe(rules=(Rule(pattern, scheme), Rule(".*", W4G32)))
    with pytest.raises(SchemeError) as ei:
        quantize_model(model, recipe, progress=False)
    msg = str(ei.value)
    assert f"rule 0 ({pattern!r})" in msg and "no linear layer" in msg
    for n in names:
        assert n in msg
    assert isinstance(model.fc, nn.Linear)  # untouched


def test_rule_that_matches_nothing_is_an_error():
    model = tiny_llama()
    recipe = Recipe(rules=(Rule(r"lm_head", None), Rule(r".*\.q_prj", None), Rule(".*", W4G32)))
    with pytest.raises(SchemeError, match=r"rule 1 \('.*q_prj'\) matches no module of LlamaForCausalLM"):
        quantize_model(model, recipe, progress=False)
    # a rule that reaches the linears inside a module is fine; one naming only the container is not
    quantize_model(tiny_llama(), Recipe(rules=(Rule(r"model\.layers\.0\.mlp\..*", None), Rule(".*", W4G32))), progress=False)
    with pytest.raises(SchemeError, match=r"model\.layers\.0\.mlp \(LlamaMLP\) but no linear layer"):
        quantize_model(tiny_llama(), Recipe(rules=(Rule(r"model\.layers\.0\.mlp", None), Rule(".*", W4G32))), progress=False)
