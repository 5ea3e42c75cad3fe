"""Quality of RTN on the real SmolLM2-135M, a few WikiText-2 windows.

The baseline is the GGUF's Q4_1 weights dequantized to fp32. Its linear
weights already lie on a 4-bit, 32-wide asymmetric grid, so W4 g32 asym would
be trivially lossless here; these tests use other settings.
"""

from __future__ import annotations

import copy

import pytest

import lowbit
from lowbit import Recipe
from lowbit.eval.compare import compare_models
from lowbit.eval.perplexity import make_windows
from lowbit.kernels.registry import use_kernel
from lowbit.scheme import QuantScheme

pytestmark = pytest.mark.real_model

N_WINDOWS, WINDOW = 4, 512


@pytest.fixture(scope="module")
def windows(wikitext_ids):
    return make_windows(wikitext_ids, WINDOW, N_WINDOWS)


def _compare(smollm2, windows, recipe):
    model, _ = smollm2
    q = copy.deepcopy(model)
    report = lowbit.quantize(q, recipe, progress=False)
    with use_kernel("dequantized"):
        result = compare_models(model, q, windows, progress=False)
    return result, report


def test_w8_per_channel_changes_perplexity_by_under_one_percent(smollm2, windows):
    result, report = _compare(smollm2, windows, Recipe.uniform(QuantScheme(bits=8, granularity="channel")))
    assert len(report.layers) == 30 * 7  # every linear of the 30 blocks; lm_head (tied) skipped
    assert abs(result.candidate_ppl / result.reference_ppl - 1) < 0.01, result
    assert result.mean_kl < 0.01, result
    assert result.top1_agreement > 0.95, result


def test_w4_g128_stays_within_bound(smollm2, windows):
    # 576-wide layers take group 64 (the largest power of two dividing 576), down_proj group 128.
    recipe = Recipe.uniform(QuantScheme(bits=4, group_size=128), indivisible_groups="shrink")
    result, report = _compare(smollm2, windows, recipe)
    assert any("group_size 64" in n for n in report.notes)
    # Stated bound: RTN W4 g128 at most 1.6x the fp32 (dequantized Q4_1) perplexity on these
    # windows (measured 31.08 -> 44.25, 1.42x, on 2026-11-25). RTN alone is lossy on a model
    # this small; calibration methods (GPTQ/AWQ) are what close the gap.
    assert result.candidate_ppl / result.reference_ppl < 1.6, result
    assert result.candidate_ppl > result.reference_ppl * 0.99, result
    assert result.top1_agreement > 0.55, result  # measured 0.634


def test_w3_is_worse_than_w4_is_worse_than_w8(smollm2, windows):
    """Ordering by bits must hold on real weights (catches a broken grid at any width)."""
    kl = {}
    for bits in (8, 4, 3):
        recipe = Recipe.uniform(QuantScheme(bits=bits, group_size=64, symmetric=False))
        kl[bits] = _compare(smollm2, windows, recipe)[0].mean_kl
    assert kl[8] < kl[4] < kl[3], kl
