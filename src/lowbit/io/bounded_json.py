"""JSON from untrusted files, parsed with bounds.

``json.loads`` on a hostile or corrupted document can raise ``RecursionError`` (deep nesting)
or ``ValueError`` (an integer of more than 4,300 digits: CPython's int/str conversion limit),
and a huge integer that does parse makes any loop over it hang. :func:`loads` turns all of
that into :class:`JSONLimitError`: integers have at most ``MAX_INT_DIGITS`` digits and
containers nest at most ``MAX_DEPTH`` deep (the parser's own recursion is caught as well, so
no bound depends on the caller's stack).
"""

from __future__ import annotations

import json
from typing import Any, Union

MAX_DEPTH = 64  # a lowbit manifest nests about 8 deep (manifest > model > config > rope_scaling > ...)
MAX_INT_DIGITS = 40  # every count, size and seed lowbit stores fits in 20 digits


class JSONLimitError(ValueError):
    """The document breaks a bound (depth, integer size) or is not JSON at all. The message is a
    predicate ('is not valid JSON (...)', 'nests ... deeper than ...') for the caller to prefix
    with what was parsed."""


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise JSONLimitError(f"holds an integer of {digits} digits (at most {MAX_INT_DIGITS} are accepted)")
    return int(text)


def depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed document (a scalar: 0). Iterative."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def loads(text: Union[str, bytes]) -> Any:
    """``json.loads`` with the bounds of this module; JSONLimitError on any failure."""
    try:
        value = json.loads(text, parse_int=_bounded_int)
    except RecursionError:
        raise JSONLimitError(f"nests lists/objects deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JSONLimitError(f"is not valid JSON ({e})") from None
    except ValueError as e:  # our integer bound, or any other conversion limit of the interpreter
        raise JSONLimitError(str(e)) from None
    if depth(value) > MAX_DEPTH:
        raise JSONLimitError(f"nests lists/objects deeper than {MAX_DEPTH} levels")
    return value
