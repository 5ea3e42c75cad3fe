"""Recipes: which scheme each linear layer gets (ordered ``Rule``s, the first match wins), the
method that chooses the codes, and the optional end-to-end scale tuning; with their JSON form.

The method registry maps method names to their spec classes, which live beside their numerics
(``GPTQ`` in ``lowbit.methods.gptq``, ..., ``E2ETuning`` in ``lowbit.qat.config``). The method
modules import torch, so the registry imports them on first use (``method_specs``, when a ``Recipe``
is built or read): importing this module stays cheap (the command line does it to build its parser).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from lowbit.errors import SchemeError
from lowbit.qat.config import E2ETuning
from lowbit.scheme import Granularity, QuantScheme, shrink_group_size
from lowbit.validation import options_from_dict

# Output heads stay in full precision unless a rule says otherwise
# (lm_head for Llama/GPT-2/OPT, embed_out for GPT-NeoX).
DEFAULT_SKIP_PATTERN = r"(.*\.)?(lm_head|embed_out)"
INDIVISIBLE_POLICIES = ("error", "shrink")


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
# method specs: how codes are chosen (the classes and their numerics live in lowbit.methods)
# ---------------------------------------------------------------------------
METHODS = ("rtn", "gptq", "awq", "hqq", "signround", "smoothquant", "llm_int8")
MethodSpec = "RTN | GPTQ | AWQ | HQQ | SignRound | SmoothQuant | LLMInt8"
# methods whose numerics assume integer codes (the other formats take RTN or llm_int8)
INTEGER_ONLY_METHODS = ("gptq", "awq", "hqq", "signround", "smoothquant")


@functools.lru_cache(maxsize=None)
def method_specs() -> dict[str, type]:
    """Method name -> its spec class, in ``METHODS`` order. The classes live beside their numerics
    (``lowbit.methods.<name>``), which import torch: they are imported here, on first use."""
    from lowbit.methods.awq import AWQ
    from lowbit.methods.gptq import GPTQ
    from lowbit.methods.hqq import HQQ
    from lowbit.methods.llm_int8 import LLMInt8
    from lowbit.methods.rtn import RTN
    from lowbit.methods.signround import SignRound
    from lowbit.methods.smoothquant import SmoothQuant

    specs = {cls.name: cls for cls in (RTN, GPTQ, AWQ, HQQ, SignRound, SmoothQuant, LLMInt8)}
    if tuple(specs) != METHODS:
        raise AssertionError(f"METHODS {METHODS} does not list the method specs {tuple(specs)}")
    return specs


def method_to_dict(spec) -> dict[str, Any]:
    return {"name": spec.name, **asdict(spec)}


def method_from_dict(d: dict[str, Any]):
    specs = method_specs()
    if not isinstance(d, dict) or d.get("name") not in specs:
        raise SchemeError(f"a method entry needs a 'name' in {METHODS}, got {d!r}")
    d = dict(d)
    cls = specs[d.pop("name")]
    return options_from_dict(cls, d, cls.name)


def parse_method(method) -> tuple:
    """Normalise a method to its steps: zero or more transforms, then exactly one rounding.

    Accepts a name (``"gptq"``), names joined by ``+`` (``"awq+gptq"``), a spec object
    (``GPTQ(damp=0.05)``) or a sequence of specs. A transform alone is followed by RTN.
    """
    specs = method_specs()
    if isinstance(method, str):
        names = [n.strip() for n in method.split("+")]
        unknown = [n for n in names if n not in specs]
        if unknown or not method:
            raise SchemeError(f"unknown method {method!r}; use one of {METHODS}, or join them with '+' (e.g. 'awq+gptq')")
        steps = [specs[n]() for n in names]
    elif isinstance(method, tuple(specs.values())):
        steps = [method]
    elif isinstance(method, (list, tuple)):
        steps = list(method)
        for s in steps:
            if not isinstance(s, tuple(specs.values())):
                raise SchemeError(f"method steps must be RTN/GPTQ/AWQ/HQQ/SignRound/SmoothQuant/LLMInt8 objects, got {type(s).__name__}")
    else:
        raise SchemeError(f"method must be a name or a method spec, got {type(method).__name__}")
    if not steps:
        raise SchemeError("a method needs at least one step")
    if steps[-1].kind != "rounding":
        steps.append(specs["rtn"]())
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
