"""Kernel choice on real QuantLinear layers, and each fast kernel pinned to its reference twin."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import KernelError
from lowbit.kernels.registry import KERNELS, resolve, use_kernel
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor


def layer(scheme, n=192, k=576, bias=True, seed=0, kernel="auto"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_quantized(QuantizedTensor.quantize(w, scheme), b, kernel=kernel)


def x_for(k, m=5, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "scheme, expected",
    [
        (QuantScheme(bits=4, group_size=64), "cpu_int4"),
        (QuantScheme(bits=4, group_size=64, symmetric=False), "cpu_int4"),
        (QuantScheme(bits=4, granularity="channel", symmetric=False), "cpu_int4"),
        (QuantScheme(bits=4, granularity="tensor"), "cpu_int4"),
        (QuantScheme(bits=8, granularity="channel"), "cpu_int8"),
        (QuantScheme(bits=8, granularity="tensor"), "cpu_int8"),
        (QuantScheme(bits=8, granularity="channel", symmetric=False), "reference"),
        (QuantScheme(bits=8, group_size=64), "reference"),
        (QuantScheme(bits=4, group_size=48), "reference"),  # not a multiple of 32
        (QuantScheme(bits=3, group_size=64), "cpu_lut"),
        (QuantScheme(bits=2, group_size=64, symmetric=False), "cpu_lut"),
        (QuantScheme(bits=3, group_size=48), "reference"),  # cpu_lut: not a multiple of 32
    ],
)
def test_auto_picks_the_fast_kernel_only_where_it_applies(scheme, expected):
    assert layer(scheme).kernel_name == expected


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(bits=4, group_size=64),
        QuantScheme(bits=4, group_size=32, symmetric=False),
        QuantScheme(bits=4, granularity="channel", symmetric=False, scale_dtype="bfloat16"),
        QuantScheme(bits=8, granularity="channel"),
        QuantScheme(bits=8, granularity="tensor", scale_dtype="float16"),
    ],
)
@pytest.mark.parametrize("m", [1, 3, 32])
def test_fast_kernel_matches_reference_twin(scheme, m):
    lin = layer(scheme)
    x = x_for(576, m)
    with use_kernel("reference"):
        ref = lin(x)
    fast = lin(x)
    assert lin.kernel_name in ("cpu_int4", "cpu_int8")
    # bf16 activations and bf16 output rounding: relative error bound of the bf16 path
    # (see tests/test_kernels_cpu.py for the elementwise derivation).
    err = (fast - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, float(err)
    # and it is a real computation, not a copy: the fp32 reference differs in low bits
    assert fast.dtype == ref.dtype == torch.float32


@pytest.mark.parametrize("scheme", [QuantScheme(bits=3, group_size=64), QuantScheme(bits=4, group_size=32)])
def test_dequantized_kernel_is_bit_identical_to_reference(scheme):
    lin = layer(scheme)
    x = x_for(576, 7)
    with use_kernel("reference"):
        ref = lin(x)
    with use_kernel("dequantized"):
        cached = lin(x)
    assert torch.equal(ref, cached)


def test_explicit_kernel_that_cannot_run_raises():
    lin = layer(QuantScheme(bits=3, group_size=64), kernel="cpu_int4")
    with pytest.raises(KernelError, match="cpu_int4"):
        lin(x_for(576))
    with pytest.raises(KernelError, match="unknown kernel"):
        with use_kernel("cuda_magic"):
            pass


def test_context_manager_overrides_layer_argument_and_is_scoped():
    lin = layer(QuantScheme(bits=4, group_size=64), kernel="cpu_int4")
    with use_kernel("reference"):
        assert resolve(lin, lin.kernel).name == "reference"
        with use_kernel("auto"):
            assert resolve(lin, lin.kernel).name == "cpu_int4"
    assert lin.kernel_name == "cpu_int4"


def test_forward_follows_the_requested_kernel_after_earlier_calls():
    """QuantLinear reuses its last kernel choice: a later use_kernel(...) block or a new
    ``layer.kernel`` must still take effect, in forward itself (not just in kernel_name)."""
    lin = layer(QuantScheme(bits=4, group_size=64))
    x = x_for(576)
    fast = lin(x)  # cpu_int4: bf16 activations
    with use_kernel("reference"):
        exact = lin(x)
    assert not torch.equal(fast, exact)
    assert torch.equal(lin(x), fast)
    lin.kernel = "reference"
    assert torch.equal(lin(x), exact)
    with use_kernel("cpu_int4"):
        assert torch.equal(lin(x), fast)
    with pytest.raises(KernelError, match="cpu_int4"):
        with use_kernel("cpu_int4"):
            layer(QuantScheme(bits=3, group_size=64))(x)


def test_prepared_state_is_rebuilt_when_weights_change():
    lin = layer(QuantScheme(bits=4, group_size=64))
    x = x_for(576)
    before = lin(x)
    other = layer(QuantScheme(bits=4, group_size=64), seed=7)
    lin.load_state_dict(other.state_dict())
    after = lin(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, other(x))


def test_registry_lists_every_kernel_with_the_reference_twin():
    assert {"reference", "dequantized", "cpu_int4", "cpu_int8"} <= set(KERNELS)
