"""Fast CPU kernels (cpu_int4, cpu_int8) pinned to their reference twin.

Tolerances (derived, not tuned). The fast ops compute in fp32 from bf16
inputs and round the output to bf16 (unit roundoff u = 2**-8). We compare with
the reference computed from the *same* bf16-rounded activations and scales,
so the only differences are:

* output rounding:            <= u * |y|
* fp32 accumulation (both):   <= 2 * K * 2**-24 * (|x| @ |W|.T)
* int4 only -- the kernel's float zero ``bf16(s * (8 - z))`` (our integer
  zero point becomes a bf16 number): per weight <= u * |s * (8 - z)|, so
  <= u * (|x| @ |s * (8 - z)|.T) on y. Zero for symmetric schemes.

Each comparison asserts this bound *elementwise*. On top of that, exact checks:
one-hot activations return the kernel's dequantized weight bit for bit, and
power-of-two scales with small integer activations make every step exact, so
the fast output equals bf16(reference) exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import KernelError
from lowbit.kernels.cpu_int4 import Int4Prepacked, int4_linear, int4_supported, prepack_int4
from lowbit.kernels.cpu_int8 import Int8Prepacked, int8_linear, int8_supported, prepack_int8
from lowbit.kernels.reference import dequantize_codes, reference_linear

U = 2.0**-8  # bf16 unit roundoff
SHAPES = [(64, 128), (192, 576), (576, 1536)]  # (N, K)
SCALE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int4_case(N, K, group, symmetric, scale_dtype, seed, pow2=False):
    g = _gen(seed)
    G = K // group
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    if pow2:
        scale = torch.pow(2.0, -torch.randint(0, 7, (N, G), generator=g).float())
    else:
        scale = torch.rand(N, G, generator=g) * 0.05 + 1e-3
    scale = scale.to(scale_dtype)
    zero = None if symmetric else torch.randint(0, 16, (N, G), generator=g, dtype=torch.uint8)
    return q, scale, zero


def _expand(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.to(torch.float64).repeat_interleave(group, dim=1)


def _int4_bound(x_bf, q, s_bf, zero, group, y_ref):
    """Elementwise |fast - ref| bound, see the module docstring."""
    K = q.shape[1]
    xa = x_bf.to(torch.float64).abs().reshape(-1, K)
    w = dequantize_codes(q, s_bf, zero, 4, group).to(torch.float64)
    z = torch.full_like(s_bf, 8, dtype=torch.float32) if zero is None else zero.float()
    zf = _expand(s_bf.float() * (8.0 - z), group).abs()
    acc = 2 * K * 2.0**-24 * (xa @ w.abs().T)
    zterm = U * (xa @ zf.T)
    return (1 + U) * (zterm + acc) + U * y_ref.to(torch.float64).abs().reshape(-1, q.shape[0])


def _bias_in_bf16_bound(bound, y_ref, bias, x_dtype):
    """bf16 activations get ``bf16(y) + bf16(bias)`` rounded again: add u*|b| + u*|y + b|."""
    if x_dtype != torch.bfloat16 or bias is None:
        return bound
    b = bias.double().abs()
    return (1 + U) * bound + U * b + U * (y_ref.double() + bias.double()).abs() * (1 + U) + U * b * U


# ------------------------------------------------------------------ reference
def test_dequantize_codes_by_hand():
    q = torch.tensor([[0, 1, 2, 15], [7, 8, 9, 3]], dtype=torch.uint8)
    s = torch.tensor([[0.5, 2.0], [1.0, 0.25]])
    z = torch.tensor([[1, 8], [8, 0]], dtype=torch.uint8)
    want = torch.tensor([[-0.5, 0.0, -12.0, 14.0], [-1.0, 0.0, 2.25, 0.75]])
    assert torch.equal(dequantize_codes(q, s, z, 4, 2), want)
    # symmetric: z = 2**(bits-1)
    want_sym = (q.float() - 8).reshape(2, 2, 2) * s[..., None]
    assert torch.equal(dequantize_codes(q, s, None, 4, 2), want_sym.reshape(2, 4))
    assert dequantize_codes(q, s, z, 4, 2, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_reference_linear_is_f_linear():
    q, s, z = _int4_case(64, 128, 32, False, torch.float32, 0)
    x = torch.randn(3, 5, 128, generator=_gen(1))
    b = torch.randn(64, generator=_gen(2))
    w = dequantize_codes(q, s, z, 4, 32)
    assert torch.equal(reference_linear(x, q, s, z, 4, 32, b), F.linear(x, w, b))
    y16 = reference_linear(x.half(), q, s, z, 4, 32, b)
    assert y16.dtype == torch.float16 and torch.equal(y16, F.linear(x.half(), w.half(), b.half()))


def test_reference_rejects_bad_shapes():
    q, s, z = _int4_case(64, 128, 32, False, torch.float32, 0)
    with pytest.raises(KernelError):
        dequantize_codes(q, s[:, :2], z, 4, 32)
    with pytest.raises(KernelError):
        dequantize_codes(q, s, z, 4, 48)


# ------------------------------------------------------------------ int4
@SETTINGS
@given(
    shape=st.sampled_from(SHAPES),
    M=st.sampled_from([1, 3, 8, 32]) | st.integers(1, 40),
    group_pick=st.integers(0, 3),
    symmetric=st.booleans(),
    scale_dtype=st.sampled_from(SCALE_DTYPES),
    x_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int4_matches_reference(shape, M, group_pick, symmetric, scale_dtype, x_dtype, with_bias, seed):
    N, K = shape
    groups = [g for g in (32, 64, 128) if K % g == 0] + [K]  # K: per-channel
    group = groups[group_pick % len(groups)]
    q, scale, zero = _int4_case(N, K, group, symmetric, scale_dtype, seed)
    x = torch.randn(M, K, generator=_gen(seed + 1)).to(x_dtype)
    bias = torch.randn(N, generator=_gen(seed + 2)) if with_bias else None

    p = prepack_int4(q, scale, zero, group)
    y = int4_linear(x, p, bias)
    assert y.dtype == x_dtype and y.shape == (M, N)

    x_bf = x.to(torch.bfloat16)
    s_bf = scale.to(torch.bfloat16)
    y_ref = reference_linear(x_bf.float(), q, s_bf, zero, 4, group)  # fp32, no bias
    err = (y.float() - (y_ref if bias is None else y_ref + bias)).to(torch.float64).abs()
    bound = _int4_bound(x_bf, q, s_bf, zero, group, y_ref)
    bound = _bias_in_bf16_bound(bound, y_ref, bias, x_dtype)
    assert (err <= bound + 1e-30).all(), f"max excess {(err - bound).max().item():.3e}"
    # and the simple aggregate view: well inside 1% of the output range
    assert err.max() <= 1e-2 * (y_ref.abs().max() + (0 if bias is None else bias.abs().max()))


def _kernel_weight_emulation(q, s_bf, zero, group):
    """The op's dequantized weight: fp32 fma((c - 8), s, bf16(s * (8 - z))), as fp32."""
    N, K = q.shape
    z = torch.full_like(s_bf, 8, dtype=torch.float32) if zero is None else zero.float()
    zf = (s_bf.float() * (8.0 - z)).to(torch.bfloat16)
    w = (q.double() - 8) * _expand(s_bf, group) + _expand(zf, group)  # exact in float64
    return w.float()  # one rounding, like fma


@pytest.mark.parametrize("N,K,group", [(64, 128, 32), (192, 576, 64), (576, 1536, 128), (64, 512, 512)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("M", [1, 3, 8, 32, 61])
def test_int4_one_hot_rows_give_kernel_weights_exactly(N, K, group, symmetric, M):
    q, scale, zero = _int4_case(N, K, group, symmetric, torch.float32, N + K + M)
    p = prepack_int4(q, scale, zero, group)
    cols = torch.randperm(K, generator=_gen(M))[:M]
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    x[torch.arange(M), cols] = 1
    y = int4_linear(x, p)
    s_bf = scale.to(torch.bfloat16)
    assert torch.equal(y, _kernel_weight_emulation(q, s_bf, zero, group)[:, cols].T.to(torch.bfloat16))
    if symmetric:  # zero = 0 exactly: the fast weight *is* the reference weight
        assert torch.equal(y, dequantize_codes(q, s_bf, None, 4, group)[:, cols].T.to(torch.bfloat16))


@pytest.mark.parametrize("N,K,group", [(64, 128, 32), (192, 576, 64), (576, 1536, 128), (64, 1024, 1024)])
@pytest.mark.parametrize("M", [1, 3, 8, 32])
def test_int4_power_of_two_scales_are_exact(N, K, group, M):
    # s = 2**-e (e <= 6), |x| <= 2, |q - z| <= 15: every product and partial sum is a
    # multiple of 2**-6 below 2**16, so fp32 is exact and only the final bf16 rounding remains.
    q, scale, zero = _int4_case(N, K, group, False, torch.float32, M * 7 + K, pow2=True)
    x = torch.randint(-2, 3, (M, K), generator=_gen(M)).to(torch.bfloat16)
    y = int4_linear(x, prepack_int4(q, scale, zero, group))
    y_ref = reference_linear(x.float(), q, scale, zero, 4, group)
    assert torch.equal(y, y_ref.to(torch.bfloat16))


def test_int4_per_channel_and_large_groups_use_a_divisor():
    q, scale, zero = _int4_case(64, 1536, 1536, False, torch.float32, 3)
    p = prepack_int4(q, scale, zero, 1536)
    assert p.group_size == 256 and p.scales_and_zeros.shape == (6, 64, 2)
    q, scale, zero = _int4_case(64, 576, 576, False, torch.float32, 3)
    assert prepack_int4(q, scale, zero, 576).group_size == 64
    q, scale, zero = _int4_case(64, 1024, 512, True, torch.float32, 3)
    assert prepack_int4(q, scale, zero, 512).group_size == 256


def test_int4_leading_dims_dtypes_and_empty_batch():
    q, scale, zero = _int4_case(64, 128, 32, False, torch.bfloat16, 5)
    p = prepack_int4(q, scale, zero, 32)
    assert isinstance(p, Int4Prepacked) and (p.N, p.K) == (64, 128)
    assert p.packed.dtype == torch.uint8 and p.packed.shape == (64, 64)
    assert p.scales_and_zeros.dtype == torch.bfloat16 and p.scales_and_zeros.shape == (4, 64, 2)
    x = torch.randn(2, 3, 128, generator=_gen(0)).half()
    b = torch.randn(64, generator=_gen(1))
    y = int4_linear(x, p, b)
    assert y.shape == (2, 3, 64) and y.dtype == torch.float16
    flat = int4_linear(x.reshape(6, 128), p, b).reshape(2, 3, 64)
    assert torch.equal(y, flat)
    assert int4_linear(torch.randn(0, 128), p).shape == (0, 64)
    with pytest.raises(KernelError):
        int4_linear(torch.randn(2, 96), p)


@pytest.mark.parametrize(
    "N,K,group,bits,needle",
    [
        (24, 128, 32, 4, "multiple of 16"),
        (64, 128, 16, 4, "multiple of 32"),
        (64, 192, 48, 4, "multiple of 32"),
        (64, 128, 96, 4, "divide"),
        (64, 128, 32, 3, "4-bit"),
        (64, 128, 32, 8, "4-bit"),
    ],
)
def test_int4_unsupported_is_reported(N, K, group, bits, needle):
    ok, why = int4_supported(N, K, group, bits)
    assert not ok and needle in why
    if bits == 4 and K % group == 0:
        q = torch.zeros(N, K, dtype=torch.uint8)
        s = torch.ones(N, K // group)
        with pytest.raises(KernelError, match=needle):
            prepack_int4(q, s, None, group)


def test_int4_supported_cases():
    for N, K, g in [(64, 128, 32), (192, 576, 64), (576, 1536, 128), (4096, 4096, 4096), (16, 256, 256)]:
        assert int4_supported(N, K, g, 4) == (True, "")


def test_int4_rejects_out_of_range_codes():
    q = torch.full((64, 128), 16, dtype=torch.uint8)
    with pytest.raises(KernelError, match="0, 15"):
        prepack_int4(q, torch.ones(64, 4), None, 32)


def test_int4_op_constraints_as_documented():
    """What cpu_int4's docstring says about the raw op; fails loudly if torch changes."""
    aten = torch.ops.aten
    q = torch.randint(0, 16, (64, 128), generator=_gen(0))
    for bad in (q.to(torch.uint8), q, (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)):
        with pytest.raises(RuntimeError, match="kInt"):
            aten._convert_weight_to_int4pack_for_cpu(bad, 1)
    with pytest.raises(RuntimeError, match="16"):
        aten._convert_weight_to_int4pack_for_cpu(q[:24].int(), 1)
    packed = aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)
    for tiles in (2, 4, 8):  # innerKTiles is ignored on CPU
        assert torch.equal(packed, aten._convert_weight_to_int4pack_for_cpu(q.int(), tiles))
    x = torch.randn(2, 128).bfloat16()
    for g in (16, 512):
        with pytest.raises(RuntimeError):
            aten._weight_int4pack_mm_for_cpu(x, packed, g, torch.ones(128 // min(g, 128), 64, 2).bfloat16())
    with pytest.raises(RuntimeError):  # scales must have x's dtype
        aten._weight_int4pack_mm_for_cpu(x, packed, 32, torch.ones(4, 64, 2))


def test_int4_wrong_zero_conversion_would_fail():
    """The bound is tight enough to catch a sign slip in the zero conversion."""
    N, K, group = 192, 576, 64
    q, scale, zero = _int4_case(N, K, group, False, torch.float32, 11)
    s_bf = scale.to(torch.bfloat16)
    p = prepack_int4(q, scale, zero, group)
    wrong_zf = (s_bf.float() * (zero.float() - 8.0))  # s * (z - 8) instead of s * (8 - z)
    sz = torch.stack([s_bf.float(), wrong_zf], -1).transpose(0, 1).contiguous().bfloat16()
    bad = Int4Prepacked(p.packed, sz, p.group_size, N, K)
    x = torch.randn(8, K, generator=_gen(0)).bfloat16()
    y_ref = reference_linear(x.float(), q, s_bf, zero, 4, group)
    bound = _int4_bound(x, q, s_bf, zero, group, y_ref)
    good_err = (int4_linear(x, p).double() - y_ref.double()).abs()
    bad_err = (int4_linear(x, bad).double() - y_ref.double()).abs()
    assert (good_err <= bound).all()
    assert (bad_err > bound).float().mean() > 0.5


# ------------------------------------------------------------------ int8
def _int8_case(N, K, seed, pow2=False, scale_dtype=torch.float32):
    g = _gen(seed)
    q = torch.randint(0, 256, (N, K), generator=g, dtype=torch.uint8)
    if pow2:
        scale = torch.pow(2.0, -torch.randint(0, 7, (N, 1), generator=g).float())
    else:
        scale = torch.rand(N, 1, generator=g) * 0.01 + 1e-4
    return q, scale.to(scale_dtype)


@SETTINGS
@given(
    shape=st.sampled_from(SHAPES),
    M=st.sampled_from([1, 3, 8, 32]) | st.integers(1, 40),
    scale_dtype=st.sampled_from(SCALE_DTYPES),
    x_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int8_matches_reference(shape, M, scale_dtype, x_dtype, with_bias, seed):
    N, K = shape
    q, scale = _int8_case(N, K, seed, scale_dtype=scale_dtype)
    x = torch.randn(M, K, generator=_gen(seed + 1)).to(x_dtype)
    bias = torch.randn(N, generator=_gen(seed + 2)) if with_bias else None
    p = prepack_int8(q, scale)
    y = int8_linear(x, p, bias)
    assert y.dtype == x_dtype and y.shape == (M, N)

    x_bf = x.to(torch.bfloat16)
    s_bf = scale.to(torch.bfloat16)
    y_ref = reference_linear(x_bf.float(), q, s_bf, None, 8, K)
    w = dequantize_codes(q, s_bf, None, 8, K).double()
    acc = 2 * K * 2.0**-24 * (x_bf.double().abs() @ w.abs().T)
    bound = (1 + U) * acc + U * y_ref.double().abs()
    bound = _bias_in_bf16_bound(bound, y_ref, bias, x_dtype)
    err = (y.double() - (y_ref if bias is None else y_ref + bias).double()).abs()
    assert (err <= bound + 1e-30).all(), f"max excess {(err - bound).max().item():.3e}"


@pytest.mark.parametrize("N,K", SHAPES + [(5, 64), (17, 32)])
@pytest.mark.parametrize("M", [1, 3, 8, 32])
def test_int8_one_hot_rows_give_weights_exactly(N, K, M):
    q, scale = _int8_case(N, K, N + M)
    p = prepack_int8(q, scale)
    cols = torch.randperm(K, generator=_gen(M))[:M]
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    x[torch.arange(M), cols] = 1
    w = dequantize_codes(q, scale.to(torch.bfloat16), None, 8, K)  # (q - 128) * s_bf16: exact in fp32
    assert torch.equal(int8_linear(x, p), w[:, cols].T.to(torch.bfloat16))


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 8, 32])
def test_int8_power_of_two_scales_are_exact(N, K, M):
    # |x| <= 1, |q - 128| <= 128, s = 2**-e (e <= 6): partial sums are multiples of 2**-6
    # below 2**18, exact in fp32; only the final bf16 rounding remains.
    q, scale = _int8_case(N, K, M + K, pow2=True)
    x = torch.randint(-1, 2, (M, K), generator=_gen(M)).to(torch.bfloat16)
    y = int8_linear(x, prepack_int8(q, scale))
    assert torch.equal(y, reference_linear(x.float(), q, scale, None, 8, K).to(torch.bfloat16))


def test_int8_misaligned_inputs_do_not_crash():
    q, scale = _int8_case(64, 128, 0)
    p = prepack_int8(q, scale)
    x = torch.randn(3, 128, generator=_gen(1)).bfloat16()
    want = int8_linear(x, p)
    buf = torch.empty(3 * 128 + 8, dtype=torch.bfloat16)
    xv = buf[8:].view(3, 128)  # 16 bytes past an aligned start: the raw op segfaults here
    xv.copy_(x)
    assert xv.data_ptr() % 64 != 0
    assert torch.equal(int8_linear(xv, p), want)
    assert torch.equal(int8_linear(torch.cat([x, x], 1)[:, 128:], p), want)  # strided view
    wbuf = torch.empty(64 * 128 + 8, dtype=torch.int8)
    wv = wbuf[8:].view(64, 128)
    wv.copy_(p.weight)
    p2 = Int8Prepacked(wv, p.scales, 64, 128)
    assert p2.weight.data_ptr() % 64 == 0
    assert torch.equal(int8_linear(xv, p2), want)


def test_int8_leading_dims_and_layout():
    q, scale = _int8_case(64, 128, 0)
    p = prepack_int8(q, scale)
    assert p.weight.dtype == torch.int8 and p.scales.dtype == torch.bfloat16 and p.scales.shape == (64,)
    assert torch.equal(p.weight.to(torch.int16), q.to(torch.int16) - 128)
    x = torch.randn(2, 3, 128, generator=_gen(0)).half()
    y = int8_linear(x, p)
    assert y.shape == (2, 3, 64) and y.dtype == torch.float16
    assert int8_linear(torch.randn(0, 128), p).shape == (0, 64)


@pytest.mark.parametrize(
    "N,K,group,bits,sym,needle",
    [
        (64, 128, 128, 4, True, "8-bit"),
        (64, 128, 128, 8, False, "symmetric"),
        (64, 128, 32, 8, True, "per output channel"),
        (64, 120, 120, 8, True, "multiple of 16"),
    ],
)
def test_int8_unsupported_is_reported(N, K, group, bits, sym, needle):
    ok, why = int8_supported(N, K, group, bits, sym)
    assert not ok and needle in why
    if bits == 8 and sym and group == K:
        with pytest.raises(KernelError, match=needle):
            prepack_int8(torch.zeros(N, K, dtype=torch.uint8), torch.ones(N, 1))


def test_int8_supported_cases():
    for N, K in SHAPES + [(4096, 4096), (5, 16)]:
        assert int8_supported(N, K, K, 8) == (True, "")


def test_int8_op_constraints_as_documented():
    aten = torch.ops.aten
    w = torch.randint(-128, 128, (64, 128), generator=_gen(0), dtype=torch.int8)
    x = torch.randn(2, 128).bfloat16()
    with pytest.raises(RuntimeError):  # mixed activation / scale dtypes are rejected
        aten._weight_int8pack_mm(x, w, torch.ones(64))
    with pytest.raises(RuntimeError):  # uint8 weights are rejected
        aten._weight_int8pack_mm(x, w.view(torch.uint8), torch.ones(64).bfloat16())
    y32 = aten._weight_int8pack_mm(x.float(), w, torch.ones(64))
    assert y32.dtype == torch.float32
