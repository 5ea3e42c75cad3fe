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
