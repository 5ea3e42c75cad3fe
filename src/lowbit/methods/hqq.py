"""HQQ: Half-Quadratic Quantization (Badri & Shaji 2023), calibration-free.

The codes ``q`` and the zero points ``z`` of each group are refined so that the
dequantized weights ``(q - z) * s`` fit ``W`` under a sparsity-promoting
``l_p`` error (``p < 1``: a few large errors are cheaper than many small ones).
The scale stays the RTN scale. Half-quadratic splitting introduces an extra
variable ``W_e`` (the error, meant to be sparse) and alternates, per iteration
``t`` (the "proximal legacy" solver of the reference ``hqq`` package):

    q     = clamp(round(W / s + z), 0, qmax)            # codes for the current zero
    W_r   = (q - z) * s                                  # dequantized weight
    W_e   = shrink_p(W - W_r, beta)                      # prox of the l_p norm
    z     = mean over the group of (q - (W - W_e) / s)   # closed-form zero update
    beta *= kappa

with the generalised soft threshold ``shrink_p(x) = sign(x) * relu(|x| - |x|**(p-1) / beta)``.
``beta`` is in weight units (as in the reference): for weights of order 1e-2
(LLM linears) and the default ``beta = 10`` the threshold is larger than every
error, ``W_e = 0``, and the update is the least-squares zero for the current
codes; for larger weights (or larger ``beta``) outlier errors are kept out of
the zero update.

What lowbit does differently from the reference, and why:

* every group is its own problem: the mean absolute error of each group is
  tracked, and a group stops (keeping its best zero so far) at the first
  iteration that does not improve it. The reference stops the whole tensor on
  the global error and returns the zero of the non-improving step. Per-group
  stopping makes the result independent of how rows are batched, and never
  worse than RTN in mean absolute error before the zero is stored.
* storage: float zero points (``zero_point="float"``) are cast to the scale
  dtype; integer zero points are rounded and clamped to ``[0, qmax]``. That
  cast can undo part of the gain, so each group finally keeps whichever of
  {the stored refined zero, the RTN zero} gives the lower mean absolute error
  with the codes ``formats.quantize`` will produce: HQQ is never worse than
  RTN, per group, in the l1 error it optimises.
* symmetric schemes fix ``z = 2**(bits-1)`` and HQQ only moves ``z``, so there
  is nothing to optimise: ``hqq`` returns the RTN result unchanged (the same
  codes, scale and bytes as ``rtn``).

Everything is computed in float32 on the grouped view of the weight
(``formats.grouped``: tensor / channel / group granularity), a block of groups
at a time, vectorised over groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit import formats
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor
from lowbit.validation import check_range


@dataclass(frozen=True)
class HQQ:
    """HQQ (Badri & Shaji 2023): calibration-free refinement of zero points (and so the
    dequantized weights) by a half-quadratic proximal solver on an l_p (p < 1) error.

    Meant for ``QuantScheme(symmetric=False, zero_point="float")``; with integer zero points the
    refined zeros are rounded at the end and a group keeps its RTN zero unless the rounded one
    is better. A float zero point removes the exact 0 from the grid: on SmolLM2 at 3 bits that
    alone (RTN with float zeros) costs more perplexity than HQQ's refinement wins back
    (BENCHMARKS.md, "HQQ at W3").
    """

    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    name = "hqq"
    kind = "rounding"
    needs_calibration = False

    def __post_init__(self) -> None:
        check_range("HQQ", "iters", self.iters, 1, 10000, integer=True)
        check_range("HQQ", "lp_norm", self.lp_norm, 0.01, 2.0)
        check_range("HQQ", "beta", self.beta, 1e-6, 1e6)
        check_range("HQQ", "kappa", self.kappa, 1.0, 10.0)


# groups are refined this many weights at a time: bounds the temporaries (about six float32
# copies of a block, ~200 MB) while keeping the number of torch ops (each a parallel region)
# small; the result does not depend on it, since every group is solved on its own
_BLOCK_ELEMS = 1 << 23


def hqq(weight: torch.Tensor, scheme: QuantScheme, spec: HQQ = HQQ()) -> QuantizedTensor:
    """Quantize a 2-D ``[out, in]`` weight with HQQ-refined zero points (see the module doc).

    Returns a ``QuantizedTensor`` with the RTN scale, the refined zero (uint8 or the scale
    dtype, as the scheme says) and the codes ``formats.quantize`` gives for them.
    """
    qp = formats.choose_qparams(weight, scheme)  # validates shape, finiteness, group size
    if scheme.symmetric:
        return QuantizedTensor.from_codes(formats.quantize(weight, qp, scheme), qp, scheme)

    g = formats.grouped(weight.detach().to(torch.float32), scheme)
    n_groups, size = g.shape[0] * g.shape[1], g.shape[2]
    g = g.reshape(n_groups, size)  # one row per group
    s = qp.scale.float().reshape(n_groups, 1)
    z_rtn = qp.zero.reshape(n_groups)
    zero = torch.empty_like(z_rtn)
    step = max(1, _BLOCK_ELEMS // size)
    for b in range(0, n_groups, step):
        sl = slice(b, b + step)
        zero[sl] = _refine_block(g[sl], s[sl], z_rtn[sl], scheme, spec)
    qp = formats.QParams(scale=qp.scale, zero=zero.reshape(qp.zero.shape))
    return QuantizedTensor.from_codes(formats.quantize(weight, qp, scheme), qp, scheme)


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft threshold, the proximal step of the l_p norm (p <= 1 sparsifies):
    ``sign(x) * relu(|x| - |x|**(p-1) / beta)``, 0 at ``x = 0``."""
    a = x.abs()
    if p == 1.0:
        thr = torch.full_like(a, 1.0 / beta)
    else:  # |x|**(p-1) is infinite at 0 for p < 1: clamp so the threshold wins there
        thr = a.clamp_min(torch.finfo(a.dtype).tiny).pow_(p - 1.0).mul_(1.0 / beta)
    return torch.sign(x).mul_(a.sub_(thr).relu_())


def _l1_code_error(u: torch.Tensor, z: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``q = clamp(round(u + z))`` for ``u = W / s`` (as ``formats.quantize``), the residual
    ``r = u + z - q`` (so ``W - W_r = s r``) and ``sum |r|`` per group (``[B, 1]``)."""
    r = u + z
    q = torch.round(r).clamp_(0, qmax)
    r.sub_(q)
    return q, r, torch.linalg.vector_norm(r, 1, dim=-1, keepdim=True)


def _refine_block(g: torch.Tensor, s: torch.Tensor, z_rtn: torch.Tensor, scheme: QuantScheme, spec: HQQ) -> torch.Tensor:
    """HQQ on groups ``g [B, S]`` with scales ``s [B, 1]`` and RTN zeros ``z_rtn [B]``; returns the
    stored zero per group (``z_rtn``'s dtype). Errors are compared in code units (``|r|``): within
    one group that orders zeros exactly as ``|W - W_r| = s |r|`` does."""
    qmax, p = scheme.qmax, float(spec.lp_norm)
    u_all = g / s  # exactly formats.quantize's g / s
    z0 = z_rtn.float().unsqueeze(-1)
    best_z = z0.clone()
    best_err = torch.full_like(z0, float("inf"))
    err_rtn = None
    # the working set: groups still improving
    idx = torch.arange(g.shape[0], device=g.device)
    u, sw, z = u_all, s, z0
    u_mean, u_lo, u_hi = u.mean(-1, keepdim=True), u.amin(-1, keepdim=True), u.amax(-1, keepdim=True)
    beta = float(spec.beta)
    for t in range(spec.iters + 1):
        q, r, err = _l1_code_error(u, z, qmax)
        if err_rtn is None:
            err_rtn = err
        improved = (err < best_err[idx]).squeeze(-1)  # a group stops at its first non-improving step
        keep = idx[improved]
        best_err[keep] = err[improved]
        best_z[keep] = z[improved]
        if t == spec.iters or keep.numel() == 0:
            break
        # z = mean(q - (W - W_e) / s) = mean(q) - mean(W / s) + mean(W_e) / s
        z_new = q.mean(-1, keepdim=True).sub_(u_mean)
        # |W - W_r| <= s * max(1/2, distance of the group's range beyond the grid): when even
        # that is under the threshold everywhere, W_e = 0 and the l_p step can be skipped
        reach = torch.maximum((-u_lo - z).clamp_min_(0.5), u_hi + z - qmax).mul_(sw)
        if float(reach.max()) ** (2.0 - p) * beta > 1.0:
            z_new.add_(shrink_lp(r.mul_(sw), beta, p).mean(-1, keepdim=True).div_(sw))
        beta *= float(spec.kappa)
        if bool(improved.all()):
            z = z_new
        else:
            idx, u, sw, z = keep, u[improved], sw[improved], z_new[improved]
            u_mean, u_lo, u_hi = u_mean[improved], u_lo[improved], u_hi[improved]

    if scheme.zero_point == "float":
        stored = best_z.squeeze(-1).to(z_rtn.dtype)
    else:
        stored = torch.round(best_z.squeeze(-1)).clamp_(0, qmax).to(z_rtn.dtype)
    if scheme.zero_point == "float" and stored.dtype == torch.float32:
        return stored  # stored exactly: best_err <= err_rtn already
    # the cast moved the zero: keep it only where it still beats RTN
    _, _, err_stored = _l1_code_error(u_all, stored.float().unsqueeze(-1), qmax)
    return torch.where((err_stored < err_rtn).squeeze(-1), stored, z_rtn)
