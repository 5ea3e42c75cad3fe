"""The configuration of end-to-end scale tuning (``E2ETuning``, a ``Recipe``'s ``tune``); the
tuning itself is ``lowbit.qat.scale_tuning``. Kept apart from it so that recipes and the command
line read it without importing torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lowbit.errors import SchemeError
from lowbit.validation import check_range, options_from_dict

__all__ = ["E2ETuning"]


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
        check_range("E2ETuning", "steps", self.steps, 1, 1_000_000, integer=True)
        check_range("E2ETuning", "lr", self.lr, 1e-8, 1.0)
        check_range("E2ETuning", "batch_size", self.batch_size, 1, 1_000_000, integer=True)
        check_range("E2ETuning", "holdout", self.holdout, 1, 1_000_000, integer=True)
        check_range("E2ETuning", "seed", self.seed, 0, 2**63 - 1, integer=True)
        if not isinstance(self.norms, bool):
            raise SchemeError("E2ETuning.norms must be True or False")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "E2ETuning":
        if not isinstance(d, dict):
            raise SchemeError(f"recipe 'tune' must be a JSON object of E2ETuning options, got {d!r}")
        return options_from_dict(cls, d, "E2ETuning")
