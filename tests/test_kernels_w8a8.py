"""W8A8 (int8 weights per channel + dynamic per-token int8 activations): the
activation format, the ``cpu_w8a8`` kernel pinned to its reference twin, and
the whole path through ``lowbit.quantize`` / ``save`` / ``load``.

Tolerance of kernel vs reference (derived, not tuned). Both compute the same
real number ``y = sx * sw * sum_k xq[k] wq[k]`` (u = 2**-24, fp32 unit roundoff):

* cpu_w8a8: the int32 sum is exact; ``float(acc)``, ``* sx``, ``* sw`` are three
  roundings: ``<= 3.01 u |y|``;
* reference: ``fl(xq * sx)`` and ``fl(wq * sw)`` (one rounding each) then an fp32
  dot product of length K: ``<= (K + 2.01) u * sx * sw * (|xq| @ |wq|)``;
* with a bias, each adds it with one more rounding: ``u |y + b|`` each.

The test asserts the sum of these, elementwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit import Recipe
from lowbit.errors import FormatError, KernelError
from lowbit.formats import fake_quantize_activations_int8, quantize_activations_int8
from lowbit.kernels import cpu_w8a8
from lowbit.kernels.registry import KERNELS, use_kernel
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor
from tiny_models import random_ids, tiny_llama

W8A8 = QuantScheme(bits=8, granularity="channel", activations="int8")
U = 2.0**-24


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(n=192, k=576, bias=True, seed=0, scheme=W8A8, kernel="auto"):
    g = _gen(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_quantized(QuantizedTensor.quantize(w, scheme), b, kernel=kernel)


def _x(m, k, seed=1, outliers=True):
    x = torch.randn(m, k, generator=_gen(seed))
    if outliers:
        x[:, :3] *= 40.0  # a few large channels, as in real LLM activations
    return x


# ------------------------------------------------------------------ activation format
def test_quantize_activations_by_hand():
    x = torch.tensor([[1.0, -2.0, 0.5, 127.0], [0.0, 0.0, 0.0, 0.0], [-3.0, 1.5, 0.0, 0.01]])
    q, s = quantize_activations_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (3, 1)
    assert torch.equal(s[:, 0], torch.tensor([1.0, 1.0, 3.0 / 127]))  # zero row -> scale 1
    assert torch.equal(q[0], torch.tensor([1, -2, 0, 127], dtype=torch.int8))  # 0.5 ties to even
    assert torch.equal(q[1], torch.zeros(4, dtype=torch.int8))
    assert torch.equal(q[2], torch.round(x[2] / s[2]).to(torch.int8))
    assert q[2, 0] == -127
    fq = fake_quantize_activations_int8(x)
    assert torch.equal(fq, q.float() * s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_activations_shapes_range_and_error(dtype):
    x = (torch.randn(2, 5, 64, generator=_gen(0)) * 3).to(dtype)
    q, s = quantize_activations_int8(x)
    assert q.shape == x.shape and s.shape == (2, 5, 1)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    fq = fake_quantize_activations_int8(x)
    assert fq.dtype == dtype
    # per-row error of round-to-nearest: half a step (plus the cast back for 16-bit dtypes)
    err = (fq.float() - x.float()).abs()
    half_step = s / 2
    cast = 0 if dtype == torch.float32 else x.float().abs() * 2.0**-7
    assert (err <= half_step * (1 + 1e-6) + cast).all()


def test_quantize_activations_edge_cases():
    tiny = torch.tensor([[1e-44, -1e-44]])  # amax / 127 underflows: smallest normal scale
    q, s = quantize_activations_int8(tiny)
    assert torch.isfinite(s).all() and (s > 0).all() and q.abs().max() <= 127
    q, s = quantize_activations_int8(torch.zeros(0, 8))
    assert q.shape == (0, 8) and s.shape == (0, 1)
    with pytest.raises(FormatError, match="NaN"):
        quantize_activations_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(FormatError, match="floating"):
        quantize_activations_int8(torch.ones(2, 2, dtype=torch.int32))


# ------------------------------------------------------------------ the integer matmul
def test_int_mm_constraints_as_documented():
    """What cpu_w8a8's docstring says about torch._int_mm on CPU; fails loudly if torch changes."""
    for M, K, N in [(1, 7, 5), (3, 128, 64), (17, 120, 60), (1, 1, 1)]:
        a = torch.randint(-127, 128, (M, K), generator=_gen(M), dtype=torch.int8)
        b = torch.randint(-128, 128, (K, N), generator=_gen(K), dtype=torch.int8)
        c = torch._int_mm(a, b)
        assert c.dtype == torch.int32 and c.shape == (M, N)
        assert torch.equal(c.long(), a.long() @ b.long())
        assert torch.equal(torch._int_mm(a, b.t().contiguous().t()), c)  # non-contiguous operand
    # a uint8 left operand is accepted and read as unsigned (int8_matmul refuses it)
    u = torch.tensor([[200, 3]], dtype=torch.uint8)
    assert int(torch._int_mm(u, torch.ones(2, 1, dtype=torch.int8))) == 203
    with pytest.raises(KernelError, match="int8"):
        cpu_w8a8.int8_matmul(u, torch.ones(2, 1, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="int8"):
        torch._int_mm(a.float(), b)


@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("N,K", [(64, 128), (192, 576), (5, 33)])
def test_int32_accumulator_equals_int64_matmul_exactly(M, N, K):
    g = _gen(M * 1000 + K)
    xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    wq = torch.randint(-128, 128, (K, N), generator=g, dtype=torch.int8)
    acc = cpu_w8a8.int8_matmul(xq, wq)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.to(torch.int64), xq.to(torch.int64) @ wq.to(torch.int64))


def test_int32_accumulator_at_the_extremes():
    # the largest possible |acc| for K = 4096: no overflow, exact
    K = 4096
    xq = torch.full((2, K), -127, dtype=torch.int8)
    wq = torch.full((K, 3), -128, dtype=torch.int8)
    acc = cpu_w8a8.int8_matmul(xq, wq)
    assert torch.equal(acc.to(torch.int64), torch.full((2, 3), K * 127 * 128, dtype=torch.int64))
    assert cpu_w8a8.MAX_K * 127 * 128 < 2**31
    assert cpu_w8a8.int8_matmul(torch.zeros(0, 8, dtype=torch.int8), torch.zeros(8, 4, dtype=torch.int8)).shape == (0, 4)


def test_prepack_layout():
    q = torch.randint(0, 256, (64, 128), generator=_gen(0), dtype=torch.uint8)
    s = torch.rand(64, 1, generator=_gen(1)).to(torch.bfloat16)
    p = cpu_w8a8.prepack_w8a8(q, s)
    assert p.weight.dtype == torch.int8 and p.weight.shape == (128, 64) and p.weight.is_contiguous()
    assert torch.equal(p.weight.t().to(torch.int16), q.to(torch.int16) - 128)
    assert p.scales.dtype == torch.float32 and torch.equal(p.scales, s.float().reshape(64))
    assert p.nbytes == 128 * 64 + 64 * 4
    with pytest.raises(KernelError, match="scale"):
        cpu_w8a8.prepack_w8a8(q, torch.ones(32, 1))


# ------------------------------------------------------------------ kernel vs reference twin
def _bound(lin: QuantLinear, x: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
    xq, sx = quantize_activations_int8(x)
    wq = lin.quantized_tensor().codes().to(torch.float64) - 128
    sw = lin.scale.to(torch.float64).reshape(1, -1)
    K = x.shape[-1]
    mag = sx.double() * sw * (xq.double().abs() @ wq.abs().T)
    bound = (K + 2.01 + 3.01) * U * mag
    if lin.bias is not None:
        bound = bound + 2.01 * U * y_ref.double().abs()
    return bound


@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(192, 576), (64, 128), (7, 40)])
def test_kernel_matches_reference_within_fp32_rounding(M, bias, shape):
    n, k = shape
    lin = _layer(n, k, bias=bias, seed=M + n)
    x = _x(M, k, seed=M)
    assert lin.kernel_name == "cpu_w8a8"
    fast = lin(x)
    with use_kernel("reference"):
        ref = lin(x)
    with use_kernel("dequantized"):
        cached = lin(x)
    assert torch.equal(ref, cached)
    assert fast.shape == ref.shape == (M, n) and fast.dtype == torch.float32
    err = (fast.double() - ref.double()).abs()
    bound = _bound(lin, x, ref)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"
    # tight in aggregate too: a few ulps of the output scale
    assert err.max() <= 1e-5 * ref.abs().max()
    # and the reference really quantizes the activations (it is not the weight-only result)
    weight_only = F.linear(x, lin.dequantize_weight(), lin.bias)
    assert not torch.allclose(ref, weight_only, rtol=0, atol=1e-6)


def test_kernel_exact_when_scales_are_powers_of_two():
    # sx * sw a power of two and |acc| < 2**24: every float step is exact on both sides.
    n, k, M = 64, 128, 5
    q = torch.randint(0, 256, (n, k), generator=_gen(0), dtype=torch.uint8)
    scale = torch.pow(2.0, -torch.randint(0, 6, (n, 1), generator=_gen(1)).float())
    lin = QuantLinear.from_quantized(QuantizedTensor(q, scale, None, (n, k), W8A8))
    x = torch.randint(-127, 128, (M, k), generator=_gen(2)).float()
    x[:, 0] = 127.0  # amax 127 in every row: activation scale exactly 1
    with use_kernel("reference"):
        ref = lin(x)
    assert torch.equal(lin(x), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_16bit_activations(dtype):
    lin = _layer(64, 128, bias=True)
    x = _x(2 * 3, 128).reshape(2, 3, 128).to(dtype)
    fast = lin(x)
    assert fast.dtype == dtype and fast.shape == (2, 3, 64)
    with use_kernel("reference"):
        ref = lin(x)
    err = (fast.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < 2e-2, float(err)  # the reference runs F.linear in 16-bit


def test_leading_dims_and_empty_batch():
    lin = _layer(64, 128)
    x = _x(6, 128)
    assert torch.equal(lin(x.reshape(2, 3, 128)), lin(x).reshape(2, 3, 64))
    assert lin(torch.zeros(0, 128)).shape == (0, 64)
    with pytest.raises(KernelError):
        lin(torch.randn(2, 96))


# ------------------------------------------------------------------ registry
def test_auto_selects_cpu_w8a8_and_weight_only_kernels_refuse():
    assert "cpu_w8a8" in KERNELS
    lin = _layer()
    assert lin.kernel_name == "cpu_w8a8"
    assert _layer(scheme=QuantScheme(bits=8, granularity="tensor", activations="int8")).kernel_name == "cpu_w8a8"
    for name in ("cpu_int8", "cpu_int4"):
        ok, why = KERNELS[name].supports(lin)
        assert not ok and "weight-only" in why
        with pytest.raises(KernelError, match=name):
            with use_kernel(name):
                lin(_x(2, 576))
    # weight-only int8 layers stay on cpu_int8, and cpu_w8a8 refuses them
    w8 = _layer(scheme=QuantScheme(bits=8, granularity="channel"))
    assert w8.kernel_name == "cpu_int8"
    ok, why = KERNELS["cpu_w8a8"].supports(w8)
    assert not ok and "activations" in why


def test_tensor_granularity_matches_reference():
    lin = _layer(scheme=QuantScheme(bits=8, granularity="tensor", scale_dtype="float16", activations="int8"))
    x = _x(9, 576)
    with use_kernel("reference"):
        ref = lin(x)
    err = (lin(x).double() - ref.double()).abs()
    assert (err <= _bound(lin, x, ref)).all()


# ------------------------------------------------------------------ end to end
def test_tiny_llama_w8a8_quantize_save_load(tmp_path):
    model = tiny_llama(seed=0)
    ids = random_ids(2, 16)
    with torch.no_grad():
        fp_logits = model(ids).logits
    lowbit.quantize(model, Recipe.uniform(W8A8), progress=False)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14 and all(m.scheme == W8A8 and m.kernel_name == "cpu_w8a8" for m in qls)
    with torch.no_grad():
        logits = model(ids).logits
        with use_kernel("reference"):
            ref_logits = model(ids).logits
    # fast kernel and its reference twin agree through the whole model
    assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    # W8A8 stays close to full precision (8-bit weights and activations)
    assert (logits.argmax(-1) == fp_logits.argmax(-1)).float().mean() > 0.9

    path = tmp_path / "w8a8.lowbit.safetensors"
    lowbit.save(model, path)
    loaded = lowbit.load(path)
    lq = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert len(lq) == 14 and all(m.scheme == W8A8 and m.kernel_name == "cpu_w8a8" for m in lq.values())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
