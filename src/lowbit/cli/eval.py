"""``lowbit eval``: perplexity, KL divergence and top-1 agreement against the full-precision
reference, and optionally speed, of a checkpoint or a model source."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from lowbit.cli.common import (
    SPEED_PREFILL_LEN,
    SPEED_PROMPT_LEN,
    add_command,
    add_eval_data_arguments,
    add_kernel_argument,
    add_model_argument,
    check_writable,
    echo,
    fp_label,
    kernel_context,
    kernels_used,
    mb,
    measure_speed,
    scheme_label,
    table,
    torch_threads,
)
from lowbit.cli.sources import (
    eval_windows,
    load_model,
    load_source,
    load_tokenizer,
    manifest_summary,
    model_manifest,
    recorded_source,
)
from lowbit.errors import UnsupportedModelError


def add_parser(subparsers) -> None:
    e = add_command(
        subparsers, "eval", "perplexity, KL divergence and top-1 agreement (and speed) of a model",
        "Evaluate MODEL by lowbit's perplexity protocol (text joined as in the GPTQ reference,\n"
        "tokenized once without special tokens, non-overlapping windows, ppl = exp(mean NLL)).\n"
        "A checkpoint is compared with its full-precision reference on the same tokens:\n"
        "KL(P_ref || P_model) in nats and top-1 agreement.",
        run,
    )
    add_model_argument(e)
    e.add_argument("--reference", metavar="SOURCE", default=None,
                   help="full-precision model to compare with ('none': no comparison). Default: for a checkpoint, "
                        "the source it was quantized from if recorded, else 'default'; for a source, none")
    e.add_argument("--tokenizer", metavar="SOURCE", default=None,
                   help="tokenizer source. Default: the reference's tokenizer, else the model's own, else 'default'")
    add_eval_data_arguments(e, windows=8, window_len=2048,
                            data_default="WikiText-2 raw test from shared/data, checksum-verified (see $LOWBIT_DATA_DIR)")
    add_kernel_argument(e)
    e.add_argument("--speed", action="store_true",
                   help=f"also measure prefill ({SPEED_PREFILL_LEN} tokens) and decode tokens/s at batch 1")
    e.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON to OUT")


def _model_label(manifest: Optional[dict], path_or_source: str) -> str:
    if manifest is None:
        from lowbit.model.loading import describe_source

        return describe_source(path_or_source)
    cfg = (manifest.get("model") or {}).get("config") or {}
    src = cfg.get("lowbit_source")
    return f"{Path(path_or_source).name}" + (f" (quantized from {src})" if src else "")


def _resolve_reference(args, manifest: Optional[dict]) -> tuple[Optional[str], Optional[str]]:
    """(reference source or None, a note about how it was chosen)."""
    if args.reference is not None:
        return (None, None) if args.reference.lower() == "none" else (args.reference, None)
    if manifest is None:
        return None, None  # a full-precision source is its own reference
    src = recorded_source(manifest)
    if src is not None:
        return src, None
    return "default", "the checkpoint does not record a loadable source; comparing against 'default'"


def _check_same_vocab(reference, candidate, ref_name: str) -> None:
    rv = getattr(getattr(reference, "config", None), "vocab_size", None)
    cv = getattr(getattr(candidate, "config", None), "vocab_size", None)
    if rv is not None and cv is not None and rv != cv:
        raise UnsupportedModelError(
            f"the reference {ref_name!r} has vocabulary size {rv} but the model has {cv}, so they "
            "cannot be compared; pass --reference with the model it was quantized from, or --reference none"
        )


def run(args: argparse.Namespace) -> int:
    from lowbit.eval.compare import compare_models
    from lowbit.eval.perplexity import perplexity

    progress = not args.no_progress
    from lowbit.kernels.registry import use_kernel  # noqa: F401  (fail early on a broken install)

    if args.json:
        check_writable(args.json)
    manifest = model_manifest(args, "eval")
    ref_source, ref_note = _resolve_reference(args, manifest)
    reference = tokenizer = None
    if ref_source is not None:
        reference, tokenizer = load_source(ref_source, progress)
    model, own_tok = load_model(args, manifest)
    if manifest is not None:
        summary = manifest_summary(manifest)
        scheme = scheme_label(summary["scheme_counts"]) + f" ({summary['avg_bits_per_weight']:.2f} bits/weight)"
    else:
        tokenizer = own_tok
        scheme = fp_label(model)
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
    elif tokenizer is None:
        tokenizer = load_tokenizer(recorded_source(manifest) or "default")
    windows, data_label = eval_windows(tokenizer, args.data, args.window_len, args.windows)
    label = _model_label(manifest, args.model)
    result: dict[str, Any] = {
        "model": label,
        "scheme": scheme,
        "data": data_label,
        "window": args.window_len,
        "n_windows": int(windows.shape[0]),
        "kernel": args.kernel,
    }
    with kernel_context(args.kernel):
        result["kernels_used"] = kernels_used(model)
        if reference is not None:
            _check_same_vocab(reference, model, ref_source)
            cmp = compare_models(reference, model, windows, progress=progress)
            result["reference"] = ref_source
            result["comparison"] = cmp.to_dict()
        else:
            result["perplexity"] = perplexity(model, windows, progress=progress).to_dict()
        if args.speed:
            result.update(measure_speed(model, progress, prefill=True))

    n_tok = result["n_windows"] * (args.window_len - 1)
    echo(f"model:  {label}")
    echo(f"scheme: {scheme}; kernel {args.kernel} (runs: {result['kernels_used']})")
    echo(f"data:   {data_label}, {result['n_windows']} windows x {args.window_len} tokens "
         f"({n_tok} predicted tokens), ppl = exp(mean NLL)")
    if ref_note:
        echo(f"note:   {ref_note}")
    headers = ["model", "scheme", "ppl"]
    rows = []
    if "comparison" in result:
        c = result["comparison"]
        headers += ["KL (nats)", "top-1 agree"]
        ref_label = ref_source if ref_source != "default" else "default (fp32)"
        rows.append([f"reference: {ref_label}", fp_label(reference), f"{c['reference_ppl']:.3f}", "0", "100.00%"])
        rows.append([Path(args.model).name, scheme, f"{c['candidate_ppl']:.3f}", f"{c['mean_kl']:.5f}", f"{100 * c['top1_agreement']:.2f}%"])
    else:
        p = result["perplexity"]
        rows.append([Path(args.model).name if manifest else args.model, scheme, f"{p['ppl']:.3f}"])
    if args.speed:
        headers += ["prefill tok/s", "decode tok/s"]
        for r in rows[:-1]:
            r += ["", ""]
        rows[-1] += [f"{result['prefill']['tokens_per_s']:.1f}", f"{result['decode']['tokens_per_s']:.1f}"]
    echo(table(headers, rows, [False, False] + [True] * (len(headers) - 2)))
    from lowbit.eval.memory import file_size_bytes, model_bytes, peak_rss_bytes

    result["memory"] = {
        "model_bytes": model_bytes(model),
        "checkpoint_bytes": file_size_bytes(args.model) if manifest is not None else None,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    mem = result["memory"]
    ckpt = f"checkpoint {mb(mem['checkpoint_bytes'])} MB; " if mem["checkpoint_bytes"] is not None else ""
    echo(f"memory: {ckpt}model tensors {mb(mem['model_bytes'])} MB; peak RSS of this process "
         f"{mb(mem['peak_rss_bytes'])} MB (it also held the reference model, if any)")
    if args.speed:
        echo(f"speed: batch 1; prefill {SPEED_PREFILL_LEN} random tokens; decode {SPEED_PROMPT_LEN}-token random "
             f"prompt + 32 greedy steps with the KV cache (median of 3); {torch_threads()} torch threads")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        echo(f"wrote {args.json}")
    return 0
