"""The quantization vocabulary as frozen, validated dataclasses.

Nothing here touches tensors or files: a scheme says *what* numbers a layer
will hold, the `formats` module says *how* they are computed. Everything above
the vocabulary imports it, never the reverse: the method specs (``GPTQ``, ...)
live beside their numerics in ``lowbit.methods``, recipes (rules, the method
registry, JSON) in ``lowbit.recipe``.

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

from dataclasses import dataclass, fields, replace
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


# calibration walk options (lowbit.model.walker.WalkOptions; the command line's choices)
PROPAGATE = ("quantized", "full_precision")
OFFLOAD = ("memory", "disk")
