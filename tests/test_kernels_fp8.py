"""cpu_fp8 (the C kernel for FP8 weights) pinned to the reference kernel.

Exact on the code table (every FP8 byte, widened in registers, equals torch's own float8
conversion) and on one-hot activations; elsewhere bounded by the float32 forward error
bound of both sides' sums, ``2 * 2**-24 * (K + 8) * (sum_k |x_k| |w_nk| + |bias_n|)`` (a wrong code,
scale or tail mask shows up at the size of the terms, far above the bound).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.errors import KernelError
from lowbit.kernels import cpu_fp8
from lowbit.kernels.registry import use_kernel
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor

from compiled_kernels import assert_missing_library_falls_back, require_kernel

U = 2.0**-24
FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@pytest.fixture(autouse=True)
def compiled(request):
    if not request.node.name.startswith("test_missing_library"):
        require_kernel("cpu_fp8", cpu_fp8.available, ("avx512f", "avx512bw", "avx512vl", "f16c"))


def _finite_codes(fmt: str) -> torch.Tensor:
    """Every byte whose FP8 value is finite (lowbit's saturating rounding never stores others)."""
    vals = torch.arange(256, dtype=torch.uint8).view(FP8[fmt]).to(torch.float32)
    return torch.arange(256, dtype=torch.uint8)[torch.isfinite(vals)]


@pytest.mark.parametrize("fmt", list(FP8))
def test_every_code_widens_to_torchs_float8_value_exactly(fmt):
    codes = _finite_codes(fmt)  # [C]
    k = codes.numel()
    w = codes.reshape(1, k).repeat(3, 1)  # [3, C]
    scale = torch.tensor([[1.0], [0.5], [3.0]])
    p = cpu_fp8.prepare(w, scale, fmt)
    y = cpu_fp8.fp8_linear(torch.eye(k), p)  # row i picks column i: no sums, exact
    want = (codes.view(FP8[fmt]).to(torch.float32).reshape(k, 1) * scale.reshape(1, 3))
    assert torch.equal(y, want)


SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    fmt = draw(st.sampled_from(list(FP8)))
    gran = draw(st.sampled_from(["channel", "tensor"]))
    n = draw(st.integers(1, 70))
    k = draw(st.integers(1, 300))  # tails of every length past the 32-wide steps
    b = draw(st.integers(1, 20))  # more than one pass of 8 activation rows
    seed = draw(st.integers(0, 2**16))
    bias = draw(st.booleans())
    return fmt, gran, n, k, b, seed, bias


@SETTINGS
@given(problems())
def test_layer_matches_reference_kernel_on_random_shapes(problem):
    fmt, gran, n, k, b, seed, bias = problem
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 4
    w[:, : min(3, k)] *= 30  # outlier columns: saturated and subnormal codes in the same rows
    qt = QuantizedTensor.quantize(w, QuantScheme(format=fmt, granularity=gran))
    layer = QuantLinear.from_quantized(qt, torch.randn(n, generator=g) if bias else None)
    assert layer.kernel_name == "cpu_fp8"
    x = torch.randn(b, k, generator=g)
    with use_kernel("reference"):
        ref = layer(x)
    y = layer(x)
    wq = qt.dequantize(torch.float32)
    # both sides round the bias addition too: its terms count like the products'
    terms = x.abs() @ wq.abs().T + (0 if layer.bias is None else layer.bias.abs())
    bound = 2 * U * (k + 8) * terms + 1e-30
    assert bool(((y - ref).abs() <= bound).all()), float(((y - ref).abs() / bound).max())


def test_fp8_activations_are_rounded_as_the_reference_does():
    from lowbit.formats.activations import fake_quantize_activations_fp8

    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 96, generator=g)
    qt = QuantizedTensor.quantize(w, QuantScheme(format="fp8_e4m3", activations="fp8_e4m3"))
    layer = QuantLinear.from_quantized(qt)
    assert layer.kernel_name == "cpu_fp8"
    x = torch.randn(2, 5, 96, generator=g)
    with use_kernel("reference"):
        ref = layer(x)
    y = layer(x)
    assert y.shape == (2, 5, 40)
    xa = fake_quantize_activations_fp8(x)
    bound = 2 * U * (96 + 8) * (xa.abs() @ qt.dequantize(torch.float32).abs().T)
    assert bool(((y - ref).abs() <= bound).all())
    # the activations really are rounded: the unrounded product differs by far more than the bound
    unrounded = x @ qt.dequantize(torch.float32).T
    assert float((unrounded - ref).abs().max()) > 100 * float(bound.max())
    # other activation dtypes come back in their own dtype
    yb = layer(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert float((yb.float() - y).norm() / y.norm()) < 2e-2


def test_other_formats_and_groups_stay_elsewhere():
    w = torch.randn(32, 128)
    assert QuantLinear.from_quantized(QuantizedTensor.quantize(w, QuantScheme(bits=8, granularity="channel"))).kernel_name == "cpu_int8"
    with pytest.raises(KernelError, match="fp8"):
        with use_kernel("cpu_fp8"):
            QuantLinear.from_quantized(QuantizedTensor.quantize(w, QuantScheme(bits=4, group_size=32)))(torch.randn(1, 128))


def test_bad_inputs_raise_typed_errors():
    p = cpu_fp8.prepare(torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 1), "fp8_e4m3")
    with pytest.raises(KernelError, match="K=16"):
        cpu_fp8.fp8_linear(torch.randn(2, 15), p)
    with pytest.raises(KernelError, match="floating-point"):
        cpu_fp8.fp8_linear(torch.ones(2, 16, dtype=torch.int32), p)
    with pytest.raises(KernelError, match="scale"):
        cpu_fp8.prepare(torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 2), "fp8_e4m3")
    with pytest.raises(KernelError, match="nf4"):
        cpu_fp8.prepare(torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 1), "nf4")


def test_missing_library_means_unsupported_and_auto_falls_back(monkeypatch):
    layer = QuantLinear.from_quantized(QuantizedTensor.quantize(torch.randn(8, 64), QuantScheme(format="fp8_e5m2")))
    assert_missing_library_falls_back(monkeypatch, cpu_fp8, "cpu_fp8", layer, torch.randn(3, 64))
