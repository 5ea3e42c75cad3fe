"""Shared plumbing of the Hugging Face exporters/importers (GPTQ, AWQ, compressed-tensors).

Two things live here (the int32 word layout they share is ``lowbit.packing.pack_int32``):

* **exact dtype conversion** (:func:`exact_cast`): other formats store scales in fp16; a
  scale is converted only when every value survives the round trip, otherwise a
  :class:`~lowbit.errors.FormatError` names the layer (``allow_rounding=True`` opts in).

* **directories**: collect a quantized model's layers and full-precision tensors
  (:func:`collect_model`), write ``config.json`` + ``model.safetensors`` (+ tokenizer)
  atomically (:func:`write_hf_directory`), and rebuild a model from such a directory with
  ``QuantLinear`` layers in place (:func:`read_hf_directory`, :func:`build_skeleton`,
  :func:`finish_import`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lowbit.errors import (
    CheckpointError,
    FormatError,
    ModelSourceError,
    SchemeError,
    TensorMismatchError,
    UnsupportedModelError,
)
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme
from lowbit.version import __version__

PathLike = Union[str, os.PathLike]

WEIGHTS_NAME = "model.safetensors"
# every tensor a QuantLinear may store (lowbit.nn.quant_linear)
QUANT_BUFFERS = ("qweight", "scale", "zero", "bias", "scale_absmax", "scale_offset", "outlier_idx", "outlier_weight")
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------
def exact_cast(t: torch.Tensor, dtype: torch.dtype, *, layer: str, what: str, allow_rounding: bool) -> torch.Tensor:
    """``t`` in ``dtype``; FormatError if any value changes (unless ``allow_rounding``)."""
    if t.dtype == dtype:
        return t.contiguous()
    out = t.to(dtype)
    if not allow_rounding:
        back = out.to(t.dtype)
        same = (back == t) | (torch.isnan(back) & torch.isnan(t))
        if not bool(same.all()):
            bad = int((~same).sum())
            worst = float((back.double() - t.double()).abs().max())
            raise FormatError(
                f"layer {layer!r}: {bad} of {t.numel()} {what} values are not representable in {dtype} "
                f"(largest change {worst:.3g}); the target format stores {what} as {dtype}. Quantize with "
                f"scale_dtype='float16' so the export is exact, or pass allow_scale_rounding=True to round them"
            )
    return out.contiguous()


# ---------------------------------------------------------------------------
# collect a quantized model
# ---------------------------------------------------------------------------
@dataclass
class ModelParts:
    """What an exporter needs from a lowbit-quantized model."""

    quantized: dict[str, QuantLinear]  # name -> layer
    unquantized_linears: list[str]  # nn.Linear / Conv1D layers kept in full precision
    dense: dict[str, torch.Tensor]  # every tensor that is not a QuantLinear buffer (tied ones once)
    tied: dict[str, str] = field(default_factory=dict)  # dropped alias -> stored name
    sources: dict[str, str] = field(default_factory=dict)  # layer -> "Linear" / "Conv1D"


def collect_model(model: nn.Module) -> ModelParts:
    from lowbit.io.checkpoint import _dedupe
    from lowbit.model.swap import linear_kind

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise CheckpointError("the model has no QuantLinear layers; call lowbit.quantize(model, recipe) before exporting")
    unq = [n for n, m in model.named_modules() if linear_kind(m) is not None]
    qbuf = {f"{n}.{b}" for n in quantized for b in QUANT_BUFFERS}
    state = {k: v for k, v in model.state_dict().items() if k not in qbuf}
    dense, aliases = _dedupe(state)
    sources: dict[str, str] = {}
    report = getattr(model, "lowbit_report", None)
    if report is not None:
        sources.update({r.name: r.source for r in report.layers})
    manifest = getattr(model, "lowbit_manifest", None)
    if isinstance(manifest, dict):
        for n, layer in manifest.get("layers", {}).items():
            if "source" in layer:
                sources.setdefault(n, layer["source"])
    return ModelParts(quantized, unq, dense, aliases, sources)


def require_plain_int(name: str, layer: QuantLinear, fmt: str) -> None:
    """SchemeError unless the layer is a plain integer scheme with integer (or no) zero points:
    the only kind GPTQ, AWQ and compressed-tensors integer layouts can hold."""
    s = layer.scheme
    why = None
    if getattr(s, "format", "int") != "int":
        why = f"its numeric format is {s.format!r}, and {fmt} stores integer codes"
    elif getattr(s, "double_quant", False):
        why = "its scales are double-quantized (8-bit codes)"
    elif getattr(s, "outlier_threshold", None) is not None or getattr(layer, "n_outliers", 0):
        why = "it keeps LLM.int8 outlier columns in float16"
    elif s.zero_point == "float":
        why = f"it has float zero points, and {fmt} stores integer zero points"
    if why:
        raise SchemeError(
            f"layer {name!r} (scheme {s.short_name}) cannot be exported to {fmt}: {why}. "
            "Quantize it with a plain integer scheme (format='int', zero_point='int'), or keep the lowbit checkpoint"
        )


def require_linear_sources(parts: ModelParts, fmt: str) -> None:
    conv = sorted(n for n in parts.quantized if parts.sources.get(n) == "Conv1D")
    if conv:
        raise UnsupportedModelError(
            f"layers {conv[:3]} were GPT-2 Conv1D layers; {fmt} loaders replace nn.Linear modules only, so "
            "the exported checkpoint would not load there. Export this model with lowbit.save instead"
        )


# ---------------------------------------------------------------------------
# write a directory
# ---------------------------------------------------------------------------
def model_config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not getattr(config, "model_type", None):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no Hugging Face config; only transformers models can be exported "
            "to a Hugging Face directory (use lowbit.save for other modules)"
        )
    d = config.to_dict()
    d.pop("quantization_config", None)
    d["architectures"] = [type(model).__name__]
    get_out = getattr(model, "get_output_embeddings", None)
    if d.get("tie_word_embeddings") and callable(get_out) and isinstance(get_out(), QuantLinear):
        # a quantized head no longer shares the embedding matrix: loaders must not re-tie it
        d["tie_word_embeddings"] = False
    return d


def write_hf_directory(
    directory: PathLike,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    tokenizer=None,
    generation_config=None,
    extra_json: Optional[dict[str, dict]] = None,
    metadata: Optional[dict[str, str]] = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` (+ extra JSON files, tokenizer, generation
    config) into ``directory``. Everything is written into a temporary sibling directory first
    and files are moved in one by one with ``os.replace``, so no file is ever half written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lowbit-export.", dir=directory))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME), metadata=metadata or {"format": "pt"})
        files = {CONFIG_NAME: config, **(extra_json or {})}
        for name, obj in files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        if generation_config is not None:
            generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        move_files_into(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def move_files_into(tmp: Path, directory: Path) -> None:
    """fsync every file written in ``tmp`` and move it into ``directory`` with ``os.replace``
    (a stale sharded index, which would shadow the single weights file, is removed first)."""
    stale = directory / INDEX_NAME
    if stale.exists():
        stale.unlink()
    for f in sorted(tmp.iterdir()):
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(f, directory / f.name)


# ---------------------------------------------------------------------------
# read a directory
# ---------------------------------------------------------------------------
def read_config(directory: PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ModelSourceError(f"{directory}: no {CONFIG_NAME}; pass a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_tensors(directory: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` (or of the shards a ``model.safetensors.index.json`` lists)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / INDEX_NAME
    if (directory / WEIGHTS_NAME).is_file():
        files = [directory / WEIGHTS_NAME]
    elif index.is_file():
        shards = json.loads(index.read_text()).get("weight_map", {})
        files = [directory / f for f in sorted(set(shards.values()))]
    else:
        raise ModelSourceError(f"{directory}: neither {WEIGHTS_NAME} nor {INDEX_NAME}; only safetensors checkpoints are read")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: safetensors could not read the file ({e})") from None
    return out


def build_skeleton(config_dict: dict[str, Any], directory: PathLike) -> nn.Module:
    """The model of ``config.json`` on the meta device (buffers such as rotary tables are real)."""
    import transformers
    from accelerate import init_empty_weights

    d = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    try:
        config_cls = transformers.CONFIG_MAPPING[model_type]
    except KeyError:
        raise CheckpointError(f"{directory}: transformers {transformers.__version__} does not know model_type {model_type!r}") from None
    arch = getattr(transformers, archs[0], None) if archs else None
    if arch is None:
        raise CheckpointError(f"{directory}: config.json names no architecture transformers {transformers.__version__} has ({archs})")
    config = config_cls.from_dict(d)
    with init_empty_weights(include_buffers=False):
        model = arch._from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    return model


def quantized_targets(model: nn.Module, names, directory: PathLike) -> dict[str, tuple[nn.Module, tuple[int, int]]]:
    """``name -> (module, (out, in))`` for every layer a checkpoint quantizes; a name the model
    lacks or that is not a linear layer is a TensorMismatchError naming it."""
    from lowbit.model.swap import linear_kind, weight_as_linear

    out = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise TensorMismatchError(f"{directory}: the checkpoint quantizes {name!r}, which the model lacks") from None
        kind = linear_kind(module)
        if kind is None:
            raise TensorMismatchError(f"{directory}: {name!r} is a {type(module).__name__} in the model, not a linear layer")
        out[name] = (module, tuple(int(s) for s in weight_as_linear(module, kind).shape))
    return out


def install_layers(model: nn.Module, layers: dict[str, QuantLinear], directory: PathLike) -> None:
    """Put ``layers`` in place of the model's linears of the same name (shapes checked)."""
    from lowbit.model.swap import set_submodule

    targets = quantized_targets(model, layers, directory)
    for name, new in layers.items():
        have = targets[name][1]
        if have != (new.out_features, new.in_features):
            raise TensorMismatchError(
                f"{directory}: layer {name!r} is [out, in] = {list(have)} in the model but "
                f"{[new.out_features, new.in_features]} in the checkpoint"
            )
        set_submodule(model, name, new)


def finish_import(model: nn.Module, dense: dict[str, torch.Tensor], directory: PathLike, fmt: str) -> nn.Module:
    """Load the full-precision tensors (``assign=True``), re-tie tied weights, check nothing is left on meta."""
    from lowbit.model.swap import linear_kind

    expected = {k for k in model.state_dict() if not _is_quant_buffer(model, k)}
    unexpected = sorted(set(dense) - expected)
    if unexpected:
        raise TensorMismatchError(f"{directory}: tensors the model does not have: {unexpected[:5]} (is this a {fmt} checkpoint of this architecture?)")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, v in dense.items():
        if tuple(v.shape) != shapes[k]:
            raise TensorMismatchError(f"{directory}: tensor {k!r} is {tuple(v.shape)} in the file, the model expects {shapes[k]}")
    model.load_state_dict(dense, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        linears = [n.rsplit(".", 1)[0] for n in leftover if linear_kind(model.get_submodule(n.rsplit(".", 1)[0])) is not None]
        hint = f" (linear layers {linears[:3]} have neither quantized nor dense weights)" if linears else ""
        raise CheckpointError(f"{directory}: these tensors are not in the checkpoint: {leftover[:5]}{hint}")
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the model now holds lowbit layers, not the source format's
    model.eval()
    return model


def _is_quant_buffer(model: nn.Module, key: str) -> bool:
    owner, _, attr = key.rpartition(".")
    try:
        mod = model.get_submodule(owner)
    except AttributeError:
        return False
    return isinstance(mod, QuantLinear) and attr in QUANT_BUFFERS


def split_layers(tensors: dict[str, torch.Tensor], marker: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Group ``tensors`` into {layer: {suffix: tensor}} for layers that own a ``marker`` tensor
    (e.g. ``qweight``) and the remaining dense tensors."""
    names = {k[: -len(marker) - 1] for k in tensors if k.endswith("." + marker)}
    layers: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    dense = {}
    for k, v in tensors.items():
        owner, _, attr = k.rpartition(".")
        if owner in layers:
            layers[owner][attr] = v
        else:
            dense[k] = v
    return layers, dense


# ---------------------------------------------------------------------------
# schemes across formats that cannot state them (GPTQ, AWQ)
# ---------------------------------------------------------------------------
LOWBIT_KEY = "lowbit"  # extra quantization_config key written by lowbit's GPTQ / AWQ exports


def lowbit_record(parts: ModelParts) -> dict[str, Any]:
    """``{"lowbit_version", "layers": {name: QuantScheme.to_dict()}}``: lets lowbit's importers
    restore what the target format cannot state (scale dtype, symmetric, per-tensor scales);
    other loaders ignore the key."""
    return {
        "lowbit_version": __version__,
        "layers": {n: layer.scheme.to_dict() for n, layer in sorted(parts.quantized.items())},
    }


def reconcile(
    name: str,
    inferred: QuantScheme,
    recorded: Optional[dict[str, Any]],
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    directory,
):
    """The scheme, scale and zero of an imported layer.

    ``inferred`` comes from the file alone (``scale`` / ``zero`` in its dtype and with one zero per
    group). ``recorded`` (the scheme lowbit exported, when present) is used when the tensors agree
    with it exactly: scales convert back without loss, symmetric layers have the fixed zero
    ``2**(bits-1)`` everywhere, per-tensor layers one scale. Otherwise the inferred scheme wins.
    """
    from lowbit.formats import scale_torch_dtype
    from lowbit.scheme import Granularity, QuantScheme

    scheme = inferred
    if recorded is not None:
        try:
            want = QuantScheme.from_dict(recorded)
        except Exception:
            want = None
        if want is not None and want.bits == inferred.bits:
            dt = scale_torch_dtype(want)
            s2 = scale.to(dt)
            ok = torch.equal(s2.to(scale.dtype), scale)
            if want.granularity is Granularity.TENSOR:
                ok = ok and bool((s2 == s2.reshape(-1)[0]).all())
                s2 = s2.reshape(-1)[:1].reshape(1, 1)
            elif want.granularity != inferred.granularity or want.group_size != inferred.group_size:
                ok = False
            if want.symmetric:
                ok = ok and zero is not None and bool((zero == want.zero_code).all())
            if ok:
                z2 = None if want.symmetric else (zero.reshape(-1)[:1].reshape(1, 1) if want.granularity is Granularity.TENSOR else zero)
                return want, s2.contiguous(), z2
    if scheme.symmetric:
        return scheme, scale, None
    return scheme, scale, zero


def inferred_scheme(bits: int, group_size: Optional[int], in_features: int, symmetric: bool, scale_dtype: torch.dtype):
    """A lowbit scheme from a GPTQ/AWQ style (bits, group_size) pair; group_size None/-1 or
    >= in_features means one scale per output channel."""
    from lowbit.scheme import Granularity, QuantScheme

    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    if scale_dtype not in names:
        raise FormatError(f"scales of dtype {scale_dtype} cannot be held by lowbit (float32/float16/bfloat16)")
    if group_size is None or group_size <= 0 or group_size >= in_features:
        return QuantScheme(bits=bits, symmetric=symmetric, granularity=Granularity.CHANNEL, scale_dtype=names[scale_dtype])
    return QuantScheme(bits=bits, symmetric=symmetric, granularity=Granularity.GROUP, group_size=group_size, scale_dtype=names[scale_dtype])


def uniform_setting(parts: ModelParts, fmt: str, key) -> Any:
    """The one value ``key(layer)`` shared by every quantized layer (SchemeError naming two
    layers that differ: the target format has one global setting)."""
    seen: dict[Any, str] = {}
    for name, layer in sorted(parts.quantized.items()):
        seen.setdefault(key(layer), name)
    if len(seen) > 1:
        (v1, n1), (v2, n2) = list(seen.items())[:2]
        raise SchemeError(
            f"{fmt} has one global quantization setting, but layer {n1!r} has {v1} and layer {n2!r} has {v2}; "
            f"quantize every exported layer with the same bits and group size (or use "
            "export_compressed_tensors, which allows one scheme per layer)"
        )
    return next(iter(seen))


def block_suffix_lists(parts: ModelParts) -> Optional[list[list[str]]]:
    """For GPTQ's ``modules_in_block_to_quantize`` (matched by name suffix inside every block):
    None when every linear inside the repeated blocks is quantized, else ``[[suffixes]]`` of
    the quantized ones. SchemeError when one suffix is quantized in one block and not in another."""
    import re

    pat = re.compile(r"^.*?\.\d+\.(.+)$")

    def suffix(n: str) -> Optional[str]:
        m = pat.match(n)
        return m.group(1) if m else None

    q = {suffix(n) for n in parts.quantized} - {None}
    u = {suffix(n) for n in parts.unquantized_linears} - {None}
    both = sorted(q & u)
    if both:
        raise SchemeError(
            f"GPTQ configs choose the linears to quantize by their name inside a block, but {both[0]!r} is "
            "quantized in some blocks and not in others; quantize it in every block (or in none), or use "
            "export_compressed_tensors"
        )
    return [sorted(q)] if u else None
