"""Calibration-based methods on the real model (SmolLM2-135M, truncated to its first blocks to
keep the tests short). Calibration text: state_union; evaluation text: WikiText-2 test."""

from __future__ import annotations

import copy

import pytest

import lowbit
from lowbit import AWQ, Recipe
from lowbit.calibration import from_texts
from lowbit.eval.compare import compare_many
from lowbit.eval.data import find_data_dir
from lowbit.eval.perplexity import make_windows
from lowbit.kernels.registry import use_kernel
from lowbit.scheme import QuantScheme

pytestmark = pytest.mark.real_model
N_BLOCKS = 4


@pytest.fixture(scope="module")
def small(smollm2):
    """The real model cut to its first N_BLOCKS blocks (a smaller but real network)."""
    model, tok = smollm2
    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:N_BLOCKS]
    m.config.num_hidden_layers = N_BLOCKS
    return m.eval(), tok


@pytest.fixture(scope="module")
def calib(small):
    _, tok = small
    return from_texts(find_data_dir() / "state_union", tok, n_samples=16, seqlen=256, seed=0)


def _kl_vs(reference, candidates, windows):
    with use_kernel("dequantized"):
        return {k: r.mean_kl for k, r in compare_many(reference, candidates, windows, progress=False).items()}


def test_gptq_and_awq_beat_rtn_on_real_blocks(small, calib, wikitext_ids):
    model, tok = small
    scheme = QuantScheme(bits=3, group_size=64, symmetric=False)
    cands = {}
    for method in ("rtn", "gptq", AWQ(max_tokens=2048)):
        m = copy.deepcopy(model)
        lowbit.quantize(m, Recipe.uniform(scheme, method=method), calibration=None if method == "rtn" else calib, progress=False)
        cands[getattr(method, "name", method)] = m
    # held-out windows of the calibration domain (other offsets into the speeches) ...
    heldout = from_texts(find_data_dir() / "state_union", tok, n_samples=2, seqlen=512, seed=123).ids
    kl = _kl_vs(model, cands, heldout)
    assert kl["gptq"] < 0.9 * kl["rtn"], kl
    assert kl["awq"] < 0.9 * kl["rtn"], kl
    # ... and another domain (WikiText): AWQ, which only rescales channels, must still win there
    kl_wiki = _kl_vs(model, cands, make_windows(wikitext_ids, 512, 2))
    assert kl_wiki["awq"] < 0.9 * kl_wiki["rtn"], kl_wiki


def test_awq_scales_reduce_block_output_error(small, calib):
    """On real activations, the searched scales beat s = 1 for the groups behind a norm."""
    model, _ = small
    m = copy.deepcopy(model)
    scheme = QuantScheme(bits=3, group_size=64, symmetric=False)
    report = lowbit.quantize(m, Recipe.uniform(scheme, method=AWQ(max_tokens=2048, clip=False)), calibration=calib, progress=False)
    found = [n for n in report.notes if "AWQ" in n and "layernorm" in n]
    assert len(found) == 2 * N_BLOCKS
    improved = [n for n in found if "kept s=1" not in n]
    assert len(improved) >= 2 * N_BLOCKS - 1, found
    for note in improved:
        err, unscaled = (float(x) for x in note.rsplit("output error ", 1)[1].replace(" unscaled", "").split(" vs "))
        assert err < 0.95 * unscaled, note


# measured (2026-11-27): held-out 0.85, other speeches 0.91, WikiText 0.97 of GPTQ(clip)'s KL; with
# lr 5e-3 the tuning raised the held-out KL (1.05) and was not kept
TUNE_STEPS, TUNE_LR = 12, 2e-3


def test_scale_tuning_after_gptq_lowers_kl_on_real_blocks(small, calib, wikitext_ids):
    """E2ETuning from GPTQ(clip)'s W3 result: the KL to the full-precision blocks drops on the
    held-out calibration windows, on other speeches and on WikiText; the codes stay GPTQ's."""
    from lowbit import GPTQ, E2ETuning
    from lowbit.qat import tune_scales

    model, tok = small
    scheme = QuantScheme(bits=3, group_size=64, symmetric=False)
    gptq = copy.deepcopy(model)
    lowbit.quantize(gptq, Recipe.uniform(scheme, method=GPTQ(clip_search=True)), calibration=calib, progress=False)
    tuned = copy.deepcopy(gptq)
    result = tune_scales(tuned, model, calib.ids, E2ETuning(steps=TUNE_STEPS, batch_size=2, lr=TUNE_LR, holdout=4), progress=False)
    assert result.kept and result.heldout_kl_after < 0.9 * result.heldout_kl_before, result
    heldout = from_texts(find_data_dir() / "state_union", tok, n_samples=2, seqlen=512, seed=123).ids
    for windows, ratio in ((heldout, 0.95), (make_windows(wikitext_ids, 512, 2), 0.99)):
        kl = _kl_vs(model, {"gptq": gptq, "tuned": tuned}, windows)
        assert kl["tuned"] < ratio * kl["gptq"], kl
    for (name, a), b in zip(gptq.named_buffers(), tuned.buffers()):
        if name.endswith("qweight") or name.endswith("zero"):
            assert (a == b).all(), name
