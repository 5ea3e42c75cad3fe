"""The numeric-format protocol (``lowbit.formats.base``), run over every registered format.

Each format's own numerics are pinned elsewhere (test_formats, test_float_formats,
test_float_zero, test_codebooks); here: the registry covers the scheme vocabulary, every
format keeps the contract (code dtype / shape / range, float32 values, stored tensors that
add up to ``QuantScheme.storage_bytes``), and the entry points dispatch through the
registry alone (a stand-in format is used without any other change).
"""

from __future__ import annotations

import pytest
import torch

from lowbit import formats
from lowbit.errors import FormatError
from lowbit.formats import registry
from lowbit.formats.base import NumericFormat, QParams
from lowbit.scheme import FORMATS, QuantScheme
from lowbit.tensor import QuantizedTensor, stored_tensor_specs

SCHEMES = [
    QuantScheme(bits=4, group_size=32),
    QuantScheme(bits=3, symmetric=False, granularity="channel", scale_dtype="float16"),
    QuantScheme(bits=2, symmetric=False, zero_point="float", group_size=32, scale_dtype="bfloat16"),
    QuantScheme(bits=8, granularity="tensor"),
    QuantScheme(format="nf4"),
    QuantScheme(format="fp4", group_size=32, scale_dtype="bfloat16"),
    QuantScheme(format="nf4", double_quant=True),
    QuantScheme(format="fp8_e4m3"),
    QuantScheme(format="fp8_e5m2", granularity="tensor", scale_dtype="float16"),
    QuantScheme(format="ternary"),
    QuantScheme(format="ternary", granularity="group", group_size=32),
]


def test_every_scheme_format_has_exactly_one_numeric_format():
    reg = formats.registered()
    assert sorted(reg) == sorted(FORMATS)
    for name, fmt in reg.items():
        assert isinstance(fmt, NumericFormat) and name in fmt.names
        assert formats.numeric_format(name) is fmt


def test_formats_are_covered_by_the_contract_schemes():
    assert {s.format for s in SCHEMES} == set(FORMATS)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.short_name)
def test_contract(scheme):
    fmt = formats.numeric_format(scheme)
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    g = formats.grouped(w, scheme)
    qp = fmt.choose_params(g, scheme)
    assert qp.scale.shape == g.shape[:2]
    codes = fmt.quantize(g, qp, scheme)
    assert codes.dtype == torch.uint8 and codes.shape == g.shape
    assert int(codes.max()) < (1 << fmt.bits_per_code(scheme))
    values = fmt.dequantize(codes, qp, scheme)
    assert values.dtype == torch.float32 and values.shape == g.shape
    assert fmt.bits_per_code(scheme) == scheme.bits  # what packing, kernels and storage_bytes use
    # round-to-nearest = choose_params then quantize, except where a format says otherwise
    rtn_codes, rtn_qp = fmt.choose_and_quantize(g, scheme)
    if not scheme.double_quant:
        assert torch.equal(rtn_codes, codes) and torch.equal(rtn_qp.scale, qp.scale)
    # the stored tensors: the layer holds exactly them, and their bytes are the scheme's
    qt = QuantizedTensor.quantize(w, scheme)
    specs = stored_tensor_specs(scheme, 16, 256)
    assert set(qt.tensors()) == set(specs)
    assert {n: (tuple(t.shape), t.dtype) for n, t in qt.tensors().items()} == specs
    assert set(fmt.stored_tensors(scheme, 16, 256)) == set(specs) - {"qweight"}
    assert qt.nbytes == scheme.storage_bytes(16, 256)


def test_value_table_is_only_for_formats_with_scale_free_code_values():
    with pytest.raises(FormatError, match="no code-value table"):
        formats.value_table(QuantScheme(bits=4))
    assert formats.value_table(QuantScheme(format="ternary")).tolist() == [-1.0, 0.0, 1.0, 0.0]
    assert formats.value_table(QuantScheme(format="nf4")).shape == (16,)


class _Halves(NumericFormat):
    """A stand-in format: ``w = q / 2`` with a stored scale of 1 (codes 0..15 at 4 bits)."""

    names = ("int",)

    def choose_params(self, g, scheme):
        return QParams(scale=torch.ones(g.shape[:2]), zero=None)

    def quantize(self, g, qp, scheme):
        return torch.round(g * 2).clamp(0, 15).to(torch.uint8)

    def dequantize(self, codes, qp, scheme):
        return codes.to(torch.float32) / 2


class _Broken(_Halves):
    def quantize(self, g, qp, scheme):
        return torch.round(g * 2).to(torch.int32)


@pytest.fixture
def stand_in(monkeypatch):
    def install(fmt):
        monkeypatch.setattr(registry, "_registry", lambda: {"int": fmt})

    return install


def test_entry_points_dispatch_through_the_registry_alone(stand_in):
    stand_in(_Halves())
    scheme = QuantScheme(bits=4, granularity="channel")
    w = torch.tensor([[0.0, 0.5, 1.0, 7.5], [3.0, 2.2, 9.0, -1.0]])
    codes, qp = formats.quantize_weight(w, scheme)
    assert codes.tolist() == [[0, 1, 2, 15], [6, 4, 15, 0]]
    assert formats.fake_quantize(w, scheme).tolist() == [[0.0, 0.5, 1.0, 7.5], [3.0, 2.0, 7.5, 0.0]]
    assert torch.equal(formats.dequantize(codes, qp, scheme), formats.fake_quantize(w, scheme))
    assert set(stored_tensor_specs(scheme, 2, 4)) == {"qweight", "scale"}


def test_a_format_that_breaks_the_contract_is_named(stand_in):
    stand_in(_Broken())
    with pytest.raises(FormatError, match="_Broken.*broke the format contract.*uint8"):
        formats.quantize_weight(torch.ones(2, 4), QuantScheme(bits=4, granularity="channel"))


def test_unknown_names_and_incomplete_formats_are_refused():
    with pytest.raises(FormatError, match="no numeric format is registered for 'int3'"):
        formats.numeric_format("int3")

    class Incomplete(NumericFormat):
        names = ("int",)

        def choose_params(self, g, scheme):
            return QParams(torch.ones(g.shape[:2]), None)

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
