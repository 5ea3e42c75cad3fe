"""Typed exceptions. Every message says what is wrong *and* how to fix it.

Imports nothing from lowbit.
"""


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose."""


class SchemeError(LowbitError, ValueError):
    """A quantization scheme or recipe is invalid, or does not fit a layer."""


class FormatError(LowbitError, ValueError):
    """Input that a numeric format cannot represent (NaN/Inf, overflow of the scale dtype...)."""


class PackingError(LowbitError, ValueError):
    """Codes that do not fit a bit layout, or packed data of the wrong size."""


class KernelError(LowbitError, RuntimeError):
    """A requested kernel cannot run this layer (format, shape or device)."""


class UnsupportedModelError(LowbitError, TypeError):
    """A model lowbit does not know how to handle."""


class ModelSourceError(LowbitError, FileNotFoundError):
    """A model source (directory, GGUF file, package) that cannot be found or read."""


class DataError(LowbitError, ValueError):
    """Evaluation or calibration data that is missing, empty or too short."""


class CalibrationError(LowbitError, ValueError):
    """Calibration statistics are unusable (NaN/Inf activations, a Hessian that is not
    positive definite, a layer that saw no calibration tokens)."""


class CheckpointError(LowbitError, ValueError):
    """A lowbit checkpoint that is truncated, malformed, or does not match its manifest."""


class TruncatedCheckpointError(CheckpointError):
    """The file ends before the data its header describes (an interrupted copy or download)."""


class ManifestError(CheckpointError):
    """The lowbit manifest in the header is missing, malformed, or from an unsupported version."""


class TensorMismatchError(CheckpointError):
    """A tensor in the file does not match the manifest or the model skeleton (name, shape or dtype)."""


class IntegrityError(CheckpointError):
    """A checkpoint whose bytes differ from the digests recorded when it was written (a corrupted
    copy, a flipped bit, an edit), or one that carries no digests to check."""
