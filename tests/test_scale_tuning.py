"""End-to-end scale tuning by distillation (lowbit.qat.scale_tuning, Recipe(tune=E2ETuning(...)))."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit import E2ETuning, GPTQ, QuantScheme, Recipe
from lowbit.calibration import CalibrationData
from lowbit.errors import CalibrationError, SchemeError
from lowbit.qat import TunableScales, heldout_kl, tune_scales
from lowbit.qat import scale_tuning
from tiny_models import random_ids, save_load_generate, tiny_gpt2, tiny_llama

W3A = QuantScheme(bits=3, group_size=32, symmetric=False)
W3S = QuantScheme(bits=3, group_size=32)


def _sharp(model):
    """A tiny random model whose next-token distributions are far from uniform (the default
    initialisation gives nearly flat logits, and so a KL that hardly moves)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


def _quantized_pair(make=tiny_llama, scheme=W3A, method="rtn"):
    ref = _sharp(make())
    q = copy.deepcopy(ref)
    lowbit.quantize(q, Recipe.uniform(scheme, method=method), calibration=_calib() if method != "rtn" else None, progress=False)
    return ref, q


def _calib(n=128, length=32):
    return CalibrationData(random_ids(n, length, seed=11), {"source": "random"})


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lowbit.QuantLinear)}


@pytest.mark.parametrize("scheme", [W3A, W3S, QuantScheme(bits=4, granularity="channel"),
                                    QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="float"),
                                    QuantScheme(format="nf4", group_size=32)])
def test_the_start_is_the_quantized_layer_bit_for_bit(scheme):
    """log_ratio = 0 reproduces the stored weight exactly, and the forward equals the reference kernel's."""
    _, q = _quantized_pair(scheme=scheme)
    x = torch.randn(3, 5, 256)
    for name, layer in _layers(q).items():
        w = TunableScales(layer)
        assert torch.equal(w.weight().detach(), layer.dequantize_weight()), name
        with lowbit.use_kernel("dequantized"), torch.no_grad():
            assert torch.equal(w(x[..., : layer.in_features]), layer(x[..., : layer.in_features])), name


def test_write_back_stores_exactly_the_tuned_scales():
    _, q = _quantized_pair()
    layer = _layers(q)["model.layers.0.mlp.down_proj"]
    codes = layer.qweight.clone()
    w = TunableScales(layer)
    with torch.no_grad():
        w.log_ratio.copy_(torch.randn_like(w.log_ratio) * 0.1)
    w.write_back(layer)
    assert torch.equal(layer.qweight, codes)  # codes and zero points never change
    assert torch.equal(layer.dequantize_weight(), w.weight().detach())  # float32 scales: exact


# (model, train norms too) -> the largest held-out KL ratio tuned / RTN accepted; a sharpened random
# Llama at W3 g32 moves least (scales alone: 0.94 measured, with norms 0.83; GPT-2: 0.56-0.62)
BOUNDS = {("tiny_llama", False): 0.97, ("tiny_llama", True): 0.9, ("tiny_gpt2", False): 0.7, ("tiny_gpt2", True): 0.7}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("norms", [False, True])
def test_tuning_lowers_the_heldout_kl_and_changes_only_scales(make, norms):
    """RTN W3 then 40 steps: the KL on held-out windows (never trained on) drops, and on fresh
    windows too; codes and zero points stay; only norms change besides the scales, and only when
    asked; parameters keep their requires_grad flags and get no gradients."""
    ref, q = _quantized_pair(make)
    rtn = copy.deepcopy(q)
    flags = {n: p.requires_grad for n, p in q.named_parameters()}
    spec = E2ETuning(steps=40, lr=0.01, batch_size=16, norms=norms, holdout=8)
    result = tune_scales(q, ref, _calib().ids, spec, progress=False)
    bound = BOUNDS[make.__name__, norms]
    assert result.kept and result.heldout_kl_after < bound * result.heldout_kl_before
    fresh = random_ids(8, 32, seed=99)
    assert heldout_kl(q, ref, fresh) < bound * heldout_kl(rtn, ref, fresh)
    for name, layer in _layers(q).items():
        before = _layers(rtn)[name]
        assert torch.equal(layer.qweight, before.qweight)
        assert (layer.zero is None) or torch.equal(layer.zero, before.zero)
        assert not torch.equal(layer.scale, before.scale)
    rtn_params = dict(rtn.named_parameters())
    changed = [n for n, p in q.named_parameters() if not torch.equal(p, rtn_params[n])]
    assert all("norm" in n or ".ln_" in n for n in changed) and (bool(changed) == norms), changed
    for n, p in q.named_parameters():
        assert p.grad is None and p.requires_grad == flags[n], n


def test_tuning_that_does_not_lower_the_heldout_kl_is_undone(monkeypatch):
    """When the held-out check fails, every scale and norm weight is restored bit for bit."""
    ref, q = _quantized_pair()
    rtn = copy.deepcopy(q)
    calls = iter([0.1, 0.2])
    monkeypatch.setattr(scale_tuning, "heldout_kl", lambda *a: next(calls))
    result = tune_scales(q, ref, _calib(12).ids, E2ETuning(steps=3, lr=0.05, norms=True, holdout=4), progress=False)
    assert not result.kept
    assert "not kept" in result.note()
    for (n, a), (_, b) in zip(q.state_dict().items(), rtn.state_dict().items()):
        assert torch.equal(a, b), n


def test_recipe_runs_tuning_after_gptq_and_the_checkpoint_records_it(tmp_path):
    ref = _sharp(tiny_llama())
    gptq, tuned = copy.deepcopy(ref), copy.deepcopy(ref)
    data = _calib()
    lowbit.quantize(gptq, Recipe.uniform(W3A, method=GPTQ()), calibration=data, progress=False)
    recipe = Recipe.uniform(W3A, method=GPTQ(), tune=E2ETuning(steps=30, lr=0.01, batch_size=16))
    report = lowbit.quantize(tuned, recipe, calibration=data, progress=False)
    assert report.tuning["kept"] and any(n.startswith("e2e scale tuning") for n in report.notes)
    for name, layer in _layers(tuned).items():  # the same codes as GPTQ alone
        assert torch.equal(layer.qweight, _layers(gptq)[name].qweight), name
    fresh = random_ids(4, 32, seed=98)
    assert heldout_kl(tuned, ref, fresh) < heldout_kl(gptq, ref, fresh)
    manifest = save_load_generate(tuned, tmp_path / "t.lowbit.safetensors", new_tokens=4)
    assert manifest["recipe"]["tune"] == E2ETuning(steps=30, lr=0.01, batch_size=16).to_dict()
    assert manifest["tuning"]["kept"] is True
    assert Recipe.from_dict(manifest["recipe"]) == recipe
    assert lowbit.load(tmp_path / "t.lowbit.safetensors").lowbit_report.tuning == report.tuning


def test_rtn_with_tuning_takes_calibration_tokens_from_one_call():
    """RTN needs no data, but its tuning does: token ids are accepted, and none is a typed error."""
    ref = _sharp(tiny_llama())
    q = copy.deepcopy(ref)
    report = lowbit.quantize(q, Recipe.uniform(W3A, tune=E2ETuning(steps=2, holdout=2)), calibration=random_ids(10, 16), progress=False)
    assert report.tuning["train_windows"] == 8 and report.tuning["heldout_windows"] == 2
    assert not any("uses no calibration data" in n for n in report.notes)
    with pytest.raises(CalibrationError, match=r"E2ETuning \(recipe.tune\) needs calibration data"):
        lowbit.quantize(copy.deepcopy(ref), Recipe.uniform(W3A, tune=E2ETuning(steps=2)), progress=False)


def test_bad_input_is_a_typed_error():
    ref, q = _quantized_pair()
    with pytest.raises(CalibrationError, match="holds out 8 of the 8"):
        tune_scales(q, ref, random_ids(8, 16), E2ETuning(steps=1), progress=False)
    with pytest.raises(CalibrationError, match="int64 token ids"):
        tune_scales(q, ref, torch.zeros(12, 16), E2ETuning(steps=1, holdout=2), progress=False)
    with pytest.raises(SchemeError, match="no QuantLinear"):
        tune_scales(copy.deepcopy(ref), ref, random_ids(12, 16), E2ETuning(steps=1, holdout=2), progress=False)
    with pytest.raises(CalibrationError, match="diverged"):
        _diverge(q, ref)
    for bad in (dict(steps=0), dict(lr=0.0), dict(batch_size=0), dict(holdout=0), dict(norms=1), dict(seed=-1)):
        with pytest.raises(SchemeError):
            E2ETuning(**bad)
    with pytest.raises(SchemeError, match="double-quantized"):
        Recipe.uniform(QuantScheme(format="nf4", double_quant=True), tune=E2ETuning())
    with pytest.raises(SchemeError, match="unknown E2ETuning options"):
        Recipe.from_dict({**Recipe.uniform(W3A, tune=E2ETuning()).to_dict(), "tune": {"stepz": 3}})
    with pytest.raises(SchemeError, match="quantize_from_disk streams"):
        lowbit.quantize_from_disk("/nonexistent", Recipe.uniform(W3A, tune=E2ETuning()), "/tmp/x.safetensors")


def _diverge(q, ref):
    """A non-finite loss stops the tuning with a typed error and leaves the model as it was."""
    before = copy.deepcopy(q.state_dict())
    nan_ref = copy.deepcopy(ref)
    with torch.no_grad():
        nan_ref.lm_head.weight.fill_(float("nan"))
    try:
        tune_scales(q, nan_ref, random_ids(12, 16), E2ETuning(steps=2, holdout=2), progress=False)
    finally:
        for k, v in q.state_dict().items():
            assert torch.equal(v, before[k]), k
