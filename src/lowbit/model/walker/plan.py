"""The walk's bookkeeping: every linear the recipe plans, the report, installing each block's
results, and rounding the planned linears that no calibration reaches."""

from __future__ import annotations

import dataclasses

from torch import nn

from lowbit.calibration.data import CalibrationData
from lowbit.methods import round_weight
from lowbit.model.adapters import BlockStructure
from lowbit.model.swap import PlannedLayer, install_quantized, plan_layers, shared_parameter_owners, start_report
from lowbit.model.walker.weights import get_weight
from lowbit.methods.rtn import RTN
from lowbit.recipe import Recipe


class WalkPlan:
    """``layers``: every planned linear by qualified name; ``report``: what the walk did."""

    def __init__(self, model: nn.Module, recipe: Recipe, calibration: CalibrationData) -> None:
        self.model, self.recipe = model, recipe
        self.layers = {p.name: p for p in plan_layers(model, recipe)}
        self.report = start_report(model, recipe, list(self.layers.values()))
        self.report.calibration = dict(calibration.description)
        self.owners = shared_parameter_owners(model)
        self._installed: set[str] = set()

    def block_layers(self, block_name: str, structure: BlockStructure) -> dict[str, PlannedLayer]:
        """The block's planned linears by name relative to the block, in structure order."""
        return {
            rel: self.layers[f"{block_name}.{rel}"]
            for rel in structure.linears
            if f"{block_name}.{rel}" in self.layers
        }

    def install(self, layers: dict[str, PlannedLayer], results: dict[str, tuple]) -> None:
        """Swap each rounded linear for a QuantLinear (``results``: ``{rel: (qt, reference)}``)."""
        for rel, (qt, ref) in results.items():
            install_quantized(self.model, layers[rel], qt, ref, self.report, self.owners)
            self._installed.add(layers[rel].name)
            # the plan must not keep the replaced full-precision module alive (streamed
            # models would otherwise accumulate every block's weights)
            self.layers[layers[rel].name] = dataclasses.replace(layers[rel], module=None)

    def not_installed_in(self, block_name: str) -> list[PlannedLayer]:
        """The block's planned linears that ``install`` has not replaced."""
        return [p for n, p in self.layers.items() if n.startswith(f"{block_name}.") and n not in self._installed]

    def outside(self, blocks_path: str) -> list[PlannedLayer]:
        """The planned linears outside the blocks (an LM head a rule quantizes)."""
        return [p for n, p in self.layers.items() if not n.startswith(blocks_path + ".")]

    def round_uncalibrated(self, layers: list[PlannedLayer], why: str) -> None:
        """Round ``layers`` without statistics (RTN for a rounding that needs them) and note why."""
        rounding = self.recipe.rounding
        for p in layers:
            if p.scheme is None or not isinstance(p.module, nn.Module) or p.name in {r.name for r in self.report.layers}:
                continue
            w = get_weight(p.module)
            used = rounding if not rounding.needs_calibration else RTN()
            qt = round_weight(w, p.scheme, used)
            install_quantized(self.model, p, qt, w, self.report, self.owners)
            skipped = [t.name for t in self.recipe.transforms] + ([rounding.name] if used is not rounding else [])
            if skipped:
                self.report.notes.append(
                    f"{p.name}: {why}; rounded with {used.name}, without calibration ({'+'.join(skipped)} not applied)"
                )
