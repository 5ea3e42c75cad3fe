"""One block's work: the block, the planned linears in it, the inputs it is calibrated on."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.model.adapters import BlockStructure, InputGroup
from lowbit.model.swap import PlannedLayer
from lowbit.model.walker.activations import BlockInputs
from lowbit.model.walker.options import WalkOptions


@dataclass
class BlockJob:
    """What the per-block steps (transforms, rounding) work on.

    name:       the block's qualified name ("model.layers.3"), for notes.
    layers:     the block's linears the plan knows, by name relative to the block.
    inputs:     the block's calibration inputs (the walk's current stream).
    notes:      the report's notes, where the steps say what they did or skipped.
    no_clip:    last name parts of linears AWQ's clipping search leaves alone.
    """

    block: nn.Module
    name: str
    structure: BlockStructure
    layers: dict[str, PlannedLayer]
    inputs: BlockInputs
    options: WalkOptions
    notes: list[str]
    no_clip: tuple[str, ...]

    def planned(self, rel: str) -> bool:
        """Whether the linear ``rel`` is to be quantized (the plan gives it a scheme)."""
        return rel in self.layers and self.layers[rel].scheme is not None

    def module(self, rel: str) -> nn.Module:
        return self.block.get_submodule(rel)

    def rounded_groups(self) -> list[InputGroup]:
        """The input groups with at least one linear to quantize, in forward order."""
        return [g for g in self.structure.groups if any(self.planned(rel) for rel in g.linears)]

    def clips(self, rel: str) -> bool:
        """Whether AWQ's clipping search applies to the linear ``rel``."""
        return self.planned(rel) and rel.rsplit(".", 1)[-1] not in self.no_clip
