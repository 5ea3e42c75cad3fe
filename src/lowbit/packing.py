"""Bit layouts: pack unsigned integer codes into bytes, and back.

Layout ``lowbit.bitstream.v1`` (the only native layout), per row of a
``[rows, cols]`` code matrix with codes of ``bits`` bits (1..8):

* 8 bits: one code per byte, ``bytes[r, c] = q[r, c]`` (no padding).
* 1..7 bits: the row is padded with zero codes to a multiple of 8 codes and
  laid out as a little-endian bit stream: code ``c`` occupies bits
  ``[c*bits, (c+1)*bits)`` of the row, bit ``i`` of the stream being bit
  ``i % 8`` of byte ``i // 8``. Every 8 codes fill exactly ``bits`` bytes, so a
  row takes ``ceil(cols / 8) * bits`` bytes. Concretely:

  - 4 bits: ``byte[j] = q[2j] | q[2j+1] << 4`` (low nibble first);
  - 2 bits: ``byte[j] = q[4j] | q[4j+1] << 2 | q[4j+2] << 4 | q[4j+3] << 6``;
  - 3 bits: 8 codes -> 3 bytes: ``v = sum_k q[8i+k] << 3k`` (24 bits),
    ``bytes = v & 0xff, (v >> 8) & 0xff, v >> 16``; codes straddle bytes.

Everything is vectorized tensor arithmetic: no Python loop touches elements.
"""

from __future__ import annotations

import torch

from lowbit.errors import PackingError

NATIVE_LAYOUT = "lowbit.bitstream.v1"
LAYOUTS = (NATIVE_LAYOUT,)


def packed_row_bytes(cols: int, bits: int) -> int:
    _check_bits(bits)
    if bits == 8:
        return cols
    return -(-cols // 8) * bits


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise PackingError(f"bits must be an integer from 1 to 8, got {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, cols]`` uint8 codes -> ``[rows, packed_row_bytes(cols, bits)]`` uint8."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise PackingError(f"pack expects a 2-D code matrix, got shape {tuple(codes.shape)}")
    if codes.dtype != torch.uint8:
        raise PackingError(f"codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise PackingError(f"code {int(codes.max())} does not fit in {bits} bits")
    if bits == 8:
        return codes.contiguous()
    rows, cols = codes.shape
    n8 = -(-cols // 8)
    padded = torch.zeros(rows, n8 * 8, dtype=torch.int64)
    padded[:, :cols] = codes
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (padded.view(rows, n8, 8) << shifts).sum(dim=-1)  # <= 56 bits, fits int64
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(rows, n8 * bits).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[rows, packed bytes]`` -> ``[rows, cols]`` uint8 codes."""
    _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise PackingError(f"packed data must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    rows = packed.shape[0]
    expected = packed_row_bytes(cols, bits)
    if packed.shape[1] != expected:
        raise PackingError(
            f"packed rows hold {packed.shape[1]} bytes but {cols} codes of {bits} bits need {expected}"
        )
    if bits == 8:
        return packed.contiguous()
    if 8 % bits == 0:  # 1, 2, 4 bits: codes never straddle a byte; stay in uint8
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(rows, expected * (8 // bits))[:, :cols].contiguous()
    n8 = expected // bits
    by = packed.to(torch.int64).view(rows, n8, bits)
    words = (by << (torch.arange(bits, dtype=torch.int64) * 8)).sum(dim=-1)
    codes = (words.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return codes.reshape(rows, n8 * 8)[:, :cols].to(torch.uint8).contiguous()
