"""A seeded mutation fuzzer for ``lowbit.io.gguf.import_gguf`` (tests/test_fuzz_gguf.py runs a few
hundred cases, benchmarks/fuzz_gguf.py ten thousand and more).

Base files: tiny random Llama models written by ``export_gguf`` at several types (plus one
rewritten by gguf-py's own writer with ``general.alignment = 64``); each base's logits on
fixed ids are the reference. A case = (mutation class, base, seed): the mutated bytes are
imported in a forked child with a CPU-time-independent wall-clock limit and an address-space
limit (``RLIMIT_AS``), then run on the same ids. The outcomes (typed-error, identical,
silently-different, non-typed-exception, hang, memory-blow-up) are those of tests/fuzz_runner.py,
which runs the cases; a typed error must also be one line, and never gguf-py's failure behind
lowbit's checks (``BACKSTOP``).

``KNOWN_UNDETECTABLE`` names the classes where a silently different model is inherent to the
format (GGUF carries no checksums) and says why; in every other class only ``typed-error`` and
``identical`` are acceptable.
"""

from __future__ import annotations

import math
import random
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from lowbit.io.gguf.blocks import FP16_FIELDS
from lowbit.io.gguf.validate import GGUFLayout, KVEntry, TensorInfo, padded, scan_gguf

import fuzz_runner

BACKSTOP = "gguf-py could not parse a file that lowbit's checks passed"
FAILURES = ("non-typed-exception", "hang", "memory-blow-up")

KNOWN_UNDETECTABLE = {
    "data_bitflip": "a flipped bit in tensor data that leaves every value finite: GGUF has no checksums",
    "meta_float_bitflip": "llama.rope.freq_base or the RMS epsilon flipped to another value inside its valid range",
    "type_swap_same_size": "F16 <-> BF16, or Q4_0 <-> Q4_K on rows that are multiples of 256: the same byte count, "
    "so every structural check still holds",
    "tinfo_name_swap": "two tensors of the same type and shape trade names (the file's tensor order is free)",
}

IDS_SEED, IDS_LEN = 5, 8
ROPE_THETA = 500000.0  # not the default 10000, so that a lost llama.rope.freq_base changes the outputs

# (name, ftype, model seed, tied, alignment rewrite)
BASE_SPECS = (
    ("Q8_0", "Q8_0", 0, True, None),
    ("Q4_K_M-untied", "Q4_K_M", 1, False, None),
    ("F16", "F16", 2, True, None),
    ("BF16", "BF16", 3, True, None),
    ("Q4_0", "Q4_0", 4, True, None),
    ("Q5_1", "Q5_1", 5, True, None),
    ("Q8_0-align64", "Q8_0", 6, True, 64),
)

INT_HPARAMS = (
    "llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
    "llama.attention.key_length", "llama.attention.value_length", "llama.vocab_size",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "general.alignment",
)
FLOAT_HPARAMS = ("llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon")
OPTIONAL_WITH_DEFAULT = ("llama.rope.freq_base",)


# ---------------------------------------------------------------------------
# bases
# ---------------------------------------------------------------------------
@dataclass
class Base:
    name: str
    path: Path
    data: bytes
    layout: GGUFLayout
    refs: dict  # as_is (bool) -> reference logits

    def entries(self) -> list[KVEntry]:
        return list(self.layout.kv.values())


def input_ids():
    import torch

    return torch.randint(0, 256, (1, IDS_LEN), generator=torch.Generator().manual_seed(IDS_SEED))


def reference_logits(path: Path, as_is: bool):
    import torch

    from lowbit.io.gguf import import_gguf

    with torch.no_grad():
        return import_gguf(path, as_is=as_is)(input_ids()).logits


def make_bases(directory: Path, specs=BASE_SPECS) -> list[Base]:
    from gguf_helpers import rewrite_gguf, write_tokenizer_gguf
    from tiny_models import tiny_llama

    from lowbit.io.gguf import export_gguf

    directory.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer_gguf(directory / "tok.gguf")
    bases = []
    for name, ftype, seed, tied, alignment in specs:
        model = tiny_llama(seed, tie=tied)
        model.config.rope_theta = ROPE_THETA
        path = directory / f"base-{name}.gguf"
        export_gguf(model, path, ftype, source_gguf=tok)
        if alignment is not None:
            plain = path.with_suffix(".plain.gguf")
            path.rename(plain)
            rewrite_gguf(plain, path, alignment=alignment)  # gguf-py's writer, with general.alignment
        refs = {False: reference_logits(path, False), True: reference_logits(path, True)}
        bases.append(Base(name, path, path.read_bytes(), scan_gguf(path), refs))
    return bases


# ---------------------------------------------------------------------------
# byte helpers
# ---------------------------------------------------------------------------
def put(data: bytearray, offset: int, fmt: str, value) -> None:
    struct.pack_into("<" + fmt, data, offset, value)


def flip_bit(data: bytearray, lo: int, hi: int, rng: random.Random) -> int:
    pos = rng.randrange(lo, hi)
    data[pos] ^= 1 << rng.randrange(8)
    return pos


def pack_str(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def kv_raw(base: Base, e: KVEntry) -> bytes:
    return base.data[e.entry_offset : e.end]


def tinfo_raw(name: str, t: TensorInfo) -> bytes:
    return (
        pack_str(name.encode())
        + struct.pack("<I", len(t.dims))
        + b"".join(struct.pack("<Q", d) for d in t.dims)
        + struct.pack("<IQ", t.type_id, t.offset)
    )


def rebuild(base: Base, kv: list[bytes], infos: list[bytes]) -> bytes:
    """Header + the given metadata entries and tensor infos + padding + the base's tensor data:
    a well-formed file whenever the pieces are."""
    lay = base.layout
    head = base.data[:8] + struct.pack("<QQ", len(infos), len(kv))
    body = head + b"".join(kv) + b"".join(infos)
    return body + bytes(padded(len(body), lay.alignment) - len(body)) + base.data[lay.data_start :]


def new_kv(key: str, vtype: V, value: bytes) -> bytes:
    return pack_str(key.encode()) + struct.pack("<I", vtype) + value


# ---------------------------------------------------------------------------
# mutations: each returns (class, bytes, note) or None when it does not apply to the base
# ---------------------------------------------------------------------------
Mutation = tuple[str, bytes, str]
HUGE_U64 = (2**64 - 1, 2**63, 2**40, 10**9)


def m_header_bitflip(base: Base, rng) -> Mutation:
    d = bytearray(base.data)
    pos = flip_bit(d, 0, 24, rng)
    return "header_bitflip", bytes(d), f"byte {pos}"


def m_header_count_huge(base: Base, rng) -> Mutation:
    d = bytearray(base.data)
    off, n = rng.choice([(8, len(base.layout.tensors)), (16, len(base.layout.kv))])
    v = rng.choice(HUGE_U64 + (len(d), n + 1, max(n - 1, 0), 0))
    put(d, off, "Q", v)
    return "header_count_huge", bytes(d), f"{'tensors' if off == 8 else 'kv'} = {v}"


def _kv_flip_class(e: KVEntry, pos: int) -> str:
    if e.key in FLOAT_HPARAMS and pos >= e.value_offset:
        return "meta_float_bitflip"
    if e.key in OPTIONAL_WITH_DEFAULT and e.entry_offset + 8 <= pos < e.entry_offset + 8 + len("llama."):
        return "meta_key_rename"
    return "kv_bitflip"


def m_kv_bitflip(base: Base, rng) -> Mutation:
    e = rng.choice(base.entries())
    d = bytearray(base.data)
    pos = flip_bit(d, e.entry_offset, e.end, rng)
    return _kv_flip_class(e, pos), bytes(d), f"{e.key} byte {pos - e.entry_offset}"


def m_meta_float_bitflip(base: Base, rng) -> Mutation:
    e = rng.choice(_hparam_entries(base, FLOAT_HPARAMS))
    d = bytearray(base.data)
    pos = flip_bit(d, e.value_offset, e.end, rng)
    (v,) = struct.unpack_from("<f", d, e.value_offset)
    return "meta_float_bitflip", bytes(d), f"{e.key} = {v!r} (byte {pos - e.value_offset})"


def m_meta_key_rename(base: Base, rng) -> Optional[Mutation]:
    keys = [e for e in base.entries() if e.key in OPTIONAL_WITH_DEFAULT]
    if not keys:
        return None
    e = rng.choice(keys)
    d = bytearray(base.data)
    pos = flip_bit(d, e.entry_offset + 8, e.entry_offset + 8 + len("llama."), rng)
    return "meta_key_rename", bytes(d), f"{e.key} -> {bytes(d[e.entry_offset + 8 : e.value_offset - 4])!r}"


def m_kv_length_huge(base: Base, rng) -> Mutation:
    e = rng.choice(base.entries())
    fields = [("key length", e.entry_offset)]
    if e.vtype == V.STRING:
        fields.append(("string length", e.value_offset))
    if e.vtype == V.ARRAY:
        fields.append(("array count", e.value_offset + 4))
    what, off = rng.choice(fields)
    d = bytearray(base.data)
    (old,) = struct.unpack_from("<Q", d, off)
    v = rng.choice(HUGE_U64 + (len(d), len(d) - off, old + 1, old * 2 + 1))
    put(d, off, "Q", v)
    return "kv_length_huge", bytes(d), f"{e.key} {what} {old} -> {v}"


def m_kv_type_change(base: Base, rng) -> Mutation:
    e = rng.choice(base.entries())
    d = bytearray(base.data)
    if e.vtype == V.ARRAY and rng.random() < 0.5:
        off, old = e.value_offset, int(e.subtype)
    else:
        off, old = e.value_offset - 4, int(e.vtype)
    v = rng.choice([t for t in range(16) if t != old] + [2**31, 2**32 - 1])
    put(d, off, "I", v)
    return "kv_type_change", bytes(d), f"{e.key} type {old} -> {v}"


def _hparam_entries(base: Base, keys) -> list[KVEntry]:
    return [e for e in base.entries() if e.key in keys and e.vtype != V.ARRAY]


def m_meta_value_bad(base: Base, rng) -> Mutation:
    e = rng.choice(_hparam_entries(base, INT_HPARAMS + FLOAT_HPARAMS))
    d = bytearray(base.data)
    if e.vtype == V.FLOAT32:
        (old,) = struct.unpack_from("<f", d, e.value_offset)
        v = rng.choice([0.0, -0.0, math.nan, math.inf, -math.inf, 1e30, -abs(old), 3.0e38])
        put(d, e.value_offset, "f", v)
    else:
        v = rng.choice([0, 2**32 - 1, 2**31, 10**9, 2**27 + 1, 2**24 + 7])
        put(d, e.value_offset, "I", v)
    return "meta_value_bad", bytes(d), f"{e.key} = {v}"


def _wrong_values(e: KVEntry, raw_value: bytes) -> list[tuple[V, bytes]]:
    s = [(V.STRING, pack_str(b"32")), (V.BOOL, b"\x01")]
    if e.vtype == V.STRING:
        return [(V.UINT32, struct.pack("<I", 1)), (V.ARRAY, struct.pack("<IQ", V.STRING, 1) + raw_value)]
    arr = (V.ARRAY, struct.pack("<IQ", e.vtype, 1) + raw_value)
    if e.vtype in (V.FLOAT32, V.FLOAT64):
        return s + [arr, (V.UINT32, struct.pack("<I", 10000)), (V.INT64, struct.pack("<q", 1))]
    return s + [arr, (V.FLOAT32, struct.pack("<f", 2.0)), (V.FLOAT64, struct.pack("<d", 2.0))]


def m_meta_wrong_type(base: Base, rng) -> Mutation:
    e = rng.choice(_hparam_entries(base, INT_HPARAMS + FLOAT_HPARAMS + ("general.architecture",)))
    raw_value = base.data[e.value_offset : e.end]
    vtype, value = rng.choice(_wrong_values(e, raw_value))
    kv = [new_kv(x.key, vtype, value) if x is e else kv_raw(base, x) for x in base.entries()]
    infos = [base.data[t.info_offset : t.end] for t in base.layout.tensors]
    return "meta_wrong_type", rebuild(base, kv, infos), f"{e.key}: {e.vtype.name} -> {vtype.name}"


def m_tinfo_bitflip(base: Base, rng) -> Mutation:
    t = rng.choice(base.layout.tensors)
    d = bytearray(base.data)
    pos = flip_bit(d, t.info_offset, t.end, rng)
    return "tinfo_bitflip", bytes(d), f"{t.name} byte {pos - t.info_offset}"


def m_offset_overlap(base: Base, rng) -> Mutation:
    ts = base.layout.tensors
    i = rng.randrange(1, len(ts))
    t, a = ts[i], base.layout.alignment
    v = rng.choice([ts[rng.randrange(i)].offset, t.offset - a, rng.randrange(0, t.offset // a) * a])
    d = bytearray(base.data)
    put(d, t.offset_offset, "Q", v)
    return "offset_overlap", bytes(d), f"{t.name} offset {t.offset} -> {v}"


def m_offset_gap_or_misaligned(base: Base, rng) -> Mutation:
    t = rng.choice(base.layout.tensors)
    a = base.layout.alignment
    v = rng.choice([t.offset + a * rng.randint(1, 4), t.offset + rng.randint(1, a - 1),
                    max(t.offset - rng.randint(1, a - 1), 0), 2**63, 2**64 - a, len(base.data)])
    if v == t.offset:
        v += a
    d = bytearray(base.data)
    put(d, t.offset_offset, "Q", v)
    return "offset_gap_or_misaligned", bytes(d), f"{t.name} offset {t.offset} -> {v}"


def same_size_partner(t: TensorInfo) -> Optional[int]:
    pairs = {T.F16: T.BF16, T.BF16: T.F16}
    if t.dims[0] % 256 == 0:
        pairs.update({T.Q4_0: T.Q4_K, T.Q4_K: T.Q4_0})
    p = pairs.get(T(t.type_id))
    return int(p) if p is not None else None


def m_type_change(base: Base, rng) -> Mutation:
    t = rng.choice(base.layout.tensors)
    skip = {t.type_id, same_size_partner(t)}
    v = rng.choice([x for x in list(range(46)) + [200, 2**31, 2**32 - 1] if x not in skip])
    d = bytearray(base.data)
    put(d, t.type_offset, "I", v)
    return "type_change", bytes(d), f"{t.name} type {T(t.type_id).name} -> {v}"


def m_type_swap_same_size(base: Base, rng) -> Optional[Mutation]:
    cands = [t for t in base.layout.tensors if same_size_partner(t) is not None]
    if not cands:
        return None
    t = rng.choice(cands)
    d = bytearray(base.data)
    put(d, t.type_offset, "I", same_size_partner(t))
    return "type_swap_same_size", bytes(d), f"{t.name} {T(t.type_id).name} -> {T(same_size_partner(t)).name}"


def m_dims_change(base: Base, rng) -> Mutation:
    t = rng.choice(base.layout.tensors)
    d = bytearray(base.data)
    n = len(t.dims)
    kind = rng.choice(["dim", "dim", "dim", "swap", "n_dims"])
    if kind == "n_dims":
        v = rng.choice([0, n + 1, 5, 2**31, 2**32 - 1] + ([n - 1] if n > 1 else []))
        put(d, t.dims_offset - 4, "I", v)
        return "dims_change", bytes(d), f"{t.name} n_dims {n} -> {v}"
    if kind == "swap" and n == 2:
        put(d, t.dims_offset, "Q", t.dims[1])
        put(d, t.dims_offset + 8, "Q", t.dims[0])
        return "dims_change", bytes(d), f"{t.name} dims swapped {t.dims}"
    j = rng.randrange(n)
    old = t.dims[j]
    v = rng.choice([0, 1, 2**32, 2**63, 2**64 - 1, old * 2, old // 2, old + 32, old * 256])
    put(d, t.dims_offset + 8 * j, "Q", v)
    return "dims_change", bytes(d), f"{t.name} dim {j} {old} -> {v}"


def m_tinfo_name_swap(base: Base, rng) -> Optional[Mutation]:
    ts = base.layout.tensors
    groups = defaultdict(list)
    for i, t in enumerate(ts):
        groups[(t.type_id, t.dims)].append(i)
    pairs = [g for g in groups.values() if len(g) > 1]
    if not pairs:
        return None
    i, j = rng.sample(rng.choice(pairs), 2)
    names = [t.name for t in ts]
    names[i], names[j] = names[j], names[i]
    infos = [tinfo_raw(n, t) for n, t in zip(names, ts)]
    data = rebuild(base, [kv_raw(base, e) for e in base.entries()], infos)
    return "tinfo_name_swap", data, f"{ts[i].name} <-> {ts[j].name}"


def m_data_bitflip(base: Base, rng) -> Mutation:
    d = bytearray(base.data)
    pos = flip_bit(d, base.layout.data_start, len(d), rng)
    return "data_bitflip", bytes(d), f"data byte {pos - base.layout.data_start}"


_NONFINITE = {
    "f32": (0x7FC00000, 0x7F800000, 0xFF800000),
    "f16": (0x7E00, 0x7C00, 0xFC00, 0x7C01),
    "bf16": (0x7FC0, 0x7F80, 0xFF80),
}


def m_data_nonfinite(base: Base, rng) -> Mutation:
    t = rng.choice(base.layout.tensors)
    qt = T(t.type_id)
    start = base.layout.data_start + t.offset
    d = bytearray(base.data)
    if qt == T.F32:
        off, fmt, v = start + 4 * rng.randrange(t.n_elements), "I", rng.choice(_NONFINITE["f32"])
    elif qt in (T.F16, T.BF16):
        off, fmt = start + 2 * rng.randrange(t.n_elements), "H"
        v = rng.choice(_NONFINITE["f16" if qt == T.F16 else "bf16"])
    else:
        _, type_size = GGML_QUANT_SIZES[qt]
        block = rng.randrange(t.n_bytes // type_size)
        off, fmt = start + block * type_size + rng.choice(FP16_FIELDS[qt]), "H"
        v = rng.choice(_NONFINITE["f16"])
    put(d, off, fmt, v)
    return "data_nonfinite", bytes(d), f"{t.name} ({qt.name}) byte {off - start} = {v:#x}"


def m_truncate(base: Base, rng) -> Mutation:
    lay = base.layout
    region = rng.choice([(1, lay.infos_end), (lay.data_start, len(base.data)), (len(base.data) - 64, len(base.data))])
    cut = rng.randrange(*region)
    return "truncate", base.data[:cut], f"cut at {cut} of {len(base.data)}"


def m_trailing_garbage(base: Base, rng) -> Mutation:
    n = rng.choice([1, 7, 31, 32, 64, 4096])
    tail = bytes(n) if rng.random() < 0.3 else rng.randbytes(n)
    return "trailing_garbage", base.data + tail, f"{n} bytes appended"


MUTATORS: dict[str, Callable] = {
    "header_bitflip": m_header_bitflip,
    "header_count_huge": m_header_count_huge,
    "kv_bitflip": m_kv_bitflip,
    "kv_length_huge": m_kv_length_huge,
    "kv_type_change": m_kv_type_change,
    "meta_value_bad": m_meta_value_bad,
    "meta_wrong_type": m_meta_wrong_type,
    "meta_float_bitflip": m_meta_float_bitflip,
    "meta_key_rename": m_meta_key_rename,
    "tinfo_bitflip": m_tinfo_bitflip,
    "offset_overlap": m_offset_overlap,
    "offset_gap_or_misaligned": m_offset_gap_or_misaligned,
    "type_change": m_type_change,
    "type_swap_same_size": m_type_swap_same_size,
    "dims_change": m_dims_change,
    "tinfo_name_swap": m_tinfo_name_swap,
    "data_bitflip": m_data_bitflip,
    "data_nonfinite": m_data_nonfinite,
    "truncate": m_truncate,
    "trailing_garbage": m_trailing_garbage,
}
CLASSES = tuple(MUTATORS)  # kv_bitflip reports meta_float_bitflip / meta_key_rename when it lands there


@dataclass
class Case:
    index: int
    cls: str
    base: Base
    data: bytes
    note: str
    as_is: bool


def generate(bases: list[Base], n: int, seed: int):
    """``n`` cases: the mutator cycles through ``MUTATORS`` (each class equally often), the base and
    the rest come from a generator seeded by (seed, case index)."""
    names = list(MUTATORS)
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        mutator = MUTATORS[names[i % len(names)]]
        order = rng.sample(bases, len(bases))
        for base in order:
            m = mutator(base, rng)
            if m is not None:
                break
        else:
            raise AssertionError(f"mutator {names[i % len(names)]} applies to no base")
        cls, data, note = m
        yield Case(i, cls, base, data, note, as_is=rng.random() < 0.5)


# ---------------------------------------------------------------------------
# running cases (tests/fuzz_runner.py forks, limits and classifies)
# ---------------------------------------------------------------------------
class Result(fuzz_runner.Result):
    @property
    def backstop(self) -> bool:
        """The reader's last-resort wrapper fired: gguf-py failed on a file lowbit's checks passed."""
        return BACKSTOP in self.detail

    @property
    def failed(self) -> bool:
        if self.outcome in FAILURES or not self.one_line or self.backstop:
            return True
        return self.outcome == "silently-different" and self.case.cls not in KNOWN_UNDETECTABLE

    def describe(self) -> str:
        c = self.case
        return f"#{c.index} {c.cls} on {c.base.name} ({c.note}, as_is={c.as_is}): {self.outcome} {self.detail[:300]}"


def run_case(case: Case, workdir: Path, time_limit: float = 20.0, mem_bytes: int = 1 << 30) -> Result:
    from lowbit.io.gguf import import_gguf

    path = workdir / "case.gguf"
    path.write_bytes(case.data)
    return fuzz_runner.run_in_child(case, lambda: import_gguf(path, as_is=case.as_is)(input_ids()).logits,
                                    case.base.refs[case.as_is], time_limit, mem_bytes, Result)


def run_cases(cases, workdir: Optional[Path] = None, time_limit: float = 20.0, mem_bytes: int = 1 << 30,
              on_result: Optional[Callable[[Result], None]] = None) -> list[Result]:
    return fuzz_runner.run_all(cases, lambda case, wd: run_case(case, wd, time_limit, mem_bytes), workdir, on_result)


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
def markdown_table(results: list[Result]) -> str:
    table = fuzz_runner.counts(results, lambda r: r.case.cls)
    rows = [((cls + (" (known)" if cls in KNOWN_UNDETECTABLE else ""),), table[cls]) for cls in sorted(table)]
    return fuzz_runner.markdown_table(("mutation class",), rows)
