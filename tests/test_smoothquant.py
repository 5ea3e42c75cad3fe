"""SmoothQuant numerics (lowbit.methods.smoothquant): the scales, the W8A8 error
they remove on outlier activations, and exact folding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import CalibrationError, FormatError
from lowbit.kernels.registry import use_kernel
from lowbit.methods.smoothquant import (
    fold_into_linear_rows,
    fold_into_norm,
    scale_input_channels,
    smoothquant_scales,
)
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor

W8A8 = QuantScheme(bits=8, granularity="channel", activations="int8")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ------------------------------------------------------------------ scales
def test_scales_by_hand():
    act = torch.tensor([16.0, 1.0, 4.0, 0.25])
    w1 = torch.tensor([[1.0, -4.0, 0.5, 2.0]])
    w2 = torch.tensor([[-2.0, 1.0, 0.25, 0.0], [0.5, 0.5, 0.5, 0.5]])
    wmax = torch.tensor([2.0, 4.0, 0.5, 2.0])  # per channel, over the rows of both linears
    s = smoothquant_scales(act, [w1, w2], 0.5)
    assert s.dtype == torch.float32 and s.shape == (4,)
    assert torch.allclose(s, act.sqrt() / wmax.sqrt(), rtol=1e-6)
    assert torch.allclose(smoothquant_scales(act, [w1, w2], 1.0), act)
    assert torch.allclose(smoothquant_scales(act, [w1, w2], 0.0), 1.0 / wmax)
    s75 = smoothquant_scales(act, [w1, w2], 0.75)
    assert torch.allclose(s75, act.pow(0.75) / wmax.pow(0.25), rtol=1e-6)


def test_scales_floors_and_dead_channels():
    act = torch.tensor([0.0, 1e-30, 5.0, 3.0])
    w = torch.tensor([[1.0, 1.0, 0.0, 1e-12]])
    s = smoothquant_scales(act, [w], 0.5)
    assert bool(torch.isfinite(s).all()) and bool((s >= 1e-5).all())
    assert s[0] == 1.0  # never active: nothing to smooth
    assert math.isclose(float(s[1]), 1e-5, rel_tol=1e-6)  # floored
    assert math.isclose(float(s[2]), math.sqrt(5.0) / math.sqrt(1e-5), rel_tol=1e-5)  # weight max floored at 1e-5
    assert math.isclose(float(s[3]), math.sqrt(3.0) / math.sqrt(1e-5), rel_tol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_statistics_are_a_calibration_error(bad):
    act = torch.ones(8)
    act[3] = bad
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        smoothquant_scales(act, [torch.ones(4, 8)], 0.5)


def test_bad_inputs_are_reported():
    w = torch.ones(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(FormatError, match="NaN"):
        smoothquant_scales(torch.ones(8), [w], 0.5)
    with pytest.raises(CalibrationError, match="match"):
        smoothquant_scales(torch.ones(8), [torch.ones(4, 6)], 0.5)
    with pytest.raises(CalibrationError, match="alpha"):
        smoothquant_scales(torch.ones(8), [torch.ones(4, 8)], 1.5)
    with pytest.raises(CalibrationError, match="at least one"):
        smoothquant_scales(torch.ones(8), [], 0.5)


# ------------------------------------------------------------------ W8A8 error
def _w8a8_output(w, x, bias=None):
    """Through the real path: a W8A8 QuantLinear (cpu_w8a8 kernel) and its reference twin."""
    lin = QuantLinear.from_quantized(QuantizedTensor.quantize(w, W8A8), bias)
    assert lin.kernel_name == "cpu_w8a8"
    y = lin(x)
    with use_kernel("reference"):
        y_ref = lin(x)
    assert _rel(y, y_ref) < 1e-5
    return y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smoothing_reduces_w8a8_error_on_outlier_activations(seed):
    g = _gen(seed)
    k, n, tokens = 512, 256, 256
    x = torch.randn(tokens, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:8]] *= 100.0  # outlier channels
    w = torch.randn(n, k, generator=g) * 0.02
    b = torch.randn(n, generator=g)
    y = F.linear(x, w, b)

    plain = float((_w8a8_output(w, x, b) - y).pow(2).mean())
    s = smoothquant_scales(x.abs().amax(0), [w], 0.5)
    smoothed = float((_w8a8_output(scale_input_channels(w, s), x / s, b) - y).pow(2).mean())
    assert smoothed < 0.25 * plain, (smoothed, plain)
    # without outliers there is little to gain, and smoothing must not hurt much
    x_flat = torch.randn(tokens, k, generator=g)
    y_flat = F.linear(x_flat, w, b)
    plain_flat = float((_w8a8_output(w, x_flat, b) - y_flat).pow(2).mean())
    s_flat = smoothquant_scales(x_flat.abs().amax(0), [w], 0.5)
    smoothed_flat = float((_w8a8_output(scale_input_channels(w, s_flat), x_flat / s_flat, b) - y_flat).pow(2).mean())
    assert smoothed_flat < 2.0 * plain_flat


# ------------------------------------------------------------------ folding is exact
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_fold_into_norm_is_exactly_invertible(norm):
    g = _gen(5)
    k, n1, n2 = 256, 64, 96
    x = torch.randn(3, 9, k, generator=g)
    x[..., :4] *= 50.0
    nw = torch.rand(k, generator=g) + 0.5
    nb = torch.randn(k, generator=g) * 0.1 if norm == "layer" else None
    q, v = torch.randn(n1, k, generator=g) * 0.05, torch.randn(n2, k, generator=g) * 0.05

    def h(nw, nb):
        return F.rms_norm(x, (k,), nw, eps=1e-6) if norm == "rms" else F.layer_norm(x, (k,), nw, nb, eps=1e-5)

    act_max = h(nw, nb).reshape(-1, k).abs().amax(0)
    s = smoothquant_scales(act_max, [q, v], 0.5)
    nw2, nb2 = fold_into_norm(nw, nb, s)
    h2 = h(nw2, nb2)
    assert _rel(h2 * s, h(nw, nb)) < 1e-5  # the norm's output is divided by s ...
    for w in (q, v):  # ... and each consumer sees the same product
        assert _rel(F.linear(h2, scale_input_channels(w, s)), F.linear(h(nw, nb), w)) < 1e-5
    # smoothing did flatten the activations
    assert float(h2.abs().amax() / h2.abs().mean()) < 0.5 * float(h(nw, nb).abs().amax() / h(nw, nb).abs().mean())


def test_fold_into_preceding_linear_is_exactly_invertible():
    g = _gen(6)
    x = torch.randn(20, 64, generator=g)
    Wv, bv = torch.randn(128, 64, generator=g) * 0.2, torch.randn(128, generator=g)
    Wv[:3] *= 40.0  # a few large output channels feed the next layer
    Wo = torch.randn(32, 128, generator=g) * 0.05
    v = F.linear(x, Wv, bv)
    s = smoothquant_scales(v.abs().amax(0), [Wo], 0.5)
    Wv2, bv2 = fold_into_linear_rows(Wv, bv, s)
    assert _rel(F.linear(F.linear(x, Wv2, bv2), scale_input_channels(Wo, s)), F.linear(v, Wo)) < 1e-5
