"""SignRound (Cheng et al. 2023, the method of Intel's AutoRound): learn, for a whole block at
once, how each weight rounds and how far each group's range is clipped, by signed gradient
descent on the block's output error.

For a linear with weight ``W`` ``[N, K]`` and an integer scheme, tuning starts from a
``Start``: round-to-nearest (AutoRound's start), or another method's result such as GPTQ's
(``start_from``), given by its scales, zero points and each code's integer ``shift`` from
round-to-nearest. The tunables are

* ``v``: float32 ``[N, K]``, the rounding offset,
  ``codes = clamp(round(W / s + shift + v) + z, 0, qmax)``, kept in ``[-0.5, 0.5]``, so a code
  moves at most one step from its start (towards the side where ``W / s`` lies);
* ``lo``, ``hi``: float32 ``[rows, G]`` (the scheme's scale shape), factors in ``[0.5, 1]`` on
  the start grid's span below and above zero, from which the scale and zero point follow
  (``hi`` alone when symmetric).

``v = 0``, ``lo = hi = 1`` is the start exactly (from RTN: round-to-nearest bit for bit). The
quantize-dequantize function (``qdq``) passes gradients straight through the roundings (and
the cast of the scale to the scale dtype); its forward value is exactly what ``finalize``
stores, so a tuned block runs after saving as it ran during tuning (a test pins the two).

``tune`` is the optimisation loop: ``iters`` steps of ``p -= lr_t * sign(grad)`` with
``lr_t = lr * (1 - t / iters)`` (``lr = 1 / iters`` by default, as in AutoRound, so that the
steps add up to about 0.5), one calibration batch per step in a seeded random order. The caller supplies ``loss_fn(dequantized weights, batch) -> loss``
(the walker runs the block with those weights and compares with the full-precision
outputs). At the end three candidates are scored on every batch: the start, the last step
and the step with the lowest loss; the lowest total wins, so tuning never returns a block
worse than its start on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lowbit import formats
from lowbit.errors import CalibrationError, SchemeError
from lowbit.methods.gptq import GPTQ
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor
from lowbit.validation import check_range, options_from_dict

FACTOR_MIN = 0.5  # the lowest range factor (AutoRound's lr schedule reaches the same bound)


@dataclass(frozen=True)
class SignRound:
    """SignRound (Cheng et al. 2023; Intel's AutoRound): per block, learn each weight's rounding
    offset in [-0.5, 0.5] and a clipping factor in [0.5, 1] on each group's min and max by signed
    gradient descent on the block's output error against the full-precision block's outputs
    (``lowbit.methods.signround``).

    ``iters``: optimisation steps per block, one calibration batch (``WalkOptions.batch_size``
    windows) each; ``lr``: the step size, decaying linearly to 0 (None: ``1 / iters``, AutoRound's
    default); ``tune_range``: also learn the range factors (else only the rounding); ``seed``: the
    batch order; ``start``: None tunes from round-to-nearest, a ``GPTQ`` spec from that GPTQ's
    result on the block (its codes, scales and zero points); ``fp_targets``: the targets are the
    full-precision model's block outputs (a second, full-precision stream of block inputs, as in
    AutoRound, so a block also makes up for the error of the blocks before it; the calibration
    activations held or spilled double), else the full-precision block's outputs on the same
    inputs the quantized block sees (GPTQ's local objective). Integer schemes with integer zero
    points.
    """

    iters: int = 200
    lr: Optional[float] = None
    tune_range: bool = True
    seed: int = 0
    start: Optional[GPTQ] = None
    fp_targets: bool = False
    name = "signround"
    kind = "rounding"
    needs_calibration = True

    def __post_init__(self) -> None:
        check_range("SignRound", "iters", self.iters, 0, 100_000, integer=True)
        if self.lr is not None:
            check_range("SignRound", "lr", self.lr, 1e-8, 1.0)
        check_range("SignRound", "seed", self.seed, 0, 2**63 - 1, integer=True)
        for f in ("tune_range", "fp_targets"):
            if not isinstance(getattr(self, f), bool):
                raise SchemeError(f"SignRound.{f} must be True or False")
        if isinstance(self.start, dict):  # from JSON: a GPTQ entry (Recipe.to_dict writes it without its name)
            start = dict(self.start)
            if start.pop("name", GPTQ.name) == GPTQ.name:
                object.__setattr__(self, "start", options_from_dict(GPTQ, start, GPTQ.name))
        if self.start is not None and not isinstance(self.start, GPTQ):
            raise SchemeError(f"SignRound.start must be None (round to nearest) or a GPTQ spec, got {self.start!r}")
        if self.start is not None and self.start.fp_targets:
            raise SchemeError("SignRound.start: GPTQ(fp_targets=True) is not supported as a start; use fp_targets=False")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)


@dataclass
class Tunables:
    """One linear's tuned parameters (see the module docstring for shapes)."""

    v: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.v, self.lo, self.hi]

    def copy(self) -> "Tunables":
        return Tunables(self.v.detach().clone(), self.lo.detach().clone(), self.hi.detach().clone())


@dataclass(frozen=True)
class TuneResult:
    """``params`` per layer name, relative to ``starts``; ``losses``: the calibration-set loss of
    each candidate (``"start"``, ``"last"``, ``"best_step"``); ``chosen``: the candidate kept."""

    params: dict[str, Tunables]
    losses: dict[str, float]
    chosen: str
    starts: dict[str, Start]


@dataclass(frozen=True)
class Start:
    """Where one linear's tuning starts (``[rows, G]`` = the scheme's scale shape):

    * ``scale``: float32 ``[rows, G]``, the start's scales (values of the scale dtype);
    * ``zero``: float32 ``[rows, G]``, its zero points (the fixed ``zero_code`` when symmetric);
    * ``shift``: float32 ``[N, K]``, how many steps each start code lies from round-to-nearest
      (unclamped) at the start's scale and zero point: 0 everywhere for RTN; otherwise an
      integer, moved a quarter step where rounding alone would not give the start's code
      (a weight exactly halfway between two levels).

    The range factors multiply the grid's span below and above zero,
    ``[-lo * zero * scale, hi * (qmax - zero) * scale]`` (symmetric: the scale times ``hi``), so
    factors 1 give the start's scale and zero point exactly.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    shift: torch.Tensor


def check_scheme(scheme: QuantScheme, name: str = "<layer>") -> None:
    """SignRound tunes integer grids with integer zero points (or symmetric ones)."""
    if scheme.format != "int" or scheme.zero_point == "float":
        raise SchemeError(
            f"layer {name!r}: signround tunes integer codes with integer zero points, not "
            f"format={scheme.format!r} zero_point={scheme.zero_point!r}; use an integer scheme with "
            "zero_point='int' (or method 'rtn' for this layer)"
        )


def rtn_start(weight: torch.Tensor, scheme: QuantScheme) -> Start:
    """Round-to-nearest as the start (AutoRound's): RTN's scales and zero points, no shifts."""
    check_scheme(scheme)
    scale, zero = _float_qparams(QuantizedTensor.quantize(weight, scheme))
    return Start(scale, zero, torch.zeros_like(weight, dtype=torch.float32))


def _float_qparams(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A result's scales and zero points as float32 ``[rows, G]`` (symmetric: the fixed zero code)."""
    scale = qt.qparams.scale.float()
    if qt.scheme.symmetric:
        return scale, torch.full_like(scale, float(qt.scheme.zero_code))
    return scale, qt.qparams.zero.float()


@torch.no_grad()
def start_from(weight: torch.Tensor, qt: QuantizedTensor) -> Start:
    """Another method's result ``qt`` of ``weight`` (e.g. GPTQ's) as the start: its scales and zero
    points, and each code's distance from round-to-nearest at those (GPTQ moves some weights
    by more than one step)."""
    scheme = qt.scheme
    check_scheme(scheme)
    if tuple(qt.shape) != tuple(weight.shape):
        raise SchemeError(f"start_from: the result's shape {tuple(qt.shape)} is not the weight's {tuple(weight.shape)}")
    scale, zero = _float_qparams(qt)
    g = formats.grouped(weight.detach().float(), scheme)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    codes = formats.grouped(qt.codes().float(), scheme)
    # unclamped: a weight far outside a clipped range may sit on an inner code (GPTQ's clipping)
    shift = codes - (torch.round(g / s) + z)
    # round(x + k) is not round(x) + k for x exactly halfway between two levels (half to even),
    # nor always after the float addition: there, move the shift a quarter step towards the code
    again = (torch.round(g / s + shift) + z).clamp(0, scheme.qmax)
    shift = shift + 0.25 * (codes - again)
    return Start(scale, zero, shift.reshape(weight.shape))


def init_tunables(weight: torch.Tensor, scheme: QuantScheme) -> Tunables:
    """No change from the start: offsets 0, range factors 1."""
    check_scheme(scheme)
    rows_groups = formats.grouped(weight, scheme).shape[:2]
    return Tunables(
        v=torch.zeros_like(weight, dtype=torch.float32),
        lo=torch.ones(rows_groups, dtype=torch.float32, device=weight.device),
        hi=torch.ones(rows_groups, dtype=torch.float32, device=weight.device),
    )


def _straight(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``x`` in the backward pass (exactly
    ``value``: ``x - x.detach()`` is an exact zero)."""
    return value.detach() + (x - x.detach())


def _scale_zero(start: Start, p: Tunables, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``[rows, G]`` (float32) for the start's grid with its span below and
    above zero scaled by the factors; the scale is cast to the scale dtype (as ``formats`` does
    before choosing codes); factors 1 give the start's values exactly."""
    qmax = scheme.qmax
    if scheme.symmetric:
        scale = start.scale * p.hi
    else:
        scale = start.scale * ((p.hi * (qmax - start.zero) + p.lo * start.zero) / qmax)
    sdtype = formats.scale_torch_dtype(scheme)
    cast = scale.detach().to(sdtype).float()
    tiny = torch.finfo(sdtype).tiny
    cast = torch.where(cast < tiny, torch.full_like(cast, tiny), cast)  # never 0: codes divide by it
    scale = _straight(cast, scale)
    if scheme.symmetric:
        return scale, start.zero
    z = p.lo * start.zero * start.scale / scale
    return scale, _straight(torch.round(z).clamp(0, qmax), z)


def qdq(weight: torch.Tensor, p: Tunables, scheme: QuantScheme, start: Optional[Start] = None) -> torch.Tensor:
    """The dequantized weight ``[N, K]`` float32 for the tunables, differentiable in ``p``
    (straight through the roundings); ``weight`` is a constant; ``start`` defaults to RTN."""
    start = start or rtn_start(weight, scheme)
    g = formats.grouped(weight.detach().float(), scheme)
    scale, zero = _scale_zero(start, p, scheme)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    x = g / s + formats.grouped(start.shift + p.v, scheme)
    q = (_straight(torch.round(x), x) + z).clamp(0, scheme.qmax)
    return ((q - z) * s).reshape(weight.shape)


@torch.no_grad()
def finalize(weight: torch.Tensor, p: Tunables, scheme: QuantScheme, start: Optional[Start] = None) -> QuantizedTensor:
    """The stored form of the tuned weight: ``dequantize()`` equals ``qdq(weight, p, scheme, start)``
    exactly."""
    check_scheme(scheme)
    start = start or rtn_start(weight, scheme)
    g = formats.grouped(weight.detach().float(), scheme)
    scale, zero = _scale_zero(start, p, scheme)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    codes = (torch.round(g / s + formats.grouped(start.shift + p.v, scheme)) + z).clamp(0, scheme.qmax)
    qp = formats.QParams(
        scale=scale.to(formats.scale_torch_dtype(scheme)),
        zero=None if scheme.symmetric else zero.to(torch.uint8),
    )
    return QuantizedTensor.from_codes(codes.to(torch.uint8).reshape(weight.shape), qp, scheme)


def _clamp_(p: Tunables) -> None:
    p.v.clamp_(-0.5, 0.5)
    p.lo.clamp_(FACTOR_MIN, 1.0)
    p.hi.clamp_(FACTOR_MIN, 1.0)


LossFn = Callable[[dict[str, torch.Tensor], int], torch.Tensor]


def _total_loss(weights, schemes, starts, params, loss_fn: LossFn, n_batches: int) -> float:
    with torch.no_grad():
        dq = {k: qdq(weights[k], params[k], schemes[k], starts[k]) for k in weights}
        return sum(float(loss_fn(dq, b)) for b in range(n_batches))


def tune(
    weights: dict[str, torch.Tensor],
    schemes: dict[str, QuantScheme],
    loss_fn: LossFn,
    n_batches: int,
    spec: SignRound = SignRound(),
    starts: Optional[dict[str, Start]] = None,
    name: str = "the block",
) -> TuneResult:
    """Tune every layer in ``weights`` (name -> ``[N, K]`` float32) jointly against ``loss_fn``,
    from ``starts`` (name -> ``Start``; RTN for a name not given).

    ``loss_fn(dq, b)`` must return a scalar tensor differentiable in the dequantized weights
    ``dq`` (name -> ``[N, K]``) for calibration batch ``b`` in ``range(n_batches)``."""
    if n_batches < 1:
        raise ValueError("signround needs at least one calibration batch")
    for layer, sch in schemes.items():
        check_scheme(sch, layer)
    unknown = set(starts or {}) - set(weights)
    if unknown or set(schemes) != set(weights):
        raise SchemeError(
            f"signround on {name}: weights, schemes and starts must name the same layers "
            f"(starts for unknown layers {sorted(unknown)}, schemes {sorted(schemes)}, weights {sorted(weights)})"
        )
    starts = {k: (starts or {}).get(k) or rtn_start(w, schemes[k]) for k, w in weights.items()}
    for k, st in starts.items():
        if st.shift.shape != weights[k].shape:
            raise SchemeError(f"signround on {name}: the start of {k!r} has shape {tuple(st.shift.shape)}, "
                              f"the weight {tuple(weights[k].shape)}")
    params = {k: init_tunables(w, schemes[k]) for k, w in weights.items()}
    start = {k: p.copy() for k, p in params.items()}
    lr0 = spec.learning_rate
    gen = torch.Generator().manual_seed(spec.seed)
    order: list[int] = []
    best_loss, best = float("inf"), start
    for step in range(spec.iters):
        if not order:
            order = torch.randperm(n_batches, generator=gen).tolist()
        batch = order.pop()
        tensors = [t.requires_grad_(True) for p in params.values() for t in _trainable(p, spec)]
        with torch.enable_grad():
            dq = {k: qdq(weights[k], params[k], schemes[k], starts[k]) for k in weights}
            loss = loss_fn(dq, batch)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True) if loss.requires_grad else [None] * len(tensors)
        if step == 0 and all(gr is None for gr in grads):
            raise CalibrationError(
                f"signround on {name}: the loss does not depend on the tuned weights (no gradient reached "
                "them); the loss function must run the block with the dequantized weights it is given"
            )
        value = float(loss.detach())
        if value < best_loss:  # the parameters that produced this loss, before the step
            best_loss, best = value, {k: p.copy() for k, p in params.items()}
        lr = lr0 * (1.0 - step / spec.iters)
        with torch.no_grad():
            for t, gr in zip(tensors, grads):
                t.requires_grad_(False)
                if gr is not None:
                    t.sub_(lr * torch.sign(gr))
            for p in params.values():
                _clamp_(p)
        del dq, loss, grads, tensors  # free this step's graph before the next forward pass
    candidates = {"start": start, "last": params, "best_step": best}
    losses = {cand: _total_loss(weights, schemes, starts, c, loss_fn, n_batches) for cand, c in candidates.items()}
    chosen = min(losses, key=lambda cand: (losses[cand], cand != "start"))
    return TuneResult({k: p.copy() for k, p in candidates[chosen].items()}, losses, chosen, starts)


def _trainable(p: Tunables, spec: SignRound) -> list[torch.Tensor]:
    return p.tensors() if spec.tune_range else [p.v]
