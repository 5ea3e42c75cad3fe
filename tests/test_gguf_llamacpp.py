"""llama.cpp itself on lowbit's GGUF files (skipped unless llama-cpp-python is installed;
``scripts/test.sh``, which CI runs, installs it and sets ``LOWBIT_REQUIRE_LLAMACPP=1`` so
that a missing package fails there instead of skipping). llama.cpp runs in child
processes (``llamacpp_child``): a native crash fails one test, not the session.

* ``llama_model_quantize`` (llama.cpp's own quantizer and type mix) applied to
  our F32 export produces, tensor for tensor, the very bytes and types that
  ``export_gguf`` writes at the same ftype;
* llama.cpp runs our exported files, and its logits match lowbit's
  ``import_gguf`` of the same file (llama.cpp quantizes activations to 8 bits
  for quantized matmuls, hence a tolerance instead of equality).
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFReader

from lowbit.io.gguf import export_gguf, import_gguf, mix

import llamacpp_child
from gguf_helpers import write_tokenizer_gguf
from tiny_models import random_ids

if not llamacpp_child.installed():
    if os.environ.get("LOWBIT_REQUIRE_LLAMACPP") == "1":
        raise RuntimeError("LOWBIT_REQUIRE_LLAMACPP=1 but llama-cpp-python is not installed; run scripts/setup_interop.sh")
    pytest.skip("llama-cpp-python is not installed (scripts/setup_interop.sh builds it)", allow_module_level=True)


def small_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """Rows of 256 and 512 so that every linear takes a K-quant (tiny_llama's 128 fall back)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("llamacpp")
    tok = write_tokenizer_gguf(d / "tok.gguf")
    model = small_llama()
    export_gguf(model, d / "f32.gguf", "F32", source_gguf=tok)
    return d, tok, model


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q4_0", "Q8_0", "Q5_1", "Q6_K", "F16", "BF16"])
def test_export_equals_llama_quantize(files, ftype):
    d, tok, model = files
    ours = d / f"ours-{ftype}.gguf"
    theirs = d / f"llama-{ftype}.gguf"
    export_gguf(model, ours, ftype, source_gguf=tok)
    llamacpp_child.run("quantize", d / "f32.gguf", theirs, int(mix.FTYPES[ftype][1]))
    a = {t.name: t for t in GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in GGUFReader(str(theirs)).tensors}
    assert set(a) == set(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, (name, a[name].tensor_type.name, b[name].tensor_type.name)
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name
    if ftype == "Q4_K_M":
        kinds = {t.tensor_type.name for t in a.values()}
        assert {"Q4_K", "Q6_K"} <= kinds


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M", "Q4_0"])
def test_llama_cpp_logits_match_lowbit(files, ftype):
    d, tok, model = files
    path = d / f"run-{ftype}.gguf"
    export_gguf(model, path, ftype, source_gguf=tok)
    ids = random_ids(1, 32, seed=3)[0].tolist()
    out = d / f"logits-{ftype}.npy"
    llamacpp_child.run("logits", path, ",".join(map(str, ids)), out)
    theirs = np.load(out)
    assert theirs.shape == (len(ids), model.config.vocab_size)
    with torch.no_grad():
        ours = import_gguf(path)(torch.tensor([ids])).logits[0].numpy()
    scale = float(np.abs(ours).max())
    assert np.abs(theirs - ours).max() < 0.02 * scale + 1e-3
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9


def test_a_native_crash_fails_one_test_and_names_the_signal(tmp_path):
    """The harness itself: a child that dies of SIGILL (what ggml's AMX path did) is one failure
    whose message names the signal and the command, and this process lives on."""
    with pytest.raises(pytest.fail.Exception) as e:
        llamacpp_child.run("selftest-signal", int(signal.SIGILL))
    assert "SIGILL" in str(e.value) and "selftest-signal" in str(e.value)


def test_a_build_for_another_cpu_is_refused_with_the_rebuild_command(tmp_path):
    record = tmp_path / "llama_cpp_build.json"
    record.write_text('{"isa": "avx512", "required_cpu_flags": "avx2 avx512f avx512_bf16"}')
    why = llamacpp_child.cpu_mismatch(record, flags={"avx2", "fma"})
    assert "avx512_bf16" in why and "avx512f" in why and "LOWBIT_LLAMACPP_ISA=avx2" in why
    assert llamacpp_child.cpu_mismatch(record, flags={"avx2", "avx512f", "avx512_bf16", "fma"}) is None
    assert llamacpp_child.cpu_mismatch(tmp_path / "absent.json") is None
