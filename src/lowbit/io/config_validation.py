"""Checks of the transformers config stored in a lowbit manifest, before a model is built from it.

Building a skeleton from a corrupted config goes wrong in every way: a ``num_hidden_layers`` of
1e9 builds modules until memory runs out, a dimension of 0 or -1 raises ZeroDivisionError or
RuntimeError deep inside transformers, a string ``rms_norm_eps`` builds fine and fails at the
first forward. So before anything is built:

* every field whose default in the config class is a bool, int, float or str holds that kind of
  value (ints may also be None or a list of ints, as token ids are; floats must be finite);
* the dimensions below are integers in ``[1, MAX_CONFIG_DIMENSION]`` (looked up through the
  class's ``attribute_map``, so GPT-2's ``n_embd`` counts as ``hidden_size``);
* ``num_hidden_layers`` is the number of blocks the tensors hold: some ``<prefix>.<i>.`` of the
  tensor names (the first numbered path component) runs over exactly ``0 .. num_hidden_layers-1``;
* no field shadows a method of the config class, and no field name is a dunder.

The rest of the config is checked against the tensors by building the skeleton on the meta
device first (``lowbit.io.checkpoint``), which costs no memory.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Optional

from lowbit.errors import ManifestError

MAX_CONFIG_DIMENSION = 1 << 24
REQUIRED_DIMENSIONS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_DIMENSIONS = ("intermediate_size", "num_key_value_heads", "head_dim", "max_position_embeddings")  # None: derived
_MAX_INDEX_DIGITS = 9


def _fix(where: str, what: str) -> ManifestError:
    return ManifestError(f"{where}: the model config in the manifest {what}; the file is corrupted (re-save or re-download it)")


def class_defaults(config_cls: Optional[type]) -> dict[str, Any]:
    """The config class's default fields (empty when it cannot be built without arguments)."""
    if config_cls is None:
        return {}
    try:
        return config_cls().to_dict()
    except Exception:  # a composite config that needs its parts: no defaults to compare with
        return {}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def kind_mismatch(value: Any, default: Any) -> Optional[str]:
    """What ``value`` should be, given the class default ``default``; None when it fits."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if _is_int(default):
        ok = value is None or _is_int(value) or (isinstance(value, list) and all(_is_int(x) for x in value))
        return None if ok else "an integer"
    if isinstance(default, float):
        return None if _is_real(value) else "a finite number"
    if isinstance(default, str):
        return None if value is None or isinstance(value, str) else "a string"
    if isinstance(default, (dict, list)):
        return None if value is None or isinstance(value, type(default)) else f"a JSON {'object' if isinstance(default, dict) else 'list'}"
    return None  # a None default says nothing about the type


def check_field_names(config: dict[str, Any], config_cls: Optional[type], where: str) -> None:
    for key in config:
        if key.startswith("__") or (config_cls is not None and callable(getattr(config_cls, key, None))):
            raise _fix(where, f"has a field {key!r}, which names a method or internal attribute of the config class")


def check_field_types(config: dict[str, Any], defaults: dict[str, Any], where: str) -> None:
    for key, value in config.items():
        if key not in defaults:
            continue
        want = kind_mismatch(value, defaults[key])
        if want is not None:
            raise _fix(where, f"has {key}={value!r:.60}, which must be {want} (default {defaults[key]!r:.60})")


def _field(name: str, config_cls: Optional[type]) -> str:
    return (getattr(config_cls, "attribute_map", None) or {}).get(name, name)


def check_dimensions(config: dict[str, Any], config_cls: Optional[type], where: str) -> None:
    for name in REQUIRED_DIMENSIONS + OPTIONAL_DIMENSIONS:
        key = _field(name, config_cls)
        if key not in config or (config[key] is None and name in OPTIONAL_DIMENSIONS):
            continue
        value = config[key]
        if not _is_int(value) or not 1 <= value <= MAX_CONFIG_DIMENSION:
            label = key if key == name else f"{key} ({name})"
            raise _fix(where, f"has {label}={value!r:.60}, which must be an integer from 1 to {MAX_CONFIG_DIMENSION}")


def block_indices(names: Iterable[str]) -> dict[str, set[int]]:
    """``{prefix: indices}`` of the first numbered component of each name:
    ``model.layers.3.mlp.up_proj.qweight`` -> ``{"model.layers": {3}}``."""
    found: dict[str, set[int]] = defaultdict(set)
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isascii() and part.isdigit():
                if len(part) <= _MAX_INDEX_DIGITS:
                    found[".".join(parts[:i])].add(int(part))
                break
    return dict(found)


def check_layer_count(config: dict[str, Any], config_cls: Optional[type], defaults: dict[str, Any], names: Iterable[str], where: str) -> None:
    key = _field("num_hidden_layers", config_cls)
    n = config.get(key, defaults.get(key))
    if not _is_int(n):
        return
    blocks = block_indices(names)
    if any(indices == set(range(n)) for indices in blocks.values()):
        return
    held = ", ".join(f"{p}.{min(ix)}..{max(ix)} ({len(ix)} indices)" for p, ix in sorted(blocks.items())) or "no numbered blocks"
    raise _fix(where, f"has {key}={n}, but the tensors hold {held}")


def check_transformers_config(config: dict[str, Any], config_cls: Optional[type], tensor_names: Iterable[str], where: str) -> None:
    """All checks of the module doc; ManifestError naming the field on the first failure.
    ``config_cls``: the config class of ``config["model_type"]`` (None when transformers does not
    know it: only the dimension and layer-count checks run then)."""
    defaults = class_defaults(config_cls)
    check_field_names(config, config_cls, where)
    check_field_types(config, defaults, where)
    check_dimensions(config, config_cls, where)
    check_layer_count(config, config_cls, defaults, tensor_names, where)
