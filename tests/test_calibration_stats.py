"""HessianAccumulator and ChannelStats against the direct formulas."""

from __future__ import annotations

import pytest
import torch

from lowbit.calibration.stats import ChannelStats, CrossAccumulator, HessianAccumulator, cap_token_norms
from lowbit.errors import CalibrationError

K = 48
# uneven batches with different leading shapes; 699 rows in all
BATCH_SHAPES = [(3, K), (2, 5, K), (1, K), (300, K), (4, 3, 7, K), (1, 1, 1, K), (300, K)]


def _batches(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) * 0.3 + torch.eye(K)
    out = []
    for shape in BATCH_SHAPES:
        x = torch.randn(*shape, generator=g) @ mix
        x[..., 5] *= 20.0  # an outlier channel, as in real activations
        out.append(x.to(dtype))
    return out


def _all_rows(batches) -> torch.Tensor:
    return torch.cat([b.reshape(-1, K).double() for b in batches])


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 4096])
def test_hessian_equals_direct_formula_over_uneven_batches(chunk_rows):
    batches = _batches()
    acc = HessianAccumulator(K, chunk_rows=chunk_rows)
    for b in batches:
        acc.add_batch(b)
    x = _all_rows(batches)
    n = x.shape[0]
    want = (2.0 / n) * x.T @ x
    assert acc.n_tokens == n == 699
    h = acc.hessian
    assert h.dtype == torch.float32 and h.shape == (K, K)
    torch.testing.assert_close(h.double(), want, rtol=2e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.allclose(h, h.T, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hessian_accepts_half_precision_activations(dtype):
    batches = _batches(seed=1, dtype=dtype)
    acc = HessianAccumulator(K)
    for b in batches:
        acc.add_batch(b)
    x = _all_rows(batches)  # the half-precision values, upcast exactly
    want = (2.0 / x.shape[0]) * x.T @ x
    assert acc.hessian.dtype == torch.float32
    torch.testing.assert_close(acc.hessian.double(), want, rtol=2e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("chunk_rows", [1, 64, 4096])
def test_channel_stats_equal_direct_mean_and_max(chunk_rows):
    batches = _batches(seed=2)
    st = ChannelStats(K, chunk_rows=chunk_rows)
    for b in batches:
        st.add_batch(b)
    x = _all_rows(batches)
    assert st.n_tokens == x.shape[0]
    assert st.abs_mean.shape == st.abs_max.shape == (K,)
    assert st.abs_mean.dtype == st.abs_max.dtype == torch.float32
    torch.testing.assert_close(st.abs_mean.double(), x.abs().mean(dim=0), rtol=1e-5, atol=0)
    assert torch.equal(st.abs_max.double(), x.abs().amax(dim=0))  # max is exact
    assert int(st.abs_max.argmax()) == 5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("cls", [HessianAccumulator, ChannelStats])
def test_non_finite_activations_raise_and_leave_state_unchanged(cls, bad):
    acc = cls(K)
    good = torch.randn(10, K)
    acc.add_batch(good)
    x = torch.randn(2, 6, K)
    x[1, 3, 7] = bad
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        acc.add_batch(x)
    assert acc.n_tokens == 10
    if cls is HessianAccumulator:
        torch.testing.assert_close(acc.hessian, 2.0 / 10 * good.T @ good)
    else:
        torch.testing.assert_close(acc.abs_mean, good.abs().mean(0))


@pytest.mark.parametrize("cls", [HessianAccumulator, ChannelStats])
def test_wrong_last_dimension_raises(cls):
    acc = cls(K)
    with pytest.raises(CalibrationError, match="in_features=48"):
        acc.add_batch(torch.randn(4, K + 1))
    with pytest.raises(CalibrationError, match="floating-point"):
        acc.add_batch(torch.ones(4, K, dtype=torch.long))


def test_no_tokens_raises():
    h = HessianAccumulator(K)
    h.add_batch(torch.empty(0, K))  # an empty batch is not an error, but adds nothing
    assert h.n_tokens == 0
    with pytest.raises(CalibrationError, match="no calibration tokens"):
        h.hessian
    st = ChannelStats(K)
    with pytest.raises(CalibrationError, match="no calibration tokens"):
        st.abs_mean
    with pytest.raises(CalibrationError, match="no calibration tokens"):
        st.abs_max


def test_bad_constructor_arguments():
    for bad in (0, -3, 1.5, True):
        with pytest.raises(CalibrationError):
            HessianAccumulator(bad)
        with pytest.raises(CalibrationError):
            ChannelStats(bad)
    with pytest.raises(CalibrationError):
        HessianAccumulator(K, chunk_rows=0)


def test_errors_name_the_layer_when_given():
    acc = HessianAccumulator(K, name="model.layers.3.mlp.down_proj")
    with pytest.raises(CalibrationError, match=r"model\.layers\.3\.mlp\.down_proj.*no calibration tokens"):
        acc.hessian
    st = ChannelStats(K, name="model.layers.0.self_attn.q_proj")
    with pytest.raises(CalibrationError, match=r"q_proj.*NaN/Inf"):
        st.add_batch(torch.full((2, K), float("nan")))


@pytest.mark.parametrize("chunk_rows", [1, 64, 4096])
def test_cross_accumulator_equals_direct_formula(chunk_rows):
    """D = (2/n) sum_t (f_t - x_t) x_t^T over uneven paired batches; zero when the inputs agree."""
    fps = _batches(seed=0)
    xs = [f + 0.1 * torch.randn(f.shape, generator=torch.Generator().manual_seed(i)) for i, f in enumerate(fps)]
    acc = CrossAccumulator(K, chunk_rows=chunk_rows)
    same = CrossAccumulator(K, chunk_rows=chunk_rows)
    for f, x in zip(fps, xs):
        acc.add_batch(f, x)
        same.add_batch(x, x)
    f_all, x_all = _all_rows(fps), _all_rows(xs)
    want = (2.0 / f_all.shape[0]) * (f_all - x_all).T @ x_all
    assert acc.n_tokens == 699
    torch.testing.assert_close(acc.cross.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert torch.count_nonzero(same.cross) == 0


def test_cross_accumulator_refuses_unpaired_batches():
    acc = CrossAccumulator(K)
    with pytest.raises(CalibrationError, match="pair token for token"):
        acc.add_batch(torch.zeros(4, K), torch.zeros(5, K))
    with pytest.raises(CalibrationError, match="no calibration tokens"):
        acc.cross


# -- token norm cap (GPTQ(token_cap=...)) -----------------------------------------------------
def _windows_with_a_sink(n_windows=3, length=40, seed=0):
    """Windows whose first token is 500x larger than the rest, on two channels (an attention sink)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_windows, length, K, generator=g)
    x[:, 0] = 0.0
    x[:, 0, 3], x[:, 0, 9] = 3000.0, -2000.0
    return x


def test_cap_token_norms_scales_only_tokens_above_the_cap():
    x = _windows_with_a_sink()
    x0 = x.clone()
    capped = cap_token_norms(x, 10.0)
    assert torch.equal(x, x0)  # pure
    norms = x.norm(dim=-1)  # [W, L]
    med = norms.median(dim=-1).values  # [W]
    big = norms > 10.0 * med[:, None]
    assert big[:, 0].all() and int(big.sum()) == x.shape[0]  # exactly the sinks
    assert torch.equal(capped[~big], x[~big])  # everything else untouched, bit for bit
    torch.testing.assert_close(capped[:, 0].norm(dim=-1), 10.0 * med)
    cos = torch.nn.functional.cosine_similarity(capped[:, 0], x[:, 0], dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))  # same direction
    mostly_padding = torch.zeros(5, K)
    mostly_padding[0, 0] = 7.0  # median norm 0: nothing to cap against, so no token is zeroed
    assert torch.equal(cap_token_norms(mostly_padding, 10.0), mostly_padding)
    with pytest.raises(CalibrationError, match=">= 1"):
        cap_token_norms(x, 0.5)


def test_capped_hessian_does_not_depend_on_batching_and_is_plain_h_without_outliers():
    x = _windows_with_a_sink()
    one = HessianAccumulator(K, token_cap=10.0)
    one.add_batch(x)
    split = HessianAccumulator(K, token_cap=10.0)
    for w in x:  # one window per batch (2-D [L, K]): the median is per window either way
        split.add_batch(w)
    torch.testing.assert_close(one.hessian, split.hessian, rtol=1e-6, atol=1e-6)
    plain = HessianAccumulator(K)
    plain.add_batch(x)
    # the sinks dominate the plain Hessian and not the capped one
    assert float(plain.hessian[3, 3]) > 1000 * float(plain.hessian.diagonal().median())
    assert float(one.hessian[3, 3]) < 1e-3 * float(plain.hessian[3, 3])  # a sink now weighs at most 100 tokens
    quiet = x[:, 1:]  # no token above the cap: exactly the plain accumulator
    a, b = HessianAccumulator(K, token_cap=10.0), HessianAccumulator(K)
    a.add_batch(quiet)
    b.add_batch(quiet)
    assert torch.equal(a.hessian, b.hessian)
    with pytest.raises(CalibrationError, match="token_cap"):
        HessianAccumulator(K, token_cap=0.9)
