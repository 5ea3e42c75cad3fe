"""GGML block codecs: float32 rows <-> the bytes of one GGUF tensor type.

Every codec works on a 2-D ``[n_blocks, block_size]`` float32 array (encode)
or a ``[n_blocks, type_size]`` uint8 array (decode), vectorized in numpy: no
Python loop touches an element (the K-quant encoders loop over their
candidate scales, a fixed count, each step vectorized over all blocks).

Facts checked against llama.cpp ``ggml/src/ggml-quants.c`` (``quantize_row_*_ref``,
``dequantize_row_*``, ``make_qx_quants``, ``make_qkx2_quants``) and gguf-py
``gguf/quants.py`` (the block tables). The encoders reproduce the C reference
quantizers operation by operation in float32: ``nearest_int`` (add 1.5*2^23)
is round-half-to-even (``np.rint``), the C ``(int)`` casts truncate, fp16
conversion is round-to-nearest-even, and running sums are sequential
(``np.cumsum``), as in the C loops.

Block layouts (all little-endian; ``d``/``m``/``dmin`` are fp16; ``q[i]`` is
the code of the block's i-th weight)::

    Q8_0  32 weights,  2 + 32      = 34 bytes  | d | q[0..31] int8 |             w = d*q
    Q4_0  32 weights,  2 + 16      = 18 bytes  | d | qs[16] |                    w = d*(q-8)
    Q4_1  32 weights,  2 + 2 + 16  = 20 bytes  | d | m | qs[16] |                w = d*q + m
    Q5_0  32 weights,  2 + 4 + 16  = 22 bytes  | d | qh u32 | qs[16] |           w = d*(q-16)
    Q5_1  32 weights,  2 + 2+4+16  = 24 bytes  | d | m | qh u32 | qs[16] |       w = d*q + m
          qs[j] = (q[j] & 0xF) | (q[j+16] & 0xF) << 4      (j = 0..15)
          qh bit j = q[j] >> 4                              (j = 0..31, Q5 only)

    Q4_K  256 weights = 8 sub-blocks of 32, 2 + 2 + 12 + 128 = 144 bytes
          | d | dmin | scales[12] | qs[128] |
          sub-block j: w = d*sc[j]*q - dmin*mn[j], sc/mn 6-bit:
            j < 4:  sc = scales[j] & 63,  mn = scales[j+4] & 63
            j >= 4: sc = (scales[j+4] & 0xF) | (scales[j-4] >> 6) << 4
                    mn = (scales[j+4] >> 4)  | (scales[j]   >> 6) << 4
          qs[32c + l] = q[64c + l] | q[64c + 32 + l] << 4   (c = 0..3, l = 0..31)

    Q6_K  256 weights = 16 sub-blocks of 16, 128 + 64 + 16 + 2 = 210 bytes
          | ql[128] | qh[64] | scales[16] int8 | d |
          sub-block j: w = d*scales[j]*(q - 32), q 6-bit; for half h = 0, 1
          (weights 128h .. 128h+127, ql/qh offsets 64h/32h), l = 0..31:
            ql[l]    = q[l] & 0xF  | (q[l+64] & 0xF) << 4
            ql[l+32] = q[l+32] & 0xF | (q[l+96] & 0xF) << 4
            qh[l]    = q[l] >> 4 | (q[l+32] >> 4) << 2 | (q[l+64] >> 4) << 4 | (q[l+96] >> 4) << 6

    F32 / F16 / BF16: one value per weight (4 / 2 / 2 bytes), no blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from lowbit.errors import FormatError

F32 = np.float32
GROUP_MAX_EPS = np.float32(1e-15)  # ggml-quants.c: below this a group counts as all-zero


# ---------------------------------------------------------------------------
# scalar helpers (all float32)
# ---------------------------------------------------------------------------
def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 ``[n]`` -> fp16 (round to nearest even) as uint8 ``[n, 2]``."""
    return np.ascontiguousarray(v.astype(np.float16)).view(np.uint8).reshape(-1, 2)


def fp16_value(b: np.ndarray) -> np.ndarray:
    """uint8 ``[n, 2]`` -> float32 ``[n]``."""
    return np.ascontiguousarray(b).view(np.float16).reshape(-1).astype(F32)


def _inv(d: np.ndarray) -> np.ndarray:
    """``d ? 1/d : 0`` in float32."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / d).astype(F32)


def _first_absmax(x: np.ndarray) -> np.ndarray:
    """The signed value with the largest |x| per row, the first one on ties (C: ``if (amax < fabsf(v))``)."""
    i = np.abs(x).argmax(axis=-1)
    return np.take_along_axis(x, i[:, None], axis=-1)[:, 0]


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sequential float32 sum over the last axis (the C loop's order), not numpy's pairwise sum."""
    return np.cumsum(a, axis=-1, dtype=F32)[..., -1]


# ---------------------------------------------------------------------------
# nibble / 5th-bit layouts of the 32-weight blocks
# ---------------------------------------------------------------------------
def pack_nibbles32(q: np.ndarray) -> np.ndarray:
    """codes ``[n, 32]`` (low 4 bits used) -> ``qs [n, 16]``: ``qs[j] = q[j] | q[j+16] << 4``."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def unpack_nibbles32(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def pack_high_bits32(q: np.ndarray) -> np.ndarray:
    """codes ``[n, 32]`` -> ``qh [n, 4]``: little-endian uint32 whose bit j is bit 4 of ``q[j]``."""
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=1, bitorder="little")


def unpack_high_bits32(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=1, bitorder="little")


# ---------------------------------------------------------------------------
# codecs
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockCodec:
    """One GGML tensor type: ``encode([n, block_size] f32) -> [n, type_size] u8`` and back."""

    qtype: T
    block_size: int
    type_size: int
    encode_blocks: Callable[[np.ndarray], np.ndarray]
    decode_blocks: Callable[[np.ndarray], np.ndarray]


# -- Q8_0 -------------------------------------------------------------------
def pack_q8_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``d`` fp16-representable float32 ``[n]``, ``q`` int8 ``[n, 32]`` -> ``[n, 34]``."""
    return np.concatenate([fp16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


def unpack_q8_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return fp16_value(b[:, :2]), np.ascontiguousarray(b[:, 2:]).view(np.int8)


def encode_q8_0(x: np.ndarray) -> np.ndarray:
    d = (np.abs(x).max(axis=1) / F32(127)).astype(F32)
    v = x * _inv(d)[:, None]
    a = np.abs(v)
    fl = np.floor(a)
    q = np.sign(v) * (fl + np.floor(F32(2) * (a - fl)))  # roundf (half away from zero), exact in float32
    return pack_q8_0(d, q.astype(np.int8))


def decode_q8_0(b: np.ndarray) -> np.ndarray:
    d, q = unpack_q8_0(b)
    return q.astype(F32) * d[:, None]


# -- Q4_0 / Q5_0 (symmetric, zero at 8 / 16) --------------------------------
def pack_q4_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``q`` uint8 codes 0..15 ``[n, 32]`` -> ``[n, 18]``."""
    return np.concatenate([fp16_bytes(d), pack_nibbles32(q)], axis=1)


def unpack_q4_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return fp16_value(b[:, :2]), unpack_nibbles32(b[:, 2:])


def pack_q5_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.concatenate([fp16_bytes(d), pack_high_bits32(q), pack_nibbles32(q)], axis=1)


def unpack_q5_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return fp16_value(b[:, :2]), unpack_nibbles32(b[:, 6:]) | (unpack_high_bits32(b[:, 2:6]) << 4)


def _sym_codes(x: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q{4,5}_0_ref: ``d = max / -half``, ``q = min(2*half-1, (int)(x/d + half + 0.5))``."""
    d = (_first_absmax(x) / F32(-half)).astype(F32)
    v = x * _inv(d)[:, None] + F32(half + 0.5)
    q = np.minimum(np.trunc(v), 2 * half - 1).astype(np.uint8)
    return d, q


def encode_q4_0(x: np.ndarray) -> np.ndarray:
    return pack_q4_0(*_sym_codes(x, 8))


def decode_q4_0(b: np.ndarray) -> np.ndarray:
    d, q = unpack_q4_0(b)
    return d[:, None] * (q.astype(np.int8) - 8).astype(F32)


def encode_q5_0(x: np.ndarray) -> np.ndarray:
    return pack_q5_0(*_sym_codes(x, 16))


def decode_q5_0(b: np.ndarray) -> np.ndarray:
    d, q = unpack_q5_0(b)
    return d[:, None] * (q.astype(np.int8) - 16).astype(F32)


# -- Q4_1 / Q5_1 (affine: d and min) ------------------------------------------
def pack_q4_1(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.concatenate([fp16_bytes(d), fp16_bytes(m), pack_nibbles32(q)], axis=1)


def unpack_q4_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return fp16_value(b[:, :2]), fp16_value(b[:, 2:4]), unpack_nibbles32(b[:, 4:])


def pack_q5_1(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.concatenate([fp16_bytes(d), fp16_bytes(m), pack_high_bits32(q), pack_nibbles32(q)], axis=1)


def unpack_q5_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = unpack_nibbles32(b[:, 8:]) | (unpack_high_bits32(b[:, 4:8]) << 4)
    return fp16_value(b[:, :2]), fp16_value(b[:, 2:4]), q


def _affine_codes(x: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q{4,5}_1_ref: ``d = (max - min) / qmax``, ``q = (int)((x - min)/d + 0.5)``."""
    lo = x.min(axis=1)
    d = ((x.max(axis=1) - lo) / F32(qmax)).astype(F32)
    v = (x - lo[:, None]) * _inv(d)[:, None] + F32(0.5)
    q = np.minimum(np.trunc(v), qmax).astype(np.uint8)
    return d, lo, q


def encode_q4_1(x: np.ndarray) -> np.ndarray:
    return pack_q4_1(*_affine_codes(x, 15))


def decode_q4_1(b: np.ndarray) -> np.ndarray:
    d, m, q = unpack_q4_1(b)
    return d[:, None] * q.astype(F32) + m[:, None]


def encode_q5_1(x: np.ndarray) -> np.ndarray:
    return pack_q5_1(*_affine_codes(x, 31))


def decode_q5_1(b: np.ndarray) -> np.ndarray:
    d, m, q = unpack_q5_1(b)
    return d[:, None] * q.astype(F32) + m[:, None]


# -- Q4_K -------------------------------------------------------------------------
def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml-quants.c ``make_qkx2_quants`` (use_mad=false) over rows of ``x``/``w`` ``[n, 32]``.

    Returns ``(scale [n], the_min [n] (>= 0), L [n, 32] uint8)`` with ``x ~= scale*L - the_min``.
    """
    n = x.shape[0]
    lo = np.minimum(x.min(axis=1), F32(0))
    hi = x.max(axis=1)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = hi == lo
    rng = np.where(flat, F32(1), hi - lo).astype(F32)
    xm = x - lo[:, None]

    iscale = (F32(nmax) / rng).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    L = np.clip(np.rint(iscale[:, None] * xm), 0, nmax).astype(F32)
    diff = scale[:, None] * L + lo[:, None] - x
    best = _seqsum(w * (diff * diff))
    mn = lo.copy()
    for step in range(nstep + 1):
        # as in the C loop, a better candidate's min moves the range of the later candidates
        rng = np.where(flat, F32(1), hi - mn).astype(F32)
        isc = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / rng).astype(F32)
        with np.errstate(invalid="ignore", over="ignore"):
            la = np.clip(np.nan_to_num(np.rint(isc[:, None] * (x - mn[:, None]))), 0, nmax).astype(F32)
        wl = w * la
        sum_l = _seqsum(wl)
        sum_l2 = _seqsum(wl * la)
        sum_xl = _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(pos, sum_xl / np.where(sum_l2 == 0, F32(1), sum_l2), this_scale).astype(F32)
        this_min = np.where(pos, F32(0), this_min).astype(F32)
        d2 = this_scale[:, None] * la + this_min[:, None] - x
        cur = _seqsum(w * (d2 * d2))
        better = ok & (cur < best) & ~flat
        L = np.where(better[:, None], la, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, F32(0), scale).astype(F32)
    L = np.where(flat[:, None], F32(0), L)
    return scale, (-mn).astype(F32), L.astype(np.uint8)


def pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales/mins ``[n, 8]`` -> the 12-byte ``scales`` field of Q4_K/Q5_K."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def unpack_k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def encode_q4_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref: per 32-weight sub-block make_qkx2_quants(nmax=15, rmin=-1,
    rdelta=0.1, nstep=20) with weights ``sqrt(mean(x^2)) + |x|``; 6-bit scales and mins
    relative to ``d = max_scale/63``, ``dmin = max_min/63``; final codes re-rounded
    against the stored (fp16 x 6-bit) scale and min."""
    n = x.shape[0]
    xs = x.reshape(n * 8, 32)
    av = np.sqrt(_seqsum(xs * xs) / F32(32)).astype(F32)
    w = av[:, None] + np.abs(xs)
    scales, mins, L = _make_qkx2_quants(xs, w, 15, -1.0, 0.1, 20)
    scales = scales.reshape(n, 8)
    mins = mins.reshape(n, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0)).astype(F32)
    inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0)).astype(F32)
    ls = np.minimum(np.rint(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min[:, None] * mins), 63).astype(np.uint8)
    d16 = fp16_bytes((max_scale / F32(63)).astype(F32))
    m16 = fp16_bytes((max_min / F32(63)).astype(F32))
    d = (fp16_value(d16)[:, None] * ls.astype(F32)).reshape(n * 8)
    dm = (fp16_value(m16)[:, None] * lm.astype(F32)).reshape(n * 8)
    with np.errstate(divide="ignore", invalid="ignore"):
        l2 = np.clip(np.rint((xs + dm[:, None]) / d[:, None]), 0, 15)
    L = np.where((d == 0)[:, None], L, np.nan_to_num(l2)).astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(n, 128)
    return np.concatenate([d16, m16, pack_k4_scales(ls, lm), qs], axis=1)


def decode_q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = fp16_value(b[:, 0:2])
    dmin = fp16_value(b[:, 2:4])
    sc, mn = unpack_k4_scales(b[:, 4:16])
    ds = (d[:, None] * sc.astype(F32))[:, :, None]
    dm = (dmin[:, None] * mn.astype(F32))[:, :, None]
    qs = b[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0xF).reshape(n, 8, 32).astype(F32)
    return (ds * q - dm).reshape(n, 256)


# -- Q6_K -------------------------------------------------------------------------
def _make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml-quants.c ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)`` over rows ``[n, 16]``.

    Weights ``x^2``; tries ``iscale = -(nmax + 0.1*k)/max`` for k = -9..9.
    Returns ``(scale [n], L [n, 16] uint8 in 0..2*nmax-1)`` with ``x ~= scale*(L - nmax)``.
    """
    mx = _first_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    mxs = np.where(zero, F32(1), mx).astype(F32)
    w = x * x

    def trial(iscale):
        lf = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
        sumlx = _seqsum(w * x * lf)
        suml2 = _seqsum(w * lf * lf)
        return lf, sumlx, suml2

    lf, sumlx, suml2 = trial((F32(-nmax) / mxs).astype(F32))
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0)).astype(F32)
    best = (scale * sumlx).astype(F32)
    L = lf
    for k in range(-9, 10):
        if k == 0:
            continue
        isc = (-(F32(nmax) + F32(0.1) * F32(k)) / mxs).astype(F32)
        lk, slx, sl2 = trial(isc)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(better[:, None], lk, L)
        sc_k = slx / np.where(sl2 > 0, sl2, F32(1))
        scale = np.where(better, sc_k, scale).astype(F32)
        best = np.where(better, scale * slx, best).astype(F32)
    scale = np.where(zero, F32(0), scale).astype(F32)
    L = np.where(zero[:, None], F32(-nmax), L)
    return scale, (L + nmax).astype(np.uint8)


def encode_q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref: per 16-weight sub-block make_qx_quants(nmax=32, rmse_type=1);
    int8 sub-block scales relative to ``d = max_scale / -128``; final codes re-rounded
    against the stored scales. Blocks whose scales are all ~0 are written as zeros."""
    n = x.shape[0]
    xs = x.reshape(n * 16, 16)
    scales, L = _make_qx_quants_rmse1(xs, 32)
    scales = scales.reshape(n, 16)
    max_scale = _first_absmax(scales)
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = (F32(-128) / np.where(empty, F32(1), max_scale)).astype(F32)
    d16 = fp16_bytes((F32(1) / iscale).astype(F32))
    sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)
    d = (fp16_value(d16)[:, None] * sc.astype(F32)).reshape(n * 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        l2 = np.clip(np.rint(xs / d[:, None]), -32, 31) + 32
    L = np.where((d == 0)[:, None], L, np.nan_to_num(l2)).astype(np.uint8).reshape(n, 2, 4, 32)
    ql = (L[:, :, 0:2, :] & 0xF) | ((L[:, :, 2:4, :] & 0xF) << 4)  # [n, half, 2, 32]
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d16], axis=1)
    out[empty] = 0
    return out


def decode_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 2, 32)
    qh = b[:, 128:192].reshape(n, 2, 32)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(F32)
    d = fp16_value(b[:, 208:210])
    lo = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # [n, half, 4, 32]: q1 q2 q3 q4 low nibbles
    hi = qh[:, :, None, :] >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (lo | ((hi & 3) << 4)).astype(np.int8) - 32
    ds = (d[:, None] * sc).reshape(n, 16, 1)
    return (ds * q.reshape(n, 16, 16).astype(F32)).reshape(n, 256)


# -- float passthrough ---------------------------------------------------------------
def _bf16_encode(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even, NaN kept quiet (ggml_compute_fp32_to_bf16)."""
    u = np.ascontiguousarray(x, dtype=F32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    r = np.where(nan, ((u >> 16) | 64), r)
    return r.astype(np.uint16).view(np.uint8).reshape(x.shape[0], -1)


def _bf16_decode(b: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << 16
    return u.view(F32).reshape(b.shape[0], -1)


CODECS: dict[T, BlockCodec] = {
    c.qtype: c
    for c in (
        BlockCodec(T.F32, 1, 4, lambda x: np.ascontiguousarray(x, dtype=F32).view(np.uint8), lambda b: np.ascontiguousarray(b).view(F32)),
        BlockCodec(T.F16, 1, 2, lambda x: np.ascontiguousarray(x.astype(np.float16)).view(np.uint8), lambda b: np.ascontiguousarray(b).view(np.float16).astype(F32)),
        BlockCodec(T.BF16, 1, 2, _bf16_encode, _bf16_decode),
        BlockCodec(T.Q8_0, 32, 34, encode_q8_0, decode_q8_0),
        BlockCodec(T.Q4_0, 32, 18, encode_q4_0, decode_q4_0),
        BlockCodec(T.Q4_1, 32, 20, encode_q4_1, decode_q4_1),
        BlockCodec(T.Q5_0, 32, 22, encode_q5_0, decode_q5_0),
        BlockCodec(T.Q5_1, 32, 24, encode_q5_1, decode_q5_1),
        BlockCodec(T.Q4_K, 256, 144, encode_q4_k, decode_q4_k),
        BlockCodec(T.Q6_K, 256, 210, encode_q6_k, decode_q6_k),
    )
}

# byte offsets of the fp16 fields (scales d, mins m / dmin) inside one block of each type
FP16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q5_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_1: (0, 2),
    T.Q4_K: (0, 2),
    T.Q6_K: (208,),
}


def block_fp16_fields(b: np.ndarray, qtype) -> np.ndarray:
    """uint8 blocks ``[..., type_size]`` (any shape with whole blocks) -> float32 ``[n_blocks, k]``:
    each block's fp16 scale / min fields (``k = 0`` for float types, which have none)."""
    c = codec(qtype)
    offsets = FP16_FIELDS.get(c.qtype, ())
    rows = np.ascontiguousarray(b, dtype=np.uint8).reshape(-1, c.type_size)
    if not offsets:
        return np.zeros((rows.shape[0], 0), dtype=F32)
    return np.stack([fp16_value(rows[:, o : o + 2]) for o in offsets], axis=1)


_CHUNK_WEIGHTS = 1 << 18  # weights encoded per numpy step (bounds the K-quant temporaries)


def codec(qtype) -> BlockCodec:
    try:
        return CODECS[T(qtype)]
    except (KeyError, ValueError):
        known = ", ".join(t.name for t in CODECS)
        raise FormatError(f"GGML type {qtype!r} is not supported by lowbit; supported: {known}") from None


def row_bytes(qtype, n_cols: int) -> int:
    c = codec(qtype)
    if n_cols % c.block_size:
        raise FormatError(
            f"{c.qtype.name} packs rows in blocks of {c.block_size} weights; a row of {n_cols} does not divide "
            "(pick a type with a block size that divides the row, e.g. Q8_0/Q5_0 for multiples of 32, or F16)"
        )
    return n_cols // c.block_size * c.type_size


def encode(x: np.ndarray, qtype) -> np.ndarray:
    """float rows ``[rows, cols]`` -> uint8 ``[rows, row_bytes(qtype, cols)]`` (blocks run along each row)."""
    c = codec(qtype)
    x = np.asarray(x, dtype=F32)
    if x.ndim != 2:
        raise FormatError(f"encode takes a 2-D [rows, cols] array, got shape {x.shape}")
    rows, cols = x.shape
    rb = row_bytes(qtype, cols)
    if c.block_size > 1 and not np.isfinite(x).all():
        raise FormatError(f"{c.qtype.name} cannot encode NaN/Inf weights; fix the weights first")
    blocks = x.reshape(-1, c.block_size)
    step = max(1, _CHUNK_WEIGHTS // c.block_size)
    out = np.concatenate([c.encode_blocks(blocks[i : i + step]) for i in range(0, blocks.shape[0], step)], axis=0)
    return out.reshape(rows, rb)


def decode(b: np.ndarray, qtype, n_cols: int) -> np.ndarray:
    """uint8 ``[rows, row_bytes]`` -> float32 ``[rows, n_cols]``."""
    c = codec(qtype)
    b = np.ascontiguousarray(b, dtype=np.uint8)
    rb = row_bytes(qtype, n_cols)
    if b.ndim != 2 or b.shape[1] != rb:
        raise FormatError(f"{c.qtype.name} rows of {n_cols} weights take {rb} bytes, got an array of shape {b.shape}")
    return c.decode_blocks(b.reshape(-1, c.type_size)).reshape(b.shape[0], n_cols)
