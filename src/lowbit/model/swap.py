"""Find the linear layers of any ``nn.Module`` and swap them for ``QuantLinear``.

Handles ``nn.Linear`` and GPT-2 style ``Conv1D`` (weight stored ``[in, out]``;
transposed once here). Works layer by layer: each full-precision weight is
dropped as soon as its quantized replacement is in place, so peak memory is
the model plus one layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import UnsupportedModelError
from lowbit.formats import sqnr_db
from lowbit.methods import round_weight
from lowbit.nn import QuantLinear
from lowbit.scheme import Recipe

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

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe.to_dict(),
            "layers": [asdict(r) for r in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
            "notes": list(self.notes),
        }

    @property
    def quantized_bytes(self) -> int:
        return sum(r.nbytes for r in self.layers)


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


def _shared_parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    return owners


def quantize_model(model: nn.Module, recipe: Recipe, *, progress: bool = True) -> QuantizationReport:
    """Quantize every linear layer of ``model`` in place as ``recipe`` says."""
    if isinstance(model, QuantLinear) or linear_kind(model) is not None:
        raise UnsupportedModelError("quantize a model that *contains* linear layers, not a bare layer")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise UnsupportedModelError(
            "the model already holds QuantLinear layers; quantize a fresh full-precision copy "
            "(lowbit.load_pretrained) rather than re-quantizing quantized weights"
        )
    linears = list(iter_linears(model))
    if not linears:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no nn.Linear or Conv1D layers to quantize"
        )
    report = QuantizationReport(recipe=recipe)
    owners = _shared_parameter_owners(model)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            report.skipped.append(SkipRecord(name, "embedding: kept in full precision (not a linear layer)"))
    # Resolve every layer's scheme before touching any weight: a recipe error must
    # leave the model exactly as it was, never half quantized.
    plan = []
    for name, mod, kind in linears:
        out_f, in_f = weight_as_linear(mod, kind).shape
        rule_idx, _ = recipe.match(name)
        plan.append((name, mod, kind, rule_idx, recipe.scheme_for(name, in_f)))
    for name, mod, kind, rule_idx, scheme in tqdm(plan, desc=f"quantizing ({recipe.method_name})", disable=not progress, unit="layer"):
        w = weight_as_linear(mod, kind)
        out_f, in_f = w.shape
        if scheme is None:
            report.skipped.append(
                SkipRecord(name, f"recipe rule {rule_idx} ({recipe.rules[rule_idx].pattern!r}) keeps full precision")
            )
            continue
        if scheme.granularity.value == "group" and scheme != recipe.rules[rule_idx].scheme:
            report.notes.append(
                f"{name}: group_size {recipe.rules[rule_idx].scheme.group_size} does not divide "
                f"in_features={in_f}; used group_size {scheme.group_size} (indivisible_groups='shrink')"
            )
        with torch.no_grad():
            wf = w.detach().to(torch.float32)
            qt = round_weight(wf, scheme, recipe.rounding)
            err = sqnr_db(wf, qt.dequantize())
            bias = None if mod.bias is None else mod.bias.detach()
            new = QuantLinear.from_quantized(qt, bias)
        sharers = [o for o in owners.get(id(mod.weight), []) if not o.startswith(name + ".")]
        if sharers:
            report.notes.append(
                f"{name}: weight was shared with {sharers}; those keep the full-precision tensor"
            )
            config = getattr(model, "config", None)
            if config is not None and getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
        set_submodule(model, name, new)
        report.layers.append(
            LayerRecord(name, kind, in_f, out_f, scheme.to_dict(), rule_idx, qt.nbytes, qt.bits_per_weight, err)
        )
    return report
