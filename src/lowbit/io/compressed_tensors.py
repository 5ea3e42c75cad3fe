"""compressed-tensors checkpoints (llm-compressor / vLLM / transformers): export and import.

Checked against compressed-tensors 0.20.0 (``compressors/pack_quantized/base.py`` and
``helpers.py``, ``compressors/naive_quantized/base.py``, ``quantization/lifecycle/initialize.py``,
``quantization/quant_args.py``, ``compressors/model_compressors/model_compressor.py``) and
transformers 4.57 ``quantizers/quantizer_compressed_tensors.py``; vLLM's
``compressed_tensors_wNa16.py`` creates the same parameter names and shapes.

Codes: compressed-tensors quantizes to *signed* integers ``q_s`` in ``[-2**(b-1), 2**(b-1)-1]``
with an int8 zero point ``zp_s`` (0 when symmetric) and dequantizes ``(q_s - zp_s) * s``.
lowbit's unsigned code is ``q = q_s + 2**(b-1)`` and zero ``z = zp_s + 2**(b-1)`` (the symmetric
zero ``2**(b-1)`` is exactly ``zp_s = 0``), so the dequantized weights are identical.

Format ``pack-quantized`` (weight-only, bits 2, 4 or 8), per quantized linear ``L`` (``N`` out,
``K`` in, ``G`` scale groups):

* ``L.weight_packed``: int32 ``[N, ceil(K*b/32)]``; row ``n`` is the dense little-endian bit
  stream of the offset-binary codes ``q_s + 2**(b-1)`` (= lowbit's ``q``): element ``k`` at
  stream bits ``[k*b, (k+1)*b)``, i.e. for 4 bits element ``8j+i`` in bits ``4i..4i+3`` of word
  ``j`` (see :mod:`lowbit.io.hf_common`);
* ``L.weight_scale``: lowbit's scale dtype, ``[N, G]`` (strategy ``group``), ``[N, 1``]
  (``channel``) or ``[1]`` (``tensor``);
* ``L.weight_zero_point`` (asymmetric only): int32 ``[ceil(N*b/32), G]`` for group/channel,
  the offset-binary zero points packed the same way but *along dim 0* (output channels);
  int8 ``[1]`` holding ``zp_s`` for strategy ``tensor`` (compressed-tensors packs zero
  points for group/channel only);
* ``L.weight_shape``: int64 ``[2]`` = ``[N, K]``;
* ``L.bias``: the model dtype ``[N]`` when present.

Format ``int-quantized`` (8-bit; used for W8A8, ``activations="int8"``):

* ``L.weight``: int8 ``[N, K]`` = ``q_s = q - 128``;
* ``L.weight_scale``: as above; ``L.weight_zero_point``: int8, scale's shape (asymmetric only);
* ``input_activations`` of the config group: ``{num_bits: 8, type: int, symmetric: true,
  strategy: token, dynamic: true}`` (per-token dynamic int8, lowbit's W8A8).

Format ``float-quantized`` (FP8 E4M3 weights, ``format="fp8_e4m3"``; per channel or tensor):

* ``L.weight``: ``torch.float8_e4m3fn`` ``[N, K]``, lowbit's stored bytes viewed as float8
  (compressed-tensors rounds ``clamp(w / s, -448, 448)`` to float8 as lowbit does, so the same
  scale gives the same bytes; tested against its compressor);
* ``L.weight_scale``: lowbit's scale dtype, ``[N, 1]`` (``channel``) or ``[1]`` (``tensor``);
* weights args ``{num_bits: 8, type: float, symmetric: true}``; with ``activations="fp8_e4m3"``
  ``input_activations = {num_bits: 8, type: float, symmetric: true, strategy: token,
  dynamic: true}`` (lowbit's dynamic per-token FP8, ``scale = amax / 448``).

FP8 E5M2 is refused: compressed-tensors' 8-bit float type is E4M3.

Bits 3, 5, 6, 7 are refused: compressed-tensors changed how it packs them (0.20 packs densely
across words, older releases put ``32 // b`` codes per word), and vLLM reads only 4 and 8 bits.
Float zero points and act-order ``weight_g_idx`` permutations cannot be expressed in lowbit
and are refused too.

``quantization_config`` (in ``config.json``): ``quant_method: "compressed-tensors"``,
``format`` (the single format, or ``mixed-precision``), ``quantization_status: "compressed"``,
``config_groups`` (one per distinct scheme: ``targets`` = ``["Linear"]`` when every quantized
layer shares one scheme, else the exact layer names; ``weights`` = ``num_bits``, ``type: "int"``,
``symmetric``, ``strategy``, ``group_size``, ``dynamic: false``, ``actorder: null``;
``input_activations``; ``format``), ``ignore`` (linear layers kept in full precision),
``kv_cache_scheme: null``, ``sparsity_config: {}``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lowbit import packing
from lowbit.errors import CheckpointError, FormatError, SchemeError, TensorMismatchError
from lowbit.formats import QParams
from lowbit.io import hf_common as hc
from lowbit.nn import QuantLinear
from lowbit.scheme import Granularity, QuantScheme
from lowbit.tensor import QuantizedTensor

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
FLOAT_QUANTIZED = "float-quantized"
FORMATS = (PACK_QUANTIZED, INT_QUANTIZED, FLOAT_QUANTIZED)
PACK_BITS = (2, 4, 8)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DYNAMIC_INT8_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
_DYNAMIC_FP8_TOKEN = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
_INPUT_ACTIVATIONS = {"int8": _DYNAMIC_INT8_TOKEN, "fp8_e4m3": _DYNAMIC_FP8_TOKEN}


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------
def _layer_format(name: str, layer: QuantLinear, requested: Optional[str]) -> str:
    if requested is not None and requested not in FORMATS:
        raise SchemeError(f"unknown compressed-tensors format {requested!r}; use one of {FORMATS} (or None for automatic)")
    scheme = layer.scheme
    if scheme.format == "fp8_e4m3":
        if requested not in (None, FLOAT_QUANTIZED):
            raise SchemeError(f"layer {name!r}: FP8 weights export as {FLOAT_QUANTIZED!r}, not {requested!r}")
        return FLOAT_QUANTIZED
    if scheme.format == "fp8_e5m2":
        raise SchemeError(
            f"layer {name!r} (scheme {scheme.short_name}) cannot be exported to compressed-tensors: its 8-bit "
            "float type is E4M3; quantize with format='fp8_e4m3'"
        )
    hc.require_plain_int(name, layer, "compressed-tensors")
    fmt = requested or (INT_QUANTIZED if scheme.activations == "int8" else PACK_QUANTIZED)
    if fmt == FLOAT_QUANTIZED:
        raise SchemeError(f"layer {name!r}: {FLOAT_QUANTIZED!r} stores FP8 weights; the layer has {scheme.bits}-bit integers")
    if fmt == INT_QUANTIZED and scheme.bits != 8:
        raise SchemeError(f"layer {name!r}: format 'int-quantized' stores int8 weights; the layer has {scheme.bits} bits (use 'pack-quantized')")
    if fmt == PACK_QUANTIZED and scheme.activations == "int8":
        raise SchemeError(f"layer {name!r}: W8A8 layers (activations='int8') export as 'int-quantized', not 'pack-quantized'")
    if fmt == PACK_QUANTIZED and scheme.bits not in PACK_BITS:
        raise SchemeError(
            f"layer {name!r}: {scheme.bits}-bit weights cannot be exported to pack-quantized unambiguously "
            f"(compressed-tensors releases disagree on how {scheme.bits}-bit codes straddle int32 words, and "
            f"vLLM reads 4 and 8 bits only); quantize with bits in {PACK_BITS}, or keep the lowbit checkpoint"
        )
    return fmt


def weight_args(scheme: QuantScheme) -> dict[str, Any]:
    """The ``weights`` QuantizationArgs of a lowbit scheme, as JSON."""
    strategy = {Granularity.GROUP: "group", Granularity.CHANNEL: "channel", Granularity.TENSOR: "tensor"}[scheme.granularity]
    return {
        "num_bits": scheme.bits,
        "type": "float" if scheme.format == "fp8_e4m3" else "int",
        "symmetric": scheme.symmetric,
        "strategy": strategy,
        "group_size": scheme.group_size if scheme.granularity is Granularity.GROUP else None,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def layer_tensors(name: str, layer: QuantLinear, fmt: str) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one ``QuantLinear`` (names as in the module doc)."""
    qt = layer.quantized_tensor()
    scheme = qt.scheme
    bits, half = scheme.bits, 1 << (scheme.bits - 1)
    codes = qt.codes()
    scale = qt.scale.reshape(1) if scheme.granularity is Granularity.TENSOR else qt.scale
    out = {f"{name}.weight_scale": scale.contiguous()}
    if fmt == FLOAT_QUANTIZED:
        out[f"{name}.weight"] = codes.contiguous().view(torch.float8_e4m3fn)
    elif fmt == PACK_QUANTIZED:
        out[f"{name}.weight_packed"] = packing.pack_int32(codes, bits)
        out[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)
    else:
        out[f"{name}.weight"] = (codes.to(torch.int16) - 128).to(torch.int8)
    if not scheme.symmetric:
        zero = qt.zero
        if fmt == PACK_QUANTIZED and scheme.granularity is not Granularity.TENSOR:
            out[f"{name}.weight_zero_point"] = packing.pack_int32(zero.t().contiguous(), bits).t().contiguous()
        else:
            out[f"{name}.weight_zero_point"] = (zero.to(torch.int16) - half).to(torch.int8).reshape(scale.shape)
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().contiguous()
    return out


def quantization_config(parts: hc.ModelParts, formats: dict[str, str]) -> dict[str, Any]:
    groups: dict[tuple, list[str]] = {}
    for name, layer in parts.quantized.items():
        key = (layer.scheme, formats[name])
        groups.setdefault(key, []).append(name)
    single = len(groups) == 1
    config_groups = {}
    for i, ((scheme, fmt), names) in enumerate(groups.items()):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if single else sorted(names),
            "weights": weight_args(scheme),
            "input_activations": dict(_INPUT_ACTIVATIONS[scheme.activations]) if scheme.activations else None,
            "output_activations": None,
            "format": fmt,
        }
    all_formats = {fmt for _, fmt in groups}
    return {
        "quant_method": QUANT_METHOD,
        "format": all_formats.pop() if len(all_formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": sorted(parts.unquantized_linears),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def export_compressed_tensors(
    model: nn.Module,
    directory,
    tokenizer=None,
    *,
    format: Optional[str] = None,
) -> Path:
    """Write a lowbit-quantized transformers model as a compressed-tensors directory.

    ``format``: None picks ``pack-quantized`` for weight-only layers and ``int-quantized`` for
    W8A8 layers; a format name forces it (``int-quantized`` needs 8-bit layers). Layers kept in
    full precision are stored as ordinary weights and listed in ``ignore``. Exact: every code,
    scale and zero point is written unchanged (scales keep lowbit's scale dtype).
    """
    parts = hc.collect_model(model)
    hc.require_linear_sources(parts, "compressed-tensors")
    formats = {n: _layer_format(n, l, format) for n, l in parts.quantized.items()}
    tensors = dict(parts.dense)
    for name, layer in parts.quantized.items():
        tensors.update(layer_tensors(name, layer, formats[name]))
    config = hc.model_config_dict(model)
    config["quantization_config"] = quantization_config(parts, formats)
    return hc.write_hf_directory(
        directory, config, tensors, tokenizer=tokenizer, generation_config=getattr(model, "generation_config", None)
    )


# ---------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------
def _matches(target: str, name: str, module: nn.Module) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == type(module).__name__


def _group_for(name: str, module: nn.Module, qcfg: dict[str, Any], directory) -> dict[str, Any]:
    for ign in qcfg.get("ignore") or []:
        if _matches(ign, name, module):
            raise CheckpointError(f"{directory}: layer {name!r} holds quantized tensors but the config ignores it")
    hits = [g for g in (qcfg.get("config_groups") or {}).values() if any(_matches(t, name, module) for t in g.get("targets", []))]
    if not hits:
        raise CheckpointError(f"{directory}: no config group of quantization_config targets layer {name!r}")
    return hits[0]


def scheme_from_group(name: str, group: dict[str, Any], scale: torch.Tensor, directory) -> QuantScheme:
    w = group.get("weights") or {}
    wtype = w.get("type", "int")
    if wtype not in ("int", "float") or (wtype == "float" and (int(w.get("num_bits", 8)) != 8 or not w.get("symmetric", True))):
        raise FormatError(
            f"{directory}: layer {name!r} uses {w.get('num_bits')}-bit {wtype!r} weights; lowbit imports integer "
            "formats and symmetric 8-bit float (FP8 E4M3)"
        )
    if w.get("dynamic"):
        raise FormatError(f"{directory}: layer {name!r} has dynamic weight scales; lowbit imports static weight scales only")
    strategy = w.get("strategy") or ("group" if (w.get("group_size") or 0) > 0 else "channel" if w.get("group_size") == -1 else "tensor")
    gran = {"group": Granularity.GROUP, "channel": Granularity.CHANNEL, "tensor": Granularity.TENSOR}.get(strategy)
    if gran is None:
        raise FormatError(f"{directory}: layer {name!r} uses weight strategy {strategy!r}; lowbit imports group, channel and tensor")
    act = group.get("input_activations")
    activations = None
    if act is not None:
        a = {k: act.get(k) for k in _DYNAMIC_INT8_TOKEN}
        activations = next((kind for kind, want in _INPUT_ACTIVATIONS.items() if a == want), None)
        if activations is None or (activations == "fp8_e4m3") != (wtype == "float"):
            raise FormatError(
                f"{directory}: layer {name!r} quantizes input activations as {act}; lowbit runs dynamic per-token "
                "symmetric int8 activations with int8 weights (W8A8) and dynamic per-token FP8 activations with "
                "FP8 weights"
            )
    if scale.dtype not in _DTYPE_NAMES:
        raise FormatError(f"{directory}: layer {name!r} has {scale.dtype} scales; lowbit stores float32/float16/bfloat16")
    if wtype == "float":
        if gran is Granularity.GROUP:
            raise FormatError(f"{directory}: layer {name!r} has grouped FP8 scales; lowbit's FP8 is per channel or per tensor")
        return QuantScheme(format="fp8_e4m3", granularity=gran, scale_dtype=_DTYPE_NAMES[scale.dtype], activations=activations)
    return QuantScheme(
        bits=int(w.get("num_bits", 8)),
        symmetric=bool(w.get("symmetric", True)),
        granularity=gran,
        group_size=int(w["group_size"]) if gran is Granularity.GROUP else None,
        scale_dtype=_DTYPE_NAMES[scale.dtype],
        activations=activations,
    )


def layer_from_tensors(name: str, t: dict[str, torch.Tensor], group: dict[str, Any], shape: tuple[int, int], directory) -> QuantLinear:
    """One ``QuantLinear`` from its compressed-tensors tensors (``t``: suffix -> tensor)."""
    n, k = shape
    scheme = scheme_from_group(name, group, t["weight_scale"], directory)
    bits, half = scheme.bits, 1 << (scheme.bits - 1)
    if "weight_g_idx" in t:
        g_idx = t["weight_g_idx"].to(torch.int64)
        if scheme.granularity is not Granularity.GROUP or not torch.equal(g_idx, torch.arange(k) // scheme.group_size):
            raise FormatError(
                f"{directory}: layer {name!r} uses activation-ordered groups (weight_g_idx is a permutation); "
                "lowbit's groups are contiguous input columns, so this checkpoint cannot be imported exactly"
            )
    if "weight_packed" in t:
        if bits not in PACK_BITS:
            raise FormatError(
                f"{directory}: layer {name!r} packs {bits}-bit codes, whose int32 layout differs between "
                f"compressed-tensors releases; lowbit imports pack-quantized with bits in {PACK_BITS}"
            )
        if "weight_shape" in t and [int(x) for x in t["weight_shape"].tolist()] != [n, k]:
            raise TensorMismatchError(f"{directory}: {name}.weight_shape is {t['weight_shape'].tolist()}, the model layer is {[n, k]}")
        codes = packing.unpack_int32(t["weight_packed"], bits, k)
    elif scheme.format == "fp8_e4m3":
        if "weight" not in t or t["weight"].dtype != torch.float8_e4m3fn:
            got = t["weight"].dtype if "weight" in t else "no weight"
            raise FormatError(f"{directory}: FP8 layer {name!r} needs a float8_e4m3fn weight, got {got}")
        codes = t["weight"].contiguous().view(torch.uint8)
        if bool(((codes & 0x7F) == 0x7F).any()):
            raise FormatError(f"{directory}: layer {name!r} holds FP8 NaN codes; lowbit's FP8 weights are finite")
    elif "weight" in t and t["weight"].dtype == torch.int8:
        if bits != 8:
            raise FormatError(f"{directory}: layer {name!r}: int8 weights but num_bits={bits}")
        codes = (t["weight"].to(torch.int16) + 128).to(torch.uint8)
    else:
        raise CheckpointError(f"{directory}: layer {name!r} has weight_scale but neither weight_packed nor int8 weight")
    if tuple(codes.shape) != (n, k):
        raise TensorMismatchError(f"{directory}: {name} codes are {tuple(codes.shape)}, the model layer is {(n, k)}")
    groups = scheme.n_groups(k)
    qshape = (1, 1) if scheme.granularity is Granularity.TENSOR else (n, groups)
    scale = t["weight_scale"]
    if scale.numel() != qshape[0] * qshape[1]:
        raise TensorMismatchError(f"{directory}: {name}.weight_scale is {tuple(scale.shape)}, expected {qshape}")
    scale = scale.reshape(qshape).contiguous()
    zero = None
    if not scheme.symmetric:
        zp = t.get("weight_zero_point")
        if zp is None:
            raise CheckpointError(f"{directory}: asymmetric layer {name!r} lacks weight_zero_point")
        if zp.dtype == torch.int32 and "weight_packed" in t:
            zero = packing.unpack_int32(zp.t().contiguous(), bits, n).t().contiguous()
        else:
            zero = (zp.to(torch.int16) + half).to(torch.uint8)
        zero = zero.reshape(qshape).contiguous()
    elif "weight_zero_point" in t and bool((t["weight_zero_point"] != 0).any()):
        raise FormatError(f"{directory}: symmetric layer {name!r} has non-zero zero points")
    qt = QuantizedTensor.from_codes(codes, QParams(scale, zero), scheme)
    return QuantLinear.from_quantized(qt, t.get("bias"))


def import_compressed_tensors(directory) -> nn.Module:
    """Build a lowbit model (``QuantLinear`` layers) from a compressed-tensors directory.

    Codes, scales and zero points come over unchanged; see the module doc for what is refused.
    """

    directory = Path(directory)
    config = hc.read_config(directory)
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{directory}: quantization_config.quant_method is {qcfg.get('quant_method')!r}, not {QUANT_METHOD!r}")
    if qcfg.get("quantization_status", "compressed") != "compressed":
        raise CheckpointError(f"{directory}: quantization_status {qcfg.get('quantization_status')!r}; only compressed checkpoints hold codes")
    tensors = hc.read_tensors(directory)
    raw, dense = hc.split_layers(tensors, "weight_scale")
    model = hc.build_skeleton(config, directory)
    layers = {}
    for name, (module, shape) in hc.quantized_targets(model, raw, directory).items():
        group = _group_for(name, module, qcfg, directory)
        layers[name] = layer_from_tensors(name, raw[name], group, shape, directory)
    hc.install_layers(model, layers, directory)
    return hc.finish_import(model, dense, directory, "compressed-tensors")
