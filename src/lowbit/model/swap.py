"""Find the linear layers of any ``nn.Module`` and swap them for ``QuantLinear``.

Handles ``nn.Linear`` and GPT-2 style ``Conv1D`` (weight stored ``[in, out]``;
transposed once here). Works layer by layer: each full-precision weight is
dropped as soon as its quantized replacement is in place, so peak memory is
the model plus one layer.

Nothing is skipped silently: every other module with parameters of its own
(embeddings, norms, convolutions, ...) is listed in the report's ``skipped``
with the reason, and so is every linear layer a recipe rule keeps in full
precision. A recipe rule that reaches no linear layer is an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import CalibrationError, SchemeError, UnsupportedModelError
from lowbit.formats import sqnr_db
from lowbit.methods import round_weight
from lowbit.nn import QuantLinear
from lowbit.recipe import DEFAULT_SKIP_PATTERN, Recipe
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor

try:  # transformers is a dependency, but the swap works without it
    from transformers.pytorch_utils import Conv1D as _Conv1D
except Exception:  # pragma: no cover
    _Conv1D = None


@dataclass
class LayerRecord:
    name: str
    source: str  # "Linear" or "Conv1D"
    in_features: int
    out_features: int
    scheme: dict
    rule: int
    nbytes: int
    bits_per_weight: float
    sqnr_db: float
    n_outliers: int = 0  # LLM.int8: input columns kept in float16


@dataclass
class SkipRecord:
    name: str
    reason: str


@dataclass
class QuantizationReport:
    recipe: Recipe
    layers: list[LayerRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calibration: Optional[dict] = None  # what the calibration data was (None: no calibration)
    tuning: Optional[dict] = None  # end-to-end scale tuning (lowbit.qat.TuningResult), if any

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe.to_dict(),
            "calibration": self.calibration,
            "layers": [asdict(r) for r in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
            "notes": list(self.notes),
            **({} if self.tuning is None else {"tuning": self.tuning}),
        }

    @property
    def quantized_bytes(self) -> int:
        return sum(r.nbytes for r in self.layers)

    @property
    def outlier_fraction(self) -> float:
        """Share of the quantized layers' input columns kept in float16 (LLM.int8; 0 otherwise)."""
        cols = sum(r.in_features for r in self.layers)
        return sum(r.n_outliers for r in self.layers) / cols if cols else 0.0


def linear_kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Linear):
        return "Linear"
    if _Conv1D is not None and isinstance(module, _Conv1D):
        return "Conv1D"
    return None


def iter_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    for name, mod in model.named_modules():
        kind = linear_kind(mod)
        if kind is not None:
            yield name, mod, kind


def weight_as_linear(module: nn.Module, kind: str) -> torch.Tensor:
    """The weight as ``[out, in]``."""
    return module.weight.t() if kind == "Conv1D" else module.weight


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def shared_parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    return owners


@dataclass
class PlannedLayer:
    name: str
    module: nn.Module
    kind: str  # "Linear" or "Conv1D"
    rule: int
    scheme: Optional[QuantScheme]  # None: keep full precision


def check_quantizable(model: nn.Module) -> None:
    if isinstance(model, QuantLinear) or linear_kind(model) is not None:
        raise UnsupportedModelError("quantize a model that *contains* linear layers, not a bare layer")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise UnsupportedModelError(
            "the model already holds QuantLinear layers; quantize a fresh full-precision copy "
            "(lowbit.load_pretrained) rather than re-quantizing quantized weights"
        )


def not_linear_reason(module: nn.Module) -> Optional[str]:
    """Why a module with parameters of its own stays in full precision; None for linear layers
    (the recipe decides those) and for modules without parameters of their own."""
    if linear_kind(module) is not None or isinstance(module, QuantLinear):
        return None
    if next(module.parameters(recurse=False), None) is None:
        return None
    kind = type(module).__name__
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding: kept in full precision (not a linear layer)"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{kind}: kept in full precision (lowbit quantizes linear layers only; convolutions are not supported yet)"
    return f"{kind}: kept in full precision (not a linear layer)"


def plan_layers(model: nn.Module, recipe: Recipe) -> list[PlannedLayer]:
    """Every linear layer with the scheme the recipe gives it, resolved before any weight is
    touched: a recipe error must leave the model exactly as it was, never half quantized."""
    check_quantizable(model)
    linears = list(iter_linears(model))
    if not linears:
        raise UnsupportedModelError(f"{type(model).__name__} has no nn.Linear or Conv1D layers to quantize")
    plan = []
    for name, mod, kind in linears:
        out_f, in_f = weight_as_linear(mod, kind).shape
        rule_idx, _ = recipe.match(name)
        plan.append(PlannedLayer(name, mod, kind, rule_idx, recipe.scheme_for(name, in_f)))
    check_rules_reach_linears(model, recipe, [p.name for p in plan])
    return plan


def check_rules_reach_linears(model: nn.Module, recipe: Recipe, linear_names: list[str]) -> None:
    """SchemeError for a rule that matches no linear layer (a typo, or a pattern aimed at a
    module lowbit cannot quantize); the default output-head rule may match nothing (models
    without a head)."""
    for i, rule in enumerate(recipe.rules):
        if rule.pattern == DEFAULT_SKIP_PATTERN or any(rule.matches(n) for n in linear_names):
            continue
        hits = [(n, type(m).__name__) for n, m in model.named_modules() if n and rule.matches(n)]
        where = f"recipe rule {i} ({rule.pattern!r})"
        if hits:
            shown = ", ".join(f"{n} ({k})" for n, k in hits[:3]) + (f" and {len(hits) - 3} more" if len(hits) > 3 else "")
            raise SchemeError(
                f"{where} matches {shown} but no linear layer: lowbit quantizes nn.Linear and Conv1D layers "
                "only (other modules stay in full precision and are listed as skipped); aim the rule at linear "
                r"layers (end it with '\..*' to reach the linears inside a module) or drop it"
            )
        raise SchemeError(
            f"{where} matches no module of {type(model).__name__}; patterns are matched with re.fullmatch "
            f"against qualified names such as {linear_names[0]!r}; fix the pattern or drop the rule"
        )


def start_report(model: nn.Module, recipe: Recipe, plan: list[PlannedLayer]) -> QuantizationReport:
    report = QuantizationReport(recipe=recipe)
    for name, mod in model.named_modules():
        reason = not_linear_reason(mod)
        if reason is not None:
            report.skipped.append(SkipRecord(name or "<model>", reason))
    for p in plan:
        if p.scheme is None:
            pattern = recipe.rules[p.rule].pattern
            report.skipped.append(SkipRecord(p.name, f"recipe rule {p.rule} ({pattern!r}) keeps full precision"))
        elif p.scheme.granularity.value == "group" and p.scheme != recipe.rules[p.rule].scheme:
            report.notes.append(
                f"{p.name}: group_size {recipe.rules[p.rule].scheme.group_size} does not divide "
                f"in_features={weight_as_linear(p.module, p.kind).shape[1]}; used group_size "
                f"{p.scheme.group_size} (indivisible_groups='shrink')"
            )
    return report


def install_quantized(
    model: nn.Module,
    layer: PlannedLayer,
    qt: QuantizedTensor,
    reference: torch.Tensor,
    report: QuantizationReport,
    owners: dict[int, list[str]],
) -> None:
    """Swap ``layer`` for a QuantLinear holding ``qt``; ``reference`` is the [out, in] weight the
    SQNR in the report is measured against."""
    mod, name = layer.module, layer.name
    with torch.no_grad():
        err = sqnr_db(reference, qt.dequantize())
        bias = None if mod.bias is None else mod.bias.detach()
        new = QuantLinear.from_quantized(qt, bias)
    sharers = [o for o in owners.get(id(mod.weight), []) if not o.startswith(name + ".")]
    if sharers:
        report.notes.append(f"{name}: weight was shared with {sharers}; those keep the full-precision tensor")
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    set_submodule(model, name, new)
    out_f, in_f = qt.shape
    report.layers.append(
        LayerRecord(
            name, layer.kind, in_f, out_f, layer.scheme.to_dict(), layer.rule, qt.nbytes, qt.bits_per_weight, err,
            qt.n_outliers,
        )
    )


def quantize_model(model: nn.Module, recipe: Recipe, *, progress: bool = True) -> QuantizationReport:
    """Quantize every linear layer of ``model`` in place, without calibration data
    (rounding methods that need none: RTN, HQQ)."""
    if recipe.method_needs_calibration:
        raise CalibrationError(
            f"method {recipe.method_name!r} needs calibration data; pass calibration=... to lowbit.quantize "
            "(lowbit.calibration.from_texts(...), or 'data-free' to sample it from the model)"
        )
    plan = plan_layers(model, recipe)
    report = start_report(model, recipe, plan)
    owners = shared_parameter_owners(model)
    todo = [p for p in plan if p.scheme is not None]
    for layer in tqdm(todo, desc=f"quantizing ({recipe.method_name})", disable=not progress, unit="layer"):
        with torch.no_grad():
            wf = weight_as_linear(layer.module, layer.kind).detach().to(torch.float32)
            qt = round_weight(wf, layer.scheme, recipe.rounding)
        install_quantized(model, layer, qt, wf, report, owners)
    return report
