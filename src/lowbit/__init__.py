"""lowbit: quantize neural networks, save self-describing checkpoints, run them fast.

    import lowbit
    model, tok = lowbit.load_pretrained("default")          # SmolLM2-135M-Instruct
    report = lowbit.quantize(model, lowbit.Recipe.uniform(lowbit.QuantScheme(bits=4, group_size=64)))
    lowbit.save(model, "smollm2-w4.lowbit.safetensors")
    model = lowbit.load("smollm2-w4.lowbit.safetensors")
"""

from lowbit.errors import (
    CalibrationError,
    CheckpointError,
    DataError,
    FormatError,
    KernelError,
    LowbitError,
    ManifestError,
    ModelSourceError,
    PackingError,
    SchemeError,
    TensorMismatchError,
    TruncatedCheckpointError,
    UnsupportedModelError,
)
from lowbit.qat.config import E2ETuning  # noqa: E402
from lowbit.recipe import Recipe, Rule  # noqa: E402
from lowbit.scheme import Granularity, QuantScheme  # noqa: E402
from lowbit.version import __version__  # noqa: E402


# `AutoModelForCausalLM.from_pretrained` of lowbit directories: registers the "lowbit" quantizer
# when transformers loads its quantizer registry (never imports transformers here).
from lowbit.integrations import register_transformers_on_import as _register_transformers  # noqa: E402

_register_transformers()

_API = ("quantize", "quantize_from_disk", "save", "load", "load_pretrained", "use_kernel", "QuantLinear", "read_manifest")
# the method specs live beside their numerics (lowbit.methods), which import torch
_METHOD_SPECS = ("RTN", "GPTQ", "AWQ", "HQQ", "SignRound", "SmoothQuant", "LLMInt8")


def __getattr__(name):
    # The API pulls in torch/transformers, the method specs torch; import them lazily so that
    # `import lowbit` for the scheme vocabulary stays cheap.
    if name in _API:
        from lowbit import api

        return getattr(api, name)
    if name in _METHOD_SPECS:
        from lowbit.recipe import method_specs

        spec = next(cls for cls in method_specs().values() if cls.__name__ == name)
        globals()[name] = spec
        return spec
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_METHOD_SPECS))
