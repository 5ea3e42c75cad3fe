"""Checks shared by the configuration dataclasses (method specs, tuning options): a value out
of range, or unknown options in a JSON entry, is a ``SchemeError`` that says what is accepted.

Imports nothing from lowbit but ``errors``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from lowbit.errors import SchemeError


def check_range(owner: str, name: str, value, lo, hi, *, integer: bool = False) -> None:
    """Raise a SchemeError unless ``value`` is a number (an integer with ``integer=True``, never
    a bool) in ``[lo, hi]``; the message names ``owner.name``."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (lo <= value <= hi):
        kind = "an integer" if integer else "a number"
        raise SchemeError(f"{owner}.{name}={value!r}; it must be {kind} in [{lo}, {hi}]")


def options_from_dict(cls, d: dict[str, Any], label: str):
    """``cls(**d)`` for a dataclass, or a SchemeError naming the options ``cls`` does not know."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise SchemeError(f"unknown {label} options {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)
