"""lowbit's native checkpoint: one safetensors file that describes itself.

File layout (safetensors): ``u64 n | n bytes of JSON header | data``. The header's
``__metadata__`` holds two strings:

* ``"format": "lowbit"``
* ``"lowbit_manifest"``: JSON with
  ``format_version`` (this module writes 1), ``lowbit_version``,
  ``model`` (``{"kind": "transformers", "architecture", "config"}`` to rebuild
  the skeleton, or ``{"kind": "module", "class"}`` when the caller must pass
  the skeleton), ``recipe`` (``Recipe.to_dict()``), ``layers`` (per quantized
  layer: ``scheme``, ``layout``, ``in_features``, ``out_features``, ``bias``,
  ``source``), ``skipped`` and ``notes`` (every layer kept in full precision
  and why), ``tensors`` (expected ``shape`` and ``dtype`` of every tensor) and
  ``aliases`` (tied tensors stored once: ``{alias: stored_name}``).

A ``QuantLinear`` named ``L`` stores ``L.qweight`` (uint8), ``L.scale``,
``L.zero`` (affine only) and ``L.bias`` (when present); everything else is the
model's ordinary state dict. Never pickle.

Loading validates the header against the file size and the manifest *before*
reading any tensor data, builds the model on the ``meta`` device
(parameters only; buffers such as rotary tables are computed normally), swaps
in ``QuantLinear`` layers, and loads with ``assign=True``. Saving is atomic:
temporary file in the same directory, fsync, rename.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import lowbit
from lowbit import packing
from lowbit.io.atomic import write_atomically
from lowbit.errors import (
    CheckpointError,
    ManifestError,
    SchemeError,
    TensorMismatchError,
    TruncatedCheckpointError,
)
from lowbit.model.swap import QuantizationReport, SkipRecord, linear_kind, set_submodule, weight_as_linear
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme, Recipe
from lowbit.tensor import stored_tensor_specs

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100 * 1024 * 1024

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
_ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------
def _model_description(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and getattr(config, "model_type", None):
        return {"kind": "transformers", "architecture": type(model).__name__, "config": config.to_dict()}
    return {"kind": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def build_manifest(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, Any]:
    report: Optional[QuantizationReport] = getattr(model, "lowbit_report", None)
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            layers[name] = {
                "scheme": mod.scheme.to_dict(),
                "layout": packing.NATIVE_LAYOUT,
                "in_features": mod.in_features,
                "out_features": mod.out_features,
                "bias": mod.bias is not None,
            }
            if mod.n_outliers:
                layers[name]["n_outliers"] = mod.n_outliers
    if not layers:
        raise CheckpointError("the model has no QuantLinear layers; call lowbit.quantize(model, recipe) before saving")
    if report is not None:
        for rec in report.layers:
            if rec.name in layers:
                layers[rec.name]["source"] = rec.source
    loaded = getattr(model, "lowbit_manifest", None)  # a model that came from lowbit.load
    if isinstance(loaded, dict):
        for name, layer in layers.items():
            src = loaded.get("layers", {}).get(name, {}).get("source")
            if src is not None:
                layer.setdefault("source", src)
    return {
        "format_version": FORMAT_VERSION,
        "lowbit_version": lowbit.__version__,
        "model": _model_description(model),
        "recipe": None if report is None else report.recipe.to_dict(),
        "layers": layers,
        "skipped": [] if report is None else [vars(s) for s in report.skipped],
        "notes": [] if report is None else list(report.notes),
        "calibration": None if report is None else report.calibration,
        **({} if report is None or report.tuning is None else {"tuning": report.tuning}),
        "tensors": {k: {"shape": list(v.shape), "dtype": _ST_DTYPES[v.dtype]} for k, v in tensors.items()},
        "aliases": aliases,
    }


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory (tied weights) once; return the aliases."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for k, v in state.items():
        if v.device.type == "meta":
            raise CheckpointError(f"tensor {k!r} is on the meta device (not loaded); cannot save it")
        if v.dtype not in _ST_DTYPES:
            raise CheckpointError(f"tensor {k!r} has dtype {v.dtype}, which the checkpoint format does not store")
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = v.detach().contiguous()
    return out, aliases


def save_checkpoint(model: nn.Module, path: PathLike, *, metadata_format: str = "lowbit") -> Path:
    """Write ``model`` (quantized by lowbit) to ``path`` atomically.

    ``metadata_format="pt"`` marks the file the way transformers requires of a ``model.safetensors``
    (``lowbit.integrations.transformers.save_pretrained``); the manifest is the same."""
    path = Path(path)
    state = model.state_dict()
    tensors, aliases = _dedupe(state)
    manifest = build_manifest(model, tensors, aliases)
    metadata = {"format": metadata_format, "lowbit_manifest": json.dumps(manifest)}
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ---------------------------------------------------------------------------
# read and validate (no tensor data touched)
# ---------------------------------------------------------------------------
def read_header(path: PathLike) -> dict[str, Any]:
    """The safetensors JSON header, validated against the file size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TruncatedCheckpointError(f"{path}: {size} bytes is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise TruncatedCheckpointError(
                f"{path}: header length {n} does not fit in the file ({size} bytes); "
                "the file is truncated or not a safetensors checkpoint"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ManifestError(f"{path}: the safetensors header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and (
        not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise ManifestError(f"{path}: the safetensors __metadata__ must map strings to strings")
    data_len = size - 8 - n
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
            if not all(_is_count(x) for x in (start, end, *shape)) or not isinstance(dtype, str) or start > end:
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise ManifestError(f"{path}: header entry for tensor {name!r} is malformed") from None
        if end > data_len:
            raise TruncatedCheckpointError(
                f"{path}: tensor {name!r} needs bytes {start}..{end} of the data section, "
                f"but the file holds only {data_len}; the file is truncated (re-copy or re-save it)"
            )
        numel = 1
        for d in shape:
            numel *= int(d)
        if dtype not in _ST_ITEMSIZE or end - start != numel * _ST_ITEMSIZE[dtype]:
            raise TensorMismatchError(f"{path}: tensor {name!r} byte range does not match its dtype {dtype} and shape {shape}")
        ranges.append((start, end, name))
    # safetensors stores tensors back to back and covers the data section exactly
    pos = 0
    for start, end, name in sorted(ranges):
        if start != pos:
            raise ManifestError(
                f"{path}: tensor {name!r} starts at byte {start} of the data section, expected {pos} "
                "(overlapping or gapped tensors); the header is corrupted"
            )
        pos = end
    if pos != data_len:
        raise ManifestError(
            f"{path}: the header describes {pos} bytes of tensor data but the file holds {data_len} "
            "(trailing bytes after the last tensor); the file is corrupted"
        )
    return header


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_manifest(path: PathLike) -> dict[str, Any]:
    """The lowbit manifest of a checkpoint, validated against the file; reads no tensor data."""
    header = read_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") not in ("lowbit", "pt") or "lowbit_manifest" not in meta:
        raise ManifestError(
            f"{path}: not a lowbit checkpoint (no lowbit manifest in the safetensors metadata); "
            "was it written by lowbit.save?"
        )
    try:
        manifest = json.loads(meta["lowbit_manifest"])
    except (TypeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: the lowbit manifest is not valid JSON ({e})") from None
    _validate_manifest(path, manifest, header)
    return manifest


def _expected_layer_tensors(name: str, layer: dict[str, Any]) -> dict[str, tuple[list[int], str]]:
    scheme = QuantScheme.from_dict(layer["scheme"])
    n, k = int(layer["out_features"]), int(layer["in_features"])
    if not isinstance(layer["bias"], bool):
        raise TypeError(f"'bias' must be true or false, got {layer['bias']!r}")
    n_outliers = layer.get("n_outliers", 0)
    if not _is_count(n_outliers) or n_outliers > k:
        raise TypeError(f"'n_outliers' must be a count <= in_features, got {n_outliers!r}")
    scheme.check_layer(name, k)
    specs = stored_tensor_specs(scheme, n, k, n_outliers)
    return {f"{name}.{t}": (list(shape), _ST_DTYPES[dtype]) for t, (shape, dtype) in specs.items()}


def _validate_manifest(path, manifest: Any, header: dict[str, Any]) -> None:
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: the lowbit manifest is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: checkpoint format_version {version!r}; this lowbit ({lowbit.__version__}) reads version "
            f"{FORMAT_VERSION} (upgrade lowbit to read newer files)"
        )
    for key in ("model", "layers", "tensors", "aliases"):
        if key not in manifest:
            raise ManifestError(f"{path}: the lowbit manifest lacks the {key!r} field")
    _check_manifest_types(path, manifest)
    stored = {k: v for k, v in header.items() if k != "__metadata__"}
    expected = manifest["tensors"]
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        raise TensorMismatchError(f"{path}: tensors listed in the manifest but absent: {missing[:5]}; present but unlisted: {extra[:5]}")
    for k, info in expected.items():
        if list(stored[k]["shape"]) != list(info["shape"]) or stored[k]["dtype"] != info["dtype"]:
            raise TensorMismatchError(
                f"{path}: tensor {k!r} is {stored[k]['dtype']} {stored[k]['shape']} in the file "
                f"but the manifest expects {info['dtype']} {info['shape']}"
            )
    for name, layer in manifest["layers"].items():
        try:
            want = _expected_layer_tensors(name, layer)
        except (SchemeError, KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{path}: layer {name!r} has an invalid scheme entry: {e}") from None
        for k, (shape, dtype) in want.items():
            if k not in stored:
                raise TensorMismatchError(f"{path}: layer {name!r} lacks tensor {k!r}")
            if list(stored[k]["shape"]) != shape or stored[k]["dtype"] != dtype:
                raise TensorMismatchError(
                    f"{path}: tensor {k!r} is {stored[k]['dtype']} {stored[k]['shape']}, but layer {name!r} "
                    f"with scheme {layer['scheme']} needs {dtype} {shape}"
                )
        # tensors the scheme does not use (e.g. a zero point under a symmetric scheme) mean the
        # scheme and the data disagree
        for suffix in ("zero", "bias"):
            k = f"{name}.{suffix}"
            used = k in want or (suffix == "bias" and layer["bias"])
            if (k in stored or k in manifest["aliases"]) != used:
                raise TensorMismatchError(
                    f"{path}: layer {name!r} with scheme {layer['scheme']} and bias={layer['bias']} "
                    f"{'needs' if used else 'does not use'} tensor {k!r}, but the file "
                    f"{'lacks it' if used else 'holds it'}"
                )
    for alias, target in manifest["aliases"].items():
        if target not in stored:
            raise TensorMismatchError(f"{path}: alias {alias!r} points at {target!r}, which is not stored")


def _check_manifest_types(path, manifest: dict[str, Any]) -> None:
    """The manifest's fields have the JSON types the loader relies on (else ManifestError)."""

    def bad(what: str):
        return ManifestError(f"{path}: the lowbit manifest is malformed: {what}; re-save the checkpoint with lowbit.save")

    model = manifest["model"]
    if not isinstance(model, dict) or model.get("kind") not in ("transformers", "module"):
        raise bad("'model' must be an object with kind 'transformers' or 'module'")
    if model["kind"] == "transformers" and not (
        isinstance(model.get("architecture"), str) and isinstance(model.get("config"), dict)
    ):
        raise bad("a 'transformers' model needs a string 'architecture' and an object 'config'")
    if not isinstance(manifest["layers"], dict) or not all(isinstance(v, dict) for v in manifest["layers"].values()):
        raise bad("'layers' must map layer names to objects")
    tensors = manifest["tensors"]
    if not isinstance(tensors, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("shape"), list) and isinstance(v.get("dtype"), str)
        for v in tensors.values()
    ):
        raise bad("'tensors' must map tensor names to {'shape': [...], 'dtype': '...'}")
    aliases = manifest["aliases"]
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise bad("'aliases' must map tensor names to stored tensor names")
    skipped = manifest.get("skipped", [])
    if not isinstance(skipped, list) or not all(
        isinstance(s, dict) and set(s) == set(SkipRecord.__dataclass_fields__) for s in skipped
    ):
        raise bad(f"'skipped' must be a list of objects with the fields {sorted(SkipRecord.__dataclass_fields__)}")
    if not isinstance(manifest.get("notes", []), list):
        raise bad("'notes' must be a list")
    if not isinstance(manifest.get("calibration"), (dict, type(None))):
        raise bad("'calibration' must be an object or null")
    recipe = manifest.get("recipe")
    if recipe is not None:
        try:
            Recipe.from_dict(recipe)
        except SchemeError as e:
            raise bad(f"invalid 'recipe' ({e})") from None


# ---------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------
def _build_skeleton(manifest: dict[str, Any], path) -> nn.Module:
    desc = manifest["model"]
    if desc.get("kind") != "transformers":
        raise CheckpointError(
            f"{path}: the checkpoint holds a custom module ({desc.get('class')}); "
            "pass a freshly built instance of it: lowbit.load(path, model=MyModel(...))"
        )
    import transformers
    from accelerate import init_empty_weights

    config_dict = dict(desc["config"])
    model_type = config_dict.get("model_type")
    try:
        config_cls = transformers.CONFIG_MAPPING[model_type]
    except KeyError:
        raise CheckpointError(f"{path}: transformers {transformers.__version__} does not know model_type {model_type!r}") from None
    arch = getattr(transformers, desc.get("architecture", ""), None)
    if arch is None:
        raise CheckpointError(f"{path}: transformers has no architecture {desc.get('architecture')!r}")
    try:
        config = config_cls.from_dict(config_dict)
        with init_empty_weights(include_buffers=False):
            model = arch._from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(
            f"{path}: could not rebuild {desc.get('architecture')} from the config in the manifest ({e}); "
            "pass the model skeleton: lowbit.load(path, model=...)"
        ) from None
    return model


def load_checkpoint(path: PathLike, model: Optional[nn.Module] = None, *, kernel: str = "auto") -> nn.Module:
    """Rebuild a quantized model from a lowbit checkpoint.

    ``model``: an optional skeleton (any ``nn.Module`` with the original layer
    structure, e.g. built on the meta device). Hugging Face models are rebuilt
    from the config in the manifest when it is omitted.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if model is None:
        model = _build_skeleton(manifest, path)
    for name, layer in manifest["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise TensorMismatchError(f"{path}: the checkpoint quantizes layer {name!r}, which the model lacks") from None
        kind = linear_kind(old)
        if kind is None and not isinstance(old, QuantLinear):
            raise TensorMismatchError(f"{path}: {name!r} is a {type(old).__name__} in the model, not a linear layer")
        have = (old.out_features, old.in_features) if kind is None else tuple(weight_as_linear(old, kind).shape)
        want = (int(layer["out_features"]), int(layer["in_features"]))
        if have != want:
            raise TensorMismatchError(
                f"{path}: layer {name!r} is [out, in] = {list(have)} in the model but {list(want)} in the "
                "checkpoint (is this the right model skeleton?)"
            )
        scheme = QuantScheme.from_dict(layer["scheme"])
        new = QuantLinear(
            int(layer["in_features"]),
            int(layer["out_features"]),
            scheme,
            bias=bool(layer["bias"]),
            device=torch.device("meta"),
            kernel=kernel,
            n_outliers=int(layer.get("n_outliers", 0)),
        )
        set_submodule(model, name, new)
    state = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                state[k] = f.get_tensor(k)
    except (SafetensorError, OSError) as e:  # the checks above should have caught it; never leak a raw error
        raise CheckpointError(f"{path}: safetensors could not read the file ({e}); re-save or re-copy it") from None
    for alias, target in manifest["aliases"].items():
        state[alias] = state[target]
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise TensorMismatchError(
            f"{path}: checkpoint and model disagree; missing from the file: {missing[:5]}, "
            f"not in the model: {unexpected[:5]} (is this the right model skeleton?)"
        )
    target_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, v in state.items():
        if tuple(v.shape) != target_shapes[k]:
            raise TensorMismatchError(f"{path}: tensor {k!r} is {tuple(v.shape)} in the file, the model expects {target_shapes[k]}")
    model.load_state_dict(state, strict=True, assign=True)
    _retie(model, manifest)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{path}: these tensors were not in the checkpoint and stay unloaded: {leftover[:5]}")
    recipe = manifest.get("recipe")
    if recipe is not None:
        report = QuantizationReport(recipe=Recipe.from_dict(recipe))
        report.skipped = [SkipRecord(**s) for s in manifest.get("skipped", [])]
        report.notes = list(manifest.get("notes", []))
        report.calibration = manifest.get("calibration")
        report.tuning = manifest.get("tuning")
        model.lowbit_report = report
    model.lowbit_manifest = manifest
    model.eval()
    return model


def _retie(model: nn.Module, manifest: dict[str, Any]) -> None:
    """Make aliased parameters the *same* Parameter again (as tie_weights would)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in manifest["aliases"].items():
        if alias in params and target in params:
            owner_name, _, attr = alias.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, attr, params[target])
