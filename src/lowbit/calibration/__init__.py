"""Calibration: text -> token windows (or windows sampled from the model itself), and the
statistics accumulated from a layer's inputs."""

from lowbit.calibration.data import CalibrationData, as_calibration, from_texts, load_texts, sample_from_model

__all__ = ["CalibrationData", "as_calibration", "from_texts", "load_texts", "sample_from_model"]
