"""Running statistics of a linear layer's inputs, accumulated batch by batch.

Both accumulators take activations ``x`` of shape ``[..., in_features]`` (any
float dtype, any device; every leading dimension is a token) and keep their
state in float32 on the device of the first batch:

* ``HessianAccumulator``: ``H = (2 / n) * sum_t x_t x_t^T``, ``[in, in]``,
  the Hessian of the layer's squared reconstruction error (GPTQ); optionally with each
  token's norm capped (``cap_token_norms``);
* ``CrossAccumulator``: ``D = (2 / n) * sum_t (f_t - x_t) x_t^T``, ``[in, in]``, from the inputs
  ``f`` a layer gets in the full-precision model and the inputs ``x`` it gets in the
  quantized one, token for token (GPTQ with ``fp_targets``);
* ``ChannelStats``: per input channel, the mean of ``|x|`` (AWQ) and the max
  of ``|x|`` (SmoothQuant), each ``[in]``.

Tokens are processed ``chunk_rows`` rows at a time, so the float32 temporary
is at most ``[chunk_rows, in]`` whatever the batch size. A batch holding
NaN/Inf, or with the wrong last dimension, raises ``CalibrationError`` before
any state changes.
"""

from __future__ import annotations

from typing import Optional

import torch

from lowbit.errors import CalibrationError

DEFAULT_CHUNK_ROWS = 4096

_NO_TOKENS = (
    "layer saw no calibration tokens; check that the hook is attached to a module the model "
    "actually runs, and that the calibration data is not empty"
)


def _as_rows(x: torch.Tensor, in_features: int, what: str) -> torch.Tensor:
    """``x`` ``[..., in]`` viewed (or copied, if not viewable) as ``[n_tokens, in]``; validated."""
    if not isinstance(x, torch.Tensor):
        raise CalibrationError(f"{what}: activations must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise CalibrationError(
            f"{what}: activations must be a floating-point tensor, got {x.dtype}; "
            "pass the layer's input, not token ids"
        )
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise CalibrationError(
            f"{what}: activations of shape {tuple(x.shape)} do not end in in_features={in_features}; "
            "attach the accumulator to the input of a linear layer with that many input features"
        )
    rows = x.detach().reshape(-1, in_features)
    finite = torch.isfinite(rows)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise CalibrationError(
            f"{what}: calibration activations contain {bad} NaN/Inf value(s) (of {rows.numel()}); "
            "the full-precision model overflows on this text: run calibration in float32 or "
            "bfloat16 rather than float16, or check the model weights and the calibration data"
        )
    return rows


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CalibrationError(f"{name} must be a positive integer, got {v!r}")


def _add_outer_mean(
    state: torch.Tensor, n: int, left: torch.Tensor, right: torch.Tensor, chunk_rows: int, left_minus_right: bool = False
) -> int:
    """Fold ``m`` new paired rows into ``state = (2 / n) * sum_t a_t b_t^T`` in place, ``chunk_rows`` at
    a time, and return ``n + m``; ``a = left`` (or ``left - right``), ``b = right``. The old average is
    rescaled by ``n / (n + m)`` before each chunk is added, so ``state`` is always the exact mean."""
    for start in range(0, right.shape[0], chunk_rows):
        b = right[start : start + chunk_rows].to(device=state.device, dtype=torch.float32)
        a = left[start : start + chunk_rows].to(device=state.device, dtype=torch.float32)
        if left_minus_right:
            a = a - b
        n_new = n + b.shape[0]
        state.mul_(n / n_new)
        state.addmm_(a.T, b, alpha=2.0 / n_new)
        n = n_new
    return n


def cap_token_norms(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``x`` ``[..., L, in]`` (windows of ``L`` tokens) with every token whose L2 norm exceeds
    ``cap`` times the median token norm of its window scaled down to that norm, in float32.

    A few tokens can carry inputs thousands of times larger than the rest (the massive
    activations of an attention sink at a window's first position: in SmolLM2-135M's block 11
    ``down_proj`` one such token holds 99.8% of ``trace(H)`` on 512-token windows); GPTQ then
    spends the layer on that one direction. Capping keeps each such token's direction at a
    weight comparable to ordinary tokens. The median is per window (the second-to-last
    dimension; a 2-D ``[L, in]`` is one window), so the result does not depend on how windows
    are batched; a window whose median norm is 0 is returned unchanged. Pure: ``x`` is not modified.
    """
    if not cap >= 1.0:
        raise CalibrationError(f"the token norm cap must be >= 1 (a multiple of the median norm), got {cap!r}")
    xf = x.detach().to(torch.float32)
    if xf.dim() < 2 or xf.shape[-2] == 0:
        return xf
    norms = xf.norm(dim=-1, keepdim=True)  # [..., L, 1]
    limit = cap * norms.median(dim=-2, keepdim=True).values  # [..., 1, 1]
    # a window whose median token is all zeros (padding) has no scale to cap against: left as is
    factor = torch.where((norms > limit) & (limit > 0), limit / norms, torch.ones_like(norms))
    return xf * factor


class HessianAccumulator:
    """Running ``H = (2 / n) * sum_t x_t x_t^T`` over all ``n`` token rows seen so far.

    ``H``: float32 ``[in_features, in_features]``, on the device of the first batch.
    Each chunk of ``m`` new rows rescales the old average by ``n / (n + m)`` and adds
    ``(2 / (n + m)) * X_chunk^T X_chunk`` (the GPTQ reference's update), so ``H`` is
    always the exact average and never a large sum. ``token_cap``: if set, each batch first
    goes through ``cap_token_norms(x, token_cap)``.
    """

    def __init__(
        self,
        in_features: int,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        name: Optional[str] = None,
        token_cap: Optional[float] = None,
    ) -> None:
        _check_positive(in_features=in_features, chunk_rows=chunk_rows)
        if token_cap is not None and not (isinstance(token_cap, (int, float)) and token_cap >= 1.0):
            raise CalibrationError(f"token_cap must be None or a number >= 1, got {token_cap!r}")
        self.in_features = in_features
        self.chunk_rows = chunk_rows
        self.name = name  # the layer's name, for error messages only
        self.token_cap = token_cap
        self._n = 0
        self._h: Optional[torch.Tensor] = None  # float32 [in, in], allocated by the first batch

    def add_batch(self, x: torch.Tensor) -> None:
        """Add the token rows of ``x`` ``[..., in_features]`` (any float dtype)."""
        rows = _as_rows(x, self.in_features, self._what())  # validates before any capping
        if rows.shape[0] == 0:
            return
        if self.token_cap is not None:
            rows = cap_token_norms(x, self.token_cap).reshape(-1, self.in_features)
        if self._h is None:
            self._h = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=rows.device)
        self._n = _add_outer_mean(self._h, self._n, rows, rows, self.chunk_rows)

    @property
    def n_tokens(self) -> int:
        """Token rows accumulated so far."""
        return self._n

    @property
    def hessian(self) -> torch.Tensor:
        """float32 ``[in_features, in_features]``, the accumulator's own storage (do not modify it)."""
        if self._h is None or self._n == 0:
            raise CalibrationError(f"{self._what()}: {_NO_TOKENS}")
        return self._h

    def _what(self) -> str:
        return f"layer {self.name!r} (Hessian)" if self.name else f"HessianAccumulator(in_features={self.in_features})"

    def __repr__(self) -> str:
        return f"HessianAccumulator(in_features={self.in_features}, n_tokens={self._n})"


class CrossAccumulator:
    """Running ``D = (2 / n) * sum_t (f_t - x_t) x_t^T`` over paired token rows: ``f`` the layer's
    full-precision input, ``x`` its quantized-model input for the same token. With ``H`` from a
    ``HessianAccumulator`` on ``x``, ``W + W D H^-1`` is the weight whose outputs on ``x`` best
    match ``W``'s outputs on ``f`` (GPTAQ's target); ``D`` is zero when the two inputs agree.
    float32 ``[in, in]`` on the device of the first pair."""

    def __init__(self, in_features: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, name: Optional[str] = None) -> None:
        _check_positive(in_features=in_features, chunk_rows=chunk_rows)
        self.in_features = in_features
        self.chunk_rows = chunk_rows
        self.name = name
        self._n = 0
        self._c: Optional[torch.Tensor] = None

    def add_batch(self, fp: torch.Tensor, x: torch.Tensor) -> None:
        """Add the paired token rows of ``fp`` and ``x`` (both ``[..., in_features]``, same shape)."""
        what = f"layer {self.name!r} (cross-covariance)" if self.name else "CrossAccumulator"
        f_rows = _as_rows(fp, self.in_features, what)
        x_rows = _as_rows(x, self.in_features, what)
        if f_rows.shape != x_rows.shape:
            raise CalibrationError(
                f"{what}: full-precision inputs {tuple(fp.shape)} and quantized inputs {tuple(x.shape)} "
                "must pair token for token; run both models on the same calibration batch"
            )
        if x_rows.shape[0] == 0:
            return
        if self._c is None:
            self._c = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x_rows.device)
        self._n = _add_outer_mean(self._c, self._n, f_rows, x_rows, self.chunk_rows, left_minus_right=True)

    @property
    def n_tokens(self) -> int:
        return self._n

    @property
    def cross(self) -> torch.Tensor:
        """float32 ``[in_features, in_features]``, ``D[a, b] = (2/n) sum_t (f_t[a] - x_t[a]) x_t[b]``."""
        if self._c is None or self._n == 0:
            raise CalibrationError(f"layer {self.name!r} (cross-covariance): {_NO_TOKENS}")
        return self._c


class ChannelStats:
    """Per-input-channel magnitude of the activations.

    ``abs_mean``: float32 ``[in_features]``, mean over all tokens of ``|x|``;
    ``abs_max``: float32 ``[in_features]``, max over all tokens of ``|x|``.
    """

    def __init__(self, in_features: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, name: Optional[str] = None) -> None:
        _check_positive(in_features=in_features, chunk_rows=chunk_rows)
        self.in_features = in_features
        self.chunk_rows = chunk_rows
        self.name = name  # the layer's name, for error messages only
        self._n = 0
        self._mean: Optional[torch.Tensor] = None  # float32 [in]
        self._max: Optional[torch.Tensor] = None  # float32 [in]

    def add_batch(self, x: torch.Tensor) -> None:
        """Add the token rows of ``x`` ``[..., in_features]`` (any float dtype)."""
        rows = _as_rows(x, self.in_features, self._what())
        if rows.shape[0] == 0:
            return
        if self._mean is None:
            self._mean = torch.zeros(self.in_features, dtype=torch.float32, device=rows.device)
            self._max = torch.zeros(self.in_features, dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], self.chunk_rows):
            a = rows[start : start + self.chunk_rows].to(device=self._mean.device, dtype=torch.float32).abs()
            n_new = self._n + a.shape[0]
            self._mean.mul_(self._n / n_new).add_(a.sum(dim=0), alpha=1.0 / n_new)
            torch.maximum(self._max, a.amax(dim=0), out=self._max)
            self._n = n_new
            del a

    @property
    def n_tokens(self) -> int:
        """Token rows accumulated so far."""
        return self._n

    def _check(self) -> None:
        if self._n == 0:
            raise CalibrationError(f"{self._what()}: {_NO_TOKENS}")

    @property
    def abs_mean(self) -> torch.Tensor:
        """float32 ``[in_features]``: mean of ``|x|`` per input channel."""
        self._check()
        return self._mean

    @property
    def abs_max(self) -> torch.Tensor:
        """float32 ``[in_features]``: max of ``|x|`` per input channel."""
        self._check()
        return self._max

    def _what(self) -> str:
        return f"layer {self.name!r} (channel stats)" if self.name else f"ChannelStats(in_features={self.in_features})"

    def __repr__(self) -> str:
        return f"ChannelStats(in_features={self.in_features}, n_tokens={self._n})"
