"""FP8, ternary and LLM.int8 layers: exact numerics, kernels against their reference twin,
files that round-trip, typed errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit import LLMInt8, Recipe, formats
from lowbit.calibration import CalibrationData
from lowbit.errors import CalibrationError, PackingError, SchemeError
from lowbit.formats.activations import fake_quantize_activations_fp8
from lowbit.formats.fp8 import fp8_max
from lowbit.kernels.registry import use_kernel
from lowbit.methods.llm_int8 import llm_int8
from lowbit.nn.quant_linear import QuantLinear
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import random_ids, tiny_llama  # noqa: E402

FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
W8A8 = QuantScheme(bits=8, granularity="channel", activations="int8")


@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_fp8_codes_are_torch_float8_bytes(fmt, granularity):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * 0.03
    scheme = QuantScheme(format=fmt, granularity=granularity)
    codes, qp = formats.quantize_weight(w, scheme)
    amax = w.abs().amax(dim=1, keepdim=True) if granularity == "channel" else w.abs().amax().reshape(1, 1)
    assert torch.equal(qp.scale, amax / fp8_max(fmt))
    expected = (w / qp.scale).to(FP8[fmt])
    assert torch.equal(codes, expected.view(torch.uint8))
    assert torch.equal(formats.dequantize(codes, qp, scheme), expected.float() * qp.scale)
    # each row's (or the tensor's) largest magnitude lands exactly on the format's maximum
    top = codes.view(FP8[fmt]).float().abs().amax(dim=1 if granularity == "channel" else None)
    assert bool((top == fp8_max(fmt)).all())


@pytest.mark.parametrize("fmt", list(FP8))
def test_fp8_saturates_instead_of_overflowing(fmt):
    scheme = QuantScheme(format=fmt, granularity="tensor")
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)) * 10.0
    qp = formats.QParams(torch.tensor([[1e-4]]), None)  # |w| / s reaches ~1e5, beyond both formats' range
    codes = formats.quantize(w, qp, scheme)
    back = formats.dequantize(codes, qp, scheme)
    assert bool(torch.isfinite(back).all())
    assert float(back.abs().max()) == pytest.approx(fp8_max(fmt) * 1e-4, rel=1e-6)


def test_ternary_is_absmean_and_three_valued():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    for granularity in ("tensor", "channel"):
        scheme = QuantScheme(format="ternary", granularity=granularity)
        codes, qp = formats.quantize_weight(w, scheme)
        assert set(codes.unique().tolist()) == {0, 1, 2}
        s = w.abs().mean() if granularity == "tensor" else w.abs().mean(dim=1, keepdim=True)
        assert torch.allclose(qp.scale.reshape(-1), s.reshape(-1), rtol=1e-6, atol=0)
        expected = torch.round(w / qp.scale.reshape(-1, 1) if granularity == "channel" else w / qp.scale).clamp(-1, 1)
        assert torch.equal(codes.float() - 1, expected)
        assert torch.equal(formats.dequantize(codes, qp, scheme), expected * qp.scale)
    assert QuantizedTensor.quantize(w, QuantScheme(format="ternary")).bits_per_weight == pytest.approx(2 + 32 / w.numel())


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 150),
    fmt=st.sampled_from(["fp8_e4m3", "fp8_e5m2", "ternary", "nf4", "fp4"]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_through_packing_any_shape(n, k, fmt, seed):
    """Odd sizes: fp8 / ternary take any width; the blockwise codebooks take widths their
    block divides and refuse the others with a SchemeError naming the sizes that work."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    scheme = QuantScheme(format=fmt) if fmt not in ("nf4", "fp4") else QuantScheme(format=fmt, group_size=8)
    if scheme.granularity.value == "group" and k % scheme.group_size:
        with pytest.raises(SchemeError, match="does not divide"):
            QuantizedTensor.quantize(w, scheme)
        return
    codes, qp = formats.quantize_weight(w, scheme)
    qt = QuantizedTensor.quantize(w, scheme)
    assert torch.equal(qt.codes(), codes)
    assert torch.equal(qt.dequantize(), formats.dequantize(codes, qp, scheme))
    layer = QuantLinear.from_quantized(qt)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(seed + 1))
    with use_kernel("reference"):  # the stored layer's exact numerics (cpu_lut, pinned in test_kernels_lut, rounds x)
        assert torch.allclose(layer(x), x @ qt.dequantize().T, rtol=1e-5, atol=1e-5)


def test_quantized_tensor_rejects_missing_or_foreign_tensors():
    w = torch.randn(16, 128)
    dq = QuantizedTensor.quantize(w, QuantScheme(format="nf4", double_quant=True))
    with pytest.raises(PackingError, match="scale_absmax"):
        QuantizedTensor(dq.packed, dq.scale, None, dq.shape, dq.scheme)
    plain = QuantizedTensor.quantize(w, QuantScheme(format="nf4"))
    with pytest.raises(PackingError, match="stores no 'scale_absmax'"):
        QuantizedTensor(plain.packed, plain.scale, None, plain.shape, plain.scheme,
                        scale_absmax=dq.scale_absmax, scale_offset=dq.scale_offset)
    with pytest.raises(PackingError, match="W8A8"):
        QuantizedTensor(plain.packed, plain.scale, None, plain.shape, plain.scheme,
                        outlier_idx=torch.zeros(1, dtype=torch.int32), outlier_weight=torch.zeros(16, 1, dtype=torch.float16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(format="ternary", bits=4), "2-bit codes"),
        (dict(format="fp8_e4m3", group_size=32), "only applies to granularity 'group'"),
        (dict(format="fp8_e4m3", granularity="group"), "not 'group'"),
        (dict(format="nf4", activations="int8"), "W8A8"),
        (dict(bits=4, activations="fp8_e4m3"), "fp8 weight format"),
        (dict(format="fp9"), "unknown numeric format"),
    ],
)
def test_invalid_float_schemes(kwargs, match):
    with pytest.raises(SchemeError, match=match):
        QuantScheme(**kwargs)


def test_integer_only_methods_refuse_other_formats():
    with pytest.raises(SchemeError, match="integer formats"):
        Recipe.uniform(QuantScheme(format="nf4"), method="gptq")
    with pytest.raises(SchemeError, match="integer formats"):
        Recipe.uniform(QuantScheme(format="fp8_e4m3"), method="awq")
    with pytest.raises(SchemeError, match="W8A8"):
        Recipe.uniform(QuantScheme(bits=8, granularity="channel"), method="llm_int8")


def test_fp8_activations_round_per_token():
    x = torch.randn(4, 64) * torch.tensor([[1.0], [100.0], [1e-3], [0.0]])
    y = fake_quantize_activations_fp8(x)
    assert torch.equal(y[3], x[3])
    for r in range(3):
        s = x[r].abs().max() / 448
        assert torch.equal(y[r], (x[r] / s).to(torch.float8_e4m3fn).float() * s)


# -- LLM.int8 ---------------------------------------------------------------------------------
def _outlier_case(seed=0, n=48, k=96):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(7, k, generator=g)
    hot = torch.tensor([5, 17, 60])
    x[:, hot] *= 40.0  # three outlier feature dimensions, as in the paper's figure
    return w, x, hot


def test_llm_int8_keeps_outlier_columns_in_float16():
    w, x, hot = _outlier_case()
    qt = llm_int8(w, W8A8, x.abs().amax(dim=0), LLMInt8(threshold=6.0))
    assert torch.equal(qt.outlier_idx, hot.to(torch.int32))
    assert torch.equal(qt.outlier_weight, w[:, hot].to(torch.float16))
    assert bool((qt.codes()[:, hot] == W8A8.zero_code).all())
    # the inlier scale comes from the inlier columns only
    inl = w.clone()
    inl[:, hot] = 0
    assert torch.equal(qt.scale, formats.choose_qparams(inl, W8A8).scale)
    deq = qt.dequantize()
    assert torch.equal(deq[:, hot], w[:, hot].to(torch.float16).float())


def test_llm_int8_beats_plain_w8a8_on_outlier_activations():
    w, x, _ = _outlier_case(1)
    exact = x @ w.T
    plain = QuantLinear.from_quantized(QuantizedTensor.quantize(w, W8A8))
    mixed = QuantLinear.from_quantized(llm_int8(w, W8A8, x.abs().amax(dim=0), LLMInt8()))
    err_plain = formats.sqnr_db(exact, plain(x))
    err_mixed = formats.sqnr_db(exact, mixed(x))
    assert err_mixed > err_plain + 10  # outliers no longer stretch each token's int8 scale


@pytest.mark.parametrize("batch", [1, 5, 32])
def test_llm_int8_integer_kernel_equals_reference(batch):
    w, _, _ = _outlier_case(2)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, w.shape[1], generator=g)
    x[:, [5, 17, 60]] *= 40
    layer = QuantLinear.from_quantized(llm_int8(w, W8A8, torch.full((w.shape[1],), 1.0).index_fill(0, torch.tensor([5, 17, 60]), 50.0), LLMInt8()), torch.randn(w.shape[0]))
    assert layer.kernel_name == "cpu_w8a8"
    with use_kernel("reference"):
        ref = layer(x)
    with use_kernel("cpu_w8a8"):
        fast = layer(x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_llm_int8_needs_activation_statistics():
    with pytest.raises(CalibrationError, match="activation statistics"):
        from lowbit.methods import round_weight

        round_weight(torch.randn(4, 8), W8A8, LLMInt8())


# -- whole models -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scheme, method, max_prob_err",
    [
        (QuantScheme(format="nf4", double_quant=True, group_size=32), "rtn", 0.01),
        (QuantScheme(format="fp4", group_size=32), "rtn", 0.02),
        (QuantScheme(format="fp8_e4m3"), "rtn", 0.005),
        (QuantScheme(format="fp8_e5m2", granularity="tensor", activations="fp8_e4m3"), "rtn", 0.01),
        (QuantScheme(format="ternary", granularity="channel"), "rtn", 0.2),
        (W8A8, LLMInt8(threshold=1.0), 0.005),
    ],
)
def test_model_quantizes_saves_loads_and_runs(tmp_path, scheme, method, max_prob_err):
    model = tiny_llama()
    ids = random_ids(2, 16)
    with torch.no_grad():
        ref = model(ids).logits.softmax(-1)
    calibration = CalibrationData(random_ids(4, 16, seed=3), {"source": "random ids"}) if method != "rtn" else None
    report = lowbit.quantize(model, Recipe.uniform(scheme, method=method), calibration=calibration, progress=False)
    with torch.no_grad():
        out = model(ids).logits
    assert float((out.softmax(-1) - ref).abs().max()) < max_prob_err
    path = tmp_path / "m.safetensors"
    lowbit.save(model, path)
    loaded = lowbit.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
    if method != "rtn":
        assert 0 < report.outlier_fraction < 1
        assert sum(m.n_outliers for m in loaded.modules() if isinstance(m, QuantLinear)) > 0
    # the stored bytes are exactly what the scheme says
    for rec in report.layers:
        assert rec.nbytes == scheme.storage_bytes(rec.out_features, rec.in_features, rec.n_outliers)
