"""Validation of a lowbit checkpoint before any of its tensors is used (``lowbit.io.checkpoint``).

Two layers of defence, every failure a one-line ``CheckpointError`` subclass naming the field or
tensor, what is wrong and how to fix it:

1. **Integrity** (``verify=True``, the default): the manifest string must match the digest in
   the safetensors metadata (``MANIFEST_DIGEST_KEY``), and every stored tensor the digest the
   manifest records for it (``lowbit.io.digest``). Any flipped bit or edit fails here
   (``IntegrityError``). Files written before digests existed (``format_version`` 1) cannot be
   verified and are refused with a message that says how to proceed.
2. **Meaning** (always, so that ``verify=False`` is safe against mistakes too): the manifest's
   JSON types; known layouts; dimensions in range before anything iterates over them; each
   layer's scheme, shapes and dtypes agreeing with the stored tensors; aliases that point at
   stored tensors and never shadow one; the transformers config
   (``lowbit.io.config_validation``); and, once the tensors are read, their values: zero points
   inside the code range, finite scales (positive where lowbit chose them), codes valid for the
   format, zero padding bits, sorted in-range outlier columns.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from lowbit import packing
from lowbit.errors import (
    IntegrityError,
    ManifestError,
    PackingError,
    SchemeError,
    TensorMismatchError,
)
from lowbit.io import bounded_json, digest
from lowbit.io.config_validation import check_transformers_config
from lowbit.model.swap import SkipRecord
from lowbit.recipe import Recipe
from lowbit.scheme import QuantScheme
from lowbit.tensor import stored_tensor_specs
from lowbit.version import __version__

FORMAT_VERSION = 2  # 2: per-tensor and manifest digests; 1: the same fields without digests
READABLE_VERSIONS = (1, 2)
MANIFEST_DIGEST_KEY = "lowbit_manifest_digest"
MAX_FEATURES = (1 << 31) - 1

ST_DTYPES = {
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

_RESAVE = "the file is corrupted: re-save or re-download it"


def is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_feature_count(x: Any) -> bool:
    return is_count(x) and 1 <= x <= MAX_FEATURES


# ---------------------------------------------------------------------------
# the manifest string: parse, version, digest
# ---------------------------------------------------------------------------
def parse_json(path, text, what: str) -> Any:
    """Bounded JSON (``lowbit.io.bounded_json``) or a ManifestError naming ``what``."""
    try:
        return bounded_json.loads(text)
    except bounded_json.JSONLimitError as e:
        raise ManifestError(f"{path}: {what} {e}; {_RESAVE}") from None


def check_version(path, manifest: dict[str, Any]) -> int:
    version = manifest.get("format_version")
    if not is_count(version) or version not in READABLE_VERSIONS:
        raise ManifestError(
            f"{path}: checkpoint format_version {version!r}; this lowbit ({__version__}) reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade lowbit to read newer files)"
        )
    return version


def check_manifest_digest(path, metadata: dict[str, str], text: str, version: int) -> None:
    """The manifest string matches the digest stored next to it (verify=True only)."""
    recorded = metadata.get(MANIFEST_DIGEST_KEY)
    if recorded is None:
        why = (
            "was written before lowbit checkpoints carried digests (format_version 1)"
            if version == 1
            else "lacks the manifest digest its format_version 2 requires"
        )
        raise IntegrityError(
            f"{path}: the checkpoint {why}, so its contents cannot be verified; if you trust the file, load it "
            "with lowbit.load(path, verify=False) and save it again with lowbit.save to add digests"
        )
    if recorded != digest.bytes_digest(text.encode("utf-8")):
        raise IntegrityError(
            f"{path}: the lowbit manifest does not match the digest recorded when the file was written "
            f"(metadata {MANIFEST_DIGEST_KEY}); the header was edited or damaged: re-save or re-download it"
        )


# ---------------------------------------------------------------------------
# the manifest's structure and meaning (no tensor data)
# ---------------------------------------------------------------------------
def validate_manifest(path, manifest: Any, header: dict[str, Any]) -> None:
    """Everything about the manifest that can be checked without reading tensor data."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: the lowbit manifest is not a JSON object")
    check_version(path, manifest)
    for key in ("model", "layers", "tensors", "aliases"):
        if key not in manifest:
            raise ManifestError(f"{path}: the lowbit manifest lacks the {key!r} field")
    check_manifest_types(path, manifest)
    stored = {k: v for k, v in header.items() if k != "__metadata__"}
    check_tensor_table(path, manifest["tensors"], stored)
    check_aliases(path, manifest["aliases"], stored)
    for name, layer in manifest["layers"].items():
        check_layer_entry(path, name, layer, stored, manifest["aliases"])
    model = manifest["model"]
    if model["kind"] == "transformers":
        check_model_config(path, model["config"], list(stored) + list(manifest["aliases"]))


def _malformed(path, what: str) -> ManifestError:
    return ManifestError(f"{path}: the lowbit manifest is malformed: {what}; re-save the checkpoint with lowbit.save")


def check_manifest_types(path, manifest: dict[str, Any]) -> None:
    """The manifest's fields have the JSON types the loader relies on (else ManifestError)."""
    model = manifest["model"]
    if not isinstance(model, dict) or model.get("kind") not in ("transformers", "module"):
        raise _malformed(path, "'model' must be an object with kind 'transformers' or 'module'")
    if model["kind"] == "transformers" and not (
        isinstance(model.get("architecture"), str) and isinstance(model.get("config"), dict)
    ):
        raise _malformed(path, "a 'transformers' model needs a string 'architecture' and an object 'config'")
    if not isinstance(manifest["layers"], dict) or not all(isinstance(v, dict) for v in manifest["layers"].values()):
        raise _malformed(path, "'layers' must map layer names to objects")
    tensors = manifest["tensors"]
    if not isinstance(tensors, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("shape"), list) and isinstance(v.get("dtype"), str)
        for v in tensors.values()
    ):
        raise _malformed(path, "'tensors' must map tensor names to {'shape': [...], 'dtype': '...'}")
    aliases = manifest["aliases"]
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise _malformed(path, "'aliases' must map tensor names to stored tensor names")
    skipped = manifest.get("skipped", [])
    if not isinstance(skipped, list) or not all(
        isinstance(s, dict) and set(s) == set(SkipRecord.__dataclass_fields__) for s in skipped
    ):
        raise _malformed(path, f"'skipped' must be a list of objects with the fields {sorted(SkipRecord.__dataclass_fields__)}")
    if not isinstance(manifest.get("notes", []), list):
        raise _malformed(path, "'notes' must be a list")
    if not isinstance(manifest.get("calibration"), (dict, type(None))):
        raise _malformed(path, "'calibration' must be an object or null")
    recipe = manifest.get("recipe")
    if recipe is not None:
        try:
            Recipe.from_dict(recipe)
        except (SchemeError, TypeError, ValueError, KeyError, AttributeError, RecursionError) as e:
            raise _malformed(path, f"invalid 'recipe' ({type(e).__name__}: {e})") from None


def check_tensor_table(path, expected: dict[str, Any], stored: dict[str, Any]) -> None:
    """The manifest's tensor table and the safetensors header list the same tensors, alike."""
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


def check_aliases(path, aliases: dict[str, str], stored: dict[str, Any]) -> None:
    """Every alias names a stored tensor, and no alias has the name of a stored tensor
    (it would silently replace that tensor's data at load)."""
    for alias, target in aliases.items():
        if alias in stored:
            raise TensorMismatchError(
                f"{path}: alias {alias!r} has the name of a stored tensor and would replace it with {target!r}; "
                "the manifest is corrupted (re-save the checkpoint with lowbit.save)"
            )
        if target not in stored:
            raise TensorMismatchError(f"{path}: alias {alias!r} points at {target!r}, which is not stored")


def layer_scheme(name: str, layer: dict[str, Any]) -> QuantScheme:
    """A layer entry's scheme after checking its scalar fields (SchemeError / TypeError / ValueError)."""
    for key in ("in_features", "out_features"):
        if not _is_feature_count(layer.get(key)):
            raise TypeError(f"{key!r} must be an integer from 1 to {MAX_FEATURES}, got {layer.get(key)!r:.40}")
    if not isinstance(layer.get("bias"), bool):
        raise TypeError(f"'bias' must be true or false, got {layer.get('bias')!r:.40}")
    n_outliers = layer.get("n_outliers", 0)
    if not is_count(n_outliers) or n_outliers > layer["in_features"]:
        raise TypeError(f"'n_outliers' must be a count <= in_features, got {n_outliers!r:.40}")
    if "scheme" not in layer:
        raise KeyError("'scheme'")
    scheme = QuantScheme.from_dict(layer["scheme"])
    scheme.check_layer(name, layer["in_features"])
    return scheme


def expected_layer_tensors(name: str, layer: dict[str, Any]) -> dict[str, tuple[list[int], str]]:
    scheme = layer_scheme(name, layer)
    specs = stored_tensor_specs(scheme, layer["out_features"], layer["in_features"], layer.get("n_outliers", 0))
    return {f"{name}.{t}": (list(shape), ST_DTYPES[dtype]) for t, (shape, dtype) in specs.items()}


def check_layer_entry(path, name: str, layer: dict[str, Any], stored: dict[str, Any], aliases: dict[str, str]) -> None:
    layout = layer.get("layout")
    if layout not in packing.LAYOUTS:
        raise ManifestError(
            f"{path}: layer {name!r} has layout {layout!r:.60}; this lowbit knows {list(packing.LAYOUTS)} "
            "(a newer lowbit may know it: upgrade lowbit; else the manifest is corrupted: re-save the checkpoint)"
        )
    try:
        want = expected_layer_tensors(name, layer)
    except (SchemeError, PackingError, KeyError, TypeError, ValueError) as e:
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
        if (k in stored or k in aliases) != used:
            raise TensorMismatchError(
                f"{path}: layer {name!r} with scheme {layer['scheme']} and bias={layer['bias']} "
                f"{'needs' if used else 'does not use'} tensor {k!r}, but the file "
                f"{'lacks it' if used else 'holds it'}"
            )


def transformers_config_class(model_type: Any) -> Optional[type]:
    import transformers

    return transformers.CONFIG_MAPPING[model_type] if model_type in transformers.CONFIG_MAPPING else None


def check_model_config(path, config: dict[str, Any], tensor_names: Iterable[str]) -> None:
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ManifestError(f"{path}: the model config in the manifest has model_type={model_type!r:.60}, which must be a string; {_RESAVE}")
    check_transformers_config(config, transformers_config_class(model_type), tensor_names, str(path))


# ---------------------------------------------------------------------------
# tensor data: digests, then values
# ---------------------------------------------------------------------------
def check_tensor_digests(path, manifest: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Every stored tensor hashes to the digest in the manifest (verify=True only; the manifest
    itself was checked against its own digest by ``check_manifest_digest``)."""
    for name in state:
        recorded = manifest["tensors"][name].get("digest")
        if not digest.is_digest(recorded):
            raise IntegrityError(
                f"{path}: the manifest records no valid digest for tensor {name!r} ({recorded!r:.80}); "
                "re-save the checkpoint with lowbit.save (or load a file you trust with verify=False)"
            )
    actual = digest.tensor_digests(state)
    for name in state:
        if actual[name] != manifest["tensors"][name]["digest"]:
            raise IntegrityError(
                f"{path}: tensor {name!r} does not match the digest recorded when the file was written; "
                "its bytes were damaged or edited: re-download or re-save the file "
                "(lowbit.load(path, verify=False) skips this check for a file you trust)"
            )


def _where(mask: torch.Tensor) -> list[int]:
    """The index of the first True element of ``mask``."""
    return [int(i) for i in mask.nonzero()[0]]


def scale_problem(scale: torch.Tensor, scheme: QuantScheme, lowbit_chose: bool) -> Optional[str]:
    """NaN/Inf scales are never valid. Integer formats whose scales lowbit chose (the layer
    has a ``source``) are > 0 (an all-zero group gets scale 1); imported integer layers may hold
    0 or negative scales (GGUF Q4_0 stores ``d = max / -8``). Codebook, fp8 and ternary scales
    are >= 0 (an all-zero nf4 block has absmax 0; tiny fp8 scales may underflow float16)."""
    s = scale.float()
    bad = ~torch.isfinite(s)
    if bool(bad.any()):
        return f"holds a non-finite scale ({float(s[tuple(_where(bad))])}) at {_where(bad)}"
    if scheme.format == "int" and lowbit_chose:
        bad = s <= 0
        need = "> 0"
    elif scheme.format != "int":
        bad = s < 0
        need = ">= 0"
    else:
        return None
    if bool(bad.any()):
        return f"holds scale {float(s[tuple(_where(bad))])} at {_where(bad)}; a {scheme.short_name} scale must be {need}"
    return None


def zero_problem(zero: torch.Tensor, scheme: QuantScheme) -> Optional[str]:
    if zero.dtype == torch.uint8:
        bad = zero > scheme.qmax
        if bool(bad.any()):
            return (
                f"holds zero point {int(zero[tuple(_where(bad))])} at {_where(bad)}, outside the "
                f"{scheme.bits}-bit code range 0..{scheme.qmax}"
            )
        return None
    bad = ~torch.isfinite(zero.float())
    if bool(bad.any()):
        return f"holds a non-finite zero point at {_where(bad)}"
    return None


def nonnegative_problem(t: torch.Tensor) -> Optional[str]:
    """Double quantization (QLoRA): the block absmax values and the subtracted mean of the
    (non-negative) block scales are finite and >= 0."""
    bad = ~torch.isfinite(t) | (t < 0)
    if bool(bad.any()):
        return f"holds {float(t[tuple(_where(bad))])} at {_where(bad)}; it must be finite and >= 0"
    return None


_FP8_NON_FINITE = {"fp8_e4m3": 0x7F, "fp8_e5m2": 0x7C}  # code & mask == mask: NaN (e4m3fn), Inf/NaN (e5m2)


def code_problem(qweight: torch.Tensor, scheme: QuantScheme, in_features: int) -> Optional[str]:
    """Codes lowbit never writes: ternary codes above 2, fp8 NaN/Inf encodings, and set
    padding bits (rows are padded with zero codes to a multiple of 8)."""
    bits, k = scheme.bits, in_features
    if scheme.format == "ternary":
        bad = packing.unpack(qweight, bits, k) > 2
        if bool(bad.any()):
            return f"holds ternary code 3 at {_where(bad)}; ternary codes are 0, 1, 2"
    mask = _FP8_NON_FINITE.get(scheme.format)
    if mask is not None:
        bad = (qweight & mask) == mask
        if bool(bad.any()):
            return f"holds a NaN/Inf {scheme.format} code ({int(qweight[tuple(_where(bad))])}) at {_where(bad)}"
    if bits < 8 and k % 8:
        tail = packing.unpack(qweight[:, -bits:].contiguous(), bits, 8)[:, k % 8 :]
        bad = tail != 0
        if bool(bad.any()):
            return f"has padding bits set in row {_where(bad)[0]} (codes past column {k} must be 0)"
    return None


def outlier_problem(idx: torch.Tensor, weight: torch.Tensor, in_features: int) -> Optional[str]:
    i = idx.long()
    if i.numel() and (int(i.min()) < 0 or int(i.max()) >= in_features or not bool((i[1:] > i[:-1]).all())):
        return f"outlier_idx must hold distinct ascending input columns in 0..{in_features - 1}, got {i.tolist()[:8]}"
    if bool(torch.isnan(weight).any()):
        return "outlier_weight holds NaN"
    return None


def layer_data_problem(scheme: QuantScheme, layer: dict[str, Any], t: dict[str, Optional[torch.Tensor]]) -> Optional[tuple[str, str]]:
    """(tensor suffix, what is wrong) for the first bad value of one layer's stored tensors."""
    k = layer["in_features"]
    checks = [("qweight", lambda: code_problem(t["qweight"], scheme, k))]
    if scheme.double_quant:
        checks += [(n, lambda n=n: nonnegative_problem(t[n])) for n in ("scale_absmax", "scale_offset")]
    else:
        checks.append(("scale", lambda: scale_problem(t["scale"], scheme, "source" in layer)))
    if t.get("zero") is not None:
        checks.append(("zero", lambda: zero_problem(t["zero"], scheme)))
    if t.get("outlier_idx") is not None:
        checks.append(("outlier_idx", lambda: outlier_problem(t["outlier_idx"], t["outlier_weight"], k)))
    for suffix, check in checks:
        problem = check()
        if problem is not None:
            return suffix, problem
    return None


def check_layer_data(path, manifest: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """The values of every quantized layer's stored tensors are valid for its scheme."""
    aliases = manifest["aliases"]

    def lookup(key: str) -> Optional[torch.Tensor]:
        return state[key] if key in state else state.get(aliases.get(key, ""))

    for name, layer in manifest["layers"].items():
        scheme = QuantScheme.from_dict(layer["scheme"])
        suffixes = stored_tensor_specs(scheme, layer["out_features"], layer["in_features"], layer.get("n_outliers", 0))
        found = layer_data_problem(scheme, layer, {s: lookup(f"{name}.{s}") for s in suffixes})
        if found is not None:
            suffix, problem = found
            raise TensorMismatchError(f"{path}: tensor {name}.{suffix} of layer {name!r} ({scheme.short_name}) {problem}; {_RESAVE}")

