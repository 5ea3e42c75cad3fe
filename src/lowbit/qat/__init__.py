"""Training-based quantization: end-to-end tuning of a quantized model's scales by distillation
(``scale_tuning``; its configuration ``E2ETuning`` lives in ``config``).

The tuning imports torch; it is resolved on first use, so that ``lowbit.qat.config`` (read by
every ``Recipe``) stays cheap to import.
"""

from lowbit.qat.config import E2ETuning

__all__ = ["E2ETuning", "TunableScales", "TuningResult", "distillation_kl", "heldout_kl", "tune_scales"]

_TUNING = ("TunableScales", "TuningResult", "distillation_kl", "heldout_kl", "tune_scales")


def __getattr__(name):
    if name in _TUNING:
        from lowbit.qat import scale_tuning

        return getattr(scale_tuning, name)
    raise AttributeError(f"module 'lowbit.qat' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_TUNING))
