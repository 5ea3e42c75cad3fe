"""``from_pretrained`` for lowbit checkpoints: a transformers quantizer registered as "lowbit".

Directory written by :func:`save_pretrained`:

* ``model.safetensors``: the lowbit checkpoint itself (``lowbit.io.checkpoint``: every
  ``QuantLinear`` stores ``qweight`` / ``scale`` / ``zero`` / ``bias`` ..., the rest of the
  state dict is ordinary, tied tensors are stored once, the lowbit manifest is in the header).
  Its safetensors metadata says ``"format": "pt"``, which transformers 4.57 requires of every
  ``model.safetensors`` (``modeling_utils.load_state_dict``); ``lowbit.load`` reads it too;
* ``config.json``: the model's config plus ``quantization_config``:
  ``{"quant_method": "lowbit", "format_version": 2, "lowbit_version", "dtype",
  "layers": {name: {"scheme": QuantScheme.to_dict(), "in_features", "out_features", "bias",
  ["n_outliers"]}}}`` (the manifest's layer table, so the quantizer can build the skeleton
  before any tensor is read);
* ``generation_config.json`` and the tokenizer files when given.

Loading (``AutoModelForCausalLM.from_pretrained(directory)`` after ``import lowbit``), in the
order transformers 4.57 calls the quantizer (``modeling_utils.PreTrainedModel.from_pretrained``):

1. ``update_dtype``: no dtype given -> the dtype recorded at save time (what ``lowbit.load`` uses);
2. ``_process_model_before_weight_loading``: every listed linear becomes a ``QuantLinear`` on
   the meta device;
3. transformers loads ``model.safetensors`` into those buffers, casting floating tensors to the
   model dtype (``_infer_parameter_dtype`` uses ``config._pre_quantization_dtype``);
4. ``_process_model_after_weight_loading`` checks the file as ``lowbit.load`` does
   (``lowbit.io.checkpoint.verify_checkpoint``: manifest and tensor digests, tensor values; a
   directory written before digests existed is refused, see ``lowbit.load(..., verify=False)``),
   re-reads the floating ``QuantLinear`` tensors whose
   stored dtype differs from what step 3 left (e.g. fp32 scales in a bf16 model), so the layers
   hold exactly the saved values, and attaches the manifest as ``model.lowbit_manifest``.

The result has the same tensors as ``lowbit.load(directory / "model.safetensors")``, so the
same logits.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit.errors import CheckpointError, UnsupportedModelError
from lowbit.io import hf_common as hc
from lowbit.io.checkpoint import FORMAT_VERSION, READABLE_VERSIONS, read_manifest, save_checkpoint, verify_checkpoint
from lowbit.nn import QuantLinear
from lowbit.scheme import QuantScheme
from lowbit.version import __version__

QUANT_METHOD = "lowbit"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_pretrained(model: torch.nn.Module, directory, tokenizer=None) -> Path:
    """Write a lowbit-quantized transformers model as a directory that
    ``AutoModelForCausalLM.from_pretrained`` loads (after ``import lowbit``) and that
    ``lowbit.load(directory / "model.safetensors")`` loads too. Files are written into a
    temporary sibling directory and moved in one by one (never a half-written file)."""
    config = hc.model_config_dict(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lowbit-save.", dir=directory))
    try:
        weights = save_checkpoint(model, tmp / hc.WEIGHTS_NAME, metadata_format="pt")
        manifest = read_manifest(weights)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "lowbit_version": __version__,
            "dtype": _dtype_name(dtype),
            "layers": manifest["layers"],
        }
        (tmp / hc.CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        hc.move_files_into(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


class LowbitConfig(QuantizationConfigMixin):
    """``quantization_config`` of a lowbit directory (see the module doc for the fields)."""

    def __init__(
        self,
        layers: Optional[dict[str, Any]] = None,
        format_version: int = FORMAT_VERSION,
        lowbit_version: Optional[str] = None,
        dtype: Optional[str] = None,
        **kwargs,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.layers = dict(layers or {})
        self.format_version = format_version
        self.lowbit_version = lowbit_version
        self.dtype = dtype
        if format_version not in READABLE_VERSIONS or isinstance(format_version, bool):
            raise CheckpointError(
                f"lowbit quantization_config has format_version {format_version!r}; this lowbit "
                f"({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))} (upgrade lowbit)"
            )

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class LowbitHfQuantizer(HfQuantizer):
    """Loads directories written by :func:`save_pretrained` (pre-quantized only)."""

    requires_calibration = True  # lowbit quantizes offline; from_pretrained only loads
    required_packages: list[str] = []
    requires_parameters_quantization = False

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized:  # pragma: no cover - HfQuantizer.__init__ already refuses this
            raise UnsupportedModelError("the lowbit quantizer loads lowbit checkpoints; quantize with lowbit.quantize")

    def update_dtype(self, dtype):
        if dtype is None and self.quantization_config.dtype in _DTYPES:
            return _DTYPES[self.quantization_config.dtype]
        return dtype

    def _process_model_before_weight_loading(self, model, **kwargs):
        dtype = _DTYPES.get(self.quantization_config.dtype, torch.float32)
        layers = {}
        for name, layer in self.quantization_config.layers.items():
            layers[name] = QuantLinear(
                int(layer["in_features"]),
                int(layer["out_features"]),
                QuantScheme.from_dict(layer["scheme"]),
                bias=bool(layer["bias"]),
                dtype=dtype,
                device=torch.device("meta"),
                **({"n_outliers": int(layer["n_outliers"])} if layer.get("n_outliers") else {}),
            )
        hc.install_layers(model, layers, getattr(model.config, "name_or_path", "<model>"))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        path = _weights_file(model)
        if path is not None:
            manifest = verify_checkpoint(path)  # the checks lowbit.load makes (digests, values)
            _restore_exact_qparams(model, path)
            model.lowbit_manifest = manifest
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        # transformers' save_pretrained would drop the lowbit manifest; lowbit's writes it
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _weights_file(model) -> Optional[Path]:
    source = getattr(model.config, "name_or_path", None)
    if not source:
        return None
    local = Path(source) / hc.WEIGHTS_NAME
    if local.is_file():
        return local
    try:
        from transformers.utils import cached_file

        found = cached_file(source, hc.WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False)
    except Exception:
        return None
    return Path(found) if found else None


def _restore_exact_qparams(model, path: Path) -> None:
    """Replace floating QuantLinear tensors that transformers cast to the model dtype by the
    stored values (bias excluded: lowbit stores it in the model dtype too)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for name, mod in model.named_modules():
            if not isinstance(mod, QuantLinear):
                continue
            for attr in hc.QUANT_BUFFERS:
                if attr == "bias":
                    continue
                t = getattr(mod, attr, None)
                key = f"{name}.{attr}"
                if t is None or not t.is_floating_point() or key not in keys:
                    continue
                if f.get_slice(key).get_dtype() != _st_dtype(t.dtype):
                    setattr(mod, attr, f.get_tensor(key).to(t.device))


def _st_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}.get(dtype, "?")


def register() -> None:
    """Register :class:`LowbitConfig` and :class:`LowbitHfQuantizer` under "lowbit" (idempotent)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(LowbitConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)


# Importing this module means transformers' quantizer registry is loaded: register now (the
# import hook of lowbit.integrations defers to this line when this import triggered it).
register()
