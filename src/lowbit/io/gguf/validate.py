"""Structural validation of a GGUF file, before gguf-py builds anything from it.

``scan_gguf(path)`` walks the file's header, metadata and tensor infos itself,
with every count and length bounded by the bytes that are left, and checks the
tensor data layout. Only a file that passes is handed to gguf-py's
``GGUFReader`` (which trusts every count it reads: a tensor count of 2**60
makes it loop and allocate, nested arrays make it recurse, and it maps
overlapping or out-of-order tensor data without a word). Every failure is a
typed ``CheckpointError`` (``TruncatedCheckpointError`` when the file ends
early) that names the key or tensor, what is wrong, and how to fix it.

The layout (GGUF v2/v3, little-endian; ``str`` = u64 length + UTF-8 bytes)::

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv      x  key str | value type u32 | value
                 (array value: element type u32 | count u64 | count x element)
    n_tensors x  name str | n_dims u32 | ne[n_dims] u64 | ggml type u32 | offset u64
    zero padding to ``general.alignment`` (u32, default 32)       <- data start
    tensor data: tensor i at data start + offset_i, then zero padding to the alignment

What is required, as llama.cpp (``gguf.cpp``) and gguf-py write and read it:

* counts fit the file: every metadata entry takes >= 13 bytes, every tensor
  info >= 24, every array element >= its scalar size (8 for a string);
* value types are known; arrays hold scalars or strings (no nested arrays, as in
  llama.cpp); at most ``MAX_ARRAY_ELEMENTS`` array elements in all (gguf-py
  builds one numpy object per element); keys and tensor names are UTF-8 and
  unique; a tensor name is shorter than 64 bytes (``GGML_MAX_NAME``);
* ``general.alignment``, when present, is a u32 power of two <= ``MAX_ALIGNMENT``;
* a tensor has 1..4 dims (``GGML_MAX_DIMS``), each >= 1, a GGML type that lowbit
  decodes, and a first dim that is a whole number of the type's blocks;
* tensor data is laid out back to back in tensor-info order: tensor i starts
  exactly at the end of tensor i-1 rounded up to the alignment (the first at 0),
  so no tensor overlaps another or leaves a gap; the last one ends inside the
  file, and nothing but its alignment padding follows it (gguf-py and llama.cpp
  write that padding; a file without it is accepted too).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from lowbit.errors import CheckpointError, TruncatedCheckpointError, UnsupportedModelError
from lowbit.io.gguf.blocks import CODECS, block_fp16_fields

PathLike = Union[str, os.PathLike]

MAGIC = b"GGUF"
VERSIONS = (2, 3)
HEADER_BYTES = 24
MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims (0 dims), type, offset
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME (64) less the terminating NUL
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16
MAX_ARRAY_ELEMENTS = 1 << 22  # all metadata arrays together (a 256k vocab with scores and types: ~0.8M)
ALIGNMENT_KEY = "general.alignment"

SCALAR_SIZES = {
    V.UINT8: 1, V.INT8: 1, V.BOOL: 1,
    V.UINT16: 2, V.INT16: 2,
    V.UINT32: 4, V.INT32: 4, V.FLOAT32: 4,
    V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8,
}
STRING_MIN_BYTES = 8

_FIX = "re-download the file or re-export it (llama.cpp's convert/quantize, gguf-py or lowbit's export_gguf)"


@dataclass(frozen=True)
class KVEntry:
    """One metadata entry: its key, value type (and element type and count for arrays) and
    where its value starts (``entry_offset`` is where the key's length is)."""

    key: str
    vtype: V
    entry_offset: int
    value_offset: int
    end: int
    subtype: Optional[V] = None
    count: int = 1


@dataclass(frozen=True)
class TensorInfo:
    """One tensor info: ``dims`` in GGUF order (``ne``, fastest first), ``offset`` relative to the
    data start, and where its fields lie in the file (``info_offset`` .. ``end``)."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    offset: int
    info_offset: int
    dims_offset: int
    type_offset: int
    offset_offset: int
    end: int

    @property
    def qtype(self) -> T:
        return T(self.type_id)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[self.qtype]
        return self.n_elements // block * type_size


@dataclass(frozen=True)
class GGUFLayout:
    """What ``scan_gguf`` found: every metadata entry and tensor info, and where the data lies."""

    path: str
    file_size: int
    version: int
    alignment: int
    kv: dict[str, KVEntry]
    tensors: tuple[TensorInfo, ...]
    infos_end: int  # first byte after the tensor infos
    data_start: int  # infos_end rounded up to the alignment

    @property
    def data_end(self) -> int:
        """End of the last tensor's padded data (the data start when there are no tensors)."""
        if not self.tensors:
            return self.data_start
        last = self.tensors[-1]
        return self.data_start + last.offset + padded(last.n_bytes, self.alignment)


def padded(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# ---------------------------------------------------------------------------
# a bounded cursor over the file's bytes
# ---------------------------------------------------------------------------
class _Cursor:
    """Reads little-endian scalars and strings; reading past the end is a ``TruncatedCheckpointError``."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise TruncatedCheckpointError(
                f"{self.path}: {what} needs {n} bytes at byte {self.pos} but the file has {self.size} bytes: "
                f"the file is truncated or the value is corrupt; {_FIX}"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return v

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string_length(self, what: str) -> int:
        n = self.u64(f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        return n

    def text(self, what: str, max_bytes: Optional[int] = None) -> str:
        start = self.pos
        n = self.string_length(what)
        if max_bytes is not None and n > max_bytes:
            raise CheckpointError(
                f"{self.path}: {what} at byte {start} is {n} bytes long; the limit is {max_bytes} "
                f"(GGML_MAX_NAME); the tensor info is corrupt: {_FIX}"
            )
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{self.path}: {what} at byte {start} is not valid UTF-8 ({raw[:40]!r}); the file is corrupt: {_FIX}"
            ) from None


# ---------------------------------------------------------------------------
# header
# ---------------------------------------------------------------------------
def check_header(cur: _Cursor) -> tuple[int, int, int]:
    """``(version, n_tensors, n_kv)`` of a file of at least ``HEADER_BYTES``; counts bounded by what
    the file can hold."""
    magic = bytes(cur.buf[0:4])
    if magic != MAGIC:
        raise CheckpointError(f"{cur.path} is not a GGUF file: it starts with {magic!r}, not {MAGIC!r}")
    cur.pos = 4
    version = cur.u32("the version")
    if version & 0xFFFF == 0 and version >> 16:
        raise UnsupportedModelError(
            f"{cur.path} is a big-endian GGUF (version field {version:#010x}); lowbit reads little-endian "
            "files only: convert it with gguf-py's gguf_convert_endian"
        )
    if version not in VERSIONS:
        raise UnsupportedModelError(
            f"{cur.path}: GGUF version {version} is not supported (lowbit reads versions "
            f"{', '.join(map(str, VERSIONS))}); re-convert the model with a current llama.cpp"
        )
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the metadata count")
    room = cur.size - HEADER_BYTES
    for count, what, unit in ((n_tensors, "tensors", MIN_TENSOR_INFO_BYTES), (n_kv, "metadata entries", MIN_KV_BYTES)):
        if count > room // unit:
            raise TruncatedCheckpointError(
                f"{cur.path}: the header claims {count} {what}, but a file of {cur.size} bytes holds at most "
                f"{room // unit} (each takes >= {unit} bytes): the file is truncated or its header is corrupt; {_FIX}"
            )
    return version, n_tensors, n_kv


# ---------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------
def _value_type(raw: int, key: str, cur: _Cursor, element: bool = False) -> V:
    try:
        vtype = V(raw)
    except ValueError:
        what = "array element type" if element else "value type"
        raise CheckpointError(
            f"{cur.path}: metadata key {key!r} has {what} id {raw}, which GGUF does not define "
            f"(0..{int(max(V))}); the metadata is corrupt: {_FIX}"
        ) from None
    if element and vtype == V.ARRAY:
        raise CheckpointError(
            f"{cur.path}: metadata key {key!r} is an array of arrays, which llama.cpp does not read either; "
            f"the metadata is corrupt: {_FIX}"
        )
    return vtype


def _skip_array(cur: _Cursor, key: str, subtype: V, count: int) -> None:
    what = f"the {count}-element array {key!r}"
    if subtype == V.STRING:
        cur.need(count * STRING_MIN_BYTES, what)
        for i in range(count):
            cur.skip(cur.string_length(f"string {i} of {key!r}"), key)
    else:
        cur.skip(count * SCALAR_SIZES[subtype], what)


def _scan_entry(cur: _Cursor, index: int, elements_left: int) -> KVEntry:
    start = cur.pos
    key = cur.text(f"metadata key #{index}")
    vtype = _value_type(cur.u32(f"the value type of {key!r}"), key, cur)
    value_offset = cur.pos
    if vtype == V.STRING:
        cur.skip(cur.string_length(f"the string value of {key!r}"), key)
        return KVEntry(key, vtype, start, value_offset, cur.pos)
    if vtype != V.ARRAY:
        cur.skip(SCALAR_SIZES[vtype], f"the value of {key!r}")
        return KVEntry(key, vtype, start, value_offset, cur.pos)
    subtype = _value_type(cur.u32(f"the element type of {key!r}"), key, cur, element=True)
    count = cur.u64(f"the element count of {key!r}")
    if count > elements_left:
        raise CheckpointError(
            f"{cur.path}: metadata array {key!r} claims {count} elements; lowbit reads at most "
            f"{MAX_ARRAY_ELEMENTS} array elements per file (gguf-py builds an object for each): "
            f"the count is corrupt or the file is not a model: {_FIX}"
        )
    _skip_array(cur, key, subtype, count)
    return KVEntry(key, vtype, start, value_offset, cur.pos, subtype, count)


def scan_metadata(cur: _Cursor, n_kv: int) -> dict[str, KVEntry]:
    out: dict[str, KVEntry] = {}
    elements_left = MAX_ARRAY_ELEMENTS
    for i in range(n_kv):
        entry = _scan_entry(cur, i, elements_left)
        if entry.key in out:
            raise CheckpointError(
                f"{cur.path}: metadata key {entry.key!r} appears twice (bytes {out[entry.key].entry_offset} and "
                f"{entry.entry_offset}); the file is corrupt: {_FIX}"
            )
        if entry.vtype == V.ARRAY:
            elements_left -= entry.count
        out[entry.key] = entry
    return out


def alignment_of(cur: _Cursor, kv: dict[str, KVEntry]) -> int:
    entry = kv.get(ALIGNMENT_KEY)
    if entry is None:
        return DEFAULT_ALIGNMENT
    if entry.vtype != V.UINT32:
        raise CheckpointError(
            f"{cur.path}: {ALIGNMENT_KEY!r} has type {entry.vtype.name}; GGUF requires UINT32: {_FIX}"
        )
    (a,) = struct.unpack_from("<I", cur.buf, entry.value_offset)
    if a == 0 or a & (a - 1) or a > MAX_ALIGNMENT:
        raise CheckpointError(
            f"{cur.path}: {ALIGNMENT_KEY!r} is {a}; it must be a power of two from 1 to {MAX_ALIGNMENT} "
            f"(llama.cpp and gguf-py write 32): {_FIX}"
        )
    return a


# ---------------------------------------------------------------------------
# tensor infos
# ---------------------------------------------------------------------------
def _scan_tensor_info(cur: _Cursor, index: int) -> TensorInfo:
    start = cur.pos
    name = cur.text(f"tensor name #{index}", max_bytes=MAX_NAME_BYTES)
    n_dims = cur.u32(f"the dim count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise CheckpointError(
            f"{cur.path}: tensor {name!r} has {n_dims} dims; GGUF tensors have 1 to {MAX_DIMS}: "
            f"the tensor info is corrupt: {_FIX}"
        )
    dims_offset = cur.pos
    dims = tuple(cur.u64(f"dim {j} of tensor {name!r}") for j in range(n_dims))
    type_offset = cur.pos
    type_id = cur.u32(f"the type of tensor {name!r}")
    offset_offset = cur.pos
    offset = cur.u64(f"the data offset of tensor {name!r}")
    return TensorInfo(name, dims, type_id, offset, start, dims_offset, type_offset, offset_offset, cur.pos)


def check_tensor_info(t: TensorInfo, supported, path: str, file_size: int) -> None:
    """Type known and decodable, dims >= 1, first dim a whole number of blocks, data no larger than the file."""
    try:
        qtype = t.qtype
        block, _ = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise CheckpointError(
            f"tensor {t.name!r} has GGML type id {t.type_id}, unknown to gguf-py; this file needs a newer reader "
            "(re-export it with a supported type)"
        ) from None
    if qtype not in supported:
        raise CheckpointError(
            f"tensor {t.name!r} is stored as {qtype.name}, which lowbit does not decode; supported: "
            f"{', '.join(s.name for s in supported)} (requantize the file, e.g. with llama-quantize)"
        )
    if any(d < 1 for d in t.dims):
        raise CheckpointError(
            f"{path}: tensor {t.name!r} has dims {list(t.dims)}; every dim must be >= 1: "
            f"the tensor info is corrupt: {_FIX}"
        )
    if t.dims[0] % block:
        raise CheckpointError(
            f"{path}: tensor {t.name!r} ({qtype.name}, dims {list(t.dims)}): a row of {t.dims[0]} is not a whole "
            f"number of {block}-weight blocks: the tensor info is corrupt: {_FIX}"
        )
    if t.n_bytes > file_size:
        raise CheckpointError(
            f"{path}: tensor {t.name!r} ({qtype.name}, dims {list(t.dims)}) would take {t.n_bytes} bytes, more than "
            f"the whole file ({file_size} bytes): its dims are corrupt: {_FIX}"
        )


def scan_tensor_infos(cur: _Cursor, n: int, supported) -> tuple[TensorInfo, ...]:
    out: list[TensorInfo] = []
    seen: set[str] = set()
    for i in range(n):
        t = _scan_tensor_info(cur, i)
        if t.name in seen:
            raise CheckpointError(f"{cur.path}: tensor {t.name!r} appears twice in the tensor infos: {_FIX}")
        seen.add(t.name)
        check_tensor_info(t, supported, cur.path, cur.size)
        out.append(t)
    return tuple(out)


# ---------------------------------------------------------------------------
# data layout
# ---------------------------------------------------------------------------
def check_data_layout(layout: GGUFLayout) -> None:
    """Back to back in info order, aligned, inside the file, nothing after the last tensor's padding."""
    path, size, a = layout.path, layout.file_size, layout.alignment
    expected = 0
    prev: Optional[TensorInfo] = None
    for t in layout.tensors:
        desc = f"{path}: tensor {t.name!r} ({t.qtype.name}, dims {list(t.dims)}, {t.n_bytes} bytes)"
        if t.offset % a:
            raise CheckpointError(
                f"{desc} has data offset {t.offset}, not a multiple of the alignment {a}: "
                f"the tensor info is corrupt: {_FIX}"
            )
        if t.offset < expected:
            other = _tensor_at(layout.tensors, t.offset, a)
            raise CheckpointError(
                f"{desc} has data offset {t.offset}, inside the data of tensor {other.name!r} "
                f"(tensor data must not overlap; it should start at {expected}): the tensor info is corrupt: {_FIX}"
            )
        if t.offset > expected:
            after = f"after tensor {prev.name!r}" if prev is not None else "at the start of the data"
            raise CheckpointError(
                f"{desc} has data offset {t.offset}, leaving {t.offset - expected} unexplained bytes {after} "
                f"(GGUF writers lay tensors out back to back; it should start at {expected}): "
                f"the tensor info is corrupt: {_FIX}"
            )
        end = layout.data_start + t.offset + t.n_bytes
        if end > size:
            raise TruncatedCheckpointError(
                f"tensor {t.name!r} ({t.qtype.name}, dims {list(t.dims)}) ends at byte {end} but the file has "
                f"{size} bytes: the file is truncated (re-download or re-export it)"
            )
        expected = t.offset + padded(t.n_bytes, a)
        prev = t
    if size > layout.data_end:
        last = f"the last tensor {prev.name!r}" if prev is not None else "the metadata"
        raise CheckpointError(
            f"{path}: {size - layout.data_end} bytes of trailing data after {last} and its padding "
            f"(the data should end at byte {layout.data_end}, the file has {size}): the file was appended to or "
            f"its header is corrupt: {_FIX}"
        )


def _tensor_at(tensors, offset: int, alignment: int) -> TensorInfo:
    """The tensor whose padded data holds ``offset`` (among earlier, back-to-back tensors)."""
    for t in tensors:
        if t.offset <= offset < t.offset + padded(t.n_bytes, alignment):
            return t
    return tensors[0]


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------
def scan_gguf(path: PathLike, supported=None) -> GGUFLayout:
    """Walk and check a GGUF file's structure (see the module docstring); ``supported``: the GGML
    types a tensor may have (default: every type lowbit decodes)."""
    if supported is None:
        supported = tuple(CODECS)
    path = str(path)
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise TruncatedCheckpointError(
            f"{path}: {size} bytes is shorter than a GGUF header ({HEADER_BYTES} bytes); {_FIX}"
        )
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, size, path)
        version, n_tensors, n_kv = check_header(cur)
        kv = scan_metadata(cur, n_kv)
        alignment = alignment_of(cur, kv)
        tensors = scan_tensor_infos(cur, n_tensors, supported)
        infos_end = cur.pos
    layout = GGUFLayout(path, size, version, alignment, kv, tensors, infos_end, padded(infos_end, alignment))
    check_data_layout(layout)
    return layout



# ---------------------------------------------------------------------------
# tensor values (after the structure passed)
# ---------------------------------------------------------------------------
def check_block_scales(name: str, qtype, raw) -> None:
    """Every fp16 scale / min of a quantized tensor's blocks is finite (a NaN/Inf one poisons its block)."""
    fields = block_fp16_fields(raw, qtype)
    bad = ~np.isfinite(fields)
    if bad.any():
        block, k = (int(i) for i in np.argwhere(bad)[0])
        what = "scale" if k == 0 else "min"
        raise CheckpointError(
            f"tensor {name!r} ({T(qtype).name}): the fp16 {what} of block {block} is {fields[block, k]} "
            f"({int(bad.sum())} non-finite fields in all); the file's data is corrupt: {_FIX}"
        )


def check_finite_weights(name: str, qtype, w) -> None:
    """Decoded weights hold no NaN/Inf."""
    finite = np.isfinite(w)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise CheckpointError(
            f"tensor {name!r} ({T(qtype).name}, shape {tuple(w.shape)}) holds {w[where]} at {where} "
            f"({int((~finite).sum())} non-finite weights in all); the file's data is corrupt, or the model it came "
            f"from had non-finite weights: {_FIX}"
        )
