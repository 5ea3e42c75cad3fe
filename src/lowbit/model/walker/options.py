"""How a walk runs (``WalkOptions``) and where streamed blocks come from (``BlockSource``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from torch import nn

from lowbit.errors import CalibrationError
from lowbit.scheme import OFFLOAD, PROPAGATE


@dataclass(frozen=True)
class WalkOptions:
    """How the walker runs (not what it computes, except ``propagate``).

    batch_size:  calibration windows per forward call.
    propagate:   "quantized" (next block sees the quantized block's outputs) or "full_precision".
    offload:     "memory" or "disk" (block inputs/outputs spill to ``offload_dir`` or a temp dir).
    """

    batch_size: int = 8
    propagate: str = "quantized"
    offload: str = "memory"
    offload_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise CalibrationError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.propagate not in PROPAGATE:
            raise CalibrationError(f"propagate={self.propagate!r}; use one of {PROPAGATE}")
        if self.offload not in OFFLOAD:
            raise CalibrationError(f"offload={self.offload!r}; use one of {OFFLOAD}")


class BlockSource(Protocol):
    """Materialises a block's full-precision weights before it is processed and drops them after."""

    def load(self, index: int, block: nn.Module) -> None: ...

    def release(self, index: int, block: nn.Module) -> None: ...
