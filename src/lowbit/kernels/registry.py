"""Which kernel runs a ``QuantLinear``: chosen explicitly, never by a global switch.

A layer's kernel is, in order of precedence:

1. the name set by the ``use_kernel(...)`` context manager (a ``ContextVar``,
   so it is scoped to the ``with`` block and to the current thread/task);
2. the ``kernel=`` argument the layer was built with;
3. ``"auto"``: the fastest registered kernel that supports the layer's format,
   shape and device, else ``"reference"``.

Asking for a kernel by name that cannot run a layer raises ``KernelError``
(no silent fallback); only ``"auto"`` falls back.

Every fast kernel has the reference kernel (dequantize, then ``F.linear``) as
its twin; ``tests/test_kernels_registry.py`` pins each pair together on real
``QuantLinear`` layers.

Every kernel honours ``layer.scheme.activations``: for W8A8 schemes
(``activations="int8"``) ``reference`` and ``dequantized`` first apply
``formats.fake_quantize_activations_int8`` to the input, ``cpu_w8a8`` runs the
same numerics on integers, and the weight-only kernels (``cpu_int4``,
``cpu_int8``, ``cpu_lut``) report such layers as unsupported. (``cpu_lut``, for
2/3-bit weights, quantizes activations on its own, per block of 32, to run on
int8 dot products; its twin is pinned in ``tests/test_kernels_lut.py``. ``cpu_fp8``,
for FP8 weights, takes unrounded activations, or rounds them to FP8 in torch first exactly
as ``reference`` does for ``activations="fp8_e4m3"``; pinned in ``tests/test_kernels_fp8.py``.)
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from lowbit.errors import KernelError
from lowbit.scheme import Granularity

_ACTIVE: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lowbit_kernel", default=None)


@contextlib.contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Run every ``QuantLinear`` inside the block with kernel ``name`` (or "auto")."""
    if name != "auto" and name not in KERNELS:
        raise KernelError(f"unknown kernel {name!r}; choose one of {kernel_names()} or 'auto'")
    token = _ACTIVE.set(name)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_kernel_override() -> Optional[str]:
    return _ACTIVE.get()


@dataclass(frozen=True)
class Kernel:
    """``supports(layer) -> (ok, reason)``; ``prepare(layer) -> state`` (cached on the
    layer, may be None); ``run(layer, state, x) -> y``."""

    name: str
    supports: Callable[[Any], tuple[bool, str]]
    prepare: Callable[[Any], Any]
    run: Callable[[Any, Any, torch.Tensor], torch.Tensor]
    priority: int  # higher wins under "auto"


# -- reference ---------------------------------------------------------------
def _ref_supports(layer) -> tuple[bool, str]:
    return True, ""


def _activations(layer, x: torch.Tensor) -> torch.Tensor:
    """The activations the layer's scheme sees: fake-quantized per row for W8A8 schemes
    (LLM.int8 layers: the outlier columns are left out of the int8 rounding and its row
    scale, and reach their float16 weights unrounded); per-row fp8 for fp8 activations."""
    if layer.scheme.activations == "int8":
        from lowbit.formats import fake_quantize_activations_int8

        idx = getattr(layer, "outlier_idx", None)
        if idx is None:
            return fake_quantize_activations_int8(x)
        idx = idx.long()
        inliers = x.clone()
        inliers[..., idx] = 0
        out = fake_quantize_activations_int8(inliers)
        out[..., idx] = x[..., idx]
        return out
    if layer.scheme.activations == "fp8_e4m3":
        from lowbit.formats import fake_quantize_activations_fp8

        return fake_quantize_activations_fp8(x)
    return x


def _ref_run(layer, state, x: torch.Tensor) -> torch.Tensor:
    w = layer.quantized_tensor().dequantize(torch.float32).to(x.dtype)
    return F.linear(_activations(layer, x), w, None if layer.bias is None else layer.bias.to(x.dtype))


def _dequantized_prepare(layer) -> torch.Tensor:
    return layer.quantized_tensor().dequantize(torch.float32)


def _dequantized_run(layer, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(_activations(layer, x), w.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))


def _integer_weights(layer, kernel: str) -> tuple[bool, str]:
    if layer.scheme.format != "int":
        return False, f"{kernel} runs integer weight formats only, not {layer.scheme.format!r}"
    return True, ""


def _weight_only(layer, kernel: str) -> tuple[bool, str]:
    if layer.scheme.activations is not None:
        return False, (
            f"{kernel} is a weight-only kernel and cannot quantize activations "
            f"(scheme activations={layer.scheme.activations!r}); use cpu_w8a8 or reference"
        )
    return True, ""


# -- CPU int4 (torch.ops.aten._weight_int4pack_mm_for_cpu) -------------------
def _per_row_qparams(layer):
    """scale / zero with one row per output channel (a per-tensor scale is repeated)."""
    n = layer.out_features
    scale, zero = layer.scale, layer.zero
    if layer.scheme.granularity is Granularity.TENSOR:
        scale = scale.expand(n, 1)
        zero = None if zero is None else zero.expand(n, 1)
    return scale, zero


def _scheme_group(layer) -> int:
    s = layer.scheme
    return s.group_size if s.granularity is Granularity.GROUP else layer.in_features


def _int4_supports(layer) -> tuple[bool, str]:
    from lowbit.kernels import cpu_int4

    ok, why = _integer_weights(layer, "cpu_int4")
    if ok:
        ok, why = _weight_only(layer, "cpu_int4")
    if not ok:
        return ok, why
    if layer.scale.device.type != "cpu":
        return False, "cpu_int4 runs on CPU tensors only"
    return cpu_int4.int4_supported(layer.out_features, layer.in_features, _scheme_group(layer), layer.scheme.bits)


def _int4_prepare(layer):
    from lowbit.kernels import cpu_int4

    scale, zero = _per_row_qparams(layer)
    return cpu_int4.prepack_int4(layer.quantized_tensor().codes(), scale, zero, _scheme_group(layer))


def _int4_run(layer, state, x):
    from lowbit.kernels import cpu_int4

    return cpu_int4.int4_linear(x, state, layer.bias)


# -- CPU int8 (torch.ops.aten._weight_int8pack_mm) ---------------------------
def _int8_supports(layer) -> tuple[bool, str]:
    from lowbit.kernels import cpu_int8

    s = layer.scheme
    ok, why = _integer_weights(layer, "cpu_int8")
    if ok:
        ok, why = _weight_only(layer, "cpu_int8")
    if not ok:
        return ok, why
    if s.granularity is Granularity.GROUP:
        return False, "cpu_int8 needs one scale per output channel (granularity 'channel' or 'tensor')"
    if layer.scale.device.type != "cpu":
        return False, "cpu_int8 runs on CPU tensors only"
    k = layer.in_features
    return cpu_int8.int8_supported(layer.out_features, k, k, s.bits, s.symmetric)


def _int8_prepare(layer):
    from lowbit.kernels import cpu_int8

    scale, _ = _per_row_qparams(layer)
    return cpu_int8.prepack_int8(layer.quantized_tensor().codes(), scale)


def _int8_run(layer, state, x):
    from lowbit.kernels import cpu_int8

    return cpu_int8.int8_linear(x, state, layer.bias)


# -- CPU W8A8 (torch._int_mm on int8 activations and weights) ---------------
def _w8a8_supports(layer) -> tuple[bool, str]:
    from lowbit.kernels import cpu_w8a8

    s = layer.scheme
    ok, why = _integer_weights(layer, "cpu_w8a8")
    if not ok:
        return ok, why
    if layer.scale.device.type != "cpu":
        return False, "cpu_w8a8 runs on CPU tensors only"
    return cpu_w8a8.w8a8_supported(
        layer.out_features,
        layer.in_features,
        s.bits,
        s.symmetric,
        s.granularity is not Granularity.GROUP,
        s.activations,
    )


def _w8a8_prepare(layer):
    from lowbit.kernels import cpu_w8a8

    scale, _ = _per_row_qparams(layer)
    return cpu_w8a8.prepack_w8a8(layer.quantized_tensor().codes(), scale)


def _w8a8_run(layer, state, x):
    from lowbit.kernels import cpu_w8a8

    if layer.outlier_idx is not None:  # LLM.int8: the outlier columns run in float
        idx = layer.outlier_idx.long()
        inliers = x.clone()
        inliers[..., idx] = 0
        y = cpu_w8a8.w8a8_linear(inliers, state, layer.bias)
        return y + F.linear(x[..., idx], layer.outlier_weight.to(x.dtype))

    return cpu_w8a8.w8a8_linear(x, state, layer.bias)


# -- CPU LUT (lowbit's own C kernel, cpu_lut.py): 2- and 3-bit integer codes ----
def _lut_supports(layer) -> tuple[bool, str]:
    from lowbit.kernels import cpu_lut

    return cpu_lut.layer_supported(layer, _weight_only(layer, "cpu_lut"), _scheme_group(layer))


def _lut_prepare(layer):
    from lowbit.kernels import cpu_lut

    return cpu_lut.prepare_layer(layer, _scheme_group(layer))


def _lut_run(layer, state, x):
    from lowbit.kernels import cpu_lut

    return cpu_lut.lut_linear(x, state, layer.bias)


# -- CPU FP8 (lowbit's own C kernel, cpu_fp8.py): fp8_e4m3 / fp8_e5m2 weights ----
def _fp8_supports(layer) -> tuple[bool, str]:
    from lowbit.kernels import cpu_fp8

    s = layer.scheme
    if s.format not in cpu_fp8.FORMATS:
        return False, f"cpu_fp8 runs {sorted(cpu_fp8.FORMATS)} weights only, not {s.format!r}"
    if s.activations not in (None, "fp8_e4m3"):
        return False, f"cpu_fp8 cannot quantize activations to {s.activations!r}"
    if s.granularity is Granularity.GROUP:
        return False, "cpu_fp8 needs one scale per output channel or per tensor"
    if layer.scale.device.type != "cpu":
        return False, "cpu_fp8 runs on CPU tensors only"
    return cpu_fp8.available()


def _fp8_prepare(layer):
    from lowbit.kernels import cpu_fp8

    return cpu_fp8.prepare(layer.quantized_tensor().codes(), layer.scale, layer.scheme.format)


def _fp8_run(layer, state, x):
    from lowbit.kernels import cpu_fp8

    # fp8 activations are rounded in torch first, exactly as the reference kernel does
    return cpu_fp8.fp8_linear(_activations(layer, x), state, layer.bias)


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        Kernel("reference", _ref_supports, lambda layer: None, _ref_run, priority=0),
        # same arithmetic as "reference" (bit-identical outputs), but the fp32 weight is
        # dequantized once and cached on the layer: fast evaluation at fp32 memory cost.
        # Never chosen by "auto".
        Kernel("dequantized", _ref_supports, _dequantized_prepare, _dequantized_run, priority=-1),
        Kernel("cpu_int4", _int4_supports, _int4_prepare, _int4_run, priority=10),
        Kernel("cpu_int8", _int8_supports, _int8_prepare, _int8_run, priority=10),
        # W2/W3 integer layers; int8 activations per block of 32 (see cpu_lut.py)
        Kernel("cpu_lut", _lut_supports, _lut_prepare, _lut_run, priority=10),
        # FP8 weights, activations unrounded or rounded to fp8 as in the reference (see cpu_fp8.py)
        Kernel("cpu_fp8", _fp8_supports, _fp8_prepare, _fp8_run, priority=10),
        # W8A8 layers only (the weight-only kernels above refuse them, so "auto" lands here)
        Kernel("cpu_w8a8", _w8a8_supports, _w8a8_prepare, _w8a8_run, priority=20),
    )
}


def kernel_names() -> list[str]:
    return sorted(KERNELS)


def resolve(layer, requested: str) -> Kernel:
    """The kernel that will run ``layer`` given the requested name (see module doc)."""
    name = active_kernel_override() or requested
    if name == "auto":
        best = KERNELS["reference"]
        for k in KERNELS.values():
            if k.priority > best.priority and k.supports(layer)[0]:
                best = k
        return best
    k = KERNELS.get(name)
    if k is None:
        raise KernelError(f"unknown kernel {name!r}; choose one of {kernel_names()} or 'auto'")
    ok, why = k.supports(layer)
    if not ok:
        raise KernelError(f"kernel {name!r} cannot run this layer: {why}; use 'auto' or 'reference'")
    return k
