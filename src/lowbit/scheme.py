"""The quantization vocabulary as frozen, validated dataclasses.

Nothing here touches tensors or files: a scheme says *what* numbers a layer
will hold, the `formats` module says *how* they are computed.

Integer schemes (2 to 8 bits) store unsigned codes ``q`` in ``[0, 2**bits - 1]``
and dequantize as ``w = (q - z) * s``:

- symmetric: ``z = 2**(bits-1)`` is fixed (not stored) and
  ``s = amax / ((2**bits - 1) / 2)`` (the convention of torchao and
  compressed-tensors). ``+-amax`` do *not* land on the grid
  ``(-2**(bits-1) .. 2**(bits-1) - 1) * s``: ``+amax`` lies half a step above
  its top value and ``-amax`` half a step above its bottom value (a tie,
  rounded half to even to the bottom code), so both get error ``s/2``, the
  same bound as every other weight;
- affine: ``s = (max - min) / (2**bits - 1)`` and an integer zero point
  ``z = clamp(round(-min / s), 0, 2**bits - 1)`` per group (AWQ/HQQ style).

With ``zero_point="float"`` (affine only) the zero point is a real number
stored in the scale dtype instead of a uint8 code (HQQ's solver and GGUF's
Q4_1-style offsets need it); the formula ``w = (q - z) * s`` is unchanged.

``activations="int8"`` (W8A8) additionally quantizes each input row (token)
to symmetric int8 at run time, with a scale per row chosen on the fly; it
needs 8-bit symmetric weights with one scale per output channel (or tensor),
so that the matmul can run on integers.

Granularity says which weights share one ``(s, z)``: the whole tensor, one
output channel (a row of the ``[out, in]`` weight), or a group of
``group_size`` consecutive input columns inside a row.

Besides integers (``format="int"``), ``format`` names the non-integer formats;
all of them are symmetric (no zero point) and store unsigned codes too:

- ``"nf4"`` / ``"fp4"``: 4-bit codebooks (bitsandbytes' NormalFloat4 and FP4
  tables, ``lowbit.codebooks``), ``w = table[q] * absmax`` per block of
  ``group_size`` (default 64). ``double_quant=True`` stores the per-block
  absmax as 8-bit codes of bitsandbytes' dynamic map, in blocks of 256 with an
  fp32 absmax each, after subtracting their mean (QLoRA's double quantization);
- ``"fp8_e4m3"`` / ``"fp8_e5m2"``: the byte of a float8 value (torch's
  ``float8_e4m3fn`` / ``float8_e5m2``), ``w = float8(q) * s`` with
  ``s = amax / fmax`` per tensor or channel (default channel), saturating;
- ``"ternary"``: codes 0, 1, 2 meaning -1, 0, +1, at 2 bits, with an absmean
  scale (BitNet b1.58), per tensor by default.

``bits`` and ``granularity`` default to what the format needs (``None``
resolves when the scheme is built; ``to_dict`` always writes resolved values).

LLM.int8-style layers are W8A8 layers quantized with the ``LLMInt8`` method:
the input columns whose calibration activations exceed its threshold keep
float16 weights and skip the int8 path (``lowbit.tensor`` lists the tensors).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any, Optional

from lowbit.errors import SchemeError

SCALE_DTYPES = ("float32", "float16", "bfloat16")
ZERO_POINTS = ("int", "float")
ACTIVATION_FORMATS = (None, "int8", "fp8_e4m3")
FORMATS = ("int", "nf4", "fp4", "fp8_e4m3", "fp8_e5m2", "ternary")
CODEBOOK_FORMATS = ("nf4", "fp4")
FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")
# bits each non-integer format stores per code, and its default granularity / block
_FORMAT_BITS = {"nf4": 4, "fp4": 4, "fp8_e4m3": 8, "fp8_e5m2": 8, "ternary": 2}
_DEFAULT_GRANULARITY = {"int": "group", "nf4": "group", "fp4": "group", "fp8_e4m3": "channel",
                        "fp8_e5m2": "channel", "ternary": "tensor"}
CODEBOOK_BLOCK = 64  # bitsandbytes' default 4-bit block
DOUBLE_QUANT_BLOCK = 256  # QLoRA: the absmax values are 8-bit quantized in blocks of 256
INT_BITS = (2, 3, 4, 5, 6, 7, 8)
DEFAULT_GROUP_SIZE = 128


class Granularity(str, Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"


@dataclass(frozen=True)
class QuantScheme:
    """How one weight matrix is quantized. Validated when built.

    >>> QuantScheme(bits=4, group_size=128)            # W4 g128 symmetric
    >>> QuantScheme(bits=8, granularity="channel")     # W8 per output channel
    """

    bits: Optional[int] = None  # None: 4 for int / nf4 / fp4, 8 for fp8, 2 for ternary
    symmetric: bool = True
    granularity: Optional[Granularity] = None  # None: the format's default (group / channel / tensor)
    group_size: Optional[int] = None  # None with granularity 'group': 128 (int) or 64 (nf4 / fp4)
    scale_dtype: str = "float32"
    zero_point: str = "int"  # affine only: "int" (uint8 code) or "float" (stored in scale_dtype)
    activations: Optional[str] = None  # None (weight-only), "int8" (W8A8) or "fp8_e4m3" (dynamic per token)
    format: str = "int"  # one of FORMATS
    double_quant: bool = False  # nf4 / fp4: 8-bit block scales (QLoRA double quantization)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SchemeError(f"unknown numeric format {self.format!r}; use one of {FORMATS}")
        if self.granularity is None:
            object.__setattr__(self, "granularity", Granularity(_DEFAULT_GRANULARITY[self.format]))
        if isinstance(self.granularity, str) and not isinstance(self.granularity, Granularity):
            try:
                object.__setattr__(self, "granularity", Granularity(self.granularity))
            except ValueError:
                raise SchemeError(
                    f"unknown granularity {self.granularity!r}; use one of "
                    f"{[g.value for g in Granularity]}"
                ) from None
        if not isinstance(self.granularity, Granularity):
            raise SchemeError(f"granularity must be one of {[g.value for g in Granularity]}, got {self.granularity!r}")
        if self.bits is None:
            object.__setattr__(self, "bits", _FORMAT_BITS.get(self.format, 4))
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in INT_BITS:
            raise SchemeError(f"bits={self.bits!r} is not supported; integer formats take bits in {INT_BITS}")
        if self.format != "int" and self.bits != _FORMAT_BITS[self.format]:
            raise SchemeError(
                f"format {self.format!r} stores {_FORMAT_BITS[self.format]}-bit codes, not bits={self.bits}; "
                "leave bits out"
            )
        if not isinstance(self.symmetric, bool):
            raise SchemeError(f"symmetric must be True or False, got {self.symmetric!r}")
        if self.format != "int" and not self.symmetric:
            raise SchemeError(f"format {self.format!r} has no zero point; leave symmetric=True")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SchemeError(f"scale_dtype={self.scale_dtype!r} is not supported; use one of {SCALE_DTYPES}")
        if self.zero_point not in ZERO_POINTS:
            raise SchemeError(f"zero_point={self.zero_point!r}; use one of {ZERO_POINTS}")
        if self.zero_point == "float" and self.symmetric:
            raise SchemeError("zero_point='float' only applies to affine schemes; set symmetric=False")
        if self.activations not in ACTIVATION_FORMATS:
            raise SchemeError(f"activations={self.activations!r}; use one of {ACTIVATION_FORMATS}")
        if self.activations == "int8" and not (
            self.format == "int" and self.bits == 8 and self.symmetric and self.granularity is not Granularity.GROUP
        ):
            raise SchemeError(
                "activations='int8' (W8A8) needs format='int', bits=8, symmetric=True and granularity 'channel' or "
                f"'tensor' weights (got {self.format} {self.bits} bits, symmetric={self.symmetric}, "
                f"{self.granularity.value})"
            )
        if self.activations == "fp8_e4m3" and (self.format not in FP8_FORMATS or self.granularity is Granularity.GROUP):
            raise SchemeError(
                "activations='fp8_e4m3' needs an fp8 weight format (fp8_e4m3 / fp8_e5m2) with granularity "
                f"'channel' or 'tensor' (got format={self.format!r}, {self.granularity.value})"
            )
        if self.format in FP8_FORMATS and self.granularity is Granularity.GROUP:
            raise SchemeError(f"format {self.format!r} takes granularity 'tensor' or 'channel' scales, not 'group'")
        if self.format in CODEBOOK_FORMATS and self.granularity is not Granularity.GROUP:
            raise SchemeError(f"format {self.format!r} is blockwise: use granularity 'group' (block = group_size)")
        if not isinstance(self.double_quant, bool):
            raise SchemeError(f"double_quant must be True or False, got {self.double_quant!r}")
        if self.double_quant and (self.format not in CODEBOOK_FORMATS or self.scale_dtype != "float32"):
            raise SchemeError(
                "double_quant=True applies to the nf4 / fp4 formats with scale_dtype='float32' "
                f"(it 8-bit-quantizes their fp32 block absmax); got format={self.format!r}, "
                f"scale_dtype={self.scale_dtype!r}"
            )
        if self.granularity is Granularity.GROUP and self.group_size is None:
            object.__setattr__(self, "group_size", CODEBOOK_BLOCK if self.format in CODEBOOK_FORMATS else DEFAULT_GROUP_SIZE)
        if self.granularity is Granularity.GROUP:
            if self.group_size is None:
                object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 2:
                raise SchemeError(
                    f"granularity 'group' needs an integer group_size >= 2, got {self.group_size!r} "
                    "(for one scale per row use granularity='channel')"
                )
        elif self.group_size is not None:
            raise SchemeError(
                f"group_size={self.group_size} only applies to granularity 'group', "
                f"not {self.granularity.value!r}; leave it out"
            )

    # -- shapes -------------------------------------------------------------
    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def zero_code(self) -> int:
        """The fixed zero point of the symmetric grid."""
        return 1 << (self.bits - 1)

    def check_layer(self, name: str, in_features: int) -> None:
        """Raise a SchemeError naming the layer if the group size does not divide its input size."""
        if self.granularity is Granularity.GROUP and in_features % self.group_size != 0:
            raise SchemeError(
                f"layer {name!r}: group_size={self.group_size} does not divide in_features={in_features}; "
                f"group sizes that would work: {valid_group_sizes(in_features)} "
                "(or set Recipe(indivisible_groups='shrink') to use the largest power-of-two "
                "divisor below the requested size for such layers)"
            )

    def n_groups(self, in_features: int) -> int:
        if self.granularity is Granularity.GROUP:
            return in_features // self.group_size
        return 1

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Storage bits per weight, scales and zero points included."""
        return self.storage_bytes(out_features, in_features) * 8 / (out_features * in_features)

    def storage_bytes(self, out_features: int, in_features: int, n_outliers: int = 0) -> int:
        """Exact bytes of the stored tensors (``lowbit.tensor.stored_tensor_specs``): packed codes,
        scales (8-bit codes plus their fp32 block absmax and offset under double quantization),
        zero points and, for LLM.int8 schemes, ``n_outliers`` float16 columns and their int32 indices."""
        from math import ceil

        scale_bytes = 4 if self.scale_dtype == "float32" else 2
        if self.granularity is Granularity.TENSOR:
            n_params = 1
        else:
            n_params = out_features * self.n_groups(in_features)
        # the native bit-stream layout: rows padded to a multiple of 8 codes (none at 8 bits)
        packed = out_features * (in_features if self.bits == 8 else ceil(in_features / 8) * self.bits)
        zeros = 0 if self.symmetric else n_params * (1 if self.zero_point == "int" else scale_bytes)
        if self.double_quant:
            scales = n_params + 4 * ceil(n_params / DOUBLE_QUANT_BLOCK) + 4
        else:
            scales = n_params * scale_bytes
        outliers = n_outliers * (2 * out_features + 4)
        return packed + scales + zeros + outliers

    # -- names and serialisation -------------------------------------------
    @property
    def short_name(self) -> str:
        g = {
            Granularity.TENSOR: "t",
            Granularity.CHANNEL: "c",
            Granularity.GROUP: f"g{self.group_size}",
        }[self.granularity]
        if self.format != "int":
            dq = "-dq" if self.double_quant else ""
            act = "-a8" if self.activations else ""
            return f"{self.format.replace('_', '')}-{g}{dq}{act}"
        kind = "sym" if self.symmetric else ("asym" if self.zero_point == "int" else "asymf")
        act = "-a8" if self.activations == "int8" else ""
        return f"w{self.bits}{g}-{kind}{act}"

    def with_group_size(self, group_size: int) -> "QuantScheme":
        return replace(self, granularity=Granularity.GROUP, group_size=group_size)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": self.format,
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity.value,
            "group_size": self.group_size,
            "scale_dtype": self.scale_dtype,
            "zero_point": self.zero_point,
            "activations": self.activations,
        }
        # written only when set, so that files of plain integer schemes stay as they were
        if self.double_quant:
            d["double_quant"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantScheme":
        if not isinstance(d, dict):
            raise SchemeError(f"a scheme must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise SchemeError(f"unknown scheme fields {sorted(unknown)}")
        gran = d.get("granularity", "group")
        if gran != "group":
            d["group_size"] = d.get("group_size")
        return cls(**d)


def valid_group_sizes(in_features: int) -> list[int]:
    """Group sizes (>= 8, < in_features) that divide ``in_features``, ascending.

    Divisors come in pairs ``(d, n // d)`` with ``d <= sqrt(n)``, so this takes O(sqrt(n))
    steps (an error message about a corrupted ``in_features`` of 1e18 must not loop 1e18 times)."""
    if not isinstance(in_features, int) or in_features < 1:
        return []
    divisors = set()
    d = 1
    while d * d <= in_features:
        if in_features % d == 0:
            divisors.update((d, in_features // d))
        d += 1
    return sorted(g for g in divisors if 8 <= g < in_features)


def shrink_group_size(requested: int, in_features: int) -> int:
    """The largest power of two <= ``requested`` that divides ``in_features`` (>= 2)."""
    g = 1 << (requested.bit_length() - 1)
    while g >= 2:
        if in_features % g == 0:
            return g
        g //= 2
    raise SchemeError(
        f"no power-of-two group size <= {requested} divides in_features={in_features}; "
        "use granularity='channel' for this layer"
    )


@dataclass(frozen=True)
class Rule:
    """``pattern`` is a regular expression matched (``re.fullmatch``) against the
    module's qualified name; ``scheme=None`` keeps the layer in full precision."""

    pattern: str
    scheme: Optional[QuantScheme]

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise SchemeError(f"rule pattern {self.pattern!r} is not a valid regular expression: {e}") from None
        if self.scheme is not None and not isinstance(self.scheme, QuantScheme):
            raise SchemeError(f"rule {self.pattern!r}: scheme must be a QuantScheme or None, got {type(self.scheme).__name__}")

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


# ---------------------------------------------------------------------------
# method specs: how codes are chosen (data only; the numerics live in lowbit.methods)
# ---------------------------------------------------------------------------
def _check_range(owner: str, name: str, value, lo, hi, *, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (lo <= value <= hi):
        kind = "an integer" if integer else "a number"
        raise SchemeError(f"{owner}.{name}={value!r}; it must be {kind} in [{lo}, {hi}]")


@dataclass(frozen=True)
class RTN:
    """Round to nearest: each group's own range, no calibration data."""

    name = "rtn"
    kind = "rounding"
    needs_calibration = False


@dataclass(frozen=True)
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
        _check_range("GPTQ", "damp", self.damp, 0.0, 1.0)
        _check_range("GPTQ", "block_size", self.block_size, 1, 1 << 16, integer=True)
        _check_range("GPTQ", "clip_grid", self.clip_grid, 1, 10_000, integer=True)
        _check_range("GPTQ", "max_shrink", self.max_shrink, 1e-6, 1.0)
        _check_range("GPTQ", "clip_norm", self.clip_norm, 1e-6, 100.0)
        for f in ("act_order", "true_sequential", "clip_search", "refine_scales", "fp_targets", "group_aware"):
            if not isinstance(getattr(self, f), bool):
                raise SchemeError(f"GPTQ.{f} must be True or False")
        if self.token_cap is not None:
            _check_range("GPTQ", "token_cap", self.token_cap, 1.0, 1e9)
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
        _check_range("AWQ", "n_grid", self.n_grid, 1, 1000, integer=True)
        _check_range("AWQ", "clip_grid", self.clip_grid, 1, 1000, integer=True)
        _check_range("AWQ", "max_shrink", self.max_shrink, 0.0, 0.99)
        _check_range("AWQ", "max_tokens", self.max_tokens, 16, 1 << 24, integer=True)
        for f in ("duo_scaling", "clip"):
            if not isinstance(getattr(self, f), bool):
                raise SchemeError(f"AWQ.{f} must be True or False")


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
        _check_range("HQQ", "iters", self.iters, 1, 10000, integer=True)
        _check_range("HQQ", "lp_norm", self.lp_norm, 0.01, 2.0)
        _check_range("HQQ", "beta", self.beta, 1e-6, 1e6)
        _check_range("HQQ", "kappa", self.kappa, 1.0, 10.0)


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
        _check_range("SignRound", "iters", self.iters, 0, 100_000, integer=True)
        if self.lr is not None:
            _check_range("SignRound", "lr", self.lr, 1e-8, 1.0)
        _check_range("SignRound", "seed", self.seed, 0, 2**63 - 1, integer=True)
        for f in ("tune_range", "fp_targets"):
            if not isinstance(getattr(self, f), bool):
                raise SchemeError(f"SignRound.{f} must be True or False")
        if isinstance(self.start, dict):  # from JSON
            object.__setattr__(self, "start", method_from_dict({"name": "gptq", **self.start}))
        if self.start is not None and not isinstance(self.start, GPTQ):
            raise SchemeError(f"SignRound.start must be None (round to nearest) or a GPTQ spec, got {self.start!r}")
        if self.start is not None and self.start.fp_targets:
            raise SchemeError("SignRound.start: GPTQ(fp_targets=True) is not supported as a start; use fp_targets=False")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant (Xiao et al. 2022): move activation outliers into the weights with
    s_j = max|X_j|^alpha / max|W_j|^(1-alpha), folded into the preceding operation.
    Meant for W8A8 schemes (``QuantScheme(bits=8, granularity="channel", activations="int8")``)."""

    alpha: float = 0.5
    name = "smoothquant"
    kind = "transform"
    needs_calibration = True

    def __post_init__(self) -> None:
        _check_range("SmoothQuant", "alpha", self.alpha, 0.0, 1.0)


@dataclass(frozen=True)
class LLMInt8:
    """LLM.int8() mixed decomposition (Dettmers et al. 2022), with the outlier columns chosen
    once from calibration data: input columns whose largest calibration activation magnitude
    exceeds ``threshold`` keep their weights in float16 and meet their activations unrounded;
    the other columns are rounded to the W8A8 scheme (int8 weights per output row, int8
    activations per token). Needs a W8A8 scheme (``activations="int8"``)."""

    threshold: float = 6.0
    name = "llm_int8"
    kind = "rounding"
    needs_calibration = True

    def __post_init__(self) -> None:
        _check_range("LLMInt8", "threshold", self.threshold, 1e-6, 1e6)


@dataclass(frozen=True)
class E2ETuning:
    """End-to-end tuning of the quantization scales after rounding, the integer codes fixed
    (EfficientQAT's E2E-QP, Chen et al. 2024; PEQA, Kim et al. 2023): every quantized layer's
    scales are trained jointly by distillation, the loss being the KL divergence from the
    full-precision model's next-token distribution to the quantized model's on the calibration
    windows (``lowbit.qat.tune_scales``). GPTQ and its peers fit each layer or block to its own
    outputs; this fits the whole model to the full-precision model's outputs, so a layer can make
    up for the error that layers before it left.

    ``steps``: optimisation steps, ``batch_size`` calibration windows each; ``lr``: Adam's step
    on each scale's log (a relative step; cosine decay to 0); ``norms``: also train the
    normalisation weights and biases (every 1-D parameter outside the quantized layers and the
    embeddings); ``holdout``: the last calibration windows are kept out of training, and the tuned
    scales are kept only if they lower the KL on them (else the rounding's scales stay);
    ``seed``: the batch order. Needs the full-precision model in memory next to the quantized
    one, and calibration data whatever the rounding method.
    """

    steps: int = 32
    lr: float = 2e-3
    batch_size: int = 4
    norms: bool = False
    holdout: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        _check_range("E2ETuning", "steps", self.steps, 1, 1_000_000, integer=True)
        _check_range("E2ETuning", "lr", self.lr, 1e-8, 1.0)
        _check_range("E2ETuning", "batch_size", self.batch_size, 1, 1_000_000, integer=True)
        _check_range("E2ETuning", "holdout", self.holdout, 1, 1_000_000, integer=True)
        _check_range("E2ETuning", "seed", self.seed, 0, 2**63 - 1, integer=True)
        if not isinstance(self.norms, bool):
            raise SchemeError("E2ETuning.norms must be True or False")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "E2ETuning":
        if not isinstance(d, dict):
            raise SchemeError(f"recipe 'tune' must be a JSON object of E2ETuning options, got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SchemeError(f"unknown E2ETuning options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


METHOD_SPECS = {cls.name: cls for cls in (RTN, GPTQ, AWQ, HQQ, SignRound, SmoothQuant, LLMInt8)}
METHODS = tuple(METHOD_SPECS)
MethodSpec = "RTN | GPTQ | AWQ | HQQ | SignRound | SmoothQuant | LLMInt8"
# methods whose numerics assume integer codes (the other formats take RTN or llm_int8)
INTEGER_ONLY_METHODS = ("gptq", "awq", "hqq", "signround", "smoothquant")


def method_to_dict(spec) -> dict[str, Any]:
    return {"name": spec.name, **asdict(spec)}


def method_from_dict(d: dict[str, Any]):
    if not isinstance(d, dict) or d.get("name") not in METHOD_SPECS:
        raise SchemeError(f"a method entry needs a 'name' in {METHODS}, got {d!r}")
    d = dict(d)
    cls = METHOD_SPECS[d.pop("name")]
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise SchemeError(f"unknown {cls.name} options {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def parse_method(method) -> tuple:
    """Normalise a method to its steps: zero or more transforms, then exactly one rounding.

    Accepts a name (``"gptq"``), names joined by ``+`` (``"awq+gptq"``), a spec object
    (``GPTQ(damp=0.05)``) or a sequence of specs. A transform alone is followed by RTN.
    """
    if isinstance(method, str):
        names = [n.strip() for n in method.split("+")]
        unknown = [n for n in names if n not in METHOD_SPECS]
        if unknown or not method:
            raise SchemeError(f"unknown method {method!r}; use one of {METHODS}, or join them with '+' (e.g. 'awq+gptq')")
        steps = [METHOD_SPECS[n]() for n in names]
    elif isinstance(method, tuple(METHOD_SPECS.values())):
        steps = [method]
    elif isinstance(method, (list, tuple)):
        steps = list(method)
        for s in steps:
            if not isinstance(s, tuple(METHOD_SPECS.values())):
                raise SchemeError(f"method steps must be RTN/GPTQ/AWQ/HQQ/SignRound/SmoothQuant/LLMInt8 objects, got {type(s).__name__}")
    else:
        raise SchemeError(f"method must be a name or a method spec, got {type(method).__name__}")
    if not steps:
        raise SchemeError("a method needs at least one step")
    if steps[-1].kind != "rounding":
        steps.append(RTN())
    roundings = [s for s in steps if s.kind == "rounding"]
    if len(roundings) != 1:
        raise SchemeError(
            f"method {'+'.join(s.name for s in steps)!r} has {len(roundings)} rounding steps; "
            "use transforms (awq, smoothquant) followed by one of rtn, gptq, hqq, signround, llm_int8"
        )
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise SchemeError(f"method {'+'.join(names)!r} repeats a step")
    return tuple(steps)


# Output heads stay in full precision unless a rule says otherwise
# (lm_head for Llama/GPT-2/OPT, embed_out for GPT-NeoX).
DEFAULT_SKIP_PATTERN = r"(.*\.)?(lm_head|embed_out)"
INDIVISIBLE_POLICIES = ("error", "shrink")
# calibration walk options (lowbit.model.walker.WalkOptions)
PROPAGATE = ("quantized", "full_precision")
OFFLOAD = ("memory", "disk")


@dataclass(frozen=True)
class Recipe:
    """Ordered rules (first match wins) plus the method that chooses the codes.

    A linear layer that no rule matches is an error at quantization time,
    never a silent skip: end the rules with a catch-all (``Recipe.uniform`` does).
    """

    rules: tuple[Rule, ...]
    method: Any = "rtn"  # a name ("awq+gptq"), a spec (GPTQ()), or a sequence of specs
    indivisible_groups: str = "error"
    tune: Optional[E2ETuning] = None  # end-to-end scale tuning after the rounding (None: none)
    VERSION: int = field(default=1, init=False, repr=False)

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        object.__setattr__(self, "rules", rules)
        if not rules:
            raise SchemeError("a recipe needs at least one rule; Recipe.uniform(scheme) builds the usual one")
        for r in rules:
            if not isinstance(r, Rule):
                raise SchemeError(f"recipe rules must be Rule objects, got {type(r).__name__}")
        object.__setattr__(self, "method", parse_method(self.method))
        for r in rules:
            if r.scheme is None:
                continue
            integer_only = [m.name for m in self.method if m.name in INTEGER_ONLY_METHODS]
            if integer_only and r.scheme.format != "int":
                raise SchemeError(
                    f"rule {r.pattern!r}: method {'+'.join(integer_only)} works on integer formats, not "
                    f"{r.scheme.format!r}; quantize {r.scheme.format} layers with method 'rtn'"
                )
            if self.method[-1].name == "signround" and r.scheme.zero_point == "float":
                raise SchemeError(
                    f"rule {r.pattern!r}: method signround tunes integer zero points; use zero_point='int' "
                    "(or a symmetric scheme) for this rule"
                )
            if self.method[-1].name == "llm_int8" and r.scheme.activations != "int8":
                raise SchemeError(
                    f"rule {r.pattern!r}: method llm_int8 needs a W8A8 scheme "
                    "(QuantScheme(bits=8, granularity='channel', activations='int8')), "
                    f"got {r.scheme.short_name}"
                )
        if self.tune is not None:
            self._check_tunable(rules)
        if self.indivisible_groups not in INDIVISIBLE_POLICIES:
            raise SchemeError(
                f"indivisible_groups={self.indivisible_groups!r}; use one of {INDIVISIBLE_POLICIES}"
            )

    @classmethod
    def uniform(cls, scheme: QuantScheme, *, skip: tuple[str, ...] = (DEFAULT_SKIP_PATTERN,), **kw) -> "Recipe":
        """One scheme for every linear layer except the skipped patterns (output heads by default)."""
        rules = tuple(Rule(p, None) for p in skip) + (Rule(".*", scheme),)
        return cls(rules=rules, **kw)

    def _check_tunable(self, rules: tuple[Rule, ...]) -> None:
        if not isinstance(self.tune, E2ETuning):
            raise SchemeError(f"Recipe.tune must be None or an E2ETuning spec, got {type(self.tune).__name__}")
        for r in rules:
            if r.scheme is None:
                continue
            if r.scheme.double_quant or r.scheme.activations is not None:
                raise SchemeError(
                    f"rule {r.pattern!r}: E2ETuning trains plain stored scales, and scheme {r.scheme.short_name} "
                    "stores double-quantized scales or quantizes activations; use tune=None for this recipe"
                )
            if self.method[-1].name == "llm_int8":
                raise SchemeError("E2ETuning does not tune LLM.int8 outlier splits; use tune=None")

    @property
    def method_name(self) -> str:
        """The steps joined by '+', e.g. 'awq+gptq'."""
        return "+".join(s.name for s in self.method)

    @property
    def rounding(self):
        return self.method[-1]

    @property
    def transforms(self) -> tuple:
        return self.method[:-1]

    @property
    def method_needs_calibration(self) -> bool:
        """Whether choosing the codes needs calibration data (GPTQ, AWQ, ...: the block walker)."""
        return any(s.needs_calibration for s in self.method)

    @property
    def needs_calibration(self) -> bool:
        """Whether anything in the recipe needs calibration data (the method, or the tuning)."""
        return self.tune is not None or self.method_needs_calibration

    def match(self, name: str) -> tuple[int, Optional[QuantScheme]]:
        """Index of the first matching rule and its scheme; SchemeError when none matches."""
        for i, r in enumerate(self.rules):
            if r.matches(name):
                return i, r.scheme
        raise SchemeError(
            f"no recipe rule matches layer {name!r}; add a rule for it "
            "(Rule(pattern, scheme) to quantize, Rule(pattern, None) to keep it in full precision)"
        )

    def scheme_for(self, name: str, in_features: int) -> Optional[QuantScheme]:
        """The scheme a layer gets, after the indivisible-group policy; None = keep full precision."""
        _, scheme = self.match(name)
        if scheme is None:
            return None
        if (
            scheme.granularity is Granularity.GROUP
            and in_features % scheme.group_size != 0
            and self.indivisible_groups == "shrink"
        ):
            return scheme.with_group_size(shrink_group_size(scheme.group_size, in_features))
        scheme.check_layer(name, in_features)
        return scheme

    # -- JSON ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "method": self.method_name,
            "method_options": [method_to_dict(m) for m in self.method],
            "indivisible_groups": self.indivisible_groups,
            **({} if self.tune is None else {"tune": self.tune.to_dict()}),
            "rules": [
                {"pattern": r.pattern, "scheme": None if r.scheme is None else r.scheme.to_dict()}
                for r in self.rules
            ],
        }

    def to_json(self, indent: Optional[int] = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        if not isinstance(d, dict):
            raise SchemeError(f"a recipe must be a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if version != cls.VERSION:
            raise SchemeError(
                f"recipe version {version!r} is not supported by this lowbit (reads version {cls.VERSION})"
            )
        try:
            rules = tuple(
                Rule(r["pattern"], None if r["scheme"] is None else QuantScheme.from_dict(r["scheme"]))
                for r in d["rules"]
            )
        except (KeyError, TypeError) as e:
            raise SchemeError(f"malformed recipe rules: {e!r}; each rule needs 'pattern' and 'scheme'") from None
        method = d.get("method", "rtn")
        if "method_options" in d:
            if not isinstance(d["method_options"], list):
                raise SchemeError("recipe 'method_options' must be a list of method entries")
            method = tuple(method_from_dict(m) for m in d["method_options"])
        return cls(
            rules=rules,
            method=method,
            indivisible_groups=d.get("indivisible_groups", "error"),
            tune=None if d.get("tune") is None else E2ETuning.from_dict(d["tune"]),
        )

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemeError(f"recipe is not valid JSON: {e}") from None
        return cls.from_dict(d)
