"""AWQ "GEMM" checkpoints (AutoAWQ / transformers / vLLM): export and import.

Checked against AutoAWQ ``awq/modules/linear/gemm.py`` (``WQLinear_GEMM.from_linear``: the
weight is transposed to ``[in, out]`` and each int32 word ``col`` takes
``intweight[:, col*8 + order_map[i]] << (4*i)`` with ``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``;
qzeros packed the same way), AutoAWQ ``awq/utils/packing_utils.py`` (``unpack_awq`` +
``reverse_awq_order`` with ``AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]``), vLLM's ``awq.py``
(``AWQLinearMethod.create_weights``: ``qweight`` ``[in, out / 8]``, ``qzeros``
``[in / G, out / 8]``, ``scales`` ``[in / G, out]``, all packed on dim 1) and transformers 4.57
``utils/quantization_config.py`` (``AwqConfig``).

Per quantized linear ``L`` (``K`` in, ``N`` out, 4 bits, group size ``G``):

* ``L.qweight``: int32 ``[K, N/8]``. Word ``[k, j]`` holds the 4-bit codes of outputs
  ``8j .. 8j+7`` of input ``k`` (lowbit's unsigned codes, unchanged) in the interleaved order:
  bits ``4i .. 4i+3`` hold output ``8j + [0, 2, 4, 6, 1, 3, 5, 7][i]``.
* ``L.qzeros``: int32 ``[K/G, N/8]``: the zero points, no offset, packed like ``qweight``.
  Symmetric lowbit layers store their fixed zero ``8``.
* ``L.scales``: float16 ``[K/G, N]`` (exact conversion, else refused unless
  ``allow_scale_rounding=True``).
* ``L.bias``: ``[N]`` in the model dtype when present.

Dequantization: ``W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]`` (lowbit's formula).

``quantization_config``: ``quant_method: "awq"``, ``bits: 4``, ``group_size``,
``zero_point: true``, ``version: "gemm"``, ``modules_to_not_convert`` (linears kept in full
precision, or null), and ``lowbit`` (the exported layers' lowbit schemes; others ignore it).
Only 4-bit, group-wise, integer-zero schemes with ``N % 8 == 0`` can be exported.
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

QUANT_METHOD = "awq"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # physical nibble i holds logical output AWQ_ORDER[i]


def _interleave(cols: int) -> torch.Tensor:
    """Column permutation p with physical[:, j] = logical[:, p[j]]."""
    return (torch.arange(cols).view(-1, 8)[:, list(AWQ_ORDER)]).reshape(-1)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, cols]`` 4-bit values (cols % 8 == 0) -> int32 ``[rows, cols/8]``, AWQ order."""
    return packing.pack_int32(values[:, _interleave(values.shape[1])].contiguous(), 4)


def unpack_awq(words: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_awq`."""
    physical = packing.unpack_int32(words, 4, cols)
    return physical[:, torch.argsort(_interleave(cols))].contiguous()


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------
def _check_layer(name: str, layer: QuantLinear) -> None:
    hc.require_plain_int(name, layer, "AWQ")
    s = layer.scheme
    if s.bits != 4:
        raise SchemeError(f"layer {name!r}: AWQ GEMM stores 4-bit codes, the layer has {s.bits} bits; quantize with bits=4")
    if s.granularity is not Granularity.GROUP:
        raise SchemeError(
            f"layer {name!r}: AWQ GEMM needs group-wise scales, the layer has granularity {s.granularity.value!r}; "
            "quantize with granularity='group'"
        )
    if layer.out_features % 8:
        raise SchemeError(f"layer {name!r}: AWQ packs 8 outputs per int32, out_features={layer.out_features} is not a multiple of 8")


def layer_tensors(name: str, layer: QuantLinear, *, allow_scale_rounding: bool = False) -> dict[str, torch.Tensor]:
    """The AWQ GEMM tensors of one ``QuantLinear`` (names as in the module doc)."""
    _check_layer(name, layer)
    qt = layer.quantized_tensor()
    scheme = qt.scheme
    n, k = qt.shape
    zero = torch.full_like(qt.scale, scheme.zero_code, dtype=torch.uint8) if scheme.symmetric else qt.zero
    out = {
        f"{name}.qweight": pack_awq(qt.codes().t().contiguous()),  # [K, N/8]
        f"{name}.qzeros": pack_awq(zero.t().contiguous()),  # [K/G, N/8]
        f"{name}.scales": hc.exact_cast(
            qt.scale.t().contiguous(), torch.float16, layer=name, what="scale", allow_rounding=allow_scale_rounding
        ),
    }
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().contiguous()
    return out


def quantization_config(parts: hc.ModelParts) -> dict[str, Any]:
    gs = hc.uniform_setting(parts, "AWQ", lambda l: l.scheme.group_size)
    return {
        "quant_method": QUANT_METHOD,
        "bits": 4,
        "group_size": gs,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": sorted(parts.unquantized_linears) or None,
        hc.LOWBIT_KEY: hc.lowbit_record(parts),
    }


def export_awq(model: nn.Module, directory, tokenizer=None, *, allow_scale_rounding: bool = False) -> Path:
    """Write a lowbit-quantized transformers model as an AWQ GEMM directory (exact; see module doc)."""
    parts = hc.collect_model(model)
    hc.require_linear_sources(parts, "AWQ")
    for name, layer in parts.quantized.items():
        _check_layer(name, layer)
    qcfg = quantization_config(parts)
    tensors = dict(parts.dense)
    for name, layer in parts.quantized.items():
        tensors.update(layer_tensors(name, layer, allow_scale_rounding=allow_scale_rounding))
    config = hc.model_config_dict(model)
    config["quantization_config"] = qcfg
    return hc.write_hf_directory(
        directory, config, tensors, tokenizer=tokenizer, generation_config=getattr(model, "generation_config", None)
    )


# ---------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------
def layer_from_tensors(name: str, t: dict[str, torch.Tensor], qcfg: dict[str, Any], shape: tuple[int, int], directory) -> QuantLinear:
    n, k = shape
    for key in ("qweight", "qzeros", "scales"):
        if key not in t:
            raise CheckpointError(f"{directory}: AWQ layer {name!r} lacks {key!r}")
    if tuple(t["qweight"].shape) != (k, n // 8) or t["qweight"].dtype != torch.int32 or n % 8:
        raise TensorMismatchError(f"{directory}: {name}.qweight is {t['qweight'].dtype} {tuple(t['qweight'].shape)}, expected int32 {(k, n // 8)}")
    scales = t["scales"]
    groups = scales.shape[0]
    if scales.dim() != 2 or scales.shape[1] != n or k % groups or tuple(t["qzeros"].shape) != (groups, n // 8):
        raise TensorMismatchError(
            f"{directory}: {name}.scales {tuple(scales.shape)} / qzeros {tuple(t['qzeros'].shape)} do not fit "
            f"[groups, {n}] / [groups, {n // 8}] with groups dividing {k}"
        )
    codes = unpack_awq(t["qweight"], n).t().contiguous()  # [N, K]
    zero = unpack_awq(t["qzeros"], n).t().contiguous()  # [N, G]
    scale = scales.t().contiguous()
    inferred = hc.inferred_scheme(4, k // groups if groups > 1 else None, k, False, scale.dtype)
    recorded = (qcfg.get(hc.LOWBIT_KEY) or {}).get("layers", {}).get(name)
    scheme, scale, zero = hc.reconcile(name, inferred, recorded, scale, zero, directory)
    qt = QuantizedTensor.from_codes(codes, QParams(scale, zero), scheme)
    return QuantLinear.from_quantized(qt, t.get("bias"))


def import_awq(directory) -> nn.Module:
    """Build a lowbit model (``QuantLinear`` layers) from an AWQ GEMM directory.

    Codes, scales and zero points come over unchanged (as affine 4-bit group schemes, or the
    exact lowbit schemes when the directory was written by :func:`export_awq`).
    """

    directory = Path(directory)
    config = hc.read_config(directory)
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{directory}: quantization_config.quant_method is {qcfg.get('quant_method')!r}, not 'awq'")
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm" or int(qcfg.get("bits", 4)) != 4 or not qcfg.get("zero_point", True):
        raise FormatError(
            f"{directory}: AWQ version={qcfg.get('version')!r}, bits={qcfg.get('bits')!r}, "
            f"zero_point={qcfg.get('zero_point')!r}; lowbit imports 4-bit GEMM checkpoints with zero points"
        )
    tensors = hc.read_tensors(directory)
    raw, dense = hc.split_layers(tensors, "qweight")
    model = hc.build_skeleton(config, directory)
    targets = hc.quantized_targets(model, raw, directory)
    layers = {name: layer_from_tensors(name, raw[name], qcfg, shape, directory) for name, (_, shape) in targets.items()}
    hc.install_layers(model, layers, directory)
    return hc.finish_import(model, dense, directory, "AWQ")
