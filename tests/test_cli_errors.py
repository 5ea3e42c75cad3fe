"""Every CLI failure is one line on stderr and a non-zero exit, never a traceback; what the CLI
loads is never unpickled and never gets randomly initialised weights bolted on.

Synthetic models only (tiny random Llama and BERT saved to tmp dirs, no downloads).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
import transformers
from tiny_models import tiny_llama

import lowbit
import lowbit.cli
from lowbit.cli import main
from lowbit.errors import ModelSourceError, UnsupportedModelError
from lowbit.model.loading import load_pretrained


def _save_tokenizer(d):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(63)} | {"<unk>": 63}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<unk>").save_pretrained(d)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_llama(tie=False).save_pretrained(d)
    _save_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(d, safe_serialization=True)
    _save_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8))
    lowbit.quantize(model, lowbit.QuantScheme(bits=4, group_size=32), progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "good.safetensors"
    lowbit.save(model, path)
    return path


def _run(capsys, argv):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.strip()


def _rewrite(src, dst, edit_manifest=None, header_bytes=None):
    """A copy of checkpoint ``src`` with its manifest edited, or with a raw header."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    if header_bytes is None:
        header = json.loads(raw[8:8 + n])
        manifest = json.loads(header["__metadata__"]["lowbit_manifest"])
        manifest = edit_manifest(manifest)
        header["__metadata__"]["lowbit_manifest"] = manifest if isinstance(manifest, str) else json.dumps(manifest)
        header_bytes = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + raw[8 + n:])
    return dst


# -- bad files and paths ----------------------------------------------------------------------
def _huge_features(m):
    for layer in m["layers"].values():
        layer["in_features"] = 1e400
    return json.dumps(m).replace("Infinity", "1e400")


@pytest.mark.parametrize("kind", ["deep-header", "deep-manifest", "huge-number", "empty", "garbage", "directory"])
def test_bad_checkpoint_files_are_one_line_errors(kind, good_ckpt, tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    if kind == "deep-header":
        _rewrite(good_ckpt, path, header_bytes=b"[" * 100_000 + b"]" * 100_000)
    elif kind == "deep-manifest":
        _rewrite(good_ckpt, path, lambda m: "[" * 100_000 + "]" * 100_000)
    elif kind == "huge-number":
        _rewrite(good_ckpt, path, _huge_features)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        path.mkdir()
    for argv in (["inspect", str(path)], ["generate", str(path), "--prompt", "w1", "--no-progress"]):
        rc, _, err = _run(capsys, argv)
        assert rc != 0
        assert _one_line(err).startswith("error: ") and str(path) in err


def test_odd_characters_in_notes_are_printed_escaped(tmp_path, capsys):
    from torch import nn

    model = nn.Sequential(nn.Linear(64, 8))
    lowbit.quantize(model, lowbit.QuantScheme(bits=8, granularity="channel"), progress=False)
    model.lowbit_report.notes.append("lone \ud800 surrogate, \x1b[31mred\x1b[0m, line\u2028break, é")
    path = tmp_path / "odd.safetensors"
    lowbit.save(model, path)
    rc, out, err = _run(capsys, ["inspect", str(path)])
    assert rc == 0, err
    assert "lone \\ud800 surrogate, \\x1b[31mred\\x1b[0m, line\\u2028break, é" in out
    assert "\x1b" not in out


# -- digests: --no-verify ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    model = tiny_llama(tie=False)
    lowbit.quantize(model, lowbit.QuantScheme(bits=4, group_size=32), progress=False)
    path = tmp_path_factory.mktemp("llama-ckpt") / "llama.safetensors"
    lowbit.save(model, path)
    return path


def _flip_data_bit(src, dst, tensor: str):
    """A copy of ``src`` with the lowest bit of one byte of ``tensor`` flipped (valid, but not the
    bytes its digest covers)."""
    raw = bytearray(src.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start, end = json.loads(raw[8:8 + n])[tensor]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0x01
    dst.write_bytes(bytes(raw))
    return dst


def _as_version_1(src, dst):
    """``src`` as lowbit wrote it before checkpoints carried digests (format_version 1)."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    del header["__metadata__"]["lowbit_manifest_digest"]
    manifest = json.loads(header["__metadata__"]["lowbit_manifest"])
    manifest["format_version"] = 1
    for info in manifest["tensors"].values():
        del info["digest"]
    header["__metadata__"]["lowbit_manifest"] = json.dumps(manifest)
    return _rewrite(src, dst, header_bytes=json.dumps(header).encode())


def _refused_with_no_verify_hint(capsys, argv, path, match: str) -> None:
    rc, out, err = _run(capsys, argv)
    assert rc == 2, err
    line = _one_line(err)
    assert line.startswith("error: ") and str(path) in line and match in line, line
    assert f"lowbit {argv[0]} --no-verify" in line, line


@pytest.mark.parametrize("kind", ["manifest-edited", "version-1"])
def test_inspect_refuses_an_unverifiable_header_and_no_verify_reads_it(kind, good_ckpt, tmp_path, capsys):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "manifest-edited":  # a valid manifest that no longer matches its digest
        _rewrite(good_ckpt, path, lambda m: {**m, "notes": [*m["notes"], "edited"]})
        match = "does not match the digest"
    else:
        _as_version_1(good_ckpt, path)
        match = "format_version 1"
    _refused_with_no_verify_hint(capsys, ["inspect", str(path)], path, match)
    rc, out, err = _run(capsys, ["inspect", str(path), "--no-verify"])
    assert rc == 0, err
    assert "quantized layers (2):" in out and "average bits/weight" in out
    rc, out, err = _run(capsys, ["inspect", str(path), "--json", "--no-verify"])
    assert rc == 0 and json.loads(out)["layers"], err


def test_a_flipped_data_bit_is_refused_and_no_verify_loads_it(llama_ckpt, llama_dir, tmp_path, capsys):
    path = _flip_data_bit(llama_ckpt, tmp_path / "flipped.safetensors", "model.layers.0.mlp.up_proj.scale")
    rc, _, err = _run(capsys, ["inspect", str(path)])  # the header alone is intact
    assert rc == 0, err
    gen = ["--prompt", "w1 w2", "--max-new-tokens", "2", "--tokenizer", str(llama_dir), "--no-progress"]
    _refused_with_no_verify_hint(capsys, ["generate", str(path), *gen], path, "does not match the digest")
    rc, out, err = _run(capsys, ["generate", str(path), *gen, "--no-verify"])
    assert rc == 0 and err == "", err
    out_dir = tmp_path / "hf"
    export = ["export", str(path), "--to", "hf", "-o", str(out_dir), "--tokenizer", str(llama_dir), "--no-progress"]
    _refused_with_no_verify_hint(capsys, export, path, "does not match the digest")
    assert not out_dir.exists()
    rc, _, err = _run(capsys, [*export, "--no-verify"])
    assert rc == 0 and out_dir.is_dir(), err


def test_missing_output_directory_fails_before_any_work(llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lowbit, "load_pretrained", lambda *a, **k: pytest.fail("loaded the model first"))
    out = tmp_path / "no" / "such" / "dir" / "m.safetensors"
    rc, _, err = _run(capsys, ["quantize", str(llama_dir), "-o", str(out), "--no-progress"])
    assert rc == 1
    assert _one_line(err) == f"error: {out.parent}: directory does not exist (create it first)"


def test_os_errors_while_writing_are_one_line(llama_dir, tmp_path, capsys, monkeypatch):
    def full_disk(model, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path) + ".tmp")

    monkeypatch.setattr(lowbit, "save", full_disk)
    out = tmp_path / "m.safetensors"
    rc, _, err = _run(capsys, ["quantize", str(llama_dir), "-o", str(out), "--no-progress"])
    assert rc == 1
    assert _one_line(err) == f"error: {out}.tmp: No space left on device"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory(llama_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _, err = _run(capsys, ["quantize", str(llama_dir), "-o", str(ro / "m.safetensors"), "--no-progress"])
    finally:
        ro.chmod(0o755)
    assert rc == 1 and _one_line(err) == f"error: {ro}: directory is not writable"


@pytest.mark.parametrize("exc, code, line", [
    (RuntimeError("boom"), 1, "internal error: RuntimeError: boom; rerun with --debug for the traceback"),
    (ValueError("bad\nvalue"), 1, "internal error: ValueError: bad value; rerun with --debug for the traceback"),
    (RecursionError("deep"), 1, "internal error: RecursionError: deep; rerun with --debug for the traceback"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_unexpected_exceptions_are_one_line_and_debug_adds_the_traceback(exc, code, line, good_ckpt, capsys,
                                                                         monkeypatch):
    def raise_(args):
        raise exc

    monkeypatch.setattr(lowbit.cli.inspect, "run", raise_)
    rc, _, err = _run(capsys, ["inspect", str(good_ckpt)])
    assert rc == code and _one_line(err) == line
    for argv in (["--debug", "inspect", str(good_ckpt)], ["inspect", str(good_ckpt), "--debug"]):
        rc, _, err = _run(capsys, argv)
        assert rc == code and "Traceback" in err and err.splitlines()[-1] == line


def test_python_dash_m_lowbit_reports_a_bad_file_in_one_line(good_ckpt, tmp_path):
    bad = _rewrite(good_ckpt, tmp_path / "deep.safetensors", lambda m: "[" * 100_000 + "]" * 100_000)
    r = subprocess.run([sys.executable, "-m", "lowbit", "inspect", str(bad)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {bad}")


# -- recipe rules that reach no linear layer ---------------------------------------------------
@pytest.mark.parametrize("pattern, message", [
    (r"model\.norm", "recipe rule 1 ('model\\\\.norm') matches model.norm (LlamaRMSNorm) but no linear layer"),
    (r"model\.embed_tokens", "model.embed_tokens (Embedding) but no linear layer"),
    (r".*\.q_prj", "recipe rule 1 ('.*\\\\.q_prj') matches no module of LlamaForCausalLM"),
])
def test_skip_pattern_that_reaches_no_linear_layer_is_an_error(pattern, message, llama_dir, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    rc, _, err = _run(capsys, ["quantize", str(llama_dir), "-o", str(out), "--skip", pattern, "--no-progress"])
    assert rc == 2 and message in _one_line(err) and not out.exists()


# -- encoders: quantized as themselves, refused where a causal LM is needed ---------------------
def test_bert_encoder_is_quantized_as_its_own_architecture(bert_dir, tmp_path, capsys):
    out = tmp_path / "bert.safetensors"
    rc, text, err = _run(capsys, ["quantize", str(bert_dir), "-o", str(out), "--granularity", "channel",
                                  "--no-progress"])
    assert rc == 0, err
    m = lowbit.read_manifest(out)
    assert m["model"]["architecture"] == "BertModel"
    fp = transformers.BertModel.from_pretrained(bert_dir)
    linears = {n for n, mod in fp.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert set(m["layers"]) == linears and "pooler.dense" in linears  # nothing added, nothing dropped
    skipped = {s["name"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {n for n, mod in fp.named_modules()
                            if isinstance(mod, (torch.nn.Embedding, torch.nn.LayerNorm))}
    assert skipped["embeddings.LayerNorm"] == "LayerNorm: kept in full precision (not a linear layer)"
    # the CLI groups modules that share a reason; the manifest lists each
    assert "5 modules (embeddings.LayerNorm, encoder.layer.0.attention.output.LayerNorm, ...): LayerNorm" in text
    loaded = lowbit.load(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        got, want = loaded(ids).last_hidden_state, fp(ids).last_hidden_state
    assert type(loaded) is transformers.BertModel
    assert float((got - want).abs().max()) < 0.1 * float(want.abs().max())  # 4-bit, not a random head


@pytest.mark.parametrize("argv", [
    ["generate", "{bert}", "--prompt", "w1 w2"],
    ["eval", "{bert}", "--reference", "none"],
    ["generate", "{ckpt}", "--prompt", "w1 w2"],
    ["eval", "{ckpt}", "--reference", "none"],
    ["quantize", "{bert}", "-o", "{tmp}/s.safetensors", "--stream", "--granularity", "channel"],
])
def test_commands_that_need_a_causal_lm_refuse_an_encoder_in_one_line(argv, bert_dir, tmp_path, capsys):
    ckpt = tmp_path / "bert.safetensors"
    assert main(["quantize", str(bert_dir), "-o", str(ckpt), "--granularity", "channel", "--no-progress"]) == 0
    capsys.readouterr()
    argv = [a.format(bert=bert_dir, ckpt=ckpt, tmp=tmp_path) for a in argv]
    rc, _, err = _run(capsys, argv + ["--no-progress"])
    assert rc == 2
    line = _one_line(err)
    assert "BertModel" in line and "not a causal language model" in line


def test_loading_never_initialises_weights_randomly(bert_dir, tmp_path):
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        load_pretrained(bert_dir)
    model, _ = load_pretrained(bert_dir, causal_lm=False)
    assert type(model) is transformers.BertModel
    # without 'architectures' the causal-LM class would add a fresh prediction head: refused
    d = tmp_path / "noarch"
    d.mkdir()
    for f in bert_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    del cfg["architectures"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"would initialise \d+ weights randomly \(cls\.predictions"):
        load_pretrained(d, causal_lm=False)


# -- pickles are never loaded ------------------------------------------------------------------
def test_pickle_only_directory_is_refused_without_unpickling(tmp_path, capsys, monkeypatch):
    d = tmp_path / "bin"
    tiny_llama().save_pretrained(d, safe_serialization=False)
    _save_tokenizer(d)
    assert (d / "pytorch_model.bin").is_file() and not list(d.glob("*.safetensors"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a user file was unpickled"))
    with pytest.raises(ModelSourceError, match=r"only pickled weights \(pytorch_model\.bin\)"):
        load_pretrained(d)
    rc, _, err = _run(capsys, ["quantize", str(d), "-o", str(tmp_path / "m.safetensors"), "--no-progress"])
    assert rc == 2
    line = _one_line(err)
    assert "never unpickles" in line and "save_pretrained(dir, safe_serialization=True)" in line
