"""Bit layout ``lowbit.bitstream.v1``: exact round trips, sizes, and the bytes
the module docstring promises (checked against hand-computed values and an
independent bit-by-bit reference packer)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import packing
from lowbit.errors import PackingError
from lowbit.packing import pack, packed_row_bytes, unpack

SETTINGS = settings(max_examples=50, deadline=None)


def reference_pack(codes: list[list[int]], bits: int) -> list[list[int]]:
    """The docstring's layout, one bit at a time (slow, obviously correct)."""
    out = []
    for row in codes:
        if bits == 8:
            out.append(list(row))
            continue
        n = -(-len(row) // 8) * 8
        row = list(row) + [0] * (n - len(row))
        stream = []
        for q in row:
            stream.extend((q >> i) & 1 for i in range(bits))  # code c -> bits [c*bits, (c+1)*bits)
        out.append([sum(stream[8 * j + i] << i for i in range(8)) for j in range(len(stream) // 8)])
    return out


@st.composite
def code_matrices(draw, bits=None):
    bits = draw(st.integers(1, 8)) if bits is None else bits
    rows = draw(st.integers(1, 8))
    cols = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    mode = draw(st.sampled_from(["random", "max", "zero", "alternating"]))
    if mode == "random":
        codes = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.int64)
    elif mode == "max":
        codes = torch.full((rows, cols), (1 << bits) - 1)
    elif mode == "zero":
        codes = torch.zeros(rows, cols, dtype=torch.int64)
    else:
        codes = (torch.arange(rows * cols).reshape(rows, cols) % 2) * ((1 << bits) - 1)
    return codes.to(torch.uint8), bits


@SETTINGS
@given(code_matrices())
def test_round_trip_exact_and_sizes(cb):
    codes, bits = cb
    rows, cols = codes.shape
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (rows, packed_row_bytes(cols, bits))
    back = unpack(packed, bits, cols)
    assert back.dtype == torch.uint8
    assert torch.equal(back, codes)


@pytest.mark.parametrize("bits", range(1, 9))
@SETTINGS
@given(data=st.data())
def test_matches_reference_bitstream(bits, data):
    codes, _ = data.draw(code_matrices(bits=bits))
    packed = pack(codes, bits)
    assert packed.tolist() == reference_pack(codes.tolist(), bits)


@pytest.mark.parametrize(
    "cols,bits,expected",
    [
        (1, 8, 1), (7, 8, 7), (300, 8, 300),
        (1, 4, 4), (8, 4, 4), (9, 4, 8), (300, 4, 152),
        (1, 3, 3), (8, 3, 3), (9, 3, 6), (17, 3, 9),
        (1, 2, 2), (16, 2, 4), (17, 2, 6),
        (1, 1, 1), (8, 1, 1), (9, 1, 2),
        (8, 5, 5), (10, 7, 14), (8, 6, 6),
    ],
)
def test_packed_row_bytes_table(cols, bits, expected):
    assert packed_row_bytes(cols, bits) == expected


def _u8(rows):
    return torch.tensor(rows, dtype=torch.uint8)


def test_bytes_4bit_low_nibble_first():
    codes = _u8([[1, 2, 3, 4, 15, 0, 0, 9], [5, 6, 0, 0, 0, 0, 0, 0]])
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x0F, 0x90], [0x65, 0, 0, 0]]
    # odd width: the row is padded with zero codes to 8 codes (4 bytes)
    assert pack(_u8([[0xA, 0xB, 0xC]]), 4).tolist() == [[0xBA, 0x0C, 0, 0]]


def test_bytes_2bit():
    # byte = q0 | q1<<2 | q2<<4 | q3<<6
    codes = _u8([[1, 2, 3, 0, 3, 0, 0, 0, 2]])
    # 1 + 8 + 48 + 0 = 0x39 ; 3 ; then 9th code starts the second 8-code block
    assert pack(codes, 2).tolist() == [[0x39, 0x03, 0x02, 0x00]]
    assert pack(_u8([[3, 3, 3, 3, 3, 3, 3, 3]]), 2).tolist() == [[0xFF, 0xFF]]


def test_bytes_3bit_straddle():
    # v = sum q[k] << 3k = 0x8B03DD for these 8 codes (hand-computed):
    # 5 + 3<<3 + 7<<6 + 1<<9 + 0<<12 + 6<<15 + 2<<18 + 4<<21
    codes = _u8([[5, 3, 7, 1, 0, 6, 2, 4]])
    assert pack(codes, 3).tolist() == [[0xDD, 0x03, 0x8B]]
    # code 2 (value 7) occupies bits 6..8: bits 6,7 of byte 0 and bit 0 of byte 1
    assert pack(_u8([[0, 0, 7, 0, 0, 0, 0, 0]]), 3).tolist() == [[0xC0, 0x01, 0x00]]
    # code 5 (value 7) occupies bits 15..17: bit 7 of byte 1, bits 0,1 of byte 2
    assert pack(_u8([[0, 0, 0, 0, 0, 7, 0, 0]]), 3).tolist() == [[0x00, 0x80, 0x03]]


def test_bytes_1bit_and_8bit():
    assert pack(_u8([[1, 0, 1, 1, 0, 0, 0, 1, 1]]), 1).tolist() == [[0x8D, 0x01]]
    codes = _u8([[0, 255, 17], [3, 4, 5]])
    assert pack(codes, 8).tolist() == codes.tolist()


def test_unpack_ignores_nothing_it_should_not():
    """Padding codes are dropped on unpack; bits beyond ``cols`` do not leak in."""
    packed = _u8([[0xFF, 0xFF, 0xFF, 0xFF]])  # 8 codes of 4 bits, all 15
    assert unpack(packed, 4, 3).tolist() == [[15, 15, 15]]
    assert unpack(_u8([[0xDD, 0x03, 0x8B]]), 3, 8).tolist() == [[5, 3, 7, 1, 0, 6, 2, 4]]


@pytest.mark.parametrize("bits", range(1, 8))
def test_code_too_large(bits):
    codes = torch.zeros(2, 5, dtype=torch.uint8)
    codes[1, 3] = 1 << bits
    with pytest.raises(PackingError, match=f"{bits} bits"):
        pack(codes, bits)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.float32])
def test_wrong_dtype(dtype):
    with pytest.raises(PackingError, match="uint8"):
        pack(torch.zeros(2, 8, dtype=dtype), 4)
    with pytest.raises(PackingError, match="uint8"):
        unpack(torch.zeros(2, 4, dtype=dtype), 4, 8)


def test_wrong_rank():
    with pytest.raises(PackingError):
        pack(torch.zeros(8, dtype=torch.uint8), 4)
    with pytest.raises(PackingError):
        unpack(torch.zeros(8, dtype=torch.uint8), 4, 8)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, None])
def test_bad_bits(bits):
    with pytest.raises(PackingError):
        pack(torch.zeros(1, 8, dtype=torch.uint8), bits)
    with pytest.raises(PackingError):
        packed_row_bytes(8, bits)


@pytest.mark.parametrize("bits,cols,nbytes", [(4, 8, 3), (4, 8, 5), (3, 9, 3), (8, 10, 9), (2, 1, 1), (1, 9, 1)])
def test_wrong_packed_size(bits, cols, nbytes):
    with pytest.raises(PackingError, match="need"):
        unpack(torch.zeros(2, nbytes, dtype=torch.uint8), bits, cols)


def test_empty_rows_round_trip():
    codes = torch.zeros(0, 12, dtype=torch.uint8)
    for bits in range(1, 9):
        p = pack(codes, bits)
        assert tuple(p.shape) == (0, packed_row_bytes(12, bits))
        assert unpack(p, bits, 12).shape == (0, 12)


def test_native_layout_registered():
    assert packing.NATIVE_LAYOUT in packing.LAYOUTS
