"""GPTQ "v1" checkpoints (AutoGPTQ / GPTQModel / transformers+optimum / vLLM): export and import.

Checked against AutoGPTQ ``nn_modules/qlinear/qlinear_cuda_old.py`` / ``qlinear_exllama.py``
(``QuantLinear.pack``: the bits 2/4/8 and bits 3 branches; ``zeros -= 1`` before packing
``qzeros``), GPTQ-for-LLaMa ``quant.py`` (3-bit ``QuantLinear``), vLLM's ``gptq.py``
(``GPTQLinearMethod.create_weights``: ``qweight`` ``[in / pack_factor, out]`` packed on dim 0,
``g_idx`` ``[in]``, ``qzeros`` ``[groups, out / pack_factor]`` packed on dim 1, ``scales``
``[groups, out]``) and transformers 4.57 ``utils/quantization_config.py`` (``GPTQConfig``).

Per quantized linear ``L`` (``K`` in, ``N`` out, ``b`` bits in 2, 3, 4, 8, ``G`` groups):

* ``L.qweight``: int32 ``[K*b/32, N]``. Column ``n`` is the dense little-endian bit stream of
  the codes ``q[n, 0..K-1]`` (lowbit's unsigned codes, unchanged) read as int32 words along
  dim 0: code ``k`` at stream bits ``[k*b, (k+1)*b)``; for 4 bits word ``i`` holds codes
  ``8i..8i+7`` at bits ``0, 4, ..., 28``; for 3 bits 32 codes fill 3 words and codes 10 and 21
  straddle words (see :mod:`lowbit.io.hf_common`). Needs ``K*b % 32 == 0``.
* ``L.qzeros``: int32 ``[G, N*b/32]``: ``z - 1`` (the v1 offset) for every (group, output),
  packed the same way along dim 1 (outputs). Symmetric layers store ``2**(b-1) - 1``
  (7 at 4 bits). A zero point of 0 cannot be stored (``-1`` would spill into the neighbours'
  bits), so such layers are refused. Needs ``N*b % 32 == 0``.
* ``L.scales``: float16 ``[G, N]`` (converted exactly from lowbit's scale dtype, else refused
  unless ``allow_scale_rounding=True``).
* ``L.g_idx``: int32 ``[K]`` = ``k // group_size`` (all 0 for one group per row).
* ``L.bias``: ``[N]`` in the model dtype when present (loaders cast it to their dtype).

Dequantization: ``W[k, n] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1))``
= lowbit's ``(q - z) * s``. Per-tensor scales are written per channel (the same value repeated).

``quantization_config`` (``config.json``) and ``quantize_config.json``: ``quant_method: "gptq"``,
``checkpoint_format: "gptq"``, ``bits``, ``group_size`` (-1 = per channel), ``desc_act: false``
(lowbit's act-order keeps static groups, so the stored order is the natural one), ``sym``,
``damp_percent``, ``static_groups: false``, ``true_sequential``, ``model_file_base_name:
"model"``, ``modules_in_block_to_quantize`` (only when some linears inside the blocks stay in
full precision), and ``lowbit`` (the exported layers' lowbit schemes; other tools ignore it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import packing
from lowbit.errors import CheckpointError, FormatError, SchemeError, TensorMismatchError
from lowbit.formats import QParams
from lowbit.io import hf_common as hc
from lowbit.nn import QuantLinear
from lowbit.scheme import Granularity
from lowbit.tensor import QuantizedTensor

QUANT_METHOD = "gptq"
GPTQ_BITS = (2, 3, 4, 8)
QUANTIZE_CONFIG_NAME = "quantize_config.json"


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------
def _check_layer(name: str, layer: QuantLinear) -> None:
    hc.require_plain_int(name, layer, "GPTQ")
    b = layer.scheme.bits
    if b not in GPTQ_BITS:
        raise SchemeError(f"layer {name!r}: GPTQ v1 stores {GPTQ_BITS} bits, the layer has {b}; quantize with one of those")
    for what, size in (("in_features", layer.in_features), ("out_features", layer.out_features)):
        if size * b % 32:
            raise SchemeError(
                f"layer {name!r}: GPTQ packs {what}={size} codes of {b} bits into whole int32 words, "
                f"which needs {what} * {b} to be a multiple of 32"
            )


def layer_tensors(name: str, layer: QuantLinear, *, allow_scale_rounding: bool = False) -> dict[str, torch.Tensor]:
    """The GPTQ v1 tensors of one ``QuantLinear`` (names as in the module doc)."""
    _check_layer(name, layer)
    qt = layer.quantized_tensor()
    scheme, b = qt.scheme, qt.scheme.bits
    n, k = qt.shape
    codes = qt.codes()  # [N, K]
    groups = scheme.n_groups(k)
    scale = qt.scale.expand(n, 1) if scheme.granularity is Granularity.TENSOR else qt.scale  # [N, G]
    if scheme.symmetric:
        zero = torch.full((n, groups), scheme.zero_code, dtype=torch.uint8)
    else:
        zero = qt.zero.expand(n, 1) if scheme.granularity is Granularity.TENSOR else qt.zero
    if bool((zero == 0).any()):
        raise FormatError(
            f"layer {name!r}: {int((zero == 0).sum())} zero points are 0, which GPTQ v1 cannot store (it stores "
            "zero - 1 in unsigned bits). Quantize symmetrically, or keep the lowbit / compressed-tensors export"
        )
    group_size = scheme.group_size if scheme.granularity is Granularity.GROUP else k
    out = {
        f"{name}.qweight": packing.pack_int32(codes, b).t().contiguous(),  # [N, K*b/32] -> [K*b/32, N]
        f"{name}.qzeros": packing.pack_int32((zero.t() - 1).contiguous(), b),  # [G, N*b/32]
        f"{name}.scales": hc.exact_cast(
            scale.t().contiguous(), torch.float16, layer=name, what="scale", allow_rounding=allow_scale_rounding
        ),
        f"{name}.g_idx": (torch.arange(k, dtype=torch.int32) // group_size).to(torch.int32),
    }
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().contiguous()
    return out


def quantization_config(parts: hc.ModelParts, model: nn.Module) -> dict[str, Any]:
    bits = hc.uniform_setting(parts, "GPTQ", lambda l: l.scheme.bits)
    gs = hc.uniform_setting(
        parts, "GPTQ", lambda l: l.scheme.group_size if l.scheme.granularity is Granularity.GROUP else -1
    )
    sym = all(l.scheme.symmetric for l in parts.quantized.values())
    damp, true_seq = 0.01, True
    report = getattr(model, "lowbit_report", None)
    rounding = getattr(getattr(report, "recipe", None), "rounding", None)
    if getattr(rounding, "name", None) == "gptq":
        damp, true_seq = float(rounding.damp), bool(rounding.true_sequential)
    cfg = {
        "quant_method": QUANT_METHOD,
        "checkpoint_format": "gptq",
        "bits": bits,
        "group_size": gs,
        "desc_act": False,
        "sym": sym,
        "damp_percent": damp,
        "static_groups": False,
        "true_sequential": true_seq,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        hc.LOWBIT_KEY: hc.lowbit_record(parts),
    }
    blocks = hc.block_suffix_lists(parts)
    if blocks is not None:
        cfg["modules_in_block_to_quantize"] = blocks
    return cfg


def export_gptq(model: nn.Module, directory, tokenizer=None, *, allow_scale_rounding: bool = False) -> Path:
    """Write a lowbit-quantized transformers model as a GPTQ v1 directory (exact; see module doc).

    Every quantized layer must share bits and group size (GPTQ has one global setting); layers
    kept in full precision are stored as ordinary weights. Scales are stored in float16: values
    that float16 cannot hold exactly raise FormatError unless ``allow_scale_rounding=True``.
    """
    parts = hc.collect_model(model)
    hc.require_linear_sources(parts, "GPTQ")
    tensors = dict(parts.dense)
    for name, layer in parts.quantized.items():
        tensors.update(layer_tensors(name, layer, allow_scale_rounding=allow_scale_rounding))
    qcfg = quantization_config(parts, model)
    config = hc.model_config_dict(model)
    config["quantization_config"] = qcfg
    return hc.write_hf_directory(
        directory,
        config,
        tensors,
        tokenizer=tokenizer,
        generation_config=getattr(model, "generation_config", None),
        extra_json={QUANTIZE_CONFIG_NAME: qcfg},
    )


# ---------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------
def _read_qcfg(directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    qcfg = config.get("quantization_config")
    if qcfg is None and (directory / QUANTIZE_CONFIG_NAME).is_file():
        import json

        qcfg = json.loads((directory / QUANTIZE_CONFIG_NAME).read_text())
    if not isinstance(qcfg, dict) or qcfg.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
        raise CheckpointError(f"{directory}: no GPTQ quantization_config (quant_method 'gptq') in config.json or {QUANTIZE_CONFIG_NAME}")
    fmt = qcfg.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise FormatError(f"{directory}: checkpoint_format {fmt!r}; lowbit imports 'gptq' (v1) and 'gptq_v2'")
    if int(qcfg.get("bits", 0)) not in GPTQ_BITS:
        raise FormatError(f"{directory}: bits={qcfg.get('bits')!r}; GPTQ checkpoints hold {GPTQ_BITS} bits")
    return qcfg


def layer_from_tensors(name: str, t: dict[str, torch.Tensor], qcfg: dict[str, Any], shape: tuple[int, int], directory) -> QuantLinear:
    """One ``QuantLinear`` from its GPTQ tensors (``t``: suffix -> tensor)."""
    n, k = shape
    b = int(qcfg["bits"])
    for key in ("qweight", "scales", "qzeros"):
        if key not in t:
            raise CheckpointError(f"{directory}: GPTQ layer {name!r} lacks {key!r}")
    if tuple(t["qweight"].shape) != (k * b // 32, n) or t["qweight"].dtype != torch.int32 or k * b % 32:
        raise TensorMismatchError(f"{directory}: {name}.qweight is {t['qweight'].dtype} {tuple(t['qweight'].shape)}, expected int32 {(k * b // 32, n)}")
    scales = t["scales"]  # [G, N]
    groups = scales.shape[0]
    if scales.dim() != 2 or scales.shape[1] != n or k % groups:
        raise TensorMismatchError(f"{directory}: {name}.scales is {tuple(scales.shape)}, expected [groups, {n}] with groups dividing {k}")
    group_size = k // groups
    g_idx = t.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(k) // group_size):
        raise FormatError(
            f"{directory}: layer {name!r} uses act-order groups (g_idx is not k // {group_size}); lowbit's groups are "
            "contiguous input columns, so this checkpoint cannot be imported exactly (re-quantize with desc_act=False "
            "or static_groups=True)"
        )
    codes = packing.unpack_int32(t["qweight"].t().contiguous(), b, k)  # [N, K]
    stored = packing.unpack_int32(t["qzeros"], b, n).to(torch.int16)  # [G, N]
    zero = stored + (1 if qcfg.get("checkpoint_format", "gptq") == "gptq" else 0)
    if bool((zero > (1 << b) - 1).any()):
        raise FormatError(
            f"{directory}: layer {name!r} stores zero points of -1 (all bits set), which means zero point 0 under the "
            "v1 offset and cannot be decoded exactly; the checkpoint was written with a GPTQ v1 overflow"
        )
    zero = zero.to(torch.uint8).t().contiguous()  # [N, G]
    scale = scales.t().contiguous()
    sym = bool(qcfg.get("sym", True)) and bool((zero == (1 << (b - 1))).all())
    gs = int(qcfg.get("group_size", -1))
    inferred = hc.inferred_scheme(b, group_size if groups > 1 or (gs > 0 and gs < k) else None, k, sym, scale.dtype)
    recorded = (qcfg.get(hc.LOWBIT_KEY) or {}).get("layers", {}).get(name)
    scheme, scale, zero = hc.reconcile(name, inferred, recorded, scale, zero, directory)
    qt = QuantizedTensor.from_codes(codes, QParams(scale, zero), scheme)
    return QuantLinear.from_quantized(qt, t.get("bias"))


def import_gptq(directory) -> nn.Module:
    """Build a lowbit model (``QuantLinear`` layers) from a GPTQ directory (v1 or v2 zeros).

    Codes, scales and zero points come over unchanged. Act-order checkpoints whose ``g_idx`` is
    a permutation are refused (FormatError): lowbit's groups are contiguous columns.
    """

    directory = Path(directory)
    config = hc.read_config(directory)
    qcfg = _read_qcfg(directory, config)
    tensors = hc.read_tensors(directory)
    raw, dense = hc.split_layers(tensors, "qweight")
    model = hc.build_skeleton(config, directory)
    targets = hc.quantized_targets(model, raw, directory)
    layers = {name: layer_from_tensors(name, raw[name], qcfg, shape, directory) for name, (_, shape) in targets.items()}
    hc.install_layers(model, layers, directory)
    return hc.finish_import(model, dense, directory, "GPTQ")
