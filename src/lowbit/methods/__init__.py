"""How codes are chosen. Each method is a pure function ``(weight, scheme) -> QuantizedTensor``
(calibration-based methods will also take statistics)."""

from lowbit.methods.rtn import rtn

METHODS = {"rtn": rtn}

__all__ = ["METHODS", "rtn"]
