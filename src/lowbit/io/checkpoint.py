"""lowbit's native checkpoint: one safetensors file that describes itself.

File layout (safetensors): ``u64 n | n bytes of JSON header | data``. The header's
``__metadata__`` holds three strings:

* ``"format": "lowbit"`` (``"pt"`` in directories written by
  ``lowbit.integrations.transformers.save_pretrained``, which transformers requires)
* ``"lowbit_manifest"``: JSON with
  ``format_version`` (this module writes 2), ``lowbit_version``,
  ``model`` (``{"kind": "transformers", "architecture", "config"}`` to rebuild
  the skeleton, or ``{"kind": "module", "class"}`` when the caller must pass
  the skeleton), ``recipe`` (``Recipe.to_dict()``), ``layers`` (per quantized
  layer: ``scheme``, ``layout``, ``in_features``, ``out_features``, ``bias``,
  ``source``), ``skipped`` and ``notes`` (every layer kept in full precision
  and why), ``tensors`` (expected ``shape``, ``dtype`` and ``digest`` of every tensor) and
  ``aliases`` (tied tensors stored once: ``{alias: stored_name}``).
* ``"lowbit_manifest_digest"``: ``"sha256:<hex>"`` of the manifest string's UTF-8 bytes.

Digests (``lowbit.io.digest``) are ``"sha256:<64 hex digits>"``; a tensor's covers its bytes as
stored. Format version 1 is version 2 without the digests; it is read only with
``verify=False``.

A ``QuantLinear`` named ``L`` stores ``L.qweight`` (uint8), ``L.scale``,
``L.zero`` (affine only) and ``L.bias`` (when present); everything else is the
model's ordinary state dict. Never pickle.

Loading checks everything before any tensor is used (``lowbit.io.checkpoint_validation``):
the header against the file size, the manifest against its digest and against the header,
every tensor against its digest (``verify=True``, the default) and its values against its
scheme; a Hugging Face skeleton is first built on the ``meta`` device (buffers included) and
compared with the file, then built for real (parameters on ``meta``; buffers such as rotary
tables computed normally), ``QuantLinear`` layers are swapped in, and the state dict is loaded
with ``assign=True``. Saving is atomic (``lowbit.io.atomic``): temporary file in the same
directory, fsync, rename.
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

from lowbit import packing
from lowbit.errors import CheckpointError, ManifestError, TensorMismatchError, TruncatedCheckpointError
from lowbit.io import digest
from lowbit.io.atomic import write_atomically
from lowbit.io.checkpoint_validation import (
    FORMAT_VERSION,
    MANIFEST_DIGEST_KEY,
    READABLE_VERSIONS,
    ST_DTYPES,
    check_layer_data,
    check_manifest_digest,
    check_tensor_digests,
    check_version,
    is_count,
    parse_json,
    validate_manifest,
)
from lowbit.model.swap import QuantizationReport, SkipRecord, linear_kind, set_submodule, weight_as_linear
from lowbit.nn import QuantLinear
from lowbit.recipe import Recipe
from lowbit.scheme import QuantScheme
from lowbit.version import __version__

__all__ = [
    "FORMAT_VERSION", "READABLE_VERSIONS", "build_manifest", "load_checkpoint", "read_header", "read_manifest",
    "save_checkpoint", "verify_checkpoint",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024

_ST_DTYPES = ST_DTYPES
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


def _tensor_table(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    digests = digest.tensor_digests(tensors)
    return {k: {"shape": list(v.shape), "dtype": _ST_DTYPES[v.dtype], "digest": digests[k]} for k, v in tensors.items()}

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
        "lowbit_version": __version__,
        "model": _model_description(model),
        "recipe": None if report is None else report.recipe.to_dict(),
        "layers": layers,
        "skipped": [] if report is None else [vars(s) for s in report.skipped],
        "notes": [] if report is None else list(report.notes),
        "calibration": None if report is None else report.calibration,
        **({} if report is None or report.tuning is None else {"tuning": report.tuning}),
        "tensors": _tensor_table(tensors),
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
    text = json.dumps(manifest)
    metadata = {
        "format": metadata_format,
        "lowbit_manifest": text,
        MANIFEST_DIGEST_KEY: digest.bytes_digest(text.encode("utf-8")),
    }
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
    header = parse_json(path, raw, "the safetensors header")
    if not isinstance(header, dict):
        raise ManifestError(f"{path}: the safetensors header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and (
        not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise ManifestError(f"{path}: the safetensors __metadata__ must map strings to strings")
    _check_data_layout(path, header, size - 8 - n)
    return header


def _check_data_layout(path, header: dict[str, Any], data_len: int) -> None:
    """Each tensor's byte range fits its dtype and shape, and the ranges tile the data section."""
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
            if not all(is_count(x) for x in (start, end, *shape)) or not isinstance(dtype, str) or start > end:
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


def read_manifest(path: PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The lowbit manifest of a checkpoint, validated against the file; reads no tensor data.

    ``verify``: check the manifest against the digest stored with it (files written before
    digests existed are refused; pass ``verify=False`` for a file you trust)."""
    header = read_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") not in ("lowbit", "pt") or "lowbit_manifest" not in meta:
        raise ManifestError(
            f"{path}: not a lowbit checkpoint (no lowbit manifest in the safetensors metadata); "
            "was it written by lowbit.save?"
        )
    text = meta["lowbit_manifest"]
    manifest = parse_json(path, text, "the lowbit manifest")
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: the lowbit manifest is not a JSON object")
    version = check_version(path, manifest)
    if verify:
        check_manifest_digest(path, meta, text, version)
    validate_manifest(path, manifest, header)
    return manifest


# ---------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------
def _skeleton_parts(manifest: dict[str, Any], path) -> tuple[type, Any]:
    """The architecture class and the config object the manifest describes."""
    desc = manifest["model"]
    if desc.get("kind") != "transformers":
        raise CheckpointError(
            f"{path}: the checkpoint holds a custom module ({desc.get('class')!r:.100}); "
            "pass a freshly built instance of it: lowbit.load(path, model=MyModel(...))"
        )
    import transformers

    config_dict = dict(desc["config"])
    model_type = config_dict.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise CheckpointError(f"{path}: transformers {transformers.__version__} does not know model_type {model_type!r:.60}")
    arch = getattr(transformers, desc["architecture"], None)
    if not (isinstance(arch, type) and issubclass(arch, transformers.PreTrainedModel)):
        raise CheckpointError(f"{path}: transformers has no model architecture {desc['architecture']!r:.60}")
    try:
        config = transformers.CONFIG_MAPPING[model_type].from_dict(config_dict)
    except Exception as e:  # third-party code fed a config from a file: any failure is the file's
        raise _unbuildable(path, desc, e) from None
    return arch, config


def _unbuildable(path, desc: dict[str, Any], e: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: could not rebuild {desc['architecture']} from the config in the manifest "
        f"({type(e).__name__}: {str(e)[:200]}); pass the model skeleton: lowbit.load(path, model=...)"
    )


def _build_skeleton(manifest: dict[str, Any], path, *, probe: bool = False) -> nn.Module:
    """The model the manifest describes, parameters on ``meta``; ``probe=True`` puts buffers on
    ``meta`` too, so that nothing is allocated whatever the config says."""
    from accelerate import init_empty_weights

    arch, config = _skeleton_parts(manifest, path)
    try:
        with init_empty_weights(include_buffers=probe):
            return arch._from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    except Exception as e:  # third-party code fed a config from a file: any failure is the file's
        raise _unbuildable(path, manifest["model"], e) from None


def _install_quant_layers(model: nn.Module, manifest: dict[str, Any], path, kernel: str) -> None:
    """Swap a ``QuantLinear`` (on ``meta``) in for every layer the manifest lists."""
    for name, layer in manifest["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise TensorMismatchError(f"{path}: the checkpoint quantizes layer {name!r}, which the model lacks") from None
        kind = linear_kind(old)
        if kind is None and not isinstance(old, QuantLinear):
            raise TensorMismatchError(f"{path}: {name!r} is a {type(old).__name__} in the model, not a linear layer")
        have = (old.out_features, old.in_features) if kind is None else tuple(weight_as_linear(old, kind).shape)
        want = (layer["out_features"], layer["in_features"])
        if have != want:
            raise TensorMismatchError(
                f"{path}: layer {name!r} is [out, in] = {list(have)} in the model but {list(want)} in the "
                "checkpoint (is this the right model skeleton?)"
            )
        new = QuantLinear(
            layer["in_features"],
            layer["out_features"],
            QuantScheme.from_dict(layer["scheme"]),
            bias=layer["bias"],
            device=torch.device("meta"),
            kernel=kernel,
            n_outliers=layer.get("n_outliers", 0),
        )
        set_submodule(model, name, new)


def _check_model_matches_file(model: nn.Module, manifest: dict[str, Any], path) -> None:
    """The model's state dict has exactly the file's tensors (stored or aliased), same shapes."""
    shapes = {k: tuple(v["shape"]) for k, v in manifest["tensors"].items()}
    shapes.update({alias: shapes[target] for alias, target in manifest["aliases"].items()})
    target_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(target_shapes) - set(shapes)), sorted(set(shapes) - set(target_shapes))
    if missing or unexpected:
        raise TensorMismatchError(
            f"{path}: checkpoint and model disagree; missing from the file: {missing[:5]}, "
            f"not in the model: {unexpected[:5]} (is this the right model skeleton?)"
        )
    for k, shape in shapes.items():
        if shape != target_shapes[k]:
            raise TensorMismatchError(f"{path}: tensor {k!r} is {shape} in the file, the model expects {target_shapes[k]}")


def _read_tensors(path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:  # the checks above should have caught it; never leak a raw error
        raise CheckpointError(f"{path}: safetensors could not read the file ({e}); re-save or re-copy it") from None


def _read_checked(path: Path, verify: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and the tensors of a checkpoint, after every check of the file itself."""
    manifest = read_manifest(path, verify=verify)
    state = _read_tensors(path)
    if verify:
        check_tensor_digests(path, manifest, state)
    check_layer_data(path, manifest, state)
    return manifest, state


def verify_checkpoint(path: PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Every check ``load_checkpoint`` makes of the file itself (header, manifest, digests,
    tensor values), without building a model; returns the manifest. For loaders that read the
    tensors their own way (``lowbit.integrations.transformers``)."""
    return _read_checked(Path(path), verify)[0]


def load_checkpoint(
    path: PathLike, model: Optional[nn.Module] = None, *, kernel: str = "auto", verify: bool = True
) -> nn.Module:
    """Rebuild a quantized model from a lowbit checkpoint.

    ``model``: an optional skeleton (any ``nn.Module`` with the original layer
    structure, e.g. built on the meta device). Hugging Face models are rebuilt
    from the config in the manifest when it is omitted.
    ``verify``: check the manifest and every tensor against the digests recorded at save time
    (``IntegrityError`` on any difference, and for files written before digests existed);
    ``verify=False`` skips that for files you trust. The other checks always run.
    """
    path = Path(path)
    manifest, state = _read_checked(path, verify)
    if model is None:
        probe = _build_skeleton(manifest, path, probe=True)
        _install_quant_layers(probe, manifest, path, kernel)
        _check_model_matches_file(probe, manifest, path)
        del probe
        model = _build_skeleton(manifest, path)
    _install_quant_layers(model, manifest, path, kernel)
    _check_model_matches_file(model, manifest, path)
    for alias, target in manifest["aliases"].items():
        state[alias] = state[target]
    model.load_state_dict(state, strict=True, assign=True)
    _retie(model, manifest)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{path}: these tensors were not in the checkpoint and stay unloaded: {leftover[:5]}")
    _attach_report(model, manifest)
    model.eval()
    return model


def _attach_report(model: nn.Module, manifest: dict[str, Any]) -> None:
    recipe = manifest.get("recipe")
    if recipe is not None:
        report = QuantizationReport(recipe=Recipe.from_dict(recipe))
        report.skipped = [SkipRecord(**s) for s in manifest.get("skipped", [])]
        report.notes = list(manifest.get("notes", []))
        report.calibration = manifest.get("calibration")
        report.tuning = manifest.get("tuning")
        model.lowbit_report = report
    model.lowbit_manifest = manifest


def _retie(model: nn.Module, manifest: dict[str, Any]) -> None:
    """Make aliased parameters the *same* Parameter again (as tie_weights would)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in manifest["aliases"].items():
        if alias in params and target in params:
            owner_name, _, attr = alias.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, attr, params[target])
