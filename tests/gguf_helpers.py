"""Helpers for the GGUF tests: a tiny byte-level BPE tokenizer in GGUF metadata."""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFWriter


def byte_level_chars() -> list[str]:
    """GPT-2's byte -> printable unicode map (the byte-level BPE alphabet), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(keep, cs))
    return [chr(table[b]) for b in range(256)]


def write_tokenizer_gguf(path: Path, vocab_size: int = 256) -> Path:
    """A GGUF holding only tokenizer.* metadata for a ``vocab_size``-token byte-level BPE vocab:
    token 0 is ``<|endoftext|>`` (bos/eos), then byte tokens, then one merge ``Ġ t``."""
    chars = byte_level_chars()
    tokens = ["<|endoftext|>"] + chars[: vocab_size - 2] + ["Ġt"]
    assert "Ġ" in tokens and "Ċ" in tokens and "t" in tokens and len(tokens) == vocab_size
    types = [3] + [1] * (vocab_size - 1)
    w = GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def rewrite_gguf(src: Path, dst: Path, set_kv: dict | None = None, drop: tuple = (), alignment: int | None = None,
                 tensors=None) -> Path:
    """Copy a GGUF with gguf-py's writer: ``set_kv`` maps a key to ``(value, GGUFValueType[, sub_type])``
    (added or replaced), ``drop`` lists keys to leave out, ``alignment`` writes general.alignment,
    ``tensors`` (name -> (array, GGML type)) replaces the tensors (default: copied)."""
    from gguf import GGUFReader, GGUFValueType

    set_kv = dict(set_kv or {})
    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in drop or name in set_kv or name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    for name, (value, vtype, *sub) in set_kv.items():
        if name == "general.architecture":
            w.kv_data[0].pop(name, None)
        w.add_key_value(name, value, vtype, sub_type=sub[0] if sub else None)
    if tensors is None:
        import numpy as np

        tensors = {t.name: (np.asarray(t.data), t.tensor_type) for t in r.tensors}
    for name, (data, gtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=gtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def patch_bytes(src: Path, dst: Path, offset: int, fmt: str, value) -> Path:
    """Copy ``src`` to ``dst`` with ``struct.pack('<' + fmt, value)`` written at ``offset``."""
    import struct

    data = bytearray(src.read_bytes())
    struct.pack_into("<" + fmt, data, offset, value)
    dst.write_bytes(bytes(data))
    return dst
