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

Layout ``int32.le`` (for other ecosystems' checkpoints: :func:`pack_int32` / :func:`unpack_int32`):
``[rows, cols]`` unsigned codes of ``bits`` bits -> ``int32 [rows, ceil(cols * bits / 32)]``,
packed along the last dimension as one dense little-endian bit stream: code ``c`` of a row
occupies stream bits ``[c*bits, (c+1)*bits)``, and bit ``b`` of word ``w`` is stream bit
``32*w + b``. For ``bits`` in 2, 4, 8 every word holds ``32 // bits`` whole codes (code ``j``
of the word at bits ``j*bits``); for 3 bits 32 codes fill 3 words and codes 10 and 21
straddle words (code 10: bits 30-31 of word 0 + bit 0 of word 1; code 21: bit 31 of word 1 +
bits 0-1 of word 2). That is exactly the layout of

- GPTQ v1 ``qweight`` / ``qzeros`` (AutoGPTQ ``QuantLinear.pack``: the ``bits == 3`` branch
  writes ``intweight[i] << 30`` then ``(intweight[i] >> 2) & 1`` into the next row, etc.;
  also GPTQ-for-LLaMa ``quant.py``), and
- compressed-tensors ``pack_to_int32`` (``compressors/pack_quantized/helpers.py`` of
  compressed-tensors 0.20: "32 consecutive elements are packed into exactly num_bits int32
  words"), which for 2/4/8 bits equals the older ``pack_factor = 32 // num_bits`` layout.

It is ``lowbit.bitstream.v1``'s byte stream read as little-endian int32 words, which is how
it is computed (no Python loop over elements).
"""

from __future__ import annotations

import sys

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
    padded = torch.zeros(rows, n8 * 8, dtype=torch.int64, device=codes.device)
    padded[:, :cols] = codes
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    words = (padded.view(rows, n8, 8) << shifts).sum(dim=-1)  # <= 56 bits, fits int64
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
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
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(rows, expected * (8 // bits))[:, :cols].contiguous()
    n8 = expected // bits
    by = packed.to(torch.int64).view(rows, n8, bits)
    words = (by << (torch.arange(bits, dtype=torch.int64, device=packed.device) * 8)).sum(dim=-1)
    codes = (words.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64, device=packed.device) * bits)) & ((1 << bits) - 1)
    return codes.reshape(rows, n8 * 8)[:, :cols].to(torch.uint8).contiguous()


# ---------------------------------------------------------------------------
# int32 words
# ---------------------------------------------------------------------------
def int32_words(cols: int, bits: int) -> int:
    """Number of int32 words a row of ``cols`` codes of ``bits`` bits takes (dense packing)."""
    return -(-cols * bits // 32)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[rows, cols]`` codes -> int32 ``[rows, ceil(cols*bits/32)]`` (layout ``int32.le``, module doc)."""
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise PackingError(f"pack_int32 expects a 2-D uint8 code matrix, got {codes.dtype} {tuple(codes.shape)}")
    rows, cols = codes.shape
    padded_cols = -(-cols // 32) * 32  # 32 codes always fill whole words
    if padded_cols != cols:
        codes = torch.cat([codes, codes.new_zeros(rows, padded_cols - cols)], dim=1)
    stream = pack(codes.contiguous(), bits)  # [rows, padded_cols/8*bits] bytes, multiple of 4
    words = _bytes_to_int32(stream)
    return words[:, : int32_words(cols, bits)].contiguous()


def unpack_int32(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 ``[rows, ceil(cols*bits/32)]`` -> uint8 ``[rows, cols]``."""
    if words.dim() != 2 or words.dtype != torch.int32:
        raise PackingError(f"unpack_int32 expects a 2-D int32 tensor, got {words.dtype} {tuple(words.shape)}")
    rows, n = words.shape
    if n != int32_words(cols, bits):
        raise PackingError(
            f"{n} int32 words per row do not hold {cols} codes of {bits} bits "
            f"(expected {int32_words(cols, bits)} words)"
        )
    padded_words = -(-cols // 32) * bits
    if padded_words != n:
        words = torch.cat([words, words.new_zeros(rows, padded_words - n)], dim=1)
    stream = _int32_to_bytes(words.contiguous())
    padded_cols = padded_words * 32 // bits
    return unpack(stream, bits, padded_cols)[:, :cols].contiguous()


def _bytes_to_int32(b: torch.Tensor) -> torch.Tensor:
    rows = b.shape[0]
    flat = b.contiguous().reshape(-1)  # 1-D: a [1, n] tensor may carry a stride that .view() refuses
    if sys.byteorder == "big":  # pragma: no cover - the stream is little-endian by definition
        flat = flat.view(-1, 4).flip(-1).reshape(-1)
    return flat.view(torch.int32).view(rows, -1)


def _int32_to_bytes(w: torch.Tensor) -> torch.Tensor:
    rows = w.shape[0]
    b = w.contiguous().reshape(-1).view(torch.uint8).view(rows, -1)
    if sys.byteorder == "big":  # pragma: no cover
        b = b.view(rows, -1, 4).flip(-1).reshape(rows, -1)
    return b.contiguous()
