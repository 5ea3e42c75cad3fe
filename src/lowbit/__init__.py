"""lowbit: quantize neural networks, save self-describing checkpoints, run them fast.

    import lowbit
    model, tok = lowbit.load_pretrained("default")          # SmolLM2-135M-Instruct
    report = lowbit.quantize(model, lowbit.Recipe.uniform(lowbit.QuantScheme(bits=4, group_size=64)))
    lowbit.save(model, "smollm2-w4.lowbit.safetensors")
    model = lowbit.load("smollm2-w4.lowbit.safetensors")
"""

__version__ = "0.1.0"

from lowbit.errors import (  # noqa: E402
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
from lowbit.scheme import AWQ, GPTQ, HQQ, RTN, E2ETuning, Granularity, LLMInt8, QuantScheme, Recipe, Rule, SignRound, SmoothQuant  # noqa: E402


# `AutoModelForCausalLM.from_pretrained` of lowbit directories: registers the "lowbit" quantizer
# when transformers loads its quantizer registry (never imports transformers here).
from lowbit.integrations import register_transformers_on_import as _register_transformers  # noqa: E402

_register_transformers()

_API = ("quantize", "quantize_from_disk", "save", "load", "load_pretrained", "use_kernel", "QuantLinear", "read_manifest")


def __getattr__(name):
    # The API pulls in torch/transformers; import it lazily so that
    # `import lowbit` for the scheme vocabulary stays cheap.
    if name in _API:
        from lowbit import api

        return getattr(api, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
