"""cpu_lut (the C kernel for 2/3/4-bit table formats) pinned to its torch twin.

Exact where the math is integer (activation codes, the weight layout, integer
inputs); elsewhere bounded by the float32 forward error bound
``gamma_n = n * 2**-24`` of the sums both sides compute, times the sum of the
absolute values of the terms the kernel adds (a wrong code, scale or layout
shows up at the size of those terms, far above the bound).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.errors import KernelError
from lowbit.kernels import cpu_lut, registry
from lowbit.kernels.registry import use_kernel
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor

from compiled_kernels import assert_missing_library_falls_back, require_kernel

U = 2.0**-24
_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")


@pytest.fixture(autouse=True)
def compiled(request):
    if not request.node.name.startswith("test_missing_library"):
        require_kernel("cpu_lut", cpu_lut.available, _FLAGS)


SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    bits = draw(st.sampled_from([2, 3, 4]))
    n = draw(st.integers(1, 70))
    whole_row = draw(st.booleans())
    if whole_row:
        k = draw(st.integers(1, 300))
        g = None
    else:
        g = draw(st.sampled_from([32, 64, 96]))
        k = g * draw(st.integers(1, 4))
    b = draw(st.integers(1, 32))
    table = draw(st.sampled_from(["identity", "signed", "ternary", "integer", "float"]))
    offset = draw(st.booleans())
    per_tensor = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return bits, n, k, g, b, table, offset, per_tensor, seed


def make(bits, n, k, g, table, offset, per_tensor, seed):
    gen = torch.Generator().manual_seed(seed)
    size = 1 << bits
    codes = torch.randint(0, size, (n, k), generator=gen, dtype=torch.uint8)
    if table == "identity":
        lut = torch.arange(size, dtype=torch.float32)
    elif table == "signed":
        lut = torch.arange(size, dtype=torch.float32) - size // 2
    elif table == "ternary":
        lut = torch.tensor([-1.0, 0.0, 1.0, 0.0] * (size // 4))
    elif table == "integer":
        lut = torch.randint(-100, 100, (size,), generator=gen).to(torch.float32)
    else:
        lut = torch.randn(size, generator=gen)
    ng = k // (g or k)
    rows = 1 if per_tensor else n
    scale = torch.rand(rows, ng, generator=gen) * 0.1 + 0.01
    off = torch.randn(rows, ng, generator=gen) * 0.05 if offset else None
    return codes, lut, scale, off


def bound(x, p, scale, off, g, n, k):
    """gamma_n times the sum of |terms| the kernel adds, ``|xdq| @ (|s| (alpha max(u) + |beta|) + |off|)^T``
    (``alpha max(u) = max(lut) - min(lut)``, ``beta = min(lut)``), n = K + blocks + groups + 8."""
    xdq = cpu_lut.fake_quantize_activations(x)
    lut = p.effective_lut
    ng = k // (g or k)
    s = scale.abs().expand(n, ng).repeat_interleave(k // ng, dim=1)
    mag = s * (float(lut.max() - lut.min()) + abs(float(lut.min())))
    if off is not None:
        mag = mag + off.abs().expand(n, ng).repeat_interleave(k // ng, dim=1)
    nterms = k + p.kpad // 32 + p.kpad // p.group + 8
    return nterms * U * (xdq.abs() @ mag.T) + 1e-30


@SETTINGS
@given(problems())
def test_kernel_matches_twin_within_float_rounding(problem):
    bits, n, k, g, b, table, offset, per_tensor, seed = problem
    codes, lut, scale, off = make(bits, n, k, g, table, offset, per_tensor, seed)
    p = cpu_lut.prepare(codes, lut, scale, off, g)
    x = torch.randn(b, k, generator=torch.Generator().manual_seed(seed + 1))
    y = cpu_lut.lut_linear(x, p)
    twin = cpu_lut.reference_twin(x, codes, p.effective_lut, scale, off, g)
    assert y.shape == (b, n) and y.dtype == torch.float32
    assert ((y - twin).abs() <= bound(x, p, scale, off, g, n, k)).all()
    if p.lut_exact:  # the kernel's table is the given one, up to float rounding
        assert torch.allclose(p.effective_lut, lut, rtol=1e-6, atol=1e-6 * float(lut.abs().max()))
    else:  # rounded: on k * max|lut| / 127 (both signs) or 255 steps over the range
        signed = float(lut.min()) < 0 < float(lut.max())
        limit = float(lut.abs().max()) / 254 if signed else float(lut.max() - lut.min()) / 510
        assert p.lut_max_error <= limit * (1 + 1e-6)
        assert float((p.effective_lut - lut).abs().max()) <= p.lut_max_error * (1 + 1e-6) + 1e-7


@SETTINGS
@given(st.integers(1, 9), st.integers(1, 200), st.sampled_from([None, 32]), st.integers(0, 2**31 - 1))
def test_activation_codes_and_scales_equal_the_torch_twin(b, k, group, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, k, generator=gen) * torch.rand(b, 1, generator=gen) * 10
    x[:, : min(k, 32) // 2] = 0.0  # whole-zero half blocks and, for small k, zero blocks
    kpad = -(-k // 32) * 32
    grp = kpad if group is None else 32
    xq, d, xg = cpu_lut.quantize_activations_c(x, kpad, grp)
    xq_t, d_t = cpu_lut.quantize_activations(x, kpad)
    assert torch.equal(xq, xq_t)
    assert torch.equal(d, d_t)
    terms = xq_t.view(b, -1, 32).to(torch.float64).sum(-1) * d_t.to(torch.float64)
    sums = terms.view(b, kpad // grp, -1).sum(-1)
    # float32 accumulation: the error scales with the sum of |terms|, not with a sum that cancels
    # (hypothesis found b=1, k=199, seed=0: sum 0.1346 of terms whose magnitudes add to 768)
    abs_sums = (xq_t.view(b, -1, 32).to(torch.float64).abs().sum(-1) * d_t.to(torch.float64)).view(b, kpad // grp, -1).sum(-1)
    assert bool(((xg.double() - sums).abs() <= 1e-5 * sums.abs() + 2**-20 * abs_sums + 1e-6).all())


@SETTINGS
@given(st.sampled_from([2, 3, 4]), st.integers(1, 40), st.integers(1, 100), st.integers(0, 2**31 - 1))
def test_prepared_layout_is_the_documented_one(bits, n, k, seed):
    codes = torch.randint(0, 1 << bits, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    p = cpu_lut.prepare(codes, torch.arange(1 << bits, dtype=torch.float32), torch.ones(n, 1))
    w = p.weights.to(torch.int64)
    nt, kb = w.shape[:2]
    assert tuple(w.shape) == (nt, kb, bits, 64) and nt == -(-n // 16) and kb == -(-k // 32)
    vec = torch.empty(nt, kb, 8, 64, dtype=torch.int64)  # vector v, byte p: row p // 4, column 4v + p % 4
    for v in range(8):
        if bits == 2:
            vec[:, :, v] = (w[:, :, v // 4] >> (2 * (v % 4))) & 3
        elif bits == 4:
            vec[:, :, v] = (w[:, :, v // 2] >> (4 * (v % 2))) & 15
        else:
            vec[:, :, v] = ((w[:, :, v // 4] >> (2 * (v % 4))) & 3) | (((w[:, :, 2] >> v) & 1) << 2)
    got = vec.view(nt, kb, 8, 16, 4).permute(0, 3, 1, 2, 4).reshape(nt * 16, kb * 32)
    assert torch.equal(got[:n, :k], codes.to(torch.int64))
    assert not got[n:].any() and not got[:, k:].any()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("offset", [False, True])
def test_integer_inputs_give_exactly_the_twin(bits, offset):
    """Integer activations whose block maximum is 127 quantize exactly (d = 1); with integer
    tables, scales and offsets every sum is an integer below 2**24, so both sides are exact."""
    gen = torch.Generator().manual_seed(bits)
    n, k, b = 45, 224, 11
    x = torch.randint(-127, 128, (b, k), generator=gen).to(torch.float32)
    x[:, ::32] = 127.0
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    lut = torch.randint(-7, 8, (1 << bits,), generator=gen).to(torch.float32)
    scale = torch.randint(1, 4, (n, 7), generator=gen).to(torch.float32)
    off = torch.randint(-3, 4, (n, 7), generator=gen).to(torch.float32) if offset else None
    p = cpu_lut.prepare(codes, lut, scale, off, 32)
    y = cpu_lut.lut_linear(x, p)
    assert torch.equal(cpu_lut.fake_quantize_activations(x), x)
    assert torch.equal(y, F.linear(x, cpu_lut.dequantize_lut(codes, lut, scale, off, 32)))


def test_integer_zero_points_are_stored_as_bytes_with_identical_results():
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 8, (40, 128), generator=gen, dtype=torch.uint8)
    scale = torch.rand(40, 2, generator=gen)
    zero = torch.randint(0, 8, (40, 2), generator=gen, dtype=torch.uint8)
    p = cpu_lut.prepare_integer(codes, scale, zero, 3, 64)
    assert p.offsets is None and p.zeros is not None and p.zeros.dtype == torch.uint8
    as_float = dataclasses.replace(p, zeros=None, offsets=-(p.zeros.to(torch.float32) * p.scales))
    assert as_float.nbytes == p.nbytes + 3 * p.zeros.numel()
    x = torch.randn(9, 128, generator=gen)
    assert torch.equal(cpu_lut.lut_linear(x, p), cpu_lut.lut_linear(x, as_float))
    twin = cpu_lut.reference_twin(x, codes, torch.arange(8.0), scale, -(zero.float() * scale), 64)
    assert torch.allclose(cpu_lut.lut_linear(x, p), twin, rtol=1e-5, atol=1e-5)
    off = -(zero.float() * scale) + 1e-3  # not of the form -z * s: stays float
    assert cpu_lut.prepare(codes, torch.arange(8.0), scale, off, 64).zeros is None


def test_read_probe_reads_every_whole_64_byte_line():
    t = torch.arange(1000, dtype=torch.int64)  # 8000 bytes: 125 lines of 64 bytes
    assert cpu_lut.read_probe(t, num_threads=2) == sum(range(1000))
    assert cpu_lut.read_probe(t[:15]) == sum(range(8))  # 120 bytes: one whole line, elements 0..7


def test_threads_and_batch_chunks_do_not_change_the_result():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (100, 256), generator=gen, dtype=torch.uint8)
    p = cpu_lut.prepare(codes, torch.randn(8, generator=gen), torch.rand(100, 2, generator=gen), None, 128)
    x = torch.randn(20, 256, generator=gen)
    one = cpu_lut.lut_linear(x, p, num_threads=1)
    assert torch.equal(one, cpu_lut.lut_linear(x, p, num_threads=2))
    assert torch.equal(one[13:14], cpu_lut.lut_linear(x[13:14], p))  # rows are independent of the batch


def test_dtype_bias_and_leading_dims_follow_f_linear():
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 4, (33, 64), generator=gen, dtype=torch.uint8)
    lut, scale = torch.tensor([-1.5, -0.5, 0.5, 1.5]), torch.rand(33, 2, generator=gen)
    p = cpu_lut.prepare(codes, lut, scale, None, 32)
    x = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(33, generator=gen).to(torch.bfloat16)
    y = cpu_lut.lut_linear(x, p, bias)
    twin = cpu_lut.reference_twin(x, codes, lut, scale, None, 32, bias)
    assert y.shape == (2, 3, 33) and y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), twin.float(), rtol=2**-7, atol=1e-2)


def test_integer_table_finds_exact_grids_and_bounds_the_rest():
    t = cpu_lut.integer_table(torch.tensor([-1.0, 0.0, 1.0, 0.0]))  # ternary
    assert t.exact and t.u.tolist() == [0, 1, 2, 1] and (t.alpha, t.beta) == (1.0, -1.0)
    fp4 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    t = cpu_lut.integer_table(fp4)
    assert t.exact and t.alpha == 0.5 and t.max_error == 0.0
    nf4_like = torch.linspace(-1, 1, 16) ** 3
    nf4_like[7] = 0.0
    t = cpu_lut.integer_table(nf4_like)
    assert not t.exact and 0 < t.max_error <= 1 / 254
    eff = t.u.double() * t.alpha + t.beta
    assert eff[7] == 0 and eff[0] == -1 and eff[15] == 1  # zero and the extremes stay exact
    bnb_fp4 = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12
    t = cpu_lut.integer_table(torch.cat([bnb_fp4, -bnb_fp4]))
    assert not t.exact and t.max_error <= 1 / 254
    positive = cpu_lut.integer_table(torch.linspace(0, 1, 16) ** 3)
    assert not positive.exact and positive.max_error <= 1 / 510
    assert cpu_lut.prepare(torch.zeros(1, 8, dtype=torch.uint8), torch.arange(8.0), torch.ones(1, 1)).table is None


def test_bad_shapes_raise_typed_errors_naming_the_shape():
    codes = torch.zeros(10, 96, dtype=torch.uint8)
    with pytest.raises(KernelError, match=r"\[10, 96\].*group_size 48"):
        cpu_lut.prepare(codes, torch.arange(4.0), torch.ones(10, 2), None, 48)
    with pytest.raises(KernelError, match="4, 8 or 16 values"):
        cpu_lut.prepare(codes, torch.arange(5.0), torch.ones(10, 1))
    with pytest.raises(KernelError, match=r"\[0, 3\]"):
        cpu_lut.prepare(codes + 4, torch.arange(4.0), torch.ones(10, 1))
    with pytest.raises(KernelError, match="scale must be"):
        cpu_lut.prepare(codes, torch.arange(4.0), torch.ones(10, 4), None, 32)
    p = cpu_lut.prepare(codes, torch.arange(4.0), torch.ones(10, 1))
    with pytest.raises(KernelError, match="K=96"):
        cpu_lut.lut_linear(torch.zeros(2, 95), p)


def _layer(scheme, n=75, k=192, seed=0, kernel="auto"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    return QuantLinear.from_quantized(QuantizedTensor.quantize(w, scheme), torch.randn(n, generator=g), kernel=kernel)


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(bits=3, group_size=64),
        QuantScheme(bits=2, group_size=32, symmetric=False),
        QuantScheme(bits=3, granularity="channel", symmetric=False, scale_dtype="bfloat16"),
        QuantScheme(bits=2, granularity="tensor"),
        QuantScheme(bits=3, group_size=64, symmetric=False, zero_point="float"),
    ],
)
def test_quantlinear_w3_w2_run_cpu_lut_under_auto(scheme):
    lin = _layer(scheme)
    assert lin.kernel_name == "cpu_lut"
    x = torch.randn(6, 192, generator=torch.Generator().manual_seed(5))
    y = lin(x)
    w = lin.dequantize_weight()
    twin = F.linear(cpu_lut.fake_quantize_activations(x), w) + lin.bias
    # the layer's offset -z*s and scale are rounded once more than (q - z) * s: a few ulp per weight
    tol = 64 * U * (cpu_lut.fake_quantize_activations(x).abs() @ (w.abs() + lin.scale.float().abs().max() * 8).T)
    assert ((y - twin).abs() <= tol + 1e-6).all()
    with use_kernel("reference"):
        ref = lin(x)
    # int8 activations (per block of 32) against float32 ones: the kernel's only approximation
    assert float((y - ref).norm() / ref.norm()) < 2e-2


def test_quantlinear_other_formats_stay_elsewhere():
    assert _layer(QuantScheme(bits=3, group_size=48)).kernel_name == "reference"  # not a multiple of 32
    assert _layer(QuantScheme(bits=4, group_size=64), n=64).kernel_name == "cpu_int4"


def test_missing_library_means_unsupported_and_auto_falls_back(monkeypatch):
    lin = _layer(QuantScheme(bits=3, group_size=64))
    assert_missing_library_falls_back(monkeypatch, cpu_lut, "cpu_lut", lin, torch.randn(2, 192))


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(format="nf4"),
        QuantScheme(format="nf4", double_quant=True, group_size=32),
        QuantScheme(format="fp4"),
        QuantScheme(format="ternary"),
        QuantScheme(format="ternary", granularity="channel"),
    ],
)
def test_table_formats_run_cpu_lut_equal_to_their_twin(scheme):
    """nf4 / fp4 / ternary layers: auto picks cpu_lut, which equals the twin built from the
    layer's codes, its (dequantized) scales and the table the kernel really uses."""
    lin = _layer(scheme, k=256)
    assert lin.kernel_name == "cpu_lut"
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(7))
    y = lin(x)
    qt = lin.quantized_tensor()
    prepared = lin._prepared_state(registry.KERNELS["cpu_lut"])
    group = scheme.group_size or 256
    twin = cpu_lut.reference_twin(x, qt.codes(), prepared.effective_lut, qt.qparams.scale.float(), None, group, lin.bias)
    torch.testing.assert_close(y, twin, rtol=1e-5, atol=1e-5)
    assert prepared.lut_exact == (scheme.format == "ternary")  # nf4 / bitsandbytes fp4 have no exact 8-bit grid
    with use_kernel("reference"):
        ref = lin(x)
    assert float((y - ref).norm() / ref.norm()) < 2e-2
