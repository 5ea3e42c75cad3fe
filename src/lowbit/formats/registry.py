"""The registry of numeric formats, keyed by ``scheme.format``.

Every module of this package that defines ``FORMATS`` (a tuple of
:class:`~lowbit.formats.base.NumericFormat` instances) is a format module; the registry
imports the package's modules once, on the first lookup (never at import time), and
maps each instance's ``names`` to it. A name claimed twice is an error. So a new format
is one new module here and nothing else in this package.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import Union

from lowbit.errors import FormatError
from lowbit.formats.base import NumericFormat
from lowbit.scheme import QuantScheme


@lru_cache(maxsize=None)
def _registry() -> dict[str, NumericFormat]:
    package = importlib.import_module(__package__)
    found: dict[str, NumericFormat] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__package__}.{info.name}")
        for fmt in getattr(module, "FORMATS", ()):
            if not isinstance(fmt, NumericFormat) or not fmt.names:
                raise TypeError(f"{module.__name__}.FORMATS must hold NumericFormat instances with names, got {fmt!r}")
            for name in fmt.names:
                if name in found:
                    raise TypeError(f"numeric format {name!r} is registered twice: {found[name]!r} and {fmt!r}")
                found[name] = fmt
    return found


def registered() -> dict[str, NumericFormat]:
    """``scheme.format`` name -> its format object (a copy)."""
    return dict(_registry())


def numeric_format(scheme: Union[QuantScheme, str]) -> NumericFormat:
    """The format object that computes ``scheme``'s numerics (a scheme or a format name)."""
    name = scheme if isinstance(scheme, str) else scheme.format
    fmt = _registry().get(name)
    if fmt is None:
        raise FormatError(f"no numeric format is registered for {name!r}; registered: {sorted(_registry())}")
    return fmt
