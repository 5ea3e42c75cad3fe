"""SignRound: the tunable quantizer, its optimisation loop and the walker's block tuning."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit import GPTQ, Recipe, SignRound, formats
from lowbit.calibration import CalibrationData
from lowbit.errors import CalibrationError, SchemeError
from lowbit.methods import round_weight
from lowbit.methods import signround as sr
from lowbit.model.walker import WalkOptions
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor
from tiny_models import random_ids, save_load_generate, tiny_gpt2, tiny_llama

SCHEMES = [
    QuantScheme(bits=4, symmetric=False, group_size=32),
    QuantScheme(bits=3, symmetric=False, group_size=16, scale_dtype="float16"),
    QuantScheme(bits=2, symmetric=True, group_size=32, scale_dtype="bfloat16"),
    QuantScheme(bits=4, symmetric=True, granularity="channel"),
    QuantScheme(bits=8, symmetric=False, granularity="tensor"),
]
W3A = QuantScheme(bits=3, symmetric=False, group_size=32)


def _weight(seed=0, shape=(24, 64)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero group
    w[1, 3] = 0.4  # an outlier
    return w


def _random_tunables(w, scheme, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = sr.init_tunables(w, scheme)
    p.v = torch.rand(p.v.shape, generator=g) - 0.5
    p.lo = 0.5 + 0.5 * torch.rand(p.lo.shape, generator=g)
    p.hi = 0.5 + 0.5 * torch.rand(p.hi.shape, generator=g)
    return p


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.short_name)
def test_the_start_is_round_to_nearest_bit_for_bit(scheme):
    w = _weight()
    tuned = sr.finalize(w, sr.init_tunables(w, scheme), scheme)
    rtn = QuantizedTensor.quantize(w, scheme)
    assert torch.equal(tuned.codes(), rtn.codes())
    assert torch.equal(tuned.qparams.scale, rtn.qparams.scale)
    if scheme.symmetric:
        assert tuned.qparams.zero is None
    else:
        assert torch.equal(tuned.qparams.zero, rtn.qparams.zero)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.short_name)
def test_stored_weight_equals_the_tuned_forward_exactly(scheme):
    """What tuning optimised (qdq) is what the checkpoint holds (finalize), for any tunables."""
    w = _weight()
    p = _random_tunables(w, scheme)
    tuned = sr.finalize(w, p, scheme)
    assert torch.equal(tuned.dequantize(), sr.qdq(w, p, scheme))
    assert not torch.equal(tuned.codes(), QuantizedTensor.quantize(w, scheme).codes())
    # the stored parameters are the scheme's own kinds (scale dtype, uint8 zero points)
    assert tuned.qparams.scale.dtype == formats.scale_torch_dtype(scheme)


@pytest.mark.parametrize("scheme", [SCHEMES[0], SCHEMES[2]], ids=lambda s: s.short_name)
def test_gradients_go_straight_through_the_rounding(scheme):
    """d loss / d v = upstream gradient x the group's scale wherever the code is inside the grid."""
    w = _weight()
    p = sr.init_tunables(w, scheme)
    for t in p.tensors():
        t.requires_grad_(True)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    (sr.qdq(w, p, scheme) * upstream).sum().backward()
    rtn = QuantizedTensor.quantize(w, scheme)
    scale = formats.grouped(torch.ones_like(w), scheme) * rtn.qparams.scale.float().unsqueeze(-1)
    inside = (rtn.codes() > 0) & (rtn.codes() < scheme.qmax)
    expected = upstream * scale.reshape(w.shape)
    assert torch.equal(p.v.grad[inside], expected[inside])
    assert bool(p.hi.grad.abs().sum() > 0)
    assert (p.lo.grad is None or float(p.lo.grad.abs().sum()) == 0) if scheme.symmetric else bool(p.lo.grad.abs().sum() > 0)


def _layer_problem(seed=0, n=32, k=64, tokens=2048, rank=8):
    """A linear whose inputs lie near a low-rank subspace (as LLM activations largely do): rounding
    each weight alone is far from optimal there."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(rank, k, generator=g)
    xs = []
    for _ in range(4):
        x = torch.randn(tokens // 4, rank, generator=g) @ mix
        xs.append(x + 0.1 * torch.randn(x.shape, generator=g))
    w = torch.randn(n, k, generator=g) * 0.1
    return w, xs


def _layer_loss(w, xs):
    def loss_fn(dq, b):
        return (xs[b] @ (dq["lin"] - w).T).pow(2).mean()

    return loss_fn


@pytest.mark.parametrize("tune_range", [True, False])
def test_tuning_lowers_the_layer_output_error_and_keeps_its_bounds(tune_range):
    w, xs = _layer_problem()
    scheme = W3A
    found = sr.tune({"lin": w}, {"lin": scheme}, _layer_loss(w, xs), len(xs), SignRound(iters=200, tune_range=tune_range))
    assert found.chosen != "start"
    assert found.losses[found.chosen] < 0.5 * found.losses["start"], found.losses
    assert found.losses[found.chosen] == min(found.losses.values())
    p = found.params["lin"]
    assert float(p.v.abs().max()) <= 0.5
    assert float(p.lo.min()) >= sr.FACTOR_MIN and float(p.hi.max()) <= 1.0
    # the reported loss is the stored weight's loss
    dq = sr.finalize(w, p, scheme).dequantize()
    total = sum(float(_layer_loss(w, xs)({"lin": dq}, b)) for b in range(len(xs)))
    assert total == pytest.approx(found.losses[found.chosen], rel=1e-5)
    if not tune_range:  # fixed grid: every code is RTN's or one step away
        step = (sr.finalize(w, p, scheme).codes().int() - QuantizedTensor.quantize(w, scheme).codes().int()).abs()
        assert int(step.max()) == 1
        assert torch.equal(p.lo, torch.ones_like(p.lo)) and torch.equal(p.hi, torch.ones_like(p.hi))


def test_a_step_that_hurts_is_not_kept():
    """One full-size step (lr 1) throws every offset to +-0.5: worse than RTN, so RTN is kept."""
    w, xs = _layer_problem(seed=1)
    found = sr.tune({"lin": w}, {"lin": W3A}, _layer_loss(w, xs), len(xs), SignRound(iters=1, lr=1.0))
    assert found.losses["last"] > found.losses["start"]
    assert found.chosen == "start"
    assert torch.equal(found.params["lin"].v, torch.zeros_like(w))


def test_bad_specs_and_schemes_are_typed_errors():
    with pytest.raises(SchemeError, match="iters"):
        SignRound(iters=-1)
    with pytest.raises(SchemeError, match="lr"):
        SignRound(lr=0.0)
    with pytest.raises(SchemeError, match="tune_range"):
        SignRound(tune_range=1)
    with pytest.raises(SchemeError, match="integer"):
        Recipe.uniform(QuantScheme(format="nf4"), method="signround")
    with pytest.raises(SchemeError, match="zero_point='int'"):
        Recipe.uniform(QuantScheme(bits=4, symmetric=False, zero_point="float", group_size=32), method="signround")
    with pytest.raises(SchemeError, match="zero_point='int'"):
        sr.init_tunables(_weight(), QuantScheme(bits=4, symmetric=False, zero_point="float", group_size=32))
    with pytest.raises(CalibrationError, match="whole block"):
        round_weight(_weight(), W3A, SignRound())
    assert SignRound().learning_rate == pytest.approx(1 / 200) and SignRound(lr=0.01).learning_rate == 0.01


def test_recipe_records_the_options():
    recipe = Recipe.uniform(W3A, method=SignRound(iters=50, lr=0.02, tune_range=False, seed=3))
    back = Recipe.from_json(recipe.to_json())
    assert back.rounding == SignRound(iters=50, lr=0.02, tune_range=False, seed=3)
    assert json.loads(recipe.to_json())["method"] == "signround"


# -- through the walker ------------------------------------------------------------------------
def _calib(n=16, length=32, seed=1):
    return CalibrationData(random_ids(n, length, seed=seed), {"source": "random ids (test)"})


def _mse(ref, model, ids):
    with torch.no_grad():
        return float((model(ids).logits - ref(ids).logits).pow(2).mean())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_walker_tunes_blocks_below_rtn(make):
    """On Llama (nn.Linear) and GPT-2 (Conv1D, stored transposed): the calibration windows'
    output error (the objective) and a held-out window's both end below RTN's; the model's own
    parameters take no gradient and keep their requires_grad flags."""
    data, heldout = _calib(), random_ids(4, 32, seed=7)
    ref, rtn, tuned = make(), make(), make()
    lowbit.quantize(rtn, Recipe.uniform(W3A), progress=False)
    flags = {n: p.requires_grad for n, p in tuned.named_parameters()}
    report = lowbit.quantize(tuned, Recipe.uniform(W3A, method=SignRound(iters=60)), calibration=data, progress=False)
    assert _mse(ref, tuned, data.ids) < 0.7 * _mse(ref, rtn, data.ids)
    assert _mse(ref, tuned, heldout) < _mse(ref, rtn, heldout)
    notes = [n for n in report.notes if "signround from" in n]
    assert len(notes) == 2 and all("from rtn" in n and "start" in n for n in notes)
    quantized = {n for n, m in tuned.named_modules() if isinstance(m, lowbit.QuantLinear)}
    for n, p in tuned.named_parameters():
        assert p.grad is None, n
        if n.rsplit(".", 1)[0] not in quantized:  # norms, embeddings: the walker's own flags restored
            assert p.requires_grad == flags[n], n


def test_tuned_model_saves_loads_and_generates(tmp_path):
    model = tiny_llama()
    lowbit.quantize(model, Recipe.uniform(W3A, method=SignRound(iters=10, seed=2)), calibration=_calib(8), progress=False)
    manifest = save_load_generate(model, tmp_path / "sr.lowbit.safetensors", new_tokens=4)
    assert manifest["recipe"]["method"] == "signround"
    assert manifest["recipe"]["method_options"][0]["iters"] == 10


def test_disk_offload_and_memory_tune_the_same(tmp_path):
    data = _calib(8)
    recipe = Recipe.uniform(W3A, method=SignRound(iters=8))
    mem, disk = tiny_llama(), tiny_llama()
    lowbit.quantize(mem, recipe, calibration=data, options=WalkOptions(batch_size=3), progress=False)
    lowbit.quantize(disk, recipe, calibration=data, progress=False,
                    options=WalkOptions(batch_size=3, offload="disk", offload_dir=str(tmp_path)))
    for (n, a), (_, b) in zip(mem.state_dict().items(), disk.state_dict().items()):
        assert torch.equal(a, b), n
    assert not list(tmp_path.iterdir()), "spilled activations and targets must be removed"


# -- starting from another method's result ---------------------------------------------------
GPTQ_SCHEMES = SCHEMES[:4] + [
    QuantScheme(bits=2, symmetric=False, group_size=16),
    QuantScheme(bits=2, symmetric=True, group_size=16),
    QuantScheme(bits=2, symmetric=False, granularity="channel"),
]


@pytest.mark.parametrize("scheme", GPTQ_SCHEMES, ids=lambda s: s.short_name)
def test_a_gptq_start_reproduces_gptq_codes(scheme):
    """Bit for bit, also where the clipping search left weights far outside a group's range that
    GPTQ then put on an inner code (more than one step from the clamped nearest one)."""
    from lowbit.methods.gptq import gptq

    w, xs = _layer_problem(k=64)
    w[:, ::9] *= 4.0  # outliers the clipping search cuts off
    x = torch.cat(xs)
    hessian = 2 * x.T @ x / x.shape[0]
    qt = gptq(w, scheme, hessian, GPTQ(clip_search=True))
    assert not torch.equal(qt.codes(), QuantizedTensor.quantize(w, scheme).codes())  # a real start
    start = sr.start_from(w, qt)
    again = sr.finalize(w, sr.init_tunables(w, scheme), scheme, start)
    assert torch.equal(again.codes(), qt.codes())
    assert torch.equal(again.qparams.scale, qt.qparams.scale)
    if not scheme.symmetric:
        assert torch.equal(again.qparams.zero, qt.qparams.zero)
    # and the start from an RTN result is the RTN start
    rtn = QuantizedTensor.quantize(w, scheme)
    assert torch.equal(sr.finalize(w, sr.init_tunables(w, scheme), scheme, sr.start_from(w, rtn)).codes(), rtn.codes())


def test_tuning_from_gptq_never_returns_worse_than_gptq():
    """The start is GPTQ's result exactly, and the stored result's loss (computed here from the
    checkpoint form, not taken from the tuner) is never above GPTQ's."""
    from lowbit.methods.gptq import gptq

    w, xs = _layer_problem(seed=2)
    x = torch.cat(xs)
    qt = gptq(w, W3A, 2 * x.T @ x / x.shape[0], GPTQ(clip_search=True))
    loss = _layer_loss(w, xs)
    found = sr.tune({"lin": w}, {"lin": W3A}, loss, len(xs), SignRound(iters=100), {"lin": sr.start_from(w, qt)})
    gptq_loss = sum(float(loss({"lin": qt.dequantize()}, b)) for b in range(len(xs)))
    assert found.losses["start"] == pytest.approx(gptq_loss, rel=1e-6)
    stored = sr.finalize(w, found.params["lin"], W3A, found.starts["lin"]).dequantize()
    assert sum(float(loss({"lin": stored}, b)) for b in range(len(xs))) <= gptq_loss * (1 + 1e-6)
    if found.chosen == "start":
        assert torch.equal(stored, qt.dequantize())


def test_walker_gptq_start_with_no_steps_is_gptq():
    data = _calib(8)
    plain, started = tiny_llama(), tiny_llama()
    lowbit.quantize(plain, Recipe.uniform(W3A, method=GPTQ(clip_search=True)), calibration=data, progress=False)
    report = lowbit.quantize(started, Recipe.uniform(W3A, method=SignRound(iters=0, start=GPTQ(clip_search=True))), calibration=data, progress=False)
    notes = [n for n in report.notes if "signround" in n]
    assert len(notes) == 2 and all("from gptq kept the 'start'" in n for n in notes)
    sp, ss = plain.state_dict(), started.state_dict()
    assert sp.keys() == ss.keys()
    for name, t in sp.items():
        assert torch.equal(t, ss[name]), name


def test_walker_gptq_start_tunes_below_gptq():
    data, ref = _calib(), tiny_llama()
    plain, tuned = tiny_llama(), tiny_llama()
    lowbit.quantize(plain, Recipe.uniform(W3A, method=GPTQ()), calibration=data, progress=False)
    lowbit.quantize(tuned, Recipe.uniform(W3A, method=SignRound(iters=60, start=GPTQ())), calibration=data, progress=False)
    assert _mse(ref, tuned, data.ids) < 0.9 * _mse(ref, plain, data.ids)


def test_start_spec_round_trips_and_is_checked():
    spec = SignRound(iters=5, start=GPTQ(clip_search=True, damp=0.1))
    back = Recipe.from_json(Recipe.uniform(W3A, method=spec).to_json()).rounding
    assert back == spec and isinstance(back.start, GPTQ)
    with pytest.raises(SchemeError, match="start"):
        SignRound(start="gptq")
    with pytest.raises(SchemeError, match="fp_targets"):
        SignRound(start=GPTQ(fp_targets=True))


@pytest.mark.parametrize("propagate", ["quantized", "full_precision"])
def test_spills_are_removed_when_tuning_fails(tmp_path, monkeypatch, propagate):
    def broken(*args, **kwargs):
        raise RuntimeError("tuning failed")

    monkeypatch.setattr(sr, "tune", broken)
    with pytest.raises(RuntimeError, match="tuning failed"):
        lowbit.quantize(tiny_llama(), Recipe.uniform(W3A, method=SignRound(iters=2)), calibration=_calib(4), progress=False,
                        options=WalkOptions(batch_size=2, offload="disk", offload_dir=str(tmp_path), propagate=propagate))
    assert not list(tmp_path.iterdir())


def test_a_loss_that_ignores_the_weights_is_an_error():
    w, xs = _layer_problem()
    with pytest.raises(CalibrationError, match="no gradient"):
        sr.tune({"lin": w}, {"lin": W3A}, lambda dq, b: xs[b].sum() * 0.0 + torch.ones(()), len(xs), SignRound(iters=2))


def test_train_mode_models_are_tuned_without_dropout_and_stay_in_train_mode():
    """GPT-2 has dropout 0.1: in train mode the objective would be noisy. The walker tunes in eval
    mode (same result as an eval-mode model) and gives the model its mode back."""
    data = _calib(8)
    recipe = Recipe.uniform(W3A, method=SignRound(iters=6))
    a, b = tiny_gpt2(), tiny_gpt2().train()
    lowbit.quantize(a, recipe, calibration=data, progress=False)
    lowbit.quantize(b, recipe, calibration=data, progress=False)
    assert b.training and not a.training
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def test_partly_planned_symmetric_block_in_bfloat16():
    """Only some of a block's linears quantized (down_proj kept), a symmetric scheme, a bf16 model."""
    from lowbit import Rule

    model = tiny_llama().to(torch.bfloat16)
    sym = QuantScheme(bits=4, group_size=32)
    recipe = Recipe(rules=(Rule(r".*lm_head", None), Rule(r".*down_proj", None), Rule(".*", sym)), method=SignRound(iters=4))
    report = lowbit.quantize(model, recipe, calibration=_calib(4), progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, lowbit.QuantLinear)
    assert len(report.layers) == 12
    with torch.no_grad():
        assert bool(torch.isfinite(model(random_ids(1, 8)).logits.float()).all())


@pytest.mark.parametrize("offload", ["memory", "disk"])
def test_fp_targets_use_the_full_precision_stream(tmp_path, offload):
    """AutoRound's targets: block 0 sees the same inputs in both streams, so its codes match the
    local objective's; later blocks are fitted to the full-precision model's outputs and differ.
    Both streams' spills are removed."""
    data, ref = _calib(8), tiny_llama()
    opts = WalkOptions(batch_size=3, offload=offload, offload_dir=str(tmp_path))
    local, fpt, rtn = tiny_llama(), tiny_llama(), tiny_llama()
    lowbit.quantize(rtn, Recipe.uniform(W3A), progress=False)
    lowbit.quantize(local, Recipe.uniform(W3A, method=SignRound(iters=10)), calibration=data, options=opts, progress=False)
    lowbit.quantize(fpt, Recipe.uniform(W3A, method=SignRound(iters=10, fp_targets=True)), calibration=data, options=opts, progress=False)
    sl, sf = local.state_dict(), fpt.state_dict()
    for name in sl:
        if name.startswith("model.layers.0.") and name.endswith("qweight"):
            assert torch.equal(sl[name], sf[name]), name
    assert not torch.equal(sl["model.layers.1.mlp.down_proj.qweight"], sf["model.layers.1.mlp.down_proj.qweight"])
    assert _mse(ref, fpt, data.ids) < _mse(ref, rtn, data.ids)
    assert not list(tmp_path.iterdir())
    with pytest.raises(SchemeError, match="fp_targets"):
        SignRound(fp_targets=1)
