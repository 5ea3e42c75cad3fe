"""NF4 / FP4 (+ double quantization) against bitsandbytes itself (CPU, bitsandbytes 0.50.2)."""

from __future__ import annotations

import pytest
import torch

from lowbit import codebooks, formats
from lowbit.errors import SchemeError
from lowbit.formats.codebook import dequantize_double, double_quantize
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor

import bitsandbytes.functional as bnb_f  # noqa: E402  (a test dependency: pyproject [test])


def _bnb_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """bitsandbytes packs two 4-bit codes per byte, the first in the high nibble."""
    p = packed.reshape(-1)
    out = torch.empty(p.numel() * 2, dtype=torch.uint8)
    out[0::2] = p >> 4
    out[1::2] = p & 0xF
    return out[:n]


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_code_tables_equal_bitsandbytes(fmt):
    assert torch.equal(codebooks.table(fmt), bnb_f.get_4bit_type(fmt, device="cpu"))


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(codebooks.dynamic_map(), bnb_f.create_dynamic_map(signed=True))


def test_nf4_table_properties():
    t = codebooks.table("nf4")
    assert t[7] == 0 and t[0] == -1 and t[15] == 1
    assert bool((t[1:] > t[:-1]).all())


def _weights(seed: int, shape=(48, 320)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    w[0, :64] = 0.0  # an all-zero block
    w[1, 3] = 0.0  # an exact zero inside a block
    w[2, 64:128] = torch.linspace(-1, 1, 64)  # block absmax hit exactly, both signs
    return w


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("seed", [0, 1])
def test_codes_and_dequantized_weights_equal_bitsandbytes(fmt, seed):
    w = _weights(seed)
    scheme = QuantScheme(format=fmt)
    codes, qp = formats.quantize_weight(w, scheme)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type=fmt, compress_statistics=False)
    assert torch.equal(codes.reshape(-1), _bnb_codes(packed, w.numel()))
    assert torch.equal(qp.scale.reshape(-1), state.absmax)
    assert torch.equal(formats.dequantize(codes, qp, scheme), bnb_f.dequantize_4bit(packed, state))


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_double_quant_decodes_bitsandbytes_state_exactly(fmt):
    """Our dequantizer reads bitsandbytes' double-quantized absmax to the same weights."""
    w = _weights(2, shape=(96, 640))  # 960 blocks of 64 -> 4 blocks of 256 absmax (the last partial)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type=fmt, compress_statistics=True)
    absmax = dequantize_double(state.absmax, state.state2.absmax, state.offset.reshape(1))
    scheme = QuantScheme(format=fmt, double_quant=True)
    codes = _bnb_codes(packed, w.numel()).reshape(w.shape)
    ours = formats.dequantize(codes, formats.QParams(absmax.reshape(96, 10), None), scheme)
    assert torch.equal(ours, bnb_f.dequantize_4bit(packed, state))


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_double_quant_matches_bitsandbytes_where_it_rounds_to_nearest(fmt):
    """Same 4-bit codes, same mean and second-level absmax; the 8-bit absmax codes agree
    wherever bitsandbytes' CPU blockwise quantizer picks the nearest map value (its
    binary search does not for values below ~1e-4 of the block absmax; ours always does)."""
    w = _weights(3, shape=(96, 640))
    scheme = QuantScheme(format=fmt, double_quant=True)
    codes, qp = formats.quantize_weight(w, scheme)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type=fmt, compress_statistics=True)
    assert torch.equal(codes.reshape(-1), _bnb_codes(packed, w.numel()))
    dq = qp.double_quant
    assert torch.equal(dq.offset, state.offset.reshape(1))
    assert torch.equal(dq.absmax, state.state2.absmax)
    ours, theirs = dq.codes.reshape(-1).long(), state.absmax.reshape(-1).long()
    dmap = codebooks.dynamic_map()
    block_of = torch.arange(ours.numel()) // 256
    target = (w.reshape(-1, 64).abs().amax(1) - dq.offset) / dq.absmax[block_of]
    err_ours = (dmap[ours] - target).abs()
    err_theirs = (dmap[theirs] - target).abs()
    assert bool((err_ours <= err_theirs).all())  # ours is never farther
    assert torch.equal(ours[err_theirs == err_ours], theirs[err_theirs == err_ours])
    assert int((ours != theirs).sum()) <= ours.numel() // 50


def test_double_quant_bits_and_error():
    w = torch.randn(256, 1024) * 0.02
    plain = QuantizedTensor.quantize(w, QuantScheme(format="nf4"))
    dq = QuantizedTensor.quantize(w, QuantScheme(format="nf4", double_quant=True))
    assert plain.bits_per_weight == pytest.approx(4.5)
    # 8-bit absmax per 64 weights + fp32 per 256 absmax + one fp32 offset (QLoRA: ~4.127)
    assert dq.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel())
    assert dq.bits_per_weight == pytest.approx(QuantScheme(format="nf4", double_quant=True).bits_per_weight(256, 1024))
    # scale codes cost little accuracy
    assert formats.sqnr_db(w, dq.dequantize()) > formats.sqnr_db(w, plain.dequantize()) - 0.3


def test_double_quantize_round_trip_partial_block():
    s = torch.rand(3, 100) * 0.1  # 300 scales -> 2 blocks, the last of 44
    dq = double_quantize(s)
    assert dq.codes.shape == (3, 100) and dq.absmax.shape == (2,) and dq.offset.shape == (1,)
    back = dq.dequantize()
    assert float((back - s).abs().max()) < 0.01 * float(s.abs().max())


def test_codebook_scheme_errors():
    with pytest.raises(SchemeError, match="4-bit codes"):
        QuantScheme(format="nf4", bits=3)
    with pytest.raises(SchemeError, match="no zero point"):
        QuantScheme(format="fp4", symmetric=False)
    with pytest.raises(SchemeError, match="blockwise"):
        QuantScheme(format="nf4", granularity="channel")
    with pytest.raises(SchemeError, match="double_quant"):
        QuantScheme(format="nf4", double_quant=True, scale_dtype="float16")
    with pytest.raises(SchemeError, match="double_quant"):
        QuantScheme(bits=4, double_quant=True)
    with pytest.raises(SchemeError, match="does not divide"):
        QuantizedTensor.quantize(torch.randn(4, 96), QuantScheme(format="nf4"))
