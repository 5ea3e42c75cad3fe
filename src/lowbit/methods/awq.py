"""AWQ (Lin et al. 2023, "Activation-aware Weight Quantization"): the numerics only.

Pure tensor functions; the model walker (``lowbit.model``) collects the
statistics, evaluates candidate weights inside the model and folds the chosen
scales into the preceding operation. Nothing here touches a module.

The idea: input channels that carry large activations matter more, so scale
them up before rounding (``W' = W * s``, column ``j`` times ``s_j``) and fold
``1/s`` into whatever produces the input (a norm's weight, or the rows of a
preceding linear). Mathematically the layer is unchanged; after rounding, the
important columns have relatively smaller rounding error.

Shapes (``N`` = out, ``K`` = in, ``G`` = number of groups per row):

* statistics: ``x_abs_mean [K]`` (mean |x| per input channel over calibration tokens),
  ``x [T, K]`` (calibration tokens, for the clip search);
* weights ``[N_i, K]``; all linears of one group share the input, hence ``K`` and ``s``;
* scales ``s [K]`` float32, every entry finite and > 0;
* clip ranges ``max_val [N, G]`` float32 (``G = 1`` for ``channel``/``tensor`` granularity).

Candidate weights are fake-quantized with ``lowbit.formats`` (``quantize_weight``
then ``dequantize``), i.e. exactly what RTN will store for them.

How the walker uses this module (the order matters):

1. ``search_scales(stats.abs_mean, weights, scheme, spec, loss_fn)`` -> ``s``;
2. fold: ``fold_into_norm`` / ``fold_into_linear_rows`` on the producer with ``s``, and
   ``scale_input_channels(W, s)`` on every linear of the group;
3. if ``spec.clip``: with inputs captured *after* the fold,
   ``apply_clip(W', search_clip(W', x, scheme, spec), scheme)``;
4. the rounding step (RTN / GPTQ / HQQ) on the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from lowbit import formats
from lowbit.errors import CalibrationError, SchemeError
from lowbit.scheme import Granularity, QuantScheme
from lowbit.validation import check_range

SCALE_FLOOR = 1e-4  # smallest raw scale before normalisation (as in AutoAWQ)
_CLIP_CHUNK_ELEMENTS = 1 << 24  # bound on the [G, T, rows] error tensor of one clip chunk (64 MiB fp32)


@dataclass(frozen=True)
class AWQ:
    """AWQ (Lin et al. 2023): per-input-channel scales from activation magnitude, folded into the
    preceding operation, then an optional search for per-group clipping.

    ``n_grid``: exponents tried in [0, 1); ``duo_scaling``: s = x^a / w^(1-a) (else x^a);
    ``clip``: search a shrink of each group's range; ``clip_grid``/``max_shrink``: that search;
    ``max_tokens``: calibration tokens used by the searches (sampled with the calibration seed).
    """

    n_grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    max_tokens: int = 8192
    name = "awq"
    kind = "transform"
    needs_calibration = True

    def __post_init__(self) -> None:
        check_range("AWQ", "n_grid", self.n_grid, 1, 1000, integer=True)
        check_range("AWQ", "clip_grid", self.clip_grid, 1, 1000, integer=True)
        check_range("AWQ", "max_shrink", self.max_shrink, 0.0, 0.99)
        check_range("AWQ", "max_tokens", self.max_tokens, 16, 1 << 24, integer=True)
        for f in ("duo_scaling", "clip"):
            if not isinstance(getattr(self, f), bool):
                raise SchemeError(f"AWQ.{f} must be True or False")


# ---------------------------------------------------------------------------
# scales
# ---------------------------------------------------------------------------
def _magnitudes(v: torch.Tensor, what: str) -> torch.Tensor:
    """A 1-D non-negative float64 copy in which NaN counts as 0 and +-Inf as the float32 maximum."""
    if v.dim() != 1:
        raise CalibrationError(f"{what} must be 1-D [in_features], got shape {tuple(v.shape)}")
    big = torch.finfo(torch.float32).max
    return torch.nan_to_num(v.detach().to(torch.float64).abs(), nan=0.0, posinf=big, neginf=big)


def awq_scales(x_abs_mean: torch.Tensor, w_abs_mean: torch.Tensor, ratio: float, duo_scaling: bool) -> torch.Tensor:
    """Per-input-channel scales ``s [K]`` (float32) for one exponent ``ratio`` in [0, 1].

    ``s = x^ratio / w^(1 - ratio)`` with ``duo_scaling`` (else ``s = x^ratio``), where ``x``
    is the mean |activation| and ``w`` the normalised weight magnitude of each channel
    (``weight_abs_mean``); raw scales are floored at ``1e-4`` (and the denominator too),
    then divided by ``sqrt(max(s) * min(s))`` so that they straddle 1. NaN-safe: NaN
    statistics count as 0, Inf as the float32 maximum, and any scale that still comes
    out non-finite is 1; the result is always finite and > 0.
    """
    if not 0.0 <= float(ratio) <= 1.0:
        raise CalibrationError(f"AWQ ratio must lie in [0, 1], got {ratio}")
    x = _magnitudes(x_abs_mean, "x_abs_mean")
    s = x.pow(float(ratio))
    if duo_scaling:
        w = _magnitudes(w_abs_mean, "w_abs_mean")
        if w.shape != x.shape:
            raise CalibrationError(
                f"activation statistics have {x.numel()} channels but the weights have {w.numel()} input channels"
            )
        s = s / w.pow(1.0 - float(ratio)).clamp(min=SCALE_FLOOR)
    s = s.clamp(min=SCALE_FLOOR)
    if s.numel():
        s = s / (s.max().sqrt() * s.min().sqrt())  # sqrt(max * min) without overflowing the product
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s)).to(torch.float32)
    # float32 may underflow/overflow what float64 held; keep the fold well defined
    tiny, big = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    return s.clamp(min=tiny, max=big)


def _check_weights(weights: Sequence[torch.Tensor]) -> int:
    if len(weights) == 0:
        raise CalibrationError("AWQ needs at least one weight in the group")
    k = None
    for w in weights:
        if w.dim() != 2:
            raise CalibrationError(f"weights must be 2-D [out, in], got shape {tuple(w.shape)}")
        if k is not None and w.shape[1] != k:
            raise CalibrationError(
                f"the linears of one AWQ group must share their input size, got {k} and {w.shape[1]}"
            )
        k = w.shape[1]
    return k


def weight_abs_mean(weights: Sequence[torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    """AWQ's normalised weight magnitude per input channel, float32 ``[K]``.

    Each weight is divided by the max |w| of its quantization group (a group of the
    scheme; the whole row for ``channel``, the whole matrix for ``tensor``), then the
    result is averaged over the output rows of all the linears together.
    """
    k = _check_weights(weights)
    total = torch.zeros(k, dtype=torch.float64, device=weights[0].device)
    rows = 0
    for w in weights:
        a = w.detach().to(torch.float32).abs().nan_to_num(nan=0.0)
        g = formats.grouped(a, scheme)
        g = g / (g.amax(dim=-1, keepdim=True) + 1e-6)
        total += g.reshape(w.shape).sum(dim=0, dtype=torch.float64)
        rows += w.shape[0]
    return (total / max(rows, 1)).to(torch.float32)


@torch.no_grad()
def fake_quantize(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``dequantize(quantize_weight(w))``, in ``w``'s dtype: what RTN will store for ``w``."""
    codes, qp = formats.quantize_weight(w, scheme)
    return formats.dequantize(codes, qp, scheme, dtype=torch.float32).to(w.dtype)


@torch.no_grad()
def scaled_candidates(weights: Sequence[torch.Tensor], s: torch.Tensor, scheme: QuantScheme) -> list[torch.Tensor]:
    """For one scale vector: ``dequant(quant(W * s)) / s`` for each weight (in its dtype)."""
    s32 = s.to(torch.float32)
    out = []
    for w in weights:
        q = fake_quantize(scale_input_channels(w, s32), scheme)
        out.append((q.to(torch.float32) / s32).to(w.dtype))
    return out


@dataclass(frozen=True)
class AWQScaleSearch:
    """The outcome of ``search_scales``.

    scales:       float32 ``[K]``, the scales to fold (all ones when no candidate beat s = 1).
    ratio:        the exponent that gave them, or ``None`` when s = 1 was kept.
    losses:       the loss of each ratio ``i / n_grid``, in order (NaN losses are kept as NaN).
    loss_at_one:  the loss with s = 1 (plain RTN of the unscaled weights).
    loss:         the loss of the returned ``scales`` (``min(losses)`` or ``loss_at_one``).
    """

    scales: torch.Tensor
    ratio: Optional[float]
    losses: tuple[float, ...]
    loss_at_one: float
    loss: float

    @property
    def ratios(self) -> tuple[float, ...]:
        n = len(self.losses)
        return tuple(i / n for i in range(n))

    @property
    def improved(self) -> bool:
        """Whether the returned scales beat s = 1."""
        return self.ratio is not None


@torch.no_grad()
def search_scales(
    x_abs_mean: torch.Tensor,
    weights: Sequence[torch.Tensor],
    scheme: QuantScheme,
    spec: AWQ,
    loss_fn: Callable[[list[torch.Tensor]], float],
) -> AWQScaleSearch:
    """Grid search of AWQ's exponent: ratios ``i / spec.n_grid`` for ``i < n_grid``.

    ``loss_fn(candidates)`` gets, for one candidate ``s``, the list
    ``dequant(quant(W * s)) / s`` (same shapes and dtypes as ``weights``) and returns the
    output error of the enclosing module with those weights in place (lower is better).
    It is also called once with ``s = 1`` (plain RTN) for ``loss_at_one``.

    The best ratio (lowest finite loss; the first one on ties) wins only if its loss is
    strictly below ``loss_at_one``; otherwise every candidate made the output worse and
    the scales returned are all ones (``ratio=None``), i.e. AWQ leaves the layer alone.
    NaN losses never win (a NaN ``loss_at_one`` loses to any finite candidate).
    """
    k = _check_weights(weights)
    if x_abs_mean.shape != (k,):
        raise CalibrationError(
            f"activation statistics have shape {tuple(x_abs_mean.shape)}, the weights expect [{k}]"
        )
    w_mean = weight_abs_mean(weights, scheme)
    ones = torch.ones(k, dtype=torch.float32, device=weights[0].device)
    loss_at_one = float(loss_fn([fake_quantize(w, scheme) for w in weights]))

    losses: list[float] = []
    best_i, best_loss, best_s = None, float("inf"), None
    for i in range(spec.n_grid):
        ratio = i / spec.n_grid
        s = awq_scales(x_abs_mean, w_mean, ratio, spec.duo_scaling)
        loss = float(loss_fn(scaled_candidates(weights, s, scheme)))
        losses.append(loss)
        if loss == loss and loss < best_loss:  # loss == loss: not NaN
            best_i, best_loss, best_s = i, loss, s

    one = loss_at_one if loss_at_one == loss_at_one else float("inf")  # a NaN baseline loses to any finite loss
    if best_i is None or not (best_loss < one):
        return AWQScaleSearch(ones, None, tuple(losses), loss_at_one, loss_at_one)
    return AWQScaleSearch(best_s, best_i / spec.n_grid, tuple(losses), loss_at_one, best_loss)


# ---------------------------------------------------------------------------
# clipping
# ---------------------------------------------------------------------------
def _clip_groups(scheme: QuantScheme, k: int) -> tuple[int, int]:
    """(groups per row, columns per group) of the clip search."""
    if scheme.granularity is Granularity.GROUP:
        scheme.check_layer("<awq clip>", k)
        return k // scheme.group_size, scheme.group_size
    return 1, k


def _shrinks(spec: AWQ) -> list[float]:
    n = max(1, int(spec.max_shrink * spec.clip_grid))  # i = 0 (no clip) is always a candidate
    return [1.0 - i / spec.clip_grid for i in range(n)]


@torch.no_grad()
def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    scheme: QuantScheme,
    spec: AWQ,
    *,
    chunk_elements: int = _CLIP_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Best clipping range per (row, group), float32 ``[N, G]``.

    For shrink factors ``f = 1 - i / spec.clip_grid`` (``i < max_shrink * clip_grid``;
    ``f = 1`` is no clipping), each group is clamped to ``[-f * m, f * m]`` (``m`` its
    max |w|), fake-quantized, and scored by its output error on the tokens,
    ``sum_t (x_t,g . (w_g - wq_g))^2`` (``x_t,g`` the token's slice of the group's
    columns). Each (row, group) keeps its own best ``f * m`` (the first on ties, so no
    clip unless it helps). ``channel`` granularity uses the whole row as the group;
    ``tensor`` granularity chooses one factor for the whole matrix (error summed over
    every row) and returns it repeated as ``[N, 1]``.

    The error is evaluated whichever way is cheaper (same value up to rounding):
    directly over the ``T`` tokens (``2 T K`` flops per row and candidate), or, when the
    group is smaller than ``T``, as the quadratic form ``d_g^T (X_g^T X_g) d_g`` with the
    per-group Gram matrices in float64 (``2 K gs`` flops, independent of ``T``). Rows are
    processed in chunks so that the per-chunk work tensor (``[G, T, rows]`` or
    ``[G, rows, gs]``) stays under ``chunk_elements``.

    ``x`` is ``[T, K]`` (leading dimensions are flattened).
    """
    if weight.dim() != 2:
        raise CalibrationError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise CalibrationError(f"inputs have {x.shape[-1]} features, the weight expects {k}")
    xs = x.detach().reshape(-1, k).to(torch.float32)
    if not bool(torch.isfinite(xs).all()):
        raise CalibrationError("calibration inputs contain NaN/Inf; AWQ's clip search needs finite activations")
    G, gs = _clip_groups(scheme, k)
    T = xs.shape[0]
    xg = xs.reshape(T, G, gs).transpose(0, 1).contiguous()  # [G, T, gs]
    if gs < T:  # quadratic form with the Gram matrices: cost independent of T
        gram = torch.bmm(xg.transpose(1, 2).to(torch.float64), xg.to(torch.float64))  # [G, gs, gs]
        del xg
        rows = max(1, chunk_elements // max(1, G * gs))

        def group_errors(d: torch.Tensor) -> torch.Tensor:  # d [c, G, gs] -> [c, G]
            d64 = d.transpose(0, 1).to(torch.float64)  # [G, c, gs]
            return (torch.bmm(d64, gram) * d64).sum(dim=-1).T
    else:  # directly over the tokens
        rows = max(1, chunk_elements // max(1, G * T))

        def group_errors(d: torch.Tensor) -> torch.Tensor:
            return torch.bmm(xg, d.permute(1, 2, 0)).pow_(2).sum(dim=1).T.to(torch.float64)

    w32 = weight.detach().to(torch.float32)
    org_max = w32.reshape(n, G, gs).abs().amax(dim=-1)  # [N, G]
    shrinks = _shrinks(spec)
    tensor_wise = scheme.granularity is Granularity.TENSOR
    if tensor_wise:
        # one (s, z) for the whole matrix: each candidate's qparams come from the whole clamped weight
        gmax = org_max.max()
        tensor_qp = [formats.choose_qparams(_clamp(w32, gmax * f, weight.dtype), scheme) for f in shrinks]
        totals = torch.zeros(len(shrinks), dtype=torch.float64, device=weight.device)

    best_err = torch.full((n, G), float("inf"), dtype=torch.float64, device=weight.device)
    best_max = org_max.clone()
    for r0 in range(0, n, rows):
        w = w32[r0 : r0 + rows]  # [c, K]
        c = w.shape[0]
        m0 = gmax.expand(c, G) if tensor_wise else org_max[r0 : r0 + rows]
        for j, f in enumerate(shrinks):
            m = m0 * f
            wc = _clamp(w.reshape(c, G, gs), m.unsqueeze(-1), weight.dtype).reshape(c, k)
            if tensor_wise:
                codes = formats.quantize(wc, tensor_qp[j], scheme)
                wq = formats.dequantize(codes, tensor_qp[j], scheme)
            else:
                wq = formats.dequantize(*formats.quantize_weight(wc, scheme), scheme)
            err = group_errors((w - wq.to(weight.dtype).to(torch.float32)).reshape(c, G, gs))  # [c, G]
            if tensor_wise:
                totals[j] += err.sum()
            else:
                better = err < best_err[r0 : r0 + rows]
                best_err[r0 : r0 + rows] = torch.where(better, err, best_err[r0 : r0 + rows])
                best_max[r0 : r0 + rows] = torch.where(better, m, best_max[r0 : r0 + rows])
    if tensor_wise:
        j = int(torch.argmin(totals))  # first minimum: no clip on ties
        return (gmax * shrinks[j]).expand(n, 1).clone()
    return best_max


def _clamp(w: torch.Tensor, m, dtype: torch.dtype) -> torch.Tensor:
    """``clamp(w, -m, m)`` in float32, rounded through ``dtype`` (what the stored weight will hold)."""
    m = torch.as_tensor(m, dtype=torch.float32)
    out = torch.minimum(torch.maximum(w, -m), m)
    return out if dtype == torch.float32 else out.to(dtype).to(torch.float32)


def apply_clip(weight: torch.Tensor, max_val: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Clamp each group of ``weight [N, K]`` to ``[-max_val, max_val]``; a new tensor in weight's dtype.

    ``max_val`` is ``[N, G]`` as ``search_clip`` returns it (``[N, 1]`` or ``[1, 1]`` for
    ``channel``/``tensor`` granularity).
    """
    if weight.dim() != 2:
        raise CalibrationError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    G, gs = _clip_groups(scheme, k)
    if max_val.dim() != 2 or max_val.shape[1] != G or max_val.shape[0] not in (1, n):
        raise CalibrationError(f"max_val must be [{n}, {G}] for this weight and scheme, got {tuple(max_val.shape)}")
    m = max_val.detach().to(torch.float32).expand(n, G).unsqueeze(-1)
    w = weight.detach().to(torch.float32).reshape(n, G, gs)
    return torch.minimum(torch.maximum(w, -m), m).reshape(n, k).to(weight.dtype)


# ---------------------------------------------------------------------------
# folding (pure: new tensors; the walker puts them in the model)
# ---------------------------------------------------------------------------
def _check_scales(s: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if s.dim() != 1 or s.numel() != n:
        raise CalibrationError(f"scales have shape {tuple(s.shape)}, {what} needs [{n}]")
    s32 = s.detach().to(torch.float32)
    if not bool((torch.isfinite(s32) & (s32 > 0)).all()):
        raise CalibrationError(f"scales must be finite and > 0 to fold into {what}")
    return s32


def scale_input_channels(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``w [N, K] * s [K]`` (column ``j`` times ``s_j``), computed in float32, in w's dtype."""
    if w.dim() != 2:
        raise CalibrationError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    s32 = _check_scales(s, w.shape[1], "the weight's input channels")
    return (w.detach().to(torch.float32) * s32).to(w.dtype)


def fold_into_norm(
    weight: torch.Tensor, bias: Optional[torch.Tensor], s: torch.Tensor
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A norm's affine ``weight [K]`` (and ``bias [K]``) divided by ``s``: its output becomes ``norm(x) / s``.

    Computed in float32, returned in the inputs' dtypes.
    """
    if weight.dim() != 1:
        raise CalibrationError(f"a norm weight must be 1-D, got shape {tuple(weight.shape)}")
    s32 = _check_scales(s, weight.shape[0], "the norm")
    w = (weight.detach().to(torch.float32) / s32).to(weight.dtype)
    b = None if bias is None else (bias.detach().to(torch.float32) / s32).to(bias.dtype)
    return w, b


def fold_into_linear_rows(
    w: torch.Tensor, b: Optional[torch.Tensor], s: torch.Tensor
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A preceding linear's rows divided by ``s`` (``w [N_prev, K_prev]``, ``b [N_prev]``, ``s [N_prev]``):
    its output becomes ``y / s``. Computed in float32, returned in the inputs' dtypes."""
    if w.dim() != 2:
        raise CalibrationError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    s32 = _check_scales(s, w.shape[0], "the preceding linear's output rows")
    w2 = (w.detach().to(torch.float32) / s32.unsqueeze(1)).to(w.dtype)
    b2 = None if b is None else (b.detach().to(torch.float32) / s32).to(b.dtype)
    return w2, b2
