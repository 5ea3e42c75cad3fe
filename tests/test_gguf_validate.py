"""GGUF import never accepts a bad file: one test per check of ``lowbit.io.gguf.validate``
(structure), ``hparams`` (metadata) and the reader's value checks, each on a small GGUF
written by ``export_gguf`` from a tiny random Llama and then mutated; and the files real
writers produce (gguf-py at other alignments, without the last padding, tokenizer-only,
the default SmolLM2 model) still load.
"""

from __future__ import annotations

import math
import re
import struct

import numpy as np

import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf import GGUFValueType as V

from lowbit.errors import (
    CheckpointError,
    TensorMismatchError,
    TruncatedCheckpointError,
    UnsupportedModelError,
)
from lowbit.io.gguf import export_gguf, import_gguf, read_gguf, validate
from lowbit.io.gguf.blocks import FP16_FIELDS

from gguf_helpers import patch_bytes, rewrite_gguf, write_tokenizer_gguf
from tiny_models import random_ids, tiny_llama


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("validate")
    tok = write_tokenizer_gguf(d / "tok.gguf")
    out = {"tok": tok}
    for ftype in ("Q8_0", "F16", "BF16", "Q4_1"):
        out[ftype] = d / f"m-{ftype}.gguf"
        export_gguf(tiny_llama(0), out[ftype], ftype, source_gguf=tok)
    return out


@pytest.fixture
def q8(files):
    return files["Q8_0"]


def layout(path):
    return validate.scan_gguf(path)


def tensor(path, name) -> validate.TensorInfo:
    return next(t for t in layout(path).tensors if t.name == name)


def entry(path, key) -> validate.KVEntry:
    return layout(path).kv[key]


def logits(model):
    with torch.no_grad():
        return model(random_ids(1, 8)).logits


@pytest.fixture
def no_gguf_py(monkeypatch):
    """gguf-py's reader must not even start on the file."""

    def boom(self, *a, **k):
        raise AssertionError("gguf-py's GGUFReader ran on a file lowbit should have refused first")

    monkeypatch.setattr(GGUFReader, "__init__", boom)


# ----------------------------------------------------------------------------- header
def test_too_short_and_bad_magic(tmp_path, q8):
    (tmp_path / "short.gguf").write_bytes(q8.read_bytes()[:20])
    with pytest.raises(TruncatedCheckpointError, match="shorter than a GGUF header"):
        import_gguf(tmp_path / "short.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGUG" + q8.read_bytes()[4:])
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        import_gguf(tmp_path / "magic.gguf")


@pytest.mark.parametrize("version,match", [(3 << 16, "big-endian"), (1, "version 1 is not supported"), (7, "version 7")])
def test_unsupported_version(tmp_path, q8, version, match):
    bad = patch_bytes(q8, tmp_path / "v.gguf", 4, "I", version)
    with pytest.raises(UnsupportedModelError, match=match):
        import_gguf(bad)


@pytest.mark.parametrize("offset,what", [(8, "tensors"), (16, "metadata entries")])
@pytest.mark.parametrize("count", [2**64 - 1, 2**40, 100_000])
def test_huge_header_counts_never_reach_gguf_py(tmp_path, q8, no_gguf_py, offset, what, count):
    bad = patch_bytes(q8, tmp_path / "n.gguf", offset, "Q", count)
    with pytest.raises(TruncatedCheckpointError, match=rf"claims {count} {what}, but a file of \d+ bytes holds at most"):
        import_gguf(bad)


# ----------------------------------------------------------------------------- metadata structure
def test_huge_string_lengths(tmp_path, q8, no_gguf_py):
    e = entry(q8, "general.name")
    bad = patch_bytes(q8, tmp_path / "k.gguf", e.entry_offset, "Q", 2**63)  # the key's length
    with pytest.raises(TruncatedCheckpointError, match=r"metadata key #\d+ \(9223372036854775808 bytes\)"):
        import_gguf(bad)
    bad = patch_bytes(q8, tmp_path / "s.gguf", e.value_offset, "Q", 2**40)  # the value's length
    with pytest.raises(TruncatedCheckpointError, match="string value of 'general.name'"):
        import_gguf(bad)


def test_huge_array_counts(tmp_path, q8, no_gguf_py, monkeypatch):
    e = entry(q8, "tokenizer.ggml.token_type")
    bad = patch_bytes(q8, tmp_path / "a.gguf", e.value_offset + 4, "Q", 2**62)
    with pytest.raises(CheckpointError, match=r"'tokenizer.ggml.token_type' claims 4611686018427387904 elements"):
        import_gguf(bad)
    bad = patch_bytes(q8, tmp_path / "b.gguf", e.value_offset + 4, "Q", 10**6)  # within the cap, past the file
    with pytest.raises(TruncatedCheckpointError, match="1000000-element array 'tokenizer.ggml.token_type'"):
        import_gguf(bad)
    monkeypatch.setattr(validate, "MAX_ARRAY_ELEMENTS", 300)  # the tokens (256) and the types (256) together
    with pytest.raises(CheckpointError, match="lowbit reads at most 300 array elements per file"):
        import_gguf(q8)


def test_nested_array_and_unknown_value_type(tmp_path, q8, no_gguf_py):
    e = entry(q8, "tokenizer.ggml.tokens")
    bad = patch_bytes(q8, tmp_path / "nested.gguf", e.value_offset, "I", int(V.ARRAY))
    with pytest.raises(CheckpointError, match="'tokenizer.ggml.tokens' is an array of arrays"):
        import_gguf(bad)
    e = entry(q8, "llama.block_count")
    bad = patch_bytes(q8, tmp_path / "type.gguf", e.value_offset - 4, "I", 13)
    with pytest.raises(CheckpointError, match="'llama.block_count' has value type id 13, which GGUF does not define"):
        import_gguf(bad)


def test_bad_utf8_key(tmp_path, q8, no_gguf_py):
    e = entry(q8, "llama.context_length")
    bad = patch_bytes(q8, tmp_path / "utf.gguf", e.entry_offset + 8 + 3, "B", 0xFF)
    with pytest.raises(CheckpointError, match=r"metadata key #\d+ at byte \d+ is not valid UTF-8"):
        import_gguf(bad)


def test_duplicate_key(tmp_path, q8, no_gguf_py):
    raw, lay = q8.read_bytes(), layout(q8)
    entries = list(lay.kv.values())
    b = lay.kv["llama.block_count"]
    kv = [raw[x.entry_offset : x.end] for x in entries] + [raw[b.entry_offset : b.end]]
    body = raw[:8] + struct.pack("<QQ", len(lay.tensors), len(kv)) + b"".join(kv) + raw[entries[-1].end : lay.infos_end]
    body += bytes(validate.padded(len(body), 32) - len(body))
    (tmp_path / "dup.gguf").write_bytes(body + raw[lay.data_start :])
    with pytest.raises(CheckpointError, match="'llama.block_count' appears twice"):
        import_gguf(tmp_path / "dup.gguf")


@pytest.mark.parametrize(
    "value,vtype,match",
    [(0, V.UINT32, "is 0; it must be a power of two"), (48, V.UINT32, "is 48"), (1 << 20, V.UINT32, "is 1048576"),
     (32, V.UINT64, "has type UINT64; GGUF requires UINT32")],
)
def test_bad_alignment(tmp_path, q8, value, vtype, match):
    if vtype == V.UINT32:
        good = rewrite_gguf(q8, tmp_path / "a64.gguf", alignment=64)
        bad = patch_bytes(good, tmp_path / "bad.gguf", entry(good, "general.alignment").value_offset, "I", value)
    else:  # the data is laid out at 32, the key says 32, but as a UINT64
        bad = rewrite_gguf(q8, tmp_path / "bad.gguf", set_kv={"general.alignment": (value, vtype)})
    with pytest.raises(CheckpointError, match=rf"'general.alignment' {match}"):
        read_gguf(bad)


# ----------------------------------------------------------------------------- tensor infos
def test_tensor_name_too_long_or_twice(tmp_path, q8):
    t = tensor(q8, "blk.0.attn_q.weight")
    bad = patch_bytes(q8, tmp_path / "long.gguf", t.info_offset, "Q", 64)
    with pytest.raises(CheckpointError, match="is 64 bytes long; the limit is 63"):
        import_gguf(bad)
    raw = bytearray(q8.read_bytes())
    name = b"blk.0.attn_k.weight"
    raw[t.info_offset + 8 : t.info_offset + 8 + len(name)] = name  # same length as attn_q
    (tmp_path / "dup.gguf").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="tensor 'blk.0.attn_k.weight' appears twice"):
        import_gguf(tmp_path / "dup.gguf")


@pytest.mark.parametrize("n_dims", [0, 5])
def test_dim_count(tmp_path, q8, n_dims):
    t = tensor(q8, "output_norm.weight")
    bad = patch_bytes(q8, tmp_path / "nd.gguf", t.dims_offset - 4, "I", n_dims)
    with pytest.raises(CheckpointError, match=rf"'output_norm.weight' has {n_dims} dims; GGUF tensors have 1 to 4"):
        import_gguf(bad)


def test_zero_and_huge_dims(tmp_path, q8):
    t = tensor(q8, "blk.0.ffn_up.weight")
    bad = patch_bytes(q8, tmp_path / "zero.gguf", t.dims_offset + 8, "Q", 0)
    with pytest.raises(CheckpointError, match=r"'blk.0.ffn_up.weight' has dims \[128, 0\]; every dim must be >= 1"):
        import_gguf(bad)
    bad = patch_bytes(q8, tmp_path / "huge.gguf", t.dims_offset + 8, "Q", 2**63)
    with pytest.raises(CheckpointError, match=r"'blk.0.ffn_up.weight' \(Q8_0, dims \[128, 9223372036854775808\]\) would take"):
        import_gguf(bad)


# ----------------------------------------------------------------------------- data layout (and type ids that do not fit)
@pytest.mark.parametrize("name,field,fmt,value,match", [
    pytest.param("output_norm.weight", "type_offset", "I", lambda t: int(T.Q4_K),
                 "'output_norm.weight' .* a row of 128 is not a whole number of 256-weight",
                 id="row-not-whole-blocks"),  # F32 [128]: as Q4_K (256-weight blocks) 128 does not divide
    pytest.param("blk.1.ffn_down.weight", "offset_offset", "Q", lambda t: t.offset + 2,
                 "'blk.1.ffn_down.weight' .* not a multiple of the alignment 32", id="offset-misaligned"),
    pytest.param("blk.0.attn_v.weight", "offset_offset", "Q", lambda t: t.offset + 64,
                 "'blk.0.attn_v.weight' .* leaving 64 unexplained bytes after tensor 'blk.0.attn_k.weight'",
                 id="offset-leaving-a-gap"),
    # Q8_0 -> Q4_0 keeps the tensor inside the file; the next tensor's offset no longer follows
    pytest.param("blk.0.attn_q.weight", "type_offset", "I", lambda t: int(T.Q4_0),
                 "leaving .* unexplained bytes after tensor 'blk.0.attn_q.weight'", id="type-id-bytes-still-fit"),
])
def test_one_patched_tensor_info_field(tmp_path, q8, name, field, fmt, value, match):
    t = tensor(q8, name)
    bad = patch_bytes(q8, tmp_path / "bad.gguf", getattr(t, field), fmt, value(t))
    with pytest.raises(CheckpointError, match=match):
        import_gguf(bad)


def test_offset_overlapping_another_tensor(tmp_path, q8):
    lay = layout(q8)
    i = next(i for i, t in enumerate(lay.tensors) if t.name == "blk.0.attn_v.weight")
    t, prev = lay.tensors[i], lay.tensors[i - 1]
    for j, off in enumerate((prev.offset, t.offset - 32, lay.tensors[0].offset)):
        bad = patch_bytes(q8, tmp_path / f"o{j}.gguf", t.offset_offset, "Q", off)
        with pytest.raises(CheckpointError, match=r"'blk.0.attn_v.weight' .* inside the data of tensor '.*' \(tensor data must not overlap"):
            import_gguf(bad)


def test_trailing_data(tmp_path, q8):
    bad = tmp_path / "trail.gguf"
    for tail in (b"\x00", b"garbage" * 100):
        bad.write_bytes(q8.read_bytes() + tail)
        with pytest.raises(CheckpointError, match=rf"{len(tail)} bytes of trailing data after the last tensor 'output_norm.weight'"):
            import_gguf(bad)


def test_writers_padding_after_the_last_tensor(tmp_path):
    """gguf-py pads after every tensor, the last one too; a file without that last padding is accepted
    (llama.cpp's loader accepts it), anything past the padding is not."""
    path = tmp_path / "odd.gguf"
    w = GGUFWriter(str(path), arch="llama")
    w.add_tensor("a", np.arange(3, dtype=np.float32))
    w.add_tensor("b", np.arange(5, dtype=np.float32))  # 20 bytes + 12 of padding
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    lay = layout(path)
    assert lay.data_end == len(data) and lay.tensors[1].offset == 32
    assert [t.name for t in read_gguf(path).tensors] == ["a", "b"]
    for n, ok in ((12, True), (1, True), (-1, False)):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:-n] if n > 0 else data + b"\x00")
        if ok:
            read_gguf(cut)
        else:
            with pytest.raises(CheckpointError, match="1 bytes of trailing data after the last tensor 'b'"):
                read_gguf(cut)
    (tmp_path / "cut13.gguf").write_bytes(data[:-13])
    with pytest.raises(TruncatedCheckpointError, match="tensor 'b' .* ends at byte"):
        read_gguf(tmp_path / "cut13.gguf")


# ----------------------------------------------------------------------------- files that must load
@pytest.mark.parametrize("alignment", [1, 8, 64, 4096])
def test_gguf_py_files_at_other_alignments_load_identically(tmp_path, q8, alignment):
    other = rewrite_gguf(q8, tmp_path / f"a{alignment}.gguf", alignment=alignment)
    assert layout(other).alignment == alignment
    assert torch.equal(logits(import_gguf(other)), logits(import_gguf(q8)))


def test_tokenizer_only_file_reads(files):
    r = read_gguf(files["tok"])
    assert not r.tensors and len(r.fields["tokenizer.ggml.tokens"].contents()) == 256


def test_default_model_file_passes_every_check():
    from lowbit.model.loading import default_model_path

    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"default model {path} is not installed")
    from lowbit.io.gguf.reader import llama_config

    lay = validate.scan_gguf(path)
    assert lay.data_end == lay.file_size and len(lay.tensors) == 272
    cfg = llama_config(read_gguf(path))
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.rope_theta) == (30, 576, 9, 100000.0)


# ----------------------------------------------------------------------------- metadata values
def _meta(tmp_path, src, **kw):
    return rewrite_gguf(src, tmp_path / "meta.gguf", **kw)


def test_block_count_huge_fails_fast_before_the_model_is_built(tmp_path, q8, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("the model was built before block_count was checked")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "__init__", boom)
    bad = patch_bytes(q8, tmp_path / "b.gguf", entry(q8, "llama.block_count").value_offset, "I", 10**9)
    with pytest.raises(CheckpointError, match="llama.block_count is 1000000000; it must be an integer from 1 to 65536"):
        import_gguf(bad)


@pytest.mark.parametrize("n", [1, 3, 64])
def test_block_count_must_match_the_blocks_present(tmp_path, q8, n):
    bad = patch_bytes(q8, tmp_path / "b.gguf", entry(q8, "llama.block_count").value_offset, "I", n)
    with pytest.raises(TensorMismatchError, match=rf"llama.block_count is {n} but the file has tensors for 2 blocks \(indices 0..1\)"):
        import_gguf(bad)


def test_head_count_must_divide_the_embedding_length(tmp_path, q8):
    drop = ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length")
    bad = _meta(tmp_path, q8, drop=drop, set_kv={"llama.attention.head_count": (3, V.UINT32),
                                                 "llama.attention.head_count_kv": (3, V.UINT32)})
    with pytest.raises(CheckpointError, match="head_count 3 does not divide llama.embedding_length 128"):
        import_gguf(bad)
    ok = _meta(tmp_path, q8, drop=drop)  # head size 128 / 4 = 32 from the head count: loads
    assert torch.equal(logits(import_gguf(ok)), logits(import_gguf(q8)))


def test_kv_heads_must_divide_the_heads(tmp_path, q8):
    bad = patch_bytes(q8, tmp_path / "kv.gguf", entry(q8, "llama.attention.head_count_kv").value_offset, "I", 3)
    with pytest.raises(CheckpointError, match="head_count_kv 3 does not divide llama.attention.head_count 4"):
        import_gguf(bad)


def test_head_size_odd_or_inconsistent(tmp_path, q8):
    bad = _meta(tmp_path, q8, set_kv={k: (33, V.UINT32) for k in (
        "llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length")})
    with pytest.raises(CheckpointError, match="odd head size 33"):
        import_gguf(bad)
    bad = patch_bytes(q8, tmp_path / "kl.gguf", entry(q8, "llama.attention.key_length").value_offset, "I", 64)
    with pytest.raises(UnsupportedModelError, match="key_length is 64 but the rotary head size is 32"):
        import_gguf(bad)


@pytest.mark.parametrize("key", ["llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"])
@pytest.mark.parametrize("value", [0.0, -1e-5, math.nan, math.inf, -math.inf, 1e30])
def test_float_hparams_finite_and_in_range(tmp_path, q8, key, value):
    bad = patch_bytes(q8, tmp_path / "f.gguf", entry(q8, key).value_offset, "f", value)
    with pytest.raises(CheckpointError, match=rf"GGUF metadata {key} is .*; it must be finite with"):
        import_gguf(bad)


def test_epsilon_of_one_and_base_of_one_refused(tmp_path, q8):
    for key, v in (("llama.attention.layer_norm_rms_epsilon", 1.0), ("llama.rope.freq_base", 1.0)):
        bad = patch_bytes(q8, tmp_path / "f.gguf", entry(q8, key).value_offset, "f", v)
        with pytest.raises(CheckpointError, match=rf"{key} is 1.0"):
            import_gguf(bad)


@pytest.mark.parametrize(
    "key,value,vtype,sub,held",
    [
        ("llama.block_count", "2", V.STRING, None, "STRING where an integer"),
        ("llama.block_count", [2], V.ARRAY, V.UINT32, r"an array \(UINT32\) where an integer"),
        ("llama.block_count", 2.0, V.FLOAT32, None, "FLOAT32 where an integer"),
        ("llama.block_count", True, V.BOOL, None, "BOOL where an integer"),
        ("llama.embedding_length", [128, 128], V.ARRAY, V.UINT32, "an array"),
        ("llama.rope.freq_base", 10000, V.UINT32, None, "UINT32 where a FLOAT32/FLOAT64"),
        ("llama.attention.layer_norm_rms_epsilon", "1e-5", V.STRING, None, "STRING where a FLOAT32"),
        ("general.architecture", 1, V.UINT32, None, "UINT32 where a string"),
    ],
)
def test_wrong_metadata_value_types(tmp_path, q8, key, value, vtype, sub, held):
    spec = (value, vtype, sub) if sub is not None else (value, vtype)
    bad = _meta(tmp_path, q8, set_kv={key: spec})
    with pytest.raises(CheckpointError, match=rf"GGUF metadata key '{key}' holds {held}"):
        import_gguf(bad)


@pytest.mark.parametrize("value", [0, 2**31])
def test_context_length_range(tmp_path, q8, value):
    bad = patch_bytes(q8, tmp_path / "c.gguf", entry(q8, "llama.context_length").value_offset, "I", value)
    with pytest.raises(CheckpointError, match=rf"llama.context_length is {value}; it must be an integer from 1"):
        import_gguf(bad)


def test_vocab_size_and_token_ids(tmp_path, q8):
    bad = patch_bytes(q8, tmp_path / "v.gguf", entry(q8, "llama.vocab_size").value_offset, "I", 255)
    with pytest.raises(TensorMismatchError, match="llama.vocab_size is 255 but token_embd.weight has 256 rows"):
        import_gguf(bad)
    bad = patch_bytes(q8, tmp_path / "bos.gguf", entry(q8, "tokenizer.ggml.bos_token_id").value_offset, "I", 256)
    with pytest.raises(CheckpointError, match="tokenizer.ggml.bos_token_id is 256; it must be an integer from 0 to 255"):
        import_gguf(bad)


def test_missing_required_key(tmp_path, q8):
    bad = _meta(tmp_path, q8, drop=("llama.embedding_length",))
    with pytest.raises(CheckpointError, match="key 'llama.embedding_length' is missing"):
        import_gguf(bad)


@pytest.mark.parametrize(
    "set_kv,match",
    [
        ({"llama.logit_scale": (0.5, V.FLOAT32)}, "'llama.logit_scale' .* is not one lowbit interprets"),
        ({"llama.rope.freq_scale": (0.5, V.FLOAT32)}, "'llama.rope.freq_scale'"),
        ({"llama.rope.scaling.type": ("linear", V.STRING)}, "scaled RoPE"),
        ({"llama.rope.scaling.factor": (4.0, V.FLOAT32)}, "scaled RoPE"),
        ({"llama.expert_count": (8, V.UINT32)}, "mixture-of-experts"),
    ],
)
def test_llama_keys_lowbit_does_not_interpret(tmp_path, q8, set_kv, match):
    bad = _meta(tmp_path, q8, set_kv=set_kv)
    with pytest.raises(UnsupportedModelError, match=match):
        import_gguf(bad)


@pytest.mark.parametrize("key", ["lhama.rope.freq_base", "llama/rope.freq_base", "llama.rope.freq_bise"])
def test_damaged_copy_of_a_known_key_is_refused(tmp_path, q8, key):
    """A bit flip in a known key's name would make it read as absent (its default applying
    silently); a key one or two characters away from a known one is refused instead."""
    bad = _meta(tmp_path, q8, drop=("llama.rope.freq_base",), set_kv={key: (5e5, V.FLOAT32)})
    with pytest.raises(CheckpointError, match=f"{re.escape(repr(key))} looks like a damaged 'llama.rope.freq_base'"):
        import_gguf(bad)


def test_harmless_llama_keys_accepted(tmp_path, q8):
    ok = _meta(tmp_path, q8, set_kv={"llama.rope.scaling.type": ("none", V.STRING),
                                     "llama.rope.scaling.finetuned": (False, V.BOOL),
                                     "llama.expert_count": (0, V.UINT32)})
    assert torch.equal(logits(import_gguf(ok)), logits(import_gguf(q8)))


# ----------------------------------------------------------------------------- tensor values
def _put_value(tmp_path, src, name, byte, fmt, value):
    t = tensor(src, name)
    return patch_bytes(src, tmp_path / "val.gguf", layout(src).data_start + t.offset + byte, fmt, value)


@pytest.mark.parametrize("bits", [0x7FC00000, 0x7F800000, 0xFF800000])
def test_non_finite_f32_weight(tmp_path, q8, bits):
    bad = _put_value(tmp_path, q8, "blk.1.ffn_norm.weight", 4 * 17, "I", bits)
    with pytest.raises(CheckpointError, match=r"tensor 'blk.1.ffn_norm.weight' \(F32, shape \(128,\)\) holds (nan|inf|-inf) at \(17,\)"):
        import_gguf(bad)


@pytest.mark.parametrize("ftype,bits", [("F16", 0x7C00), ("F16", 0x7E00), ("BF16", 0x7F80), ("BF16", 0xFFC0)])
def test_non_finite_half_weight(tmp_path, files, ftype, bits):
    bad = _put_value(tmp_path, files[ftype], "blk.0.attn_output.weight", 2 * (128 * 3 + 5), "H", bits)
    with pytest.raises(CheckpointError, match=rf"tensor 'blk.0.attn_output.weight' \({ftype}, .* at \(3, 5\)"):
        import_gguf(bad)


@pytest.mark.parametrize("as_is", [False, True])
@pytest.mark.parametrize("bits", [0x7E00, 0x7C00, 0xFC00])
def test_non_finite_q8_0_scale(tmp_path, q8, as_is, bits):
    """as_is=True keeps the codes and scales without decoding them: the scales are checked anyway."""
    bad = _put_value(tmp_path, q8, "blk.0.ffn_gate.weight", 34 * 9 + FP16_FIELDS[T.Q8_0][0], "H", bits)
    with pytest.raises(CheckpointError, match=r"tensor 'blk.0.ffn_gate.weight' \(Q8_0\): the fp16 scale of block 9 is"):
        import_gguf(bad, as_is=as_is)


def test_non_finite_q4_1_min(tmp_path, files):
    src = files["Q4_1"]
    t = tensor(src, "blk.0.ffn_up.weight")
    assert T(t.type_id) == T.Q4_1
    bad = _put_value(tmp_path, src, t.name, 20 * 4 + 2, "H", 0x7E00)
    with pytest.raises(CheckpointError, match=r"'blk.0.ffn_up.weight' \(Q4_1\): the fp16 min of block 4 is nan"):
        import_gguf(bad, as_is=True)


# ----------------------------------------------------------------------------- export's source_gguf
def test_export_source_gguf_is_checked_too(tmp_path, files):
    """export_gguf copies the tokenizer from source_gguf through the same checks."""
    tok = files["tok"]
    e = entry(tok, "tokenizer.ggml.tokens")
    first_token = e.value_offset + 4 + 8 + 8  # element type, count, the first string's length
    bad = patch_bytes(tok, tmp_path / "utf.gguf", first_token, "B", 0xFF)
    with pytest.raises(CheckpointError, match="metadata key 'tokenizer.ggml.tokens' holds a string that is not valid UTF-8"):
        export_gguf(tiny_llama(0), tmp_path / "out.gguf", "Q8_0", source_gguf=bad)
    bad = patch_bytes(tok, tmp_path / "n.gguf", e.value_offset + 4, "Q", 2**60)
    with pytest.raises(CheckpointError, match="'tokenizer.ggml.tokens' claims"):
        export_gguf(tiny_llama(0), tmp_path / "out.gguf", "Q8_0", source_gguf=bad)
    assert not (tmp_path / "out.gguf").exists()
