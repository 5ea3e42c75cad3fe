"""GPTQ (Frantar et al. 2022): round one input column at a time and push each
column's rounding error onto the columns not yet rounded, weighted by the
inverse Hessian of the layer's reconstruction error ``||X W^T - X Q^T||^2``.

Shapes (``N = out``, ``K = in``, ``G`` = group size):

* ``weight``: ``[N, K]`` (any float dtype; the math runs in float32);
* ``hessian``: ``[K, K]``, ``2/n * X^T X`` from ``lowbit.calibration.stats.HessianAccumulator``;
* the working copies: ``W`` float32 ``[N, K]``, the upper Cholesky factor ``U`` of
  ``H^-1`` float32 ``[K, K]`` (at most two ``[K, K]`` matrices live at once), codes
  uint8 ``[N, K]``;
* the result: ``QuantizedTensor`` with ``scale``/``zero`` exactly as
  ``formats.quantize_weight`` makes them (``[N, K/G]``, ``[N, 1]`` or ``[1, 1]``).

Quantization parameters always come from ``formats.choose_qparams`` (or, with
``GPTQ(clip_search=True)``, ``formats.search_qparams``) and codes
from ``formats.quantize``, so the numerics (scale dtype rounding, integer or
float zero points) are those of RTN; with a Hessian that has no off-diagonal
terms there is no error feedback and GPTQ returns RTN's result bit for bit.

When parameters are chosen:

* granularity ``channel``/``tensor``: once, from the whole weight, up front;
* ``group`` without act-order: for each group when its first column is reached,
  from the current (error-updated) weights of that group;
* ``group`` with act-order: columns are processed by descending ``diag(H)``
  (stable sort), and every group's parameters are chosen up front from the
  original weight ("static groups"), so the stored layout stays the plain
  contiguous grouping with no ``g_idx``; codes land in their original columns.
* ``group`` with ``GPTQ(act_order=True, group_aware=True)`` (group-aware reordering):
  whole groups are processed by descending largest ``diag(H)``, each group's columns
  by descending ``diag(H)``; a group's columns are contiguous in that order, so its
  parameters are chosen when it is reached, from the current weights, as without
  act-order. Same stored layout.

In every case dead columns (``diag(H) == 0``: the input is always zero) are
zeroed in the weight first.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from lowbit import formats
from lowbit.errors import CalibrationError, SchemeError
from lowbit.formats import QParams
from lowbit.scheme import Granularity, QuantScheme
from lowbit.tensor import QuantizedTensor
from lowbit.validation import check_range


@dataclasses.dataclass(frozen=True)
class GPTQ:
    """GPTQ (Frantar et al. 2022): column-by-column rounding with second-order error feedback.

    ``damp``: fraction of mean(diag H) added to the diagonal; ``block_size``: columns per lazy
    batch update; ``act_order``: process columns by descending Hessian diagonal (group
    parameters stay static, so the stored layout is unchanged); ``true_sequential``: within a
    block, collect each stage's statistics after the earlier stages are quantized.
    ``clip_search``: choose each group's range by the GPTQ reference's weight-error search
    (``formats.search_qparams`` with ``clip_grid``, ``max_shrink``, ``clip_norm``) instead of
    its min/max; off by default (then GPTQ with ``H = I`` is RTN bit for bit).
    ``refine_scales``: after the codes are chosen, replace each row's scales by the
    least-squares optimum of the layer's output error for those codes and zero points
    (``lowbit.methods.gptq.refine_scales``); a row keeps its old scales where that is not lower.
    ``fp_targets``: GPTAQ-style asymmetric calibration (Li et al. 2025): fit the layer to the
    full-precision model's outputs ``X_fp W^T`` from the quantized model's inputs ``X_q``
    (the walker keeps a second, full-precision stream of block inputs, so the calibration
    activations held or spilled double); off = plain GPTQ, which fits ``X_q W^T``.
    ``group_aware``: with ``act_order`` and group granularity, reorder by whole groups instead
    of by single columns (group-aware reordering, GAR: Gafni et al. 2025): groups are processed
    in descending order of their largest ``diag(H)``, the columns of each group in descending
    order; since a group's columns are then contiguous in processing order, its parameters are
    chosen when it is reached, from the error-updated weights (as without act-order), instead of
    up front from the original weight. The stored layout is the plain contiguous grouping either
    way. Needs ``act_order=True``; channel and tensor granularity are unaffected.
    ``token_cap``: None, or a number >= 1: before a token enters ``H``, its input is scaled down
    to at most ``token_cap`` times the median token norm of its calibration window
    (``lowbit.calibration.stats.cap_token_norms``), so that a few massive-activation tokens
    (an attention sink at each window's first position) do not outweigh all the others. Not
    combinable with ``fp_targets``.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    true_sequential: bool = True
    clip_search: bool = False
    clip_grid: int = 100
    max_shrink: float = 0.8
    clip_norm: float = 2.4
    refine_scales: bool = False
    fp_targets: bool = False
    group_aware: bool = False
    token_cap: Optional[float] = None
    name = "gptq"
    kind = "rounding"
    needs_calibration = True

    def __post_init__(self) -> None:
        check_range("GPTQ", "damp", self.damp, 0.0, 1.0)
        check_range("GPTQ", "block_size", self.block_size, 1, 1 << 16, integer=True)
        check_range("GPTQ", "clip_grid", self.clip_grid, 1, 10_000, integer=True)
        check_range("GPTQ", "max_shrink", self.max_shrink, 1e-6, 1.0)
        check_range("GPTQ", "clip_norm", self.clip_norm, 1e-6, 100.0)
        for f in ("act_order", "true_sequential", "clip_search", "refine_scales", "fp_targets", "group_aware"):
            if not isinstance(getattr(self, f), bool):
                raise SchemeError(f"GPTQ.{f} must be True or False")
        if self.token_cap is not None:
            check_range("GPTQ", "token_cap", self.token_cap, 1.0, 1e9)
            if self.fp_targets:
                raise SchemeError(
                    "GPTQ(token_cap=...) reweights the Hessian's tokens, which fp_targets' cross-covariance "
                    "does not follow; use one of token_cap and fp_targets"
                )
        if self.group_aware and not self.act_order:
            raise SchemeError(
                "GPTQ(group_aware=True) reorders act-order by groups and needs act_order=True; "
                "use GPTQ(act_order=True, group_aware=True), or drop group_aware"
            )



def _column_scheme(scheme: QuantScheme) -> QuantScheme:
    """The same numerics with one (scale, zero) per row: quantizes one ``[N, 1]`` column."""
    return dataclasses.replace(scheme, granularity=Granularity.CHANNEL, group_size=None)


def _suggest_damp(damp: float) -> str:
    return f"GPTQ(damp={min(1.0, max(0.01, damp * 10)):g})"


def order_group_size(spec: GPTQ, scheme: QuantScheme) -> Optional[int]:
    """The group size GPTQ's processing order is built around for ``scheme``: the scheme's group
    size with ``GPTQ(act_order=True, group_aware=True)`` and group granularity, else None (the
    order, if any, is by single columns). Linears whose schemes give the same value can share one
    ``PreparedHessian``."""
    if spec.act_order and spec.group_aware and scheme.granularity is Granularity.GROUP:
        return scheme.group_size
    return None


def processing_order(diag: torch.Tensor, act_order: bool, group_size: Optional[int] = None) -> Optional[torch.Tensor]:
    """The order GPTQ rounds the columns in, long ``[K]``, from ``diag`` ``[K]`` (``diag(H)``).

    None: the natural order (``act_order`` off). ``group_size`` None: every column by descending
    ``diag`` (stable). ``group_size`` G (``K % G == 0``): group-aware reordering, groups by
    descending largest ``diag`` in the group, then each group's columns by descending ``diag``
    (both stable), so every group's columns stay contiguous.
    """
    if not act_order:
        return None
    if group_size is None:
        return torch.sort(diag, descending=True, stable=True).indices
    k = diag.numel()
    if k % group_size:
        raise CalibrationError(f"group-aware order: {k} columns do not split into groups of {group_size}")
    by_group = diag.reshape(k // group_size, group_size)  # [K/G, G]
    group_rank = torch.sort(by_group.max(dim=1).values, descending=True, stable=True).indices  # [K/G]
    within = torch.sort(by_group, dim=1, descending=True, stable=True).indices  # [K/G, G]
    starts = (torch.arange(k // group_size, device=diag.device) * group_size).unsqueeze(1)  # [K/G, 1]
    return (starts + within)[group_rank].reshape(k)


def _prepare_hessian(
    hessian: torch.Tensor, damp: float, act_order: bool, device: torch.device, order_group: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """From the caller's ``hessian`` (``[K, K]``, left untouched) to ``(U, dead, perm, diag)``.

    ``dead``: bool ``[K]``, columns with ``diag(H) == 0``; ``perm``: long ``[K]``, the
    processing order (``processing_order`` with ``order_group``) or None for the natural order;
    ``U``: float32 ``[K, K]``, upper triangular with ``U^T U = (H_p + damp * mean(diag H) I)^-1``
    where ``H_p`` is ``H`` with dead columns decoupled (``H[i, i] = 1``) and permuted by ``perm``;
    ``diag``: float32 ``[K]``, ``diag(H)`` undamped in the natural column order (each input
    column's mean square activation, times 2), the weights of ``clip_search``'s error.

    All intermediates live in this frame and are freed as soon as they are used, so at most
    two ``[K, K]`` float32 matrices exist at once (besides the caller's ``hessian``).
    """
    h = hessian.detach().to(device=device, dtype=torch.float32, copy=True)  # [K, K]
    if not bool(torch.isfinite(h).all()):
        raise CalibrationError(
            "the Hessian contains NaN/Inf values: the calibration activations overflowed; "
            "calibrate in float32 or bfloat16, or check the model and the calibration data"
        )
    hdiag = h.diagonal().clone()  # [K]
    # dead columns: their input is always zero, so their weights do not matter; decouple them
    dead = h.diagonal() == 0  # [K]
    if bool(dead.any()):
        h[dead, :] = 0
        h[:, dead] = 0
        h.diagonal()[dead] = 1
    perm = processing_order(h.diagonal(), act_order, order_group)  # [K] or None
    if perm is not None:
        h = h.index_select(0, perm)
        h = h.index_select(1, perm)
    diag = h.diagonal()
    diag.add_(damp * float(diag.mean()))
    del diag
    lower, info = torch.linalg.cholesky_ex(h)
    del h
    if int(info) != 0:
        raise CalibrationError(
            f"the Hessian is not positive definite even after dampening with damp={damp} "
            f"(Cholesky failed at column {int(info) - 1}); raise the dampening, e.g. "
            f"{_suggest_damp(damp)}, or calibrate on more tokens"
        )
    # H^-1 by two triangular solves: torch.cholesky_inverse is ~30x slower on CPU (torch 2.13)
    hinv = torch.cholesky_solve(torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device), lower)  # [K, K]
    del lower
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    del hinv
    if int(info) != 0 or not bool(torch.isfinite(upper.diagonal()).all()):
        raise CalibrationError(
            f"the inverse Hessian is numerically singular with damp={damp}; raise the dampening, "
            f"e.g. {_suggest_damp(damp)}, or calibrate on more tokens"
        )
    return upper, dead, perm, hdiag


@dataclasses.dataclass(frozen=True)
class PreparedHessian:
    """What GPTQ derives from a Hessian once, shareable by every linear that reads the same
    input (q/k/v, gate/up): ``upper`` float32 ``[K, K]`` (upper Cholesky factor of the damped,
    permuted inverse), ``dead`` bool ``[K]``, ``perm`` long ``[K]`` or None, and the spec
    fields it depends on (``order_group``: see ``order_group_size``); ``diag`` float32 ``[K]``
    is the undamped ``diag(H)``."""

    upper: torch.Tensor
    dead: torch.Tensor
    perm: Optional[torch.Tensor]
    damp: float
    act_order: bool
    diag: torch.Tensor
    order_group: Optional[int] = None


def prepare_hessian(
    hessian: torch.Tensor, spec: GPTQ = GPTQ(), scheme: Optional[QuantScheme] = None
) -> PreparedHessian:
    """Validate, damp, (permute) and factor ``hessian`` ``[K, K]`` for ``gptq``.

    ``scheme`` is needed with ``GPTQ(group_aware=True)``, whose order depends on the group size;
    the result serves every scheme with the same ``order_group_size``."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise CalibrationError(f"a Hessian must be square [in, in], got shape {tuple(hessian.shape)}")
    if spec.group_aware and scheme is None:
        raise CalibrationError(
            "prepare_hessian with GPTQ(group_aware=True) needs the scheme (its order depends on the "
            "group size): prepare_hessian(hessian, spec, scheme)"
        )
    order_group = None if scheme is None else order_group_size(spec, scheme)
    if order_group is not None:
        scheme.check_layer("<gptq weight>", hessian.shape[0])
    u, dead, perm, diag = _prepare_hessian(hessian, spec.damp, spec.act_order, hessian.device, order_group)
    return PreparedHessian(
        upper=u, dead=dead, perm=perm, damp=spec.damp, act_order=spec.act_order, diag=diag, order_group=order_group
    )


def gptq(
    weight: torch.Tensor, scheme: QuantScheme, hessian, spec: GPTQ = GPTQ()
) -> QuantizedTensor:
    """Quantize ``weight`` ``[out, in]`` with GPTQ, given ``hessian`` ``[in, in]`` (a tensor, or
    a ``PreparedHessian`` from ``prepare_hessian`` with the same spec, to share the factoring).

    A pure function: neither input is modified. Raises ``CalibrationError`` when the
    Hessian has the wrong shape, holds NaN/Inf, or is not positive definite after
    dampening (the message says to raise ``GPTQ(damp=...)``); ``FormatError`` (as RTN)
    for NaN/Inf weights.
    """
    if not isinstance(spec, GPTQ):
        raise CalibrationError(f"gptq needs a GPTQ spec, got {type(spec).__name__}")
    if spec.fp_targets:
        raise CalibrationError(
            "GPTQ(fp_targets=True) needs the full-precision stream of the block walker; quantize "
            "through lowbit.quantize(model, recipe, calibration=...), or pass fp_target_weight(...) "
            "as the weight with GPTQ(fp_targets=False)"
        )
    if weight.dim() != 2:
        raise CalibrationError(f"GPTQ quantizes 2-D [out, in] weights, got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    shape = tuple(hessian.upper.shape) if isinstance(hessian, PreparedHessian) else tuple(hessian.shape)
    if shape != (n_in, n_in):
        raise CalibrationError(
            f"the Hessian has shape {shape} but the weight {tuple(weight.shape)} needs "
            f"[{n_in}, {n_in}] (in_features squared); it was accumulated on another layer's inputs"
        )
    if scheme.granularity is Granularity.GROUP:
        scheme.check_layer("<gptq weight>", n_in)
    device = weight.device
    order_group = order_group_size(spec, scheme)

    w = weight.detach().to(device=device, dtype=torch.float32, copy=True)  # [N, K]
    formats._check_finite(w)  # FormatError, as RTN, before any [K, K] work
    if isinstance(hessian, PreparedHessian):
        if (hessian.damp, hessian.act_order) != (spec.damp, spec.act_order):
            raise CalibrationError("the PreparedHessian was made with another damp/act_order than this spec")
        if hessian.order_group != order_group:
            raise CalibrationError(
                f"the PreparedHessian's column order was built for group size {hessian.order_group} but "
                f"this spec and scheme need {order_group}; use prepare_hessian(hessian, spec, scheme)"
            )
        u, dead, perm, hdiag = hessian.upper.to(device), hessian.dead.to(device), hessian.perm, hessian.diag.to(device)
        perm = None if perm is None else perm.to(device)
    else:
        u, dead, perm, hdiag = _prepare_hessian(hessian, spec.damp, spec.act_order, device, order_group)  # U: [K, K]
    w[:, dead] = 0
    if spec.refine_scales:
        if scheme.double_quant:
            raise CalibrationError(
                "GPTQ(refine_scales=True) cannot keep double-quantized scales; use refine_scales=False "
                "with double_quant schemes"
            )
        target = w.clone()  # [N, K] the weight the refined scales are fitted to
        h_damped = _hessian_from_factor(u, perm)  # [K, K] natural order

    def choose_qparams(x: torch.Tensor, cols: Optional[torch.Tensor] = None) -> QParams:
        """Parameters for the columns ``x`` of the weight; ``cols`` long: their indices (natural order)."""
        if spec.clip_search:
            cols = hdiag if cols is None else hdiag[cols]
            return formats.search_qparams(
                x, scheme, grid=spec.clip_grid, max_shrink=spec.max_shrink, norm=spec.clip_norm, column_weights=cols
            )
        return formats.choose_qparams(x, scheme)

    group = scheme.granularity is Granularity.GROUP
    gsize = scheme.group_size if group else n_in
    static = (not group) or (spec.act_order and order_group is None)
    if static:
        # [N, K/G] (group), [N, 1] (channel) or [1, 1] (tensor), from the whole weight up front
        qp_static = choose_qparams(w)
        scale, zero = qp_static.scale, qp_static.zero
        # per column j (in processing order): s_all[:, col_group[j]] and z_all[:, col_group[j]]
        s_all = scale.expand(n_out, scale.shape[1])  # [1, 1] (tensor) -> [N, 1]
        z_all = None if zero is None else zero.expand(n_out, zero.shape[1])
    else:  # filled group by group as the columns are reached: [N, K/G]
        scale = torch.empty(n_out, n_in // gsize, dtype=formats.scale_torch_dtype(scheme), device=device)
        zero = None if scheme.symmetric else torch.empty_like(scale, dtype=formats.zero_torch_dtype(scheme))

    if perm is not None:
        w = w[:, perm]
        col_group = (perm // gsize).tolist() if group else [0] * n_in  # original group of each processed column
    else:
        col_group = [j // gsize for j in range(n_in)]
    natural = perm if perm is not None else torch.arange(n_in, device=device)  # [K] column of each position

    col_scheme = _column_scheme(scheme)
    codes = torch.empty(n_out, n_in, dtype=torch.uint8, device=device)  # in processing order
    s_col = z_col = None  # [N] parameters of the current column's group

    bs = spec.block_size
    for i1 in range(0, n_in, bs):
        i2 = min(i1 + bs, n_in)
        w1 = w[:, i1:i2].clone()  # [N, B] the block, updated in place as columns are rounded
        err1 = torch.zeros_like(w1)  # [N, B] scaled errors, for the lazy update of the rest
        u1 = u[i1:i2, i1:i2]  # [B, B]
        for i in range(i2 - i1):
            j = i1 + i
            if static:
                g = col_group[j]
                s_col = s_all[:, g]
                z_col = None if z_all is None else z_all[:, g]
            elif j % gsize == 0:
                # the group's weights as they stand now: columns inside this block from w1,
                # columns past it from w minus this block's updates so far
                end = j + gsize
                cur = w1[:, i : min(end, i2) - i1]
                if end > i2:
                    rest = w[:, i2:end] - err1[:, :i] @ u[i1:j, i2:end]
                    cur = torch.cat([cur, rest], dim=1)
                # one whole group (the group-aware order keeps a group's columns contiguous)
                qp = choose_qparams(cur, natural[j:end])  # [N, 1]
                s_col, z_col = qp.scale[:, 0], None if qp.zero is None else qp.zero[:, 0]
                scale[:, col_group[j]] = s_col
                if zero is not None:
                    zero[:, col_group[j]] = z_col
            col = w1[:, i : i + 1]  # [N, 1]
            qp_col = QParams(s_col.unsqueeze(1), None if z_col is None else z_col.unsqueeze(1))
            q = formats.quantize(col, qp_col, col_scheme, check_finite=False)  # [N, 1] uint8; w checked above
            codes[:, j : j + 1] = q
            deq = formats.dequantize(q, qp_col, col_scheme)  # [N, 1] float32
            e = (col - deq) / u1[i, i]  # [N, 1]
            # rank-1 update in place through BLAS (no [N, B] temporary; stays fast on busy CPUs)
            w1[:, i:].addmm_(e, u1[i : i + 1, i:], alpha=-1.0)
            err1[:, i : i + 1] = e
        if i2 < n_in:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
        del w1, err1, u1
    del u, w

    if perm is not None:
        restored = torch.empty_like(codes)
        restored[:, perm] = codes
        codes = restored
    qp = QParams(scale, zero)
    if spec.refine_scales:
        qp = refine_scales(target, codes, qp, scheme, h_damped)
    return QuantizedTensor.from_codes(codes, qp, scheme)


def fp_target_weight(weight: torch.Tensor, cross: torch.Tensor, hessian: PreparedHessian) -> torch.Tensor:
    """GPTAQ's target ``W* = W + W D H^-1`` ``[N, K]`` float32 (``H`` damped, as GPTQ factored it).

    GPTQ on ``W*`` with ``H`` minimises ``||X_fp W^T - X_q Q^T||^2`` (the full-precision model's
    outputs from the quantized model's inputs): that error is ``||X_q (W* - Q)^T||^2`` plus a
    constant, with ``W*`` the least-squares regression of ``X_fp W^T`` on ``X_q``. ``cross``: ``D``
    ``[K, K]`` from ``lowbit.calibration.stats.CrossAccumulator``; the dampening acts on the
    correction only, so ``D = 0`` (identical inputs) gives ``W`` itself.
    """
    n_in = hessian.upper.shape[0]
    if tuple(cross.shape) != (n_in, n_in) or weight.shape[1] != n_in:
        raise CalibrationError(
            f"fp targets need a [{n_in}, {n_in}] cross-covariance and an [out, {n_in}] weight, got "
            f"{tuple(cross.shape)} and {tuple(weight.shape)}"
        )
    u = hessian.upper
    w = weight.detach().float().to(u.device)
    wc = w @ cross.float().to(u.device)  # [N, K]
    perm = hessian.perm
    if perm is not None:
        wc = wc[:, perm]
    corr_p = (wc @ u.T) @ u  # (W D)_p H_p^-1, since H_p^-1 = U^T U
    if perm is None:
        return w + corr_p
    corr = torch.empty_like(corr_p)
    corr[:, perm] = corr_p
    return w + corr


def _hessian_from_factor(upper: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """The damped Hessian ``(U^T U)^-1 = U^-1 U^-T`` ``[K, K]`` from GPTQ's factor, in the natural order."""
    eye = torch.eye(upper.shape[0], dtype=upper.dtype, device=upper.device)
    v = torch.linalg.solve_triangular(upper, eye, upper=True)  # U^-1
    h_p = v @ v.T
    if perm is None:
        return h_p
    h = torch.empty_like(h_p)
    h[perm.unsqueeze(1), perm.unsqueeze(0)] = h_p
    return h


def layer_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per row, ``(w - q) H (w - q)^T``: the layer's output error on the calibration inputs, ``[N]``."""
    d = weight.float() - approx.float()
    return ((d @ hessian) * d).sum(dim=1)


def refine_scales(
    weight: torch.Tensor, codes: torch.Tensor, qp: QParams, scheme: QuantScheme, hessian: torch.Tensor
) -> QParams:
    """Scales that minimise ``(w - q(s)) H (w - q(s))^T`` row by row for fixed ``codes`` and zero points.

    ``weight`` ``[N, K]`` float32, ``codes`` uint8 ``[N, K]``, ``qp`` their parameters, ``hessian``
    ``[K, K]`` (positive definite). A dequantized weight is linear in its scales
    (``q = s_g * v(code, zero)``), so each row's ``G`` group scales solve a ``G x G`` linear system
    ``M s = b`` with ``M[g, h] = v_g^T H_gh v_h`` and ``b[g] = v_g^T (H w)_g``; tensor granularity
    solves one scalar for all rows. The result is cast to the scale dtype; a row whose new scales
    are not all finite and positive, or whose error (after that cast) is not lower, keeps its old
    scales, so no row ever gets worse.
    """
    unit = QParams(torch.ones_like(qp.scale, dtype=torch.float32), qp.zero)
    v = formats.dequantize(codes, unit, scheme)  # [N, K] value of each code per unit scale
    n, k = v.shape
    hw = weight @ hessian  # [N, K]
    old = qp.scale
    if scheme.granularity is Granularity.TENSOR:
        m = ((v @ hessian) * v).sum()
        b = (hw * v).sum()
        s = (b / m).reshape(1, 1) if float(m) > 0 else old.float()
    else:
        groups = old.shape[1]
        gs = k // groups
        m = torch.empty(n, groups, groups, dtype=torch.float32, device=v.device)
        for g in range(groups):
            p = v[:, g * gs : (g + 1) * gs] @ hessian[g * gs : (g + 1) * gs, :]  # [N, K]
            m[:, g, :] = (p * v).reshape(n, groups, gs).sum(-1)
        b = (hw * v).reshape(n, groups, gs).sum(-1)  # [N, G]
        # a group whose codes all sit on the zero point has v = 0: pin its row of M to identity
        empty = m.diagonal(dim1=1, dim2=2) <= 0  # [N, G]
        m.diagonal(dim1=1, dim2=2).masked_fill_(empty, 1.0)
        s, info = torch.linalg.solve_ex(m, b.unsqueeze(-1))
        s = s.squeeze(-1)
        s = torch.where(empty | (info != 0).unsqueeze(1), old.float(), s)
    new = s.to(old.dtype)
    new = torch.where(torch.isfinite(new.float()) & (new.float() > 0), new, old)
    err_new = layer_error(weight, formats.dequantize(codes, QParams(new, qp.zero), scheme), hessian)  # [N]
    err_old = layer_error(weight, formats.dequantize(codes, qp, scheme), hessian)
    if scheme.granularity is Granularity.TENSOR:
        return QParams(new if float(err_new.sum()) < float(err_old.sum()) else old, qp.zero)
    return QParams(torch.where((err_new < err_old).unsqueeze(1), new, old), qp.zero)
