"""CPU kernel for b-bit lookup-table weights (b = 2, 3, 4): W3, W2, NF4/FP4, ternary.

Every format this kernel runs dequantizes as::

    w[n, k] = lut[code[n, k]] * scale[n, k // G] (+ offset[n, k // G])

with ``code`` in ``[0, 2**b)``, ``lut`` a table of ``2**b`` floats (integer affine:
``lut = 0..2**b-1``, ``offset = -z*s``; integer symmetric: ``lut = arange(2**b) -
2**(b-1)``; NF4/FP4: the 16-entry codebook with ``scale = absmax``; ternary:
``lut = [-1, 0, 1, 0]``) and groups of ``G`` input columns (``G`` a multiple of 32,
or the whole row; a per-tensor scale is given as ``[1, 1]`` and repeated).

How it computes (llama.cpp's scheme for its integer dot products):

1. Activations are quantized per row, per block of 32 columns (zero-padded to a
   multiple of 32): ``d = amax / 127``, ``id = 1 / d`` (0 when ``d == 0``),
   ``xq = clamp(round_half_even(x * id), -127, 127)`` in int8, all in float32.
   This is ggml's ``quantize_row_q8_0_ref`` (llama.cpp ``ggml-quants.c``, read
   for this) except that ``d`` stays float32 (ggml stores fp16) and ties round
   to even (ggml's ``roundf`` rounds them away from zero), so that the torch
   twin :func:`quantize_activations` is bit-identical (a test pins the int8
   codes and scales exactly).
2. The table is rewritten as ``lut = alpha * u + beta`` with ``u`` unsigned
   bytes (see :func:`integer_table`). Integer codes, ternary and FP4 tables are
   exact; a table with no exact 8-bit grid (NF4, bitsandbytes' FP4) is rounded
   to the grid ``k * max|lut| / 127``, which keeps 0 and +-max exact, an error
   of at most ``max|lut| / 254`` per table entry (``LutPrepared.lut_max_error``;
   NF4: 0.0039, against NF4's own steps of 0.08..0.28): the numerics of
   ``LutPrepared.effective_lut``.
3. ``u[code] * xq`` is summed exactly in int32 with AVX-512 VNNI ``vpdpbusd``
   (u8 x s8), 16 output rows per 512-bit register, 4 input columns per lane.
   In float32: ``F_g = sum_{blocks b of group g} d_b * int_sum_b`` and
   ``X_g = sum_b d_b * sum(xq_b)`` (the group's sum of the quantized
   activations), then ``y = sum_g (alpha * scale_g) * (F_g + gamma * X_g) +
   offset_g * X_g`` with ``gamma = beta / alpha``.

So the kernel computes ``F.linear(xdq, W)`` with ``xdq`` the dequantized int8
activations and ``W`` the weight of ``effective_lut``, up to float32 rounding
and summation order: :func:`reference_twin` is that, in plain torch, and the
tests bound the difference by ``2**-24 * (K + blocks + groups + 8)`` times the
sum of the absolute terms the kernel adds (the float32 forward error bound of
both sides). Against float32 activations (the ``reference`` kernel) the int8
activations add an error of up to half a step, ``amax / 254`` of their block,
per activation (about 0.4% relative output error on random data; the tests
bound it at 2%).

Build and loading: the C source ``csrc/lut_linear.c`` (no Python or torch
headers) is compiled by ``setup.py`` as the optional extension
``lowbit.kernels._lut_cpu`` (a plain shared library, ``-O3 -pthread``) during
``pip install -e .`` and loaded here with ``ctypes`` on raw data pointers. Why:
it needs only a C compiler at build time (no torch headers, so no build
isolation tricks and no coupling to the torch ABI), builds in seconds, and a
failed build is a warning, not a broken install. Its AVX-512 code sits in
functions with ``target`` attributes, so the library loads on any x86-64 CPU;
if the library is missing or the CPU lacks AVX-512 F/BW/DQ/VL/VNNI,
:func:`available` says why, the registry reports ``cpu_lut`` as unsupported and
``auto`` falls back to the reference kernel (never a silent wrong answer).
Threads: ``torch.get_num_threads()`` per call, from a small persistent pool
(``csrc/pool.c``) that hands out 4 tiles of 16 output rows at a time and never
waits for a worker that has not started (an OpenMP barrier does, which on this
shared 2-core machine cost a whole scheduler slice, 4-16 ms, per call).

Prepared layout (``LutPrepared``; ``Nt = ceil(N / 16)``, ``Kp = ceil(K / 32) * 32``,
``Kb = Kp / 32``, ``ng = Kp / Gk`` with ``Gk = G`` or ``Kp`` for whole rows):

* ``weights``: uint8 ``[Nt, Kb, bits, 64]``. Tile ``t`` holds rows ``16t..16t+15``
  (rows past N: code 0, scale 0), block ``kb`` columns ``32kb..32kb+31`` (past K:
  code 0, activation 0). Vector ``v`` (0..7) of a block is 64 codes: byte ``p``
  is row ``p // 4``, column ``4v + p % 4``. Its ``bits`` planes of 64 bytes:

  - 2 bits: plane ``j`` (0, 1), byte ``p`` = ``sum_t code(v=4j+t)[p] << 2t``;
  - 4 bits: plane ``j`` (0..3), byte ``p`` = ``code(v=2j)[p] | code(v=2j+1)[p] << 4``;
  - 3 bits: planes 0, 1 = the low two bits in the 2-bit layout; plane 2 byte ``p``
    bit ``t`` = bit 2 of ``code(v=t)[p]``.

* ``scales``: float32 ``[Nt, ng, 16]``, ``alpha * scale`` per row of the tile.
* ``offsets``: float32 ``[Nt, ng, 16]`` or None;
* ``zeros``: uint8 ``[Nt, ng, 16]`` or None, in place of ``offsets`` when every
  offset is ``-(z * scale)`` for an integer ``z`` in [0, 255] and ``alpha == 1``
  (lowbit's affine integer schemes): the kernel forms ``-(z * scale)`` with the
  same float32 roundings, so the result is identical and 3 bytes per group lighter.
* ``table``: uint8 ``[16]`` (code -> ``u``) or None when ``u`` is the code itself.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from lowbit.errors import KernelError
from lowbit.kernels import clib
from lowbit.kernels.activations import finish

TILE_N = 16
BLOCK_K = 32


# -- the compiled library ----------------------------------------------------
@functools.lru_cache(maxsize=1)
def _library() -> tuple[Optional[ctypes.CDLL], str]:
    """(library, "") or (None, why it cannot be used). Loaded once, on first use."""
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    return clib.bind(
        {
            "lowbit_lut_linear": (ctypes.c_int, [vp, i64, i64, i64, vp, i64, ctypes.c_int, i64, vp, ctypes.c_float,
                                                 vp, vp, vp, vp, ctypes.c_int]),
            "lowbit_lut_read_probe": (i64, [vp, i64, ctypes.c_int]),
            "lowbit_lut_quantize_activations": (ctypes.c_int, [vp, i64, i64, i64, i64, vp, vp, vp]),
        },
        "lowbit_lut_cpu_supported", "this CPU lacks AVX-512 F/BW/DQ/VL/VNNI, which the LUT kernel needs",
    )


def available() -> tuple[bool, str]:
    """Whether the compiled kernel can run on this machine; if not, why."""
    lib, why = _library()
    return lib is not None, why


def _lib() -> ctypes.CDLL:
    lib, why = _library()
    if lib is None:
        raise KernelError(f"cpu_lut cannot run: {why}")
    return lib


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


# -- the table ----------------------------------------------------------------
@dataclass(frozen=True)
class IntegerTable:
    """``lut ~= alpha * u + beta`` with ``u`` unsigned bytes.

    u:          uint8 ``[2**bits]``.
    alpha:      positive step (1.0 for integer tables).
    beta:       the offset (the table's minimum, or ``-128 * alpha`` on the signed grid).
    max_error:  ``max |alpha * u + beta - lut|`` (0 up to float rounding when exact).
    exact:      whether an exact 8-bit grid was found.
    """

    u: torch.Tensor
    alpha: float
    beta: float
    max_error: float
    exact: bool


def integer_table(lut: torch.Tensor) -> IntegerTable:
    """Write ``lut`` as ``alpha * u + beta`` with ``u`` in 0..255.

    Exact when the table lies on a grid of at most 256 levels: ``alpha = range / m``
    for the least ``m`` in 1..255 (integer tables, ternary, OCP FP4 E2M1). Otherwise
    rounded: a table with both signs (NF4, bitsandbytes' FP4, whose 0.0625/12 needs
    385 levels) on the grid ``k * max|lut| / 127``, which keeps 0 and the extremes
    exact, error <= ``max|lut| / 254`` per entry; a one-signed table on 255 steps
    over its range, error <= ``range / 510``."""
    t = lut.detach().to(torch.float64).cpu().reshape(-1)
    lo, hi = float(t.min()), float(t.max())
    rng = hi - lo
    if rng == 0.0:
        return IntegerTable(torch.zeros(t.numel(), dtype=torch.uint8), 1.0, lo, 0.0, True)
    tol = 1e-6
    for m in range(1, 256):
        alpha = rng / m
        q = (t - lo) / alpha
        if float((q - q.round()).abs().max()) <= tol:
            u = q.round()
            return IntegerTable(u.to(torch.uint8), alpha, lo, float((u * alpha + lo - t).abs().max()), True)
    if lo < 0.0 < hi:
        alpha = max(-lo, hi) / 127
        beta = -128 * alpha
        u = (t / alpha).round() + 128
    else:
        alpha, beta = rng / 255, lo
        u = ((t - lo) / alpha).round().clamp(0, 255)
    return IntegerTable(u.to(torch.uint8), alpha, beta, float((u * alpha + beta - t).abs().max()), False)


# -- prepare -------------------------------------------------------------------
@dataclass(frozen=True)
class LutPrepared:
    """A weight ready for :func:`lut_linear` (layout in the module doc).

    weights:       uint8 ``[Nt, Kb, bits, 64]``.
    scales:        float32 ``[Nt, ng, 16]`` (``alpha * scale``).
    offsets:       float32 ``[Nt, ng, 16]`` or None.
    zeros:         uint8 ``[Nt, ng, 16]`` or None (offsets ``-(zeros * scales)``; never both).
    table:         uint8 ``[16]`` (code -> u) or None (u = code).
    gamma:         ``beta / alpha``: the kernel's ``w = scales * (u + gamma) + offsets``.
    effective_lut: float32 ``[2**bits]``, ``alpha * u + beta``: the table the kernel uses.
    lut_exact, lut_max_error: see :class:`IntegerTable`.
    bits, N, K, kpad, group: code width, logical shape, padded K, kernel group size.
    """

    weights: torch.Tensor
    scales: torch.Tensor
    offsets: Optional[torch.Tensor]
    zeros: Optional[torch.Tensor]
    table: Optional[torch.Tensor]
    gamma: float
    effective_lut: torch.Tensor
    lut_exact: bool
    lut_max_error: float
    bits: int
    N: int
    K: int
    kpad: int
    group: int

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams per call: codes + scales (+ offsets or zero points)."""
        n = self.weights.numel() + self.scales.numel() * 4
        n += 0 if self.offsets is None else self.offsets.numel() * 4
        return n + (0 if self.zeros is None else self.zeros.numel())


def lut_supported(N: int, K: int, group_size: int, bits: int) -> tuple[bool, str]:
    """Whether an ``[N, K]`` weight with groups of ``group_size`` columns can be prepared."""
    if bits not in (2, 3, 4):
        return False, f"cpu_lut runs 2-, 3- and 4-bit codes, got bits={bits}"
    if N <= 0 or K <= 0:
        return False, f"empty weight [{N}, {K}]"
    if group_size != K and (group_size <= 0 or group_size % BLOCK_K != 0 or K % group_size != 0):
        return False, (
            f"weight [{N}, {K}] with group_size {group_size}: groups must be whole rows or a "
            f"multiple of {BLOCK_K} columns dividing K (re-quantize with such a group size, "
            "or use the reference kernel)"
        )
    return True, ""


def _bits_of(lut: torch.Tensor) -> int:
    n = lut.numel()
    if lut.dim() != 1 or n not in (4, 8, 16):
        raise KernelError(f"lut must be a 1-D table of 4, 8 or 16 values (2, 3 or 4 bits), got {tuple(lut.shape)}")
    return int(math.log2(n))


def _per_group(t: torch.Tensor, name: str, N: int, ng: int) -> torch.Tensor:
    t = t.detach().cpu()
    if t.dim() != 2 or t.shape[0] not in (1, N) or t.shape[1] != ng:
        raise KernelError(
            f"{name} must be [N, K // group_size] = {(N, ng)} (or [1, {ng}] for one per tensor), "
            f"got {tuple(t.shape)}"
        )
    return t.to(torch.float32).expand(N, ng)


def _pack(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Padded codes ``[Nt*16, Kb*32]`` uint8 -> ``[Nt, Kb, bits, 64]`` (module doc)."""
    nt, kb = c.shape[0] // TILE_N, c.shape[1] // BLOCK_K
    v = c.view(nt, TILE_N, kb, 8, 4).permute(0, 2, 3, 1, 4).reshape(nt, kb, 8, 64)

    def two_bit(v8: torch.Tensor) -> torch.Tensor:
        r = v8.view(nt, kb, 2, 4, 64)
        return r[:, :, :, 0] | (r[:, :, :, 1] << 2) | (r[:, :, :, 2] << 4) | (r[:, :, :, 3] << 6)

    if bits == 2:
        planes = two_bit(v)
    elif bits == 4:
        r = v.view(nt, kb, 4, 2, 64)
        planes = r[:, :, :, 0] | (r[:, :, :, 1] << 4)
    else:
        hi = torch.zeros(nt, kb, 64, dtype=torch.uint8)
        for t in range(8):
            hi |= ((v[:, :, t] >> 2) & 1) << t
        planes = torch.cat([two_bit(v & 3), hi.unsqueeze(2)], dim=2)
    return planes.contiguous()


def prepare(
    codes: torch.Tensor,
    lut: torch.Tensor,
    scale: torch.Tensor,
    offset: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
) -> LutPrepared:
    """Build the kernel layout for ``w = lut[codes] * scale (+ offset)``.

    codes:      integer ``[N, K]``, values in ``[0, len(lut))``.
    lut:        float ``[2**bits]``, bits = 2, 3 or 4.
    scale:      ``[N, K // group_size]`` (``[1, ...]`` repeats one row for every row).
    offset:     like ``scale``, or None.
    group_size: columns per group; None means the whole row (``K``).
    """
    bits = _bits_of(lut)
    if codes.dim() != 2 or codes.is_floating_point() or codes.is_complex():
        raise KernelError(f"codes must be an integer tensor [N, K], got {codes.dtype} {tuple(codes.shape)}")
    N, K = (int(s) for s in codes.shape)
    G = K if group_size is None else int(group_size)
    ok, why = lut_supported(N, K, G, bits)
    if not ok:
        raise KernelError(why)
    codes = codes.detach().cpu()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise KernelError(
            f"{bits}-bit codes must lie in [0, {(1 << bits) - 1}], got [{int(codes.min())}, {int(codes.max())}]"
        )
    ng_src = K // G
    s = _per_group(scale, "scale", N, ng_src)
    off = None if offset is None else _per_group(offset, "offset", N, ng_src)

    tab = integer_table(lut)
    nt, kpad = -(-N // TILE_N), -(-K // BLOCK_K) * BLOCK_K
    npad = nt * TILE_N
    group = kpad if G == K else G
    ng = kpad // group

    c = torch.zeros(npad, kpad, dtype=torch.uint8)
    c[:N, :K] = codes.to(torch.uint8)

    def tiles(t: torch.Tensor) -> torch.Tensor:  # [N, ng] -> [Nt, ng, 16], zero rows past N
        p = torch.zeros(npad, ng, dtype=torch.float32)
        p[:N] = t
        return p.view(nt, TILE_N, ng).transpose(1, 2).contiguous()

    zeros = None
    if off is not None and tab.alpha == 1.0:
        nonzero = s != 0
        z = torch.where(nonzero, torch.round(-off / torch.where(nonzero, s, torch.ones_like(s))), 0.0)
        if bool(((z >= 0) & (z <= 255)).all()) and torch.equal(-(z * s), off):
            zeros, off = z, None
    identity = torch.equal(tab.u, torch.arange(1 << bits, dtype=torch.uint8))
    table = None
    if not identity:
        table = torch.zeros(16, dtype=torch.uint8)
        table[: tab.u.numel()] = tab.u
    eff = (tab.u.to(torch.float64) * tab.alpha + tab.beta).to(torch.float32)
    return LutPrepared(
        weights=_pack(c, bits),
        scales=tiles(s * tab.alpha),
        offsets=None if off is None else tiles(off),
        zeros=None if zeros is None else tiles(zeros).to(torch.uint8),
        table=table,
        gamma=tab.beta / tab.alpha,
        effective_lut=eff,
        lut_exact=tab.exact,
        lut_max_error=tab.max_error,
        bits=bits,
        N=N,
        K=K,
        kpad=kpad,
        group=group,
    )


# -- run -------------------------------------------------------------------------
def _rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """``x [..., K]`` as contiguous float32 rows ``[M, K]`` (no copy when it already is)."""
    if x.dtype is not torch.float32 or x.dim() != 2 or not x.is_contiguous():
        if not x.is_floating_point():
            raise KernelError(f"activations must be floating point, got {x.dtype}")
        if x.dim() == 0:
            raise KernelError("activations must have a feature dimension, got a scalar")
        x = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    if x.shape[1] != K:
        raise KernelError(f"input has {x.shape[1]} features, the weight expects K={K}")
    if not x.is_cpu:
        raise KernelError(f"cpu_lut runs on CPU tensors, got {x.device}")
    return x


def lut_linear(
    x: torch.Tensor, p: LutPrepared, bias: Optional[torch.Tensor] = None, num_threads: Optional[int] = None
) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` for ``x [..., K]``; computes in float32 with int8
    activations (module doc), returns x's dtype; the bias is added in x's dtype."""
    x2 = _rows(x, p.K)
    B = x2.shape[0]
    y = torch.empty(B, p.N, dtype=torch.float32)
    if B:
        threads = torch.get_num_threads() if num_threads is None else int(num_threads)
        rc = _lib().lowbit_lut_linear(
            x2.data_ptr(), B, p.K, p.kpad, p.weights.data_ptr(), p.N, p.bits, p.group,
            _ptr(p.table), p.gamma, p.scales.data_ptr(), _ptr(p.offsets), _ptr(p.zeros), y.data_ptr(),
            threads,
        )
        if rc != 0:
            raise KernelError(f"cpu_lut failed (code {rc}) on x {tuple(x2.shape)} and weight [{p.N}, {p.K}]")
    if bias is None and x2 is x:  # float32 [M, K] in, nothing to convert or reshape
        return y
    return finish(y, x, bias, x.shape[:-1])


def quantize_activations_c(x: torch.Tensor, kpad: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C kernel's activation step alone: ``(xq int8 [B, kpad], d [B, kpad/32], X [B, kpad/group])``."""
    x2 = x.to(torch.float32).contiguous()
    B, K = x2.shape
    xq = torch.empty(B, kpad, dtype=torch.int8)
    xd = torch.empty(B, kpad // BLOCK_K, dtype=torch.float32)
    xg = torch.empty(B, kpad // group, dtype=torch.float32)
    rc = _lib().lowbit_lut_quantize_activations(
        x2.data_ptr(), B, K, kpad, group, xq.data_ptr(), xd.data_ptr(), xg.data_ptr()
    )
    if rc != 0:
        raise KernelError(
            f"activation quantization failed (code {rc}) for x {tuple(x2.shape)}, kpad {kpad}, group {group}"
        )
    return xq, xd, xg


def read_probe(t: torch.Tensor, num_threads: Optional[int] = None) -> int:
    """Stream-read a contiguous CPU tensor through the kernel's thread pool (for measuring
    memory bandwidth in benchmarks); returns a checksum."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise KernelError("read_probe needs a contiguous CPU tensor")
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    nbytes = t.numel() * t.element_size() // 64 * 64
    return int(_lib().lowbit_lut_read_probe(t.data_ptr(), nbytes, threads))


# -- the reference twin (plain torch) -------------------------------------------------
def quantize_activations(x: torch.Tensor, kpad: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of the kernel's activation step: ``x [B, K]`` -> ``(xq int8 [B, kpad], d [B, kpad/32])``."""
    x2 = x.to(torch.float32)
    B, K = x2.shape
    kpad = -(-K // BLOCK_K) * BLOCK_K if kpad is None else kpad
    xp = torch.zeros(B, kpad, dtype=torch.float32)
    xp[:, :K] = x2
    blocks = xp.view(B, kpad // BLOCK_K, BLOCK_K)
    amax = blocks.abs().amax(dim=-1)
    d = torch.div(amax, torch.full_like(amax, 127.0))
    inv = torch.where(d != 0, torch.div(torch.ones_like(d), d), torch.zeros_like(d))
    xq = torch.round(blocks * inv.unsqueeze(-1)).clamp_(-127, 127)
    return xq.to(torch.int8).view(B, kpad), d


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` float32 as the kernel sees it: int8 codes times their block scale."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    K = x2.shape[1]
    xq, d = quantize_activations(x2)
    B = x2.shape[0]
    xdq = (xq.view(B, -1, BLOCK_K).to(torch.float32) * d.unsqueeze(-1)).view(B, -1)[:, :K]
    return xdq.reshape(x.shape)


def dequantize_lut(
    codes: torch.Tensor,
    lut: torch.Tensor,
    scale: torch.Tensor,
    offset: Optional[torch.Tensor],
    group_size: Optional[int],
) -> torch.Tensor:
    """``lut[codes] * scale (+ offset)`` per group, float32 ``[N, K]``."""
    N, K = codes.shape
    G = K if group_size is None else group_size
    w = lut.to(torch.float32)[codes.long()].view(N, K // G, G)
    w = w * scale.to(torch.float32).expand(N, K // G).unsqueeze(-1)
    if offset is not None:
        w = w + offset.to(torch.float32).expand(N, K // G).unsqueeze(-1)
    return w.reshape(N, K)


def reference_twin(
    x: torch.Tensor,
    codes: torch.Tensor,
    lut: torch.Tensor,
    scale: torch.Tensor,
    offset: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear(fake_quantize_activations(x), dequantize_lut(...))`` in float32, then x's dtype
    (+ bias in x's dtype): what :func:`lut_linear` computes, up to float summation order
    (pass ``prepared.effective_lut`` as ``lut`` for tables that are not exact)."""
    w = dequantize_lut(codes, lut, scale, offset, group_size)
    y = F.linear(fake_quantize_activations(x), w)
    return finish(y, x, bias, x.shape[:-1])


# -- lowbit integer schemes (the registry's glue) ----------------------------------------
def integer_lut(bits: int, symmetric: bool) -> torch.Tensor:
    """The table of lowbit's integer codes: ``q - 2**(bits-1)`` (symmetric) or ``q`` (affine,
    the zero point going into the offset ``-z * s``)."""
    q = torch.arange(1 << bits, dtype=torch.float32)
    return q - (1 << (bits - 1)) if symmetric else q


def prepare_integer(
    codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int, group_size: int
) -> LutPrepared:
    """lowbit's ``w = (q - z) * s`` (``zero=None``: symmetric) as ``lut[q] * s + offset``."""
    if zero is None:
        return prepare(codes, integer_lut(bits, True), scale, None, group_size)
    s = scale.detach().cpu().to(torch.float32)
    offset = -(zero.detach().cpu().to(torch.float32) * s)
    return prepare(codes, integer_lut(bits, False), s, offset, group_size)


TABLE_FORMATS = ("nf4", "fp4", "ternary")  # lowbit formats run as w = table[q] * scale


def layer_supported(layer, weight_only: tuple[bool, str], group_size: int) -> tuple[bool, str]:
    """Whether ``cpu_lut`` runs a ``QuantLinear``: a weight-only scheme of 2- or 3-bit integers,
    or an nf4 / fp4 / ternary table format, on CPU, with groups that are whole rows or multiples
    of 32 columns, and the compiled kernel."""
    ok, why = weight_only
    if not ok:
        return ok, why
    s = layer.scheme
    if not (s.format in TABLE_FORMATS or (s.format == "int" and s.bits in (2, 3))):
        return False, f"cpu_lut runs 2- and 3-bit integers and the {TABLE_FORMATS} formats, got {s.format} {s.bits}-bit"
    if getattr(layer, "n_outliers", 0):
        return False, "cpu_lut has no float outlier columns (LLM.int8 schemes)"
    if layer.scale.device.type != "cpu":
        return False, "cpu_lut runs on CPU tensors only"
    ok, why = available()
    if not ok:
        return ok, why
    return lut_supported(layer.out_features, layer.in_features, group_size, s.bits)


def prepare_layer(layer, group_size: int) -> LutPrepared:
    qt = layer.quantized_tensor()
    qp = qt.qparams
    if layer.scheme.format in TABLE_FORMATS:
        from lowbit.formats import value_table

        # w = table[q] * scale (double-quantized scales arrive dequantized in qp.scale)
        return prepare(qt.codes(), value_table(layer.scheme), qp.scale.float(), None, group_size)
    return prepare_integer(qt.codes(), qp.scale, qp.zero, layer.scheme.bits, group_size)
