"""A seeded mutation fuzzer for lowbit checkpoints (``lowbit.io.checkpoint.load_checkpoint``);
tests/test_fuzz_checkpoint.py runs a few hundred cases, benchmarks/fuzz_checkpoint.py ten
thousand and more.

Base files: a tiny random Llama quantized at W4 g32 sym, W4 g32 asym, W8 per channel and NF4,
saved by ``lowbit.save``; each base's logits on fixed ids are the reference. A case = (mutation
class, base, seed, mode): the mutated bytes are loaded in a forked child under a wall-clock
limit and an address-space limit (``RLIMIT_AS``), then run on the same ids. Modes:

    verify     ``load_checkpoint(path)``: the digests are checked (the default)
    no-verify  ``load_checkpoint(path, verify=False)``: only the checks of meaning protect the load

Classes whose mutations can be valid data (a flipped bit, a changed scheme that fits the same
shapes, a float config value moved inside its range) run in ``verify`` mode only: nothing but a
digest can tell them from the original. The others run in both modes. The outcomes (typed-error,
identical, silently-different, non-typed-exception, hang, memory-blow-up) are those of
tests/fuzz_runner.py, which runs the cases; only ``typed-error`` and ``identical`` are acceptable,
in every class and mode.
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import fuzz_runner

MODES = ("verify", "no-verify")
IDS_SEED, IDS_LEN = 5, 8
DIGEST_KEY = "lowbit_manifest_digest"


def base_schemes() -> dict:
    from lowbit.scheme import QuantScheme

    return {
        "w4g32-sym": QuantScheme(bits=4, group_size=32),
        "w4g32-asym": QuantScheme(bits=4, group_size=32, symmetric=False),
        "w8-channel": QuantScheme(bits=8, granularity="channel"),
        "nf4": QuantScheme(format="nf4"),
    }


@dataclass
class Base:
    name: str
    raw: bytes
    header: dict
    data_start: int  # offset of the data section in ``raw``
    manifest: dict
    ref: Any  # logits of the unmutated file

    def tensor_span(self, name: str) -> tuple[int, int]:
        start, end = self.header[name]["data_offsets"]
        return self.data_start + start, self.data_start + end

    def tensors(self, suffix: str) -> list[str]:
        return sorted(k for k in self.header if k.endswith(suffix))


def input_ids():
    import torch

    return torch.randint(0, 256, (1, IDS_LEN), generator=torch.Generator().manual_seed(IDS_SEED))


def make_bases(directory: Path) -> dict[str, Base]:
    import torch
    from tiny_models import tiny_llama

    import lowbit
    from lowbit.io.checkpoint import load_checkpoint

    bases = {}
    for i, (name, scheme) in enumerate(base_schemes().items()):
        model = tiny_llama(10 + i)
        lowbit.quantize(model, scheme, progress=False)
        path = directory / f"{name}.safetensors"
        lowbit.save(model, path)
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        with torch.no_grad():
            ref = load_checkpoint(path)(input_ids()).logits
        bases[name] = Base(name, raw, header, 8 + n, json.loads(header["__metadata__"]["lowbit_manifest"]), ref)
    return bases


# ---------------------------------------------------------------------------
# file surgery
# ---------------------------------------------------------------------------
def rebuild(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def with_manifest(base: Base, edit: Callable[[dict], Optional[dict]], resign: bool = False) -> bytes:
    """The base with its manifest edited. ``edit`` may return ``{placeholder: raw JSON text}``:
    each ``"placeholder"`` string in the dumped manifest is replaced by its text (for values
    ``json.dumps`` cannot write, like 100,000 nested lists or 5,000-digit integers).
    ``resign``: recompute the manifest digest (a consistent but wrong manifest)."""
    manifest = copy.deepcopy(base.manifest)
    raw_values = edit(manifest) or {}
    text = json.dumps(manifest)
    for placeholder, raw in raw_values.items():
        text = text.replace(json.dumps(placeholder), raw)
    header = copy.deepcopy(base.header)
    header["__metadata__"]["lowbit_manifest"] = text
    if resign:
        from lowbit.io.digest import bytes_digest

        header["__metadata__"][DIGEST_KEY] = bytes_digest(text.encode())
    return rebuild(header, base.raw[base.data_start :])


def put_value(raw: bytearray, offset: int, dtype: str, value: float) -> None:
    import torch

    dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    b = torch.tensor([value], dtype=dt).view(torch.uint8).tolist()
    raw[offset : offset + len(b)] = bytes(b)


def get_value(raw: bytes, offset: int, dtype: str) -> float:
    import torch

    dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    size = torch.tensor([], dtype=dt).element_size()
    return float(torch.frombuffer(bytearray(raw[offset : offset + size]), dtype=dt)[0])


# ---------------------------------------------------------------------------
# mutations: (base, rng, mode) -> (bytes, note) or None when the base does not fit
# ---------------------------------------------------------------------------
def m_data_bitflip(base: Base, rng, mode):
    raw = bytearray(base.raw)
    spots = []
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(base.data_start, len(raw))
        bit = rng.randrange(8)
        raw[pos] ^= 1 << bit
        spots.append(f"{pos}.{bit}")
    return bytes(raw), "bits " + ",".join(spots)


def m_packed_bytes(base: Base, rng, mode):
    name = rng.choice(base.tensors(".qweight"))
    lo, hi = base.tensor_span(name)
    raw = bytearray(base.raw)
    for _ in range(rng.randint(1, 8)):
        raw[rng.randrange(lo, hi)] = rng.randrange(256)
    return bytes(raw), name


def m_zero_point_range(base: Base, rng, mode):
    zeros = base.tensors(".zero")
    if not zeros:
        return None
    name = rng.choice(zeros)
    lo, hi = base.tensor_span(name)
    raw = bytearray(base.raw)
    value = rng.choice([16, 17, 100, 128, 255])
    raw[rng.randrange(lo, hi)] = value
    return bytes(raw), f"{name} = {value}"


def m_scale_value(base: Base, rng, mode):
    name = rng.choice(base.tensors(".scale"))
    dtype = base.header[name]["dtype"]
    lo, hi = base.tensor_span(name)
    size = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    offset = lo + size * rng.randrange((hi - lo) // size)
    raw = bytearray(base.raw)
    old = get_value(raw, offset, dtype)
    choices = ["nan", "inf", "-inf", "negative", "tiny-negative"]
    if not (base.name == "nf4" and mode == "no-verify"):  # an all-zero nf4 block has absmax 0: valid
        choices.append("zero")
    kind = rng.choice(choices)
    value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "negative": -abs(old) or -1.0,
             "tiny-negative": -1e-30, "zero": 0.0}[kind]
    put_value(raw, offset, dtype, value)
    return bytes(raw), f"{name} = {kind}"


def _layer(base: Base, rng) -> str:
    return rng.choice(sorted(base.manifest["layers"]))


def m_format_change(base: Base, rng, mode):
    """A valid scheme that fits the same tensor shapes (only a digest can tell)."""
    layer = _layer(base, rng)
    scheme = base.manifest["layers"][layer]["scheme"]
    if scheme["format"] == "int" and scheme["bits"] == 4 and scheme["symmetric"]:
        change = rng.choice([{"format": "nf4"}, {"format": "fp4"}, {"scale_dtype": "float16"}])
    elif scheme["format"] == "nf4":
        change = rng.choice([{"format": "fp4"}, {"format": "int"}])
    elif scheme["bits"] == 8:
        change = rng.choice([{"activations": "int8"}, {"format": "fp8_e4m3"}, {"format": "fp8_e5m2"}])
    else:
        change = {"symmetric": True, "zero_point": "int"}  # caught: the file holds zero points

    def edit(m):
        m["layers"][layer]["scheme"].update(change)

    return with_manifest(base, edit), f"{layer} {change}"


INVALID_SCHEME_VALUES = {
    "bits": [0, 1, 9, 16, -4, "4", 4.0, None, True, 10**20],
    "group_size": [0, 1, -32, 33, 48, "32", 32.5, 10**20, True],
    "format": ["int4", "", "NF4", 4, None, ["int"], "fp16"],
    "granularity": ["row", "", None, 3, "GROUP"],
    "scale_dtype": ["float8", "", None, 32, "int8"],
    "symmetric": ["yes", 0, None],
    "zero_point": ["uint8", None, 0],
    "double_quant": ["yes", 1],
    "activations": ["int4", 8, "fp16"],
}


def m_scheme_fields(base: Base, rng, mode):
    layer = _layer(base, rng)
    key = rng.choice(sorted(INVALID_SCHEME_VALUES))
    value = rng.choice(INVALID_SCHEME_VALUES[key])

    def edit(m):
        m["layers"][layer]["scheme"][key] = value

    return with_manifest(base, edit, resign=mode == "no-verify"), f"{layer}.scheme.{key} = {value!r}"


def m_layout(base: Base, rng, mode):
    layer = _layer(base, rng)
    value = rng.choice(["lowbit.bitstream.v2", "lowbit.bitstream.v0", "", "gptq", "int32.le", None, 1, ["x"],
                        "".join(rng.choice("abcdefghij.") for _ in range(rng.randint(1, 30)))])

    def edit(m):
        if value is None and rng.random() < 0.5:
            del m["layers"][layer]["layout"]
        else:
            m["layers"][layer]["layout"] = value

    return with_manifest(base, edit, resign=mode == "no-verify"), f"{layer}.layout = {value!r}"


def m_alias_shadow(base: Base, rng, mode):
    stored = sorted(base.manifest["tensors"])
    alias = rng.choice(stored)
    target = rng.choice([t for t in stored if t != alias] + ["not.a.tensor"])

    def edit(m):
        m["aliases"][alias] = target

    return with_manifest(base, edit, resign=mode == "no-verify"), f"alias {alias} -> {target}"


_DIMS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings"]
CONFIG_INVALID = {
    **{d: [0, -1, -(10**9), 10**9, 10**20, 1e20, 2.5, "128", True, [], {}] for d in _DIMS},
    "rms_norm_eps": ["1e-06", None, [], {}, True, "__NaN__", "__Infinity__"],
    "rope_theta": ["10000", None, [], "__NaN__", "__-Infinity__"],
    "hidden_act": [1, [], True, "no_such_activation"],
    "tie_word_embeddings": ["true", 0, 1, None],
    "model_type": [123, None, [], "no_such_model", ""],
    "to_dict": [1, "x"],
    "__class__": ["x"],
}
CONFIG_VALID_BUT_DIFFERENT = {  # caught by the digest only
    "rms_norm_eps": [1e-5, 0.1, 0.0],
    "rope_theta": [500000.0, 10.0],
    "hidden_act": ["gelu", "relu"],
    "num_attention_heads": [2, 8],
    "head_dim": [16, 64, None],
    "max_position_embeddings": [32, 4096],
}


def m_config_value(base: Base, rng, mode):
    pools = dict(CONFIG_INVALID)
    if mode == "verify":
        for k, v in CONFIG_VALID_BUT_DIFFERENT.items():
            pools[k] = pools.get(k, []) + v
    key = rng.choice(sorted(pools))
    value = rng.choice(pools[key])
    raw = {}
    if isinstance(value, str) and value.startswith("__") and value.endswith("__") and key != "__class__":
        raw = {value: value.strip("_")}  # NaN / Infinity / -Infinity as bare JSON tokens

    def edit(m):
        m["model"]["config"][key] = value
        return raw

    return with_manifest(base, edit, resign=mode == "no-verify"), f"config.{key} = {value!r}"


LAYER_INVALID = {
    "in_features": [0, -1, 10**20, 10**20 + 1, 1e20, "128", None, 127, 120, 2**31, 96],
    "out_features": [0, -1, 10**20, 1e20, "128", None, 127, 2**31],
    "bias": ["true", 1, None, True],
    "n_outliers": [5, -1, "x", 10**20, 1],
    "scheme": [None, "w4", [], 4],
}


def m_layer_fields(base: Base, rng, mode):
    layer = _layer(base, rng)
    key = rng.choice(sorted(LAYER_INVALID))
    value = rng.choice(LAYER_INVALID[key])

    def edit(m):
        m["layers"][layer][key] = value

    return with_manifest(base, edit, resign=mode == "no-verify"), f"{layer}.{key} = {value!r}"


def _nested(depth: int, rng) -> str:
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    return opener * depth + "0" + closer * depth


def m_deep_json(base: Base, rng, mode):
    depth = rng.choice([65, 200, 1000, 5000, 100_000])
    where = rng.choice(["notes", "calibration", "config", "layer", "header"])
    nested = _nested(depth, rng)
    if where == "header":  # the safetensors header itself, outside the manifest
        h = json.dumps(base.header)
        h = h[:-1] + ', "__deep__": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0], "x": ' + nested + "}}"
        h = h.encode()
        return struct.pack("<Q", len(h)) + h + base.raw[base.data_start :], f"header depth {depth}"
    layer = _layer(base, rng)

    def edit(m):
        target = {"notes": (m, "notes"), "calibration": (m, "calibration"),
                  "config": (m["model"]["config"], "rope_scaling"), "layer": (m["layers"][layer], "extra")}[where]
        target[0][target[1]] = "__deep__"
        return {"__deep__": nested}

    return with_manifest(base, edit, resign=mode == "no-verify"), f"{where} depth {depth}"


def m_huge_int(base: Base, rng, mode):
    digits = rng.choice([41, 100, 4301, 5000, 100_000])
    number = "9" * digits if rng.random() < 0.8 else "-" + "9" * digits
    where = rng.choice(["format_version", "in_features", "config", "shape", "notes", "header"])
    if where == "header":
        name = rng.choice(sorted(k for k in base.header if k != "__metadata__"))
        h = json.dumps(base.header).replace(f'"{name}": {{', f'"{name}": {{"huge": {number}, ', 1).encode()
        return struct.pack("<Q", len(h)) + h + base.raw[base.data_start :], f"header {name} {digits} digits"
    layer = _layer(base, rng)
    tensor = rng.choice(sorted(base.manifest["tensors"]))

    def edit(m):
        slot = {"format_version": (m, "format_version"), "in_features": (m["layers"][layer], "in_features"),
                "config": (m["model"]["config"], rng.choice(_DIMS)), "notes": (m, "notes")}
        if where == "shape":
            m["tensors"][tensor]["shape"][0] = "__huge__"
        else:
            obj, key = slot[where]
            obj[key] = "__huge__"
        return {"__huge__": number}

    return with_manifest(base, edit, resign=mode == "no-verify"), f"{where} {digits} digits"


def m_truncation(base: Base, rng, mode):
    n = len(base.raw)
    cut = rng.choice([rng.randrange(n), rng.randrange(9), base.data_start, base.data_start - 1, n - 1,
                      rng.randrange(base.data_start, n)])
    return base.raw[:cut], f"cut at {cut} of {n}"


def m_header_bytes(base: Base, rng, mode):
    raw = bytearray(base.raw)
    spots = []
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(0, base.data_start)
        raw[pos] = rng.randrange(256) if rng.random() < 0.5 else raw[pos] ^ (1 << rng.randrange(8))
        spots.append(pos)
    return bytes(raw), f"bytes {spots}"


def m_header_struct(base: Base, rng, mode):
    """Edits of the safetensors tensor table: swapped or moved byte ranges, changed dtype or
    shape, removed or added entries, extra metadata."""
    header = copy.deepcopy(base.header)
    names = sorted(k for k in header if k != "__metadata__")
    a = rng.choice(names)
    kind = rng.choice(["swap", "dtype", "shape", "drop", "extra-metadata", "offsets"])
    data = base.raw[base.data_start :]
    if kind == "swap":
        size = lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0]  # noqa: E731
        partners = [b for b in names if b != a and size(b) == size(a) and header[b]["dtype"] == header[a]["dtype"]]
        if not partners:
            return None
        b = rng.choice(partners)
        if header[a]["shape"] != header[b]["shape"]:
            header[a]["shape"], header[b]["shape"] = header[b]["shape"], header[a]["shape"]
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        note = f"swap {a} <-> {b}"
    elif kind == "dtype":
        header[a]["dtype"] = rng.choice(["F16", "BF16", "U8", "I8", "F64", "I32", "X9"])
        note = f"{a} dtype {header[a]['dtype']}"
    elif kind == "shape":
        shape = header[a]["shape"]
        if shape:
            i = rng.randrange(len(shape))
            shape[i] = rng.choice([0, shape[i] * 2, max(shape[i] // 2, 1), shape[i] + 1])
        else:
            header[a]["shape"] = [1, 1]
        note = f"{a} shape {header[a]['shape']}"
    elif kind == "drop":
        del header[a]
        note = f"drop {a}"
    elif kind == "extra-metadata":
        header["__metadata__"]["extra"] = "harmless"
        note = "extra metadata key"
    else:
        start, end = header[a]["data_offsets"]
        header[a]["data_offsets"] = [start + rng.choice([-1, 1, 4]), end + rng.choice([-1, 0, 1, 4])]
        note = f"{a} offsets {header[a]['data_offsets']}"
    return rebuild(header, data), note


def m_manifest_text(base: Base, rng, mode):
    """Characters inside the manifest string swapped for others of the same class (digits for
    digits, letters for letters): the header stays valid JSON, the manifest changes."""
    header = copy.deepcopy(base.header)
    text = list(header["__metadata__"]["lowbit_manifest"])
    spots = []
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(text))
        c = text[i]
        if c.isdigit():
            text[i] = rng.choice("0123456789")
        elif c.isalpha() and c.isascii():
            text[i] = rng.choice("abcdefghijklmnopqrstuvwxyz")
        spots.append(i)
    header["__metadata__"]["lowbit_manifest"] = "".join(text)
    return rebuild(header, base.raw[base.data_start :]), f"chars {spots}"


def m_unmodified(base: Base, rng, mode):
    return base.raw, "control: the base itself"


# class -> (mutator, modes)
VERIFY_ONLY = ("verify",)
BOTH = MODES
MUTATORS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "unmodified": (m_unmodified, BOTH),
    "data_bitflip": (m_data_bitflip, VERIFY_ONLY),
    "packed_bytes": (m_packed_bytes, VERIFY_ONLY),
    "zero_point_range": (m_zero_point_range, BOTH),
    "scale_value": (m_scale_value, BOTH),
    "format_change": (m_format_change, VERIFY_ONLY),
    "scheme_fields": (m_scheme_fields, BOTH),
    "layout": (m_layout, BOTH),
    "alias_shadow": (m_alias_shadow, BOTH),
    "config_value": (m_config_value, BOTH),
    "layer_fields": (m_layer_fields, BOTH),
    "deep_json": (m_deep_json, BOTH),
    "huge_int": (m_huge_int, BOTH),
    "truncation": (m_truncation, BOTH),
    "header_bytes": (m_header_bytes, VERIFY_ONLY),
    "header_struct": (m_header_struct, VERIFY_ONLY),
    "manifest_text": (m_manifest_text, VERIFY_ONLY),
}
CLASSES = [(cls, mode) for cls, (_, modes) in MUTATORS.items() for mode in modes]


@dataclass
class Case:
    index: int
    cls: str
    mode: str
    base: Base
    data: bytes
    note: str


def generate(bases: dict[str, Base], n: int, seed: int):
    """``n`` cases cycling through every (class, mode) pair (each equally often); the base and the
    rest come from a generator seeded by (seed, case index)."""
    for i in range(n):
        cls, mode = CLASSES[i % len(CLASSES)]
        rng = random.Random(f"{seed}:{i}")
        mutator = MUTATORS[cls][0]
        for name in rng.sample(sorted(bases), len(bases)):
            m = mutator(bases[name], rng, mode)
            if m is not None:
                break
        else:
            raise AssertionError(f"mutator {cls} applies to no base")
        data, note = m
        yield Case(i, cls, mode, bases[name], data, note)


# ---------------------------------------------------------------------------
# running cases (tests/fuzz_runner.py forks, limits and classifies)
# ---------------------------------------------------------------------------
class Result(fuzz_runner.Result):
    def line(self) -> str:
        c = self.case
        return f"#{c.index} {c.cls}/{c.mode} on {c.base.name} ({c.note[:120]}): {self.outcome} {self.detail[:300]}"


def run_case(case: Case, workdir: Path, time_limit: float = 20.0, mem_bytes: int = 2 << 30) -> Result:
    from lowbit.io.checkpoint import load_checkpoint

    path = workdir / f"case{case.index}.safetensors"
    path.write_bytes(case.data)
    try:
        return fuzz_runner.run_in_child(
            case, lambda: load_checkpoint(path, verify=case.mode == "verify")(input_ids()).logits, case.base.ref,
            time_limit, mem_bytes, Result,
        )
    finally:
        path.unlink()


def run_cases(cases, time_limit: float = 20.0, mem_bytes: int = 2 << 30,
              on_result: Optional[Callable[[Result], None]] = None) -> list[Result]:
    return fuzz_runner.run_all(cases, lambda case, workdir: run_case(case, workdir, time_limit, mem_bytes),
                               on_result=on_result)


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
def counts(results: list[Result]) -> dict[tuple[str, str], Counter]:
    return fuzz_runner.counts(results, lambda r: (r.case.cls, r.case.mode))


def markdown_table(results: list[Result]) -> str:
    table = sorted(counts(results).items(), key=lambda kv: (list(MUTATORS).index(kv[0][0]), kv[0][1]))
    return fuzz_runner.markdown_table(("mutation class", "mode"), [((cls, mode), c) for (cls, mode), c in table])
