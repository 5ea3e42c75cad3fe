"""Loading what the commands name: full-precision model sources, tokenizers, lowbit checkpoints and
their manifests (a damaged file is a ``CheckpointError`` naming it), and the evaluation windows.

Every loader here is a thin wrapper over ``lowbit`` / ``lowbit.model.loading`` / ``lowbit.io`` that
adds a busy bar or a friendlier error; heavy imports happen inside the functions.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from lowbit.cli.common import busy
from lowbit.errors import CheckpointError, LowbitError, ModelSourceError, UnsupportedModelError
from lowbit.scheme import QuantScheme


def is_checkpoint(path: str) -> bool:
    """A lowbit checkpoint is a file that is not a .gguf (model sources are 'default', .gguf or a directory)."""
    p = Path(path).expanduser()
    return path != "default" and p.suffix.lower() != ".gguf" and not p.is_dir()


def load_source(source: str, progress: bool, causal_lm: bool = True):
    """(model, tokenizer) of a full-precision source, with a progress bar; ``causal_lm=False``
    also loads other architectures (an encoder) as themselves."""
    import lowbit

    with busy(f"loading {source}", progress):
        return lowbit.load_pretrained(source, causal_lm=causal_lm)


def load_tokenizer(source: str):
    """Only the tokenizer of a model source ('default', a .gguf file or an HF directory)."""
    from transformers import AutoTokenizer

    from lowbit.model.loading import default_model_path

    try:
        if source == "default" or source.lower().endswith(".gguf"):
            p = default_model_path() if source == "default" else Path(source).expanduser()
            if not p.is_file():
                raise ModelSourceError(f"tokenizer source {source!r}: {p} does not exist")
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        p = Path(source).expanduser()
        if not p.is_dir():
            raise ModelSourceError(
                f"tokenizer source {source!r} does not exist; pass 'default', a .gguf file or a "
                "Hugging Face model directory"
            )
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(f"could not load a tokenizer from {source!r} ({type(exc).__name__}: {exc})") from exc


# what parsing a damaged file raises besides lowbit's own errors (deep JSON nesting, huge numbers...)
_PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError)


@contextlib.contextmanager
def reading_checkpoint(path: str):
    """A parse failure inside a checkpoint file is a CheckpointError naming the file."""
    try:
        yield
    except LowbitError:
        raise
    except _PARSE_ERRORS as e:
        raise CheckpointError(f"{path} is not a readable lowbit checkpoint ({type(e).__name__}: {e})") from e


def read_checkpoint_manifest(path: str, verify: bool = True) -> dict:
    """The validated manifest of checkpoint ``path`` (header only, no tensor data); ``verify``:
    check it against its digest (``--no-verify`` turns that off)."""
    from lowbit.io.checkpoint import read_manifest

    with reading_checkpoint(path):
        return read_manifest(path, verify=verify)


def load_checkpoint(path: str, progress: bool, verify: bool = True):
    import lowbit

    with busy(f"loading {Path(path).name}", progress), reading_checkpoint(path):
        return lowbit.load(path, verify=verify)


def model_manifest(args, command: Optional[str] = None) -> Optional[dict]:
    """The validated manifest when ``args.model`` is a lowbit checkpoint, None for a model source;
    with ``command``, the checkpoint must hold a causal LM (checked before anything is loaded)."""
    if not is_checkpoint(args.model):
        return None
    manifest = read_checkpoint_manifest(args.model, verify=not args.no_verify)
    if command is not None:
        require_causal_lm(manifest, args.model, command)
    return manifest


def load_model(args, manifest: Optional[dict]):
    """(model, tokenizer) of ``args.model``: a checkpoint (``manifest`` from ``model_manifest``;
    the tokenizer is None) or a full-precision source (its own tokenizer)."""
    progress = not args.no_progress
    if manifest is not None:
        return load_checkpoint(args.model, progress, verify=not args.no_verify), None
    return load_source(args.model, progress)


def require_causal_lm(manifest: dict, path: str, command: str) -> None:
    """UnsupportedModelError unless the checkpoint holds a causal LM (before anything is loaded)."""
    from lowbit.model.loading import causal_lm_classes

    arch = (manifest.get("model") or {}).get("architecture")
    if arch is not None and arch not in causal_lm_classes():
        raise UnsupportedModelError(
            f"{path} holds a quantized {arch}, not a causal language model, which `lowbit {command}` needs "
            "(an architecture AutoModelForCausalLM loads, e.g. LlamaForCausalLM)"
        )


def recorded_source(manifest: dict) -> Optional[str]:
    """The model source a checkpoint was quantized from, when it can be known
    (``config.lowbit_source`` written by ``load_pretrained``); else None."""
    from lowbit.model.loading import DEFAULT_MODEL_NAME

    desc = ((manifest.get("model") or {}).get("config") or {}).get("lowbit_source")
    if not isinstance(desc, str):
        return None
    if desc.startswith(DEFAULT_MODEL_NAME + " ("):
        return "default"
    prefix = "Hugging Face directory "
    if desc.startswith(prefix) and Path(desc[len(prefix):]).is_dir():
        return desc[len(prefix):]
    return None


def manifest_summary(manifest: dict, file_size: Optional[int] = None) -> dict:
    """Per-layer rows and totals of a checkpoint manifest (no tensor data read)."""
    from lowbit.io.checkpoint import _ST_ITEMSIZE

    layers = []
    quant_tensor_names = set()
    q_bytes = 0
    q_weights = 0
    for name, layer in manifest["layers"].items():
        scheme = QuantScheme.from_dict(layer["scheme"])
        n, k = int(layer["out_features"]), int(layer["in_features"])
        nbytes = scheme.storage_bytes(n, k)
        layers.append(
            {
                "name": name,
                "scheme": scheme.short_name,
                "bits_per_weight": scheme.bits_per_weight(n, k),
                "bytes": nbytes,
                "shape": [n, k],
            }
        )
        quant_tensor_names.update(f"{name}.{t}" for t in ("qweight", "scale", "zero"))
        q_bytes += nbytes
        q_weights += n * k
    fp_bytes = 0
    for tname, info in manifest["tensors"].items():
        if tname in quant_tensor_names:
            continue
        numel = 1
        for d in info["shape"]:
            numel *= int(d)
        fp_bytes += numel * _ST_ITEMSIZE[info["dtype"]]
    counts: dict[str, int] = {}
    for r in layers:
        counts[r["scheme"]] = counts.get(r["scheme"], 0) + 1
    return {
        "layers": layers,
        "scheme_counts": counts,
        "quantized_bytes": q_bytes,
        "full_precision_bytes": fp_bytes,
        "file_size": file_size,
        "avg_bits_per_weight": (8 * q_bytes / q_weights) if q_weights else 0.0,
        "quantized_weights": q_weights,
    }


def eval_windows(tokenizer, data: Optional[str], window_len: int, windows: int):
    """(token windows [n, L], data label) by the protocol of lowbit.eval.data / perplexity."""
    from lowbit.eval.data import WIKITEXT2_TEST_NAME, load_wikitext2_test_text, tokenize_once
    from lowbit.eval.perplexity import make_windows

    text = load_wikitext2_test_text(data)
    label = WIKITEXT2_TEST_NAME if data is None else f"{data} (joined as WikiText-2)"
    ids = tokenize_once(tokenizer, text)
    return make_windows(ids, window_len, windows), label
