"""AWQ numerics (lowbit.methods.awq): scales, the ratio search, the clip search, folding.

The synthetic layer imitates what AWQ exploits in real LLMs: a few input
channels carry activations ~100x larger than the rest, so the rounding error
of their weight columns dominates the output error.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit import AWQ, formats
from lowbit.errors import CalibrationError
from lowbit.methods import awq
from lowbit.scheme import QuantScheme

W4 = QuantScheme(bits=4, group_size=128)
W3 = QuantScheme(bits=3, group_size=128)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _outlier_layer(seed=0, n=256, k=512, tokens=1024, n_outliers=8, mult=100.0):
    """Tokens ``x [T, K]`` with a few x100 channels and a weight ``[N, K]``."""
    g = _gen(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:n_outliers]] *= mult
    w = torch.randn(n, k, generator=g) * 0.02
    return x, w


def _output_loss(x, ws):
    """The walker's kind of loss: mean squared error of the module output (here: the linears)."""
    refs = [x @ w.T for w in ws]

    def loss_fn(candidates):
        return sum(float((x @ c.T - r).pow(2).mean()) for c, r in zip(candidates, refs))

    return loss_fn


# ------------------------------------------------------------------ awq_scales
def test_awq_scales_by_hand():
    x = torch.tensor([4.0, 1.0, 0.25, 1.0])
    w = torch.tensor([1.0, 0.5, 1.0, 2.0])
    s = awq.awq_scales(x, w, 0.5, duo_scaling=True)
    raw = torch.tensor([2.0 / 1.0, 1.0 / math.sqrt(0.5), 0.5 / 1.0, 1.0 / math.sqrt(2.0)], dtype=torch.float64)
    want = raw / math.sqrt(float(raw.max() * raw.min()))
    assert s.dtype == torch.float32 and torch.allclose(s.double(), want, rtol=1e-6)
    assert math.isclose(float(s.max() * s.min()), 1.0, rel_tol=1e-6)  # normalised to straddle 1
    s = awq.awq_scales(x, w, 0.5, duo_scaling=False)
    want = x.double().sqrt() / math.sqrt(2.0 * 0.5)
    assert torch.allclose(s.double(), want, rtol=1e-6)
    # ratio 0 without duo scaling is the identity; with duo scaling it is not
    assert torch.equal(awq.awq_scales(x, w, 0.0, duo_scaling=False), torch.ones(4))
    assert not torch.allclose(awq.awq_scales(x, w, 0.0, duo_scaling=True), torch.ones(4))


def test_awq_scales_are_nan_safe():
    x = torch.tensor([float("nan"), 0.0, float("inf"), 1.0, 3.0])
    w = torch.tensor([0.0, float("nan"), 1.0, 0.5, float("inf")])
    for duo in (True, False):
        for ratio in (0.0, 0.3, 0.95, 1.0):
            s = awq.awq_scales(x, w, ratio, duo)
            assert s.shape == (5,) and bool(torch.isfinite(s).all()) and bool((s > 0).all()), (duo, ratio, s)
    zeros = awq.awq_scales(torch.zeros(8), torch.zeros(8), 0.5, True)
    assert torch.equal(zeros, torch.ones(8))
    with pytest.raises(CalibrationError):
        awq.awq_scales(torch.ones(4), torch.ones(5), 0.5, True)
    with pytest.raises(CalibrationError):
        awq.awq_scales(torch.ones(4), torch.ones(4), 1.5, True)


# ------------------------------------------------------------------ weight_abs_mean
def test_weight_abs_mean_by_hand():
    w1 = torch.tensor([[1.0, -2.0, 4.0, 0.0], [2.0, 2.0, -1.0, 1.0]])
    w2 = torch.tensor([[0.0, 0.0, -8.0, 8.0]])
    g2 = QuantScheme(bits=4, group_size=2)
    want = (
        torch.tensor([[0.5, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]).mean(0)
    )
    got = awq.weight_abs_mean([w1, w2], g2)
    assert torch.allclose(got, want, atol=1e-5)
    ch = awq.weight_abs_mean([w1], QuantScheme(bits=4, granularity="channel"))
    assert torch.allclose(ch, torch.tensor([[0.25, 0.5, 1.0, 0.0], [1.0, 1.0, 0.5, 0.5]]).mean(0), atol=1e-5)
    t = awq.weight_abs_mean([w1], QuantScheme(bits=4, granularity="tensor"))
    assert torch.allclose(t, w1.abs().mean(0) / 4.0, atol=1e-5)
    with pytest.raises(CalibrationError, match="input size"):
        awq.weight_abs_mean([w1, torch.ones(2, 6)], g2)


# ------------------------------------------------------------------ search_scales
@pytest.mark.parametrize("scheme", [W4, W3], ids=["w4g128", "w3g128"])
@pytest.mark.parametrize("duo", [True, False])
def test_search_scales_reduces_output_error_on_outlier_activations(scheme, duo):
    x, w = _outlier_layer(seed=1)
    found = awq.search_scales(x.abs().mean(0), [w], scheme, AWQ(duo_scaling=duo), _output_loss(x, [w]))
    assert found.improved and found.ratio is not None and 0 < found.ratio < 1
    assert len(found.losses) == 20 and found.ratios[1] == 0.05
    assert found.loss == min(found.losses) == found.losses[round(found.ratio * 20)]
    # loss_at_one is plain RTN, measured explicitly
    rtn = formats.dequantize(*formats.quantize_weight(w, scheme), scheme)
    assert found.loss_at_one == _output_loss(x, [w])([rtn])
    assert found.loss < 0.8 * found.loss_at_one, (found.loss, found.loss_at_one)
    # the returned scales, folded the walker's way, give the measured loss
    s = found.scales
    assert torch.equal(s, awq.awq_scales(x.abs().mean(0), awq.weight_abs_mean([w], scheme), found.ratio, duo))
    folded = awq.fake_quantize(awq.scale_input_channels(w, s), scheme)
    err = float(((x / s) @ folded.T - x @ w.T).pow(2).mean())
    assert math.isclose(err, found.loss, rel_tol=1e-3)


def test_search_scales_groups_several_linears_and_passes_candidates_in_order():
    x, w = _outlier_layer(seed=2, n=128)
    w2 = torch.randn(64, 512, generator=_gen(9)) * 0.05
    seen = []

    def loss_fn(cands):
        assert [c.shape for c in cands] == [w.shape, w2.shape]
        assert all(c.dtype == torch.float32 for c in cands)
        seen.append(cands)
        return _output_loss(x, [w, w2])(cands)

    found = awq.search_scales(x.abs().mean(0), [w, w2], W4, AWQ(n_grid=10), loss_fn)
    assert len(seen) == 11  # s = 1, then 10 ratios
    assert torch.equal(seen[0][0], awq.fake_quantize(w, W4)) and torch.equal(seen[0][1], awq.fake_quantize(w2, W4))
    s = awq.awq_scales(x.abs().mean(0), awq.weight_abs_mean([w, w2], W4), 0.3, True)
    want = awq.fake_quantize(awq.scale_input_channels(w2, s), W4) / s
    assert torch.equal(seen[4][1], want)
    assert found.loss < 0.8 * found.loss_at_one


def test_search_scales_keeps_identity_when_nothing_helps():
    x, w = _outlier_layer(seed=3, n=64)
    rtn = awq.fake_quantize(w, W4)

    def loss_fn(cands):  # any change from plain RTN is "worse"
        return 0.0 if torch.equal(cands[0], rtn) else 1.0

    found = awq.search_scales(x.abs().mean(0), [w], W4, AWQ(n_grid=5), loss_fn)
    assert not found.improved and found.ratio is None
    assert torch.equal(found.scales, torch.ones(512)) and found.loss == found.loss_at_one == 0.0
    assert found.losses == (1.0,) * 5

    nan_losses = iter([1.0, float("nan"), 0.5, float("nan")])
    found = awq.search_scales(x.abs().mean(0), [w], W4, AWQ(n_grid=3), lambda c: next(nan_losses))
    assert found.ratio == pytest.approx(1 / 3) and found.loss == 0.5 and math.isnan(found.losses[0])


def test_search_scales_rejects_mismatched_statistics():
    with pytest.raises(CalibrationError, match="statistics"):
        awq.search_scales(torch.ones(100), [torch.ones(8, 128)], W4, AWQ(), lambda c: 0.0)


# ------------------------------------------------------------------ clip
def _heavy_tailed(n, k, g):
    """Gaussian with a log-normal spread of scales: occasional large weights, as in LLM layers."""
    return torch.randn(n, k, generator=g) * torch.exp(0.6 * torch.randn(n, k, generator=g))


def _clip_error(x, w_ref, w, scheme):
    return float((x @ (awq.fake_quantize(w, scheme) - w_ref).T).pow(2).mean())


@pytest.mark.parametrize("heavy_tails", [False, True])
def test_search_clip_lowers_output_error_at_w3(heavy_tails):
    g = _gen(4)
    n, k = 256, 512
    w = (_heavy_tailed(n, k, g) if heavy_tails else torch.randn(n, k, generator=g)) * 0.02
    x = torch.randn(512, k, generator=g)
    held_out = torch.randn(512, k, generator=g)
    max_val = awq.search_clip(w, x, W3, AWQ())
    assert max_val.shape == (n, 4) and max_val.dtype == torch.float32
    org = w.reshape(n, 4, 128).abs().amax(-1)
    assert (max_val <= org).all() and (max_val >= org * 0.5).all()
    clipped = awq.apply_clip(w, max_val, W3)
    for xs in (x, held_out):
        before, after = _clip_error(xs, w, w, W3), _clip_error(xs, w, clipped, W3)
        assert after < 0.85 * before, (after, before)


def _brute_force_clip(w, x, scheme, spec):
    """Per (row, group), the candidate with the least error: plain loops, no chunking."""
    n, k = w.shape
    G = scheme.n_groups(k)
    gs = k // G
    best = torch.zeros(n, G)
    for r in range(n):
        for gi in range(G):
            cols = slice(gi * gs, (gi + 1) * gs)
            wg = w[r : r + 1, cols]
            m0 = float(wg.abs().max())
            errs = []
            for i in range(max(1, int(spec.max_shrink * spec.clip_grid))):
                m = m0 * (1 - i / spec.clip_grid)
                wq = awq.fake_quantize(wg.clamp(-m, m), scheme)
                errs.append((float((x[:, cols] @ (wg - wq).T).double().pow(2).sum()), m))
            best[r, gi] = min(errs, key=lambda e: e[0])[1]
    return best


@pytest.mark.parametrize(
    "scheme", [QuantScheme(bits=3, group_size=16), QuantScheme(bits=3, granularity="channel")], ids=["g16", "channel"]
)
@pytest.mark.parametrize("tokens", [10, 100])  # fewer / more tokens than group columns: both error paths
def test_search_clip_matches_brute_force_and_chunking_does_not_matter(scheme, tokens):
    g = _gen(5)
    w = torch.randn(6, 64, generator=g)
    x = torch.randn(tokens, 64, generator=g)
    spec = AWQ(clip_grid=10, max_shrink=0.5)
    got = awq.search_clip(w, x, scheme, spec)
    want = _brute_force_clip(w, x, scheme, spec)
    assert torch.allclose(got, want, rtol=1e-6), (got, want)
    assert torch.equal(awq.search_clip(w, x, scheme, spec, chunk_elements=1), got)  # one row at a time


def test_search_clip_tensor_granularity_picks_one_range():
    g = _gen(6)
    w = _heavy_tailed(32, 128, g) * 0.02
    x = torch.randn(256, 128, generator=g)
    scheme = QuantScheme(bits=3, granularity="tensor")
    max_val = awq.search_clip(w, x, scheme, AWQ())
    assert max_val.shape == (32, 1) and bool((max_val == max_val[0]).all())
    assert float(max_val[0]) < float(w.abs().max())
    clipped = awq.apply_clip(w, max_val, scheme)
    assert _clip_error(x, w, clipped, scheme) < _clip_error(x, w, w, scheme)
    assert torch.equal(awq.search_clip(w, x, scheme, AWQ(), chunk_elements=1), max_val)


def test_search_clip_edge_cases():
    w = torch.randn(8, 256, generator=_gen(7))
    w[0, :128] = 0  # an all-zero group stays zero
    x = torch.randn(16, 256, generator=_gen(8))
    max_val = awq.search_clip(w, x, W3, AWQ())
    assert max_val[0, 0] == 0 and torch.equal(awq.apply_clip(w, max_val, W3)[0, :128], torch.zeros(128))
    # max_shrink 0: only "no clip" is tried
    none = awq.search_clip(w, x, W3, AWQ(max_shrink=0.0))
    assert torch.equal(none, w.reshape(8, 2, 128).abs().amax(-1))
    assert torch.equal(awq.apply_clip(w, none, W3), w)
    # leading token dimensions are flattened
    assert torch.equal(awq.search_clip(w, x.reshape(2, 8, 256), W3, AWQ()), max_val)
    with pytest.raises(CalibrationError, match="NaN"):
        awq.search_clip(w, torch.full((4, 256), float("nan")), W3, AWQ())
    with pytest.raises(CalibrationError, match="features"):
        awq.search_clip(w, torch.randn(4, 128), W3, AWQ())


def test_apply_clip_by_hand():
    w = torch.tensor([[1.0, -3.0, 0.5, 2.0], [-4.0, 4.0, 1.0, -1.0]])
    g2 = QuantScheme(bits=4, group_size=2)
    mv = torch.tensor([[2.0, 1.0], [0.5, 10.0]])
    want = torch.tensor([[1.0, -2.0, 0.5, 1.0], [-0.5, 0.5, 1.0, -1.0]])
    assert torch.equal(awq.apply_clip(w, mv, g2), want)
    ch = awq.apply_clip(w, torch.tensor([[1.0], [2.0]]), QuantScheme(bits=4, granularity="channel"))
    assert torch.equal(ch, w.clamp(-torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [2.0]])))
    assert torch.equal(awq.apply_clip(w.half(), mv, g2), want.half())
    with pytest.raises(CalibrationError, match="max_val"):
        awq.apply_clip(w, torch.ones(2, 3), g2)


def test_scales_then_clip_together():
    """The walker's order: scale, fold, then clip the scaled weight with the scaled inputs."""
    x, w = _outlier_layer(seed=10)
    y = x @ w.T
    found = awq.search_scales(x.abs().mean(0), [w], W3, AWQ(), _output_loss(x, [w]))
    ws, xs = awq.scale_input_channels(w, found.scales), x / found.scales
    clipped = awq.apply_clip(ws, awq.search_clip(ws, xs, W3, AWQ()), W3)
    scaled = float((xs @ awq.fake_quantize(ws, W3).T - y).pow(2).mean())
    both = float((xs @ awq.fake_quantize(clipped, W3).T - y).pow(2).mean())
    assert both < scaled < 0.8 * found.loss_at_one


# ------------------------------------------------------------------ folding
def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _wide_scales(k, seed):
    return torch.exp(torch.randn(k, generator=_gen(seed)) * 1.5)  # spans ~1e-3 .. 1e3


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_fold_into_norm_is_exact(norm):
    g = _gen(11)
    k, n = 256, 96
    x = torch.randn(4, 7, k, generator=g) * 3
    nw = torch.rand(k, generator=g) + 0.5
    nb = torch.randn(k, generator=g) if norm == "layer" else None
    W, b = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
    s = _wide_scales(k, 12)

    def block(nw, nb, W):
        h = F.rms_norm(x, (k,), nw, eps=1e-6) if norm == "rms" else F.layer_norm(x, (k,), nw, nb, eps=1e-5)
        return F.linear(h, W, b)

    nw_before, W_before = nw.clone(), W.clone()
    nw2, nb2 = awq.fold_into_norm(nw, nb, s)
    assert (nb2 is None) == (nb is None)
    assert _rel(block(nw2, nb2, awq.scale_input_channels(W, s)), block(nw, nb, W)) < 1e-5
    # pure: the inputs are untouched, new tensors come back
    assert torch.equal(nw, nw_before) and torch.equal(W, W_before) and not torch.equal(nw2, nw)


def test_fold_into_preceding_linear_is_exact():
    g = _gen(13)
    k_in, k, n = 64, 128, 48
    x = torch.randn(10, k_in, generator=g)
    Wv, bv = torch.randn(k, k_in, generator=g) * 0.1, torch.randn(k, generator=g)
    Wo, bo = torch.randn(n, k, generator=g) * 0.1, torch.randn(n, generator=g)
    s = _wide_scales(k, 14)
    Wv2, bv2 = awq.fold_into_linear_rows(Wv, bv, s)
    y0 = F.linear(F.linear(x, Wv, bv), Wo, bo)
    y1 = F.linear(F.linear(x, Wv2, bv2), awq.scale_input_channels(Wo, s), bo)
    assert _rel(y1, y0) < 1e-5
    Wv3, none = awq.fold_into_linear_rows(Wv, None, s)
    assert none is None and torch.equal(Wv3, Wv2)


def test_fold_helpers_keep_dtype_and_validate():
    s = torch.rand(8) + 0.5
    assert awq.scale_input_channels(torch.randn(4, 8).half(), s).dtype == torch.float16
    w, b = awq.fold_into_norm(torch.ones(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16), s)
    assert w.dtype == b.dtype == torch.bfloat16
    with pytest.raises(CalibrationError, match="finite"):
        awq.scale_input_channels(torch.randn(4, 8), torch.zeros(8))
    with pytest.raises(CalibrationError, match="shape"):
        awq.fold_into_linear_rows(torch.randn(4, 8), None, s)
