"""Training-based quantization: end-to-end tuning of a quantized model's scales by distillation
(``scale_tuning``)."""

from lowbit.qat.scale_tuning import TunableScales, TuningResult, distillation_kl, heldout_kl, tune_scales

__all__ = ["TunableScales", "TuningResult", "distillation_kl", "heldout_kl", "tune_scales"]
