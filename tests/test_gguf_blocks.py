"""GGML block codecs (lowbit.io.gguf.blocks) against gguf-py's reference implementation.

The 32-weight types must give gguf-py's bytes exactly (gguf-py's quantizers are
tested bit for bit against ggml-quants.c upstream); the K-quants, for which
gguf-py has no encoder, must decode (with gguf-py) to exactly our decoder's
values and stay within an SQNR floor of the input. When llama-cpp-python is
installed, our bytes are also compared with ggml's own ``ggml_quantize_chunk``.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from lowbit.errors import FormatError
from lowbit.io.gguf import blocks

SIMPLE = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


def _inputs(seed: int = 0, rows: int = 24, cols: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[1] *= 1e-3  # small magnitudes
    x[2] = rng.standard_t(2, cols).astype(np.float32)  # heavy tails
    x[3, :256] = 0.0  # all-zero blocks (and one all-zero K super-block)
    x[4, :32] = 0.75  # constant block
    x[4, 32:64] = -0.75
    # ties: values on exact half steps of the grid, both signs, and a max/-max tie
    x[5, :32] = (np.arange(32) - 16).astype(np.float32) * 0.5
    x[5, 32:64] = np.tile(np.array([-2.0, 2.0], np.float32), 16)
    x[6, :32] = np.linspace(-1, 1, 32, dtype=np.float32)
    x[7, :] = np.abs(x[7])  # all positive (min > 0)
    x[8, :] = -np.abs(x[8])  # all negative
    x[9, :] = rng.integers(-8, 8, cols).astype(np.float32) * 0.125  # exact Q4 grids
    x[10, :] *= 300.0  # large values
    return x


@pytest.mark.parametrize("qtype", SIMPLE + [T.F16, T.BF16], ids=lambda t: t.name)
def test_simple_types_match_gguf_py_bytes(qtype):
    x = _inputs()
    ours = blocks.encode(x, qtype)
    ref = quants.quantize(x, qtype)
    assert ours.shape[0] == ref.shape[0]
    assert np.array_equal(ours, ref.view(np.uint8).reshape(ours.shape))
    dec = blocks.decode(ours, qtype, x.shape[1])
    assert np.array_equal(dec, quants.dequantize(ref, qtype))


@pytest.mark.parametrize("qtype,floor", [(T.Q4_K, 21.0), (T.Q6_K, 33.0)], ids=["Q4_K", "Q6_K"])
def test_k_quants_decode_like_gguf_py_and_sqnr(qtype, floor):
    x = _inputs(1)
    b = blocks.encode(x, qtype)
    assert b.shape == (x.shape[0], x.shape[1] // 256 * blocks.codec(qtype).type_size)
    ours = blocks.decode(b, qtype, x.shape[1])
    ref = quants.dequantize(b, qtype)
    assert np.array_equal(ours, ref)
    # the zero super-block decodes to zeros
    assert np.all(ours[3, :256] == 0)
    # SQNR on the Gaussian rows (rows 11+ are untouched standard normal)
    g, gq = x[11:], ours[11:]
    sqnr = 10 * np.log10((g.astype(np.float64) ** 2).sum() / ((g - gq).astype(np.float64) ** 2).sum())
    assert sqnr > floor, f"{qtype.name} SQNR {sqnr:.2f} dB below {floor}"


def test_k_quants_beat_their_32_block_cousins():
    """Q4_K (scales and mins searched per 32 weights) is more accurate than Q4_0, Q6_K than Q5_1."""
    x = np.random.default_rng(2).standard_normal((64, 1024)).astype(np.float32)

    def err(t):
        return float(((x - blocks.decode(blocks.encode(x, t), t, 1024)) ** 2).sum())

    assert err(T.Q4_K) < err(T.Q4_0)
    assert err(T.Q6_K) < err(T.Q5_1)


def test_bad_inputs_raise_format_error():
    with pytest.raises(FormatError, match="blocks of 256"):
        blocks.encode(np.zeros((2, 576), np.float32), T.Q4_K)
    bad = np.zeros((1, 32), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(FormatError, match="NaN"):
        blocks.encode(bad, T.Q4_0)
    with pytest.raises(FormatError, match="not supported"):
        blocks.codec(T.Q2_K)
    with pytest.raises(FormatError, match="take 18 bytes"):
        blocks.decode(np.zeros((1, 17), np.uint8), T.Q4_0, 32)


# ---------------------------------------------------------------------------
# against ggml itself (llama-cpp-python ships libggml-base)
# ---------------------------------------------------------------------------
def _ggml_quantize():
    import ctypes
    import glob
    import os

    llama_cpp = pytest.importorskip("llama_cpp")
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    cands = sorted(glob.glob(os.path.join(libdir, "libggml-base.so*"))) or sorted(glob.glob(os.path.join(libdir, "libggml.so*")))
    if not cands:
        pytest.skip("libggml-base not found in llama_cpp/lib")
    lib = ctypes.CDLL(cands[0])
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def run(x: np.ndarray, qtype: T) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.zeros((rows, blocks.row_bytes(qtype, cols)), np.uint8)
        n = fn(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
        assert n == out.size
        return out

    return run


@pytest.mark.parametrize("qtype", SIMPLE + [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_bytes_equal_ggml_quantize_chunk(qtype):
    ggml = _ggml_quantize()
    for x in (_inputs(3), np.random.default_rng(4).standard_normal((32, 1024)).astype(np.float32)):
        assert np.array_equal(blocks.encode(x, qtype), ggml(x, qtype))
