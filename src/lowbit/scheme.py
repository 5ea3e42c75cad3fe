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

Granularity says which weights share one ``(s, z)``: the whole tensor, one
output channel (a row of the ``[out, in]`` weight), or a group of
``group_size`` consecutive input columns inside a row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from lowbit.errors import SchemeError

SCALE_DTYPES = ("float32", "float16", "bfloat16")
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

    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = Granularity.GROUP
    group_size: Optional[int] = None  # None with granularity 'group' means DEFAULT_GROUP_SIZE
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.granularity, str) and not isinstance(self.granularity, Granularity):
            try:
                object.__setattr__(self, "granularity", Granularity(self.granularity))
            except ValueError:
                raise SchemeError(
                    f"unknown granularity {self.granularity!r}; use one of "
                    f"{[g.value for g in Granularity]}"
                ) from None
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in INT_BITS:
            raise SchemeError(f"bits={self.bits!r} is not supported; integer formats take bits in {INT_BITS}")
        if not isinstance(self.symmetric, bool):
            raise SchemeError(f"symmetric must be True or False, got {self.symmetric!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SchemeError(f"scale_dtype={self.scale_dtype!r} is not supported; use one of {SCALE_DTYPES}")
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

    def storage_bytes(self, out_features: int, in_features: int) -> int:
        from math import ceil

        scale_bytes = 4 if self.scale_dtype == "float32" else 2
        if self.granularity is Granularity.TENSOR:
            n_params = 1
        else:
            n_params = out_features * self.n_groups(in_features)
        # the native bit-stream layout: rows padded to a multiple of 8 codes (none at 8 bits)
        packed = out_features * (in_features if self.bits == 8 else ceil(in_features / 8) * self.bits)
        zeros = 0 if self.symmetric else n_params  # one uint8 per group
        return packed + n_params * scale_bytes + zeros

    # -- names and serialisation -------------------------------------------
    @property
    def short_name(self) -> str:
        g = {
            Granularity.TENSOR: "t",
            Granularity.CHANNEL: "c",
            Granularity.GROUP: f"g{self.group_size}",
        }[self.granularity]
        return f"w{self.bits}{g}-{'sym' if self.symmetric else 'asym'}"

    def with_group_size(self, group_size: int) -> "QuantScheme":
        return QuantScheme(self.bits, self.symmetric, Granularity.GROUP, group_size, self.scale_dtype)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "int",
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity.value,
            "group_size": self.group_size,
            "scale_dtype": self.scale_dtype,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantScheme":
        if not isinstance(d, dict):
            raise SchemeError(f"a scheme must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        fmt = d.pop("format", "int")
        if fmt != "int":
            raise SchemeError(f"unknown numeric format {fmt!r}; this version of lowbit knows 'int'")
        unknown = set(d) - {"bits", "symmetric", "granularity", "group_size", "scale_dtype"}
        if unknown:
            raise SchemeError(f"unknown scheme fields {sorted(unknown)}")
        gran = d.get("granularity", "group")
        if gran != "group":
            d["group_size"] = d.get("group_size")
        return cls(**d)


def valid_group_sizes(in_features: int) -> list[int]:
    """Group sizes (>= 8, < in_features) that divide ``in_features``."""
    return [g for g in range(8, in_features) if in_features % g == 0]


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


# Output heads stay in full precision unless a rule says otherwise
# (lm_head for Llama/GPT-2/OPT, embed_out for GPT-NeoX).
DEFAULT_SKIP_PATTERN = r"(.*\.)?(lm_head|embed_out)"
METHODS = ("rtn",)
INDIVISIBLE_POLICIES = ("error", "shrink")


@dataclass(frozen=True)
class Recipe:
    """Ordered rules (first match wins) plus the method that chooses the codes.

    A linear layer that no rule matches is an error at quantization time,
    never a silent skip: end the rules with a catch-all (``Recipe.uniform`` does).
    """

    rules: tuple[Rule, ...]
    method: str = "rtn"
    indivisible_groups: str = "error"
    VERSION: int = field(default=1, init=False, repr=False)

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        object.__setattr__(self, "rules", rules)
        if not rules:
            raise SchemeError("a recipe needs at least one rule; Recipe.uniform(scheme) builds the usual one")
        for r in rules:
            if not isinstance(r, Rule):
                raise SchemeError(f"recipe rules must be Rule objects, got {type(r).__name__}")
        if self.method not in METHODS:
            raise SchemeError(f"unknown method {self.method!r}; this version knows {METHODS}")
        if self.indivisible_groups not in INDIVISIBLE_POLICIES:
            raise SchemeError(
                f"indivisible_groups={self.indivisible_groups!r}; use one of {INDIVISIBLE_POLICIES}"
            )

    @classmethod
    def uniform(cls, scheme: QuantScheme, *, skip: tuple[str, ...] = (DEFAULT_SKIP_PATTERN,), **kw) -> "Recipe":
        """One scheme for every linear layer except the skipped patterns (output heads by default)."""
        rules = tuple(Rule(p, None) for p in skip) + (Rule(".*", scheme),)
        return cls(rules=rules, **kw)

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
            "method": self.method,
            "indivisible_groups": self.indivisible_groups,
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
        return cls(
            rules=rules,
            method=d.get("method", "rtn"),
            indivisible_groups=d.get("indivisible_groups", "error"),
        )

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemeError(f"recipe is not valid JSON: {e}") from None
        return cls.from_dict(d)
