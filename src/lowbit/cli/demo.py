"""``lowbit demo``: quantize the default model two ways and compare both with fp32 in one table."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from lowbit.cli.common import (
    SPEED_PROMPT_LEN,
    add_command,
    add_eval_data_arguments,
    add_kernel_argument,
    check_writable,
    echo,
    fp_label,
    kernel_context,
    kernels_used,
    measure_speed,
    scheme_label,
    table,
    torch_threads,
)
from lowbit.cli.sources import eval_windows, load_checkpoint, load_source, manifest_summary
from lowbit.recipe import Recipe
from lowbit.scheme import QuantScheme

# The demo's two quantized rows. Neither is W4 g32 asymmetric, whose numbers
# would flatter lowbit on the default model (its linears came from a 4-bit,
# 32-wide grid; see README "About the default model's baseline").
DEMO_SCHEMES = (
    QuantScheme(bits=4, symmetric=True, granularity="group", group_size=64),
    QuantScheme(bits=8, symmetric=True, granularity="channel"),
)


def add_parser(subparsers) -> None:
    d = add_command(
        subparsers, "demo", "quantize the default model two ways and compare with fp32 in one table",
        "Load the default model once, quantize copies (W4 group 64 symmetric, W8 per channel symmetric),\n"
        "save each checkpoint, reload it with lowbit.load, and print scheme, bits/weight, checkpoint MB,\n"
        "perplexity, KL and top-1 agreement vs fp32, and decode tokens/s, plus the fp32 row.",
        run,
    )
    d.add_argument("--source", default="default", metavar="SOURCE",
                   help="model source: 'default', a .gguf file or an HF directory")
    add_eval_data_arguments(d, windows=4, window_len=512, data_default="WikiText-2 raw test from shared/data")
    d.add_argument("--decode-tokens", type=int, default=32, metavar="N",
                   help="greedy tokens per decode-speed run (0: skip the speed column)")
    add_kernel_argument(d)
    d.add_argument("--out-dir", metavar="DIR", default=None,
                   help="keep the checkpoints in DIR (default: a temporary directory, deleted afterwards)")
    d.add_argument("--json", metavar="OUT", default=None, help="also write the rows as JSON to OUT")


def run(args: argparse.Namespace) -> int:
    import copy
    import tempfile

    import lowbit
    from lowbit.eval.compare import compare_models
    from lowbit.eval.memory import file_size_bytes, model_bytes
    from lowbit.io.checkpoint import read_manifest

    progress = not args.no_progress
    if args.json:
        check_writable(args.json)
    t_start = time.perf_counter()
    fp_model, tokenizer = load_source(args.source, progress)
    windows, data_label = eval_windows(tokenizer, args.data, args.window_len, args.windows)

    def decode_speed(model):
        if args.decode_tokens <= 0:
            return None
        return measure_speed(model, progress, args.decode_tokens)["decode"]["tokens_per_s"]

    rows: list[dict[str, Any]] = []
    with kernel_context(args.kernel):
        fp_row = {
            "scheme": fp_label(fp_model),
            "bits_per_weight": 32.0 if fp_label(fp_model) == "float32" else None,
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
                q = load_checkpoint(str(path), progress)
                cmp = compare_models(fp_model, q, windows, progress=progress)
                fp_row["ppl"] = cmp.reference_ppl
                rows.append(
                    {
                        "scheme": scheme_label(summary["scheme_counts"]),
                        "bits_per_weight": summary["avg_bits_per_weight"],
                        "checkpoint_mb": size / 1e6,
                        "kernel": kernels_used(q),
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
    echo("")
    echo(f"lowbit demo: {getattr(fp_model.config, 'lowbit_source', args.source)}")
    if args.source == "default":
        echo("  (the fp32 baseline is the GGUF's Q4_1 weights dequantized: already a 4-bit, "
             "32-wide grid, so 4-bit g32 results would flatter; the rows below use other settings)")
    echo(f"data: {data_label}, {n} windows x {args.window_len} tokens ({n * (args.window_len - 1)} predicted "
         "tokens), ppl = exp(mean NLL); KL and top-1 vs the fp32 model on the same tokens")
    if args.decode_tokens > 0:
        echo(f"decode: batch 1, {SPEED_PROMPT_LEN}-token random prompt + {args.decode_tokens} greedy tokens "
             f"with the KV cache, median of 3; kernel {args.kernel}; {torch_threads()} torch threads")
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
    echo(table(
        ("scheme", "bits/weight", "checkpoint MB", "ppl", "KL (nats)", "top-1", "decode tok/s", "kernel"),
        table_rows,
        (False, True, True, True, True, True, True, False),
    ))
    echo("bits/weight: quantized linears, scales included (lm_head and embeddings stay fp32); "
         "(fp32 MB) is the in-memory state dict, no file written")
    echo(f"total time: {elapsed:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": getattr(fp_model.config, "lowbit_source", args.source), "data": data_label,
             "window": args.window_len, "n_windows": n, "kernel": args.kernel, "rows": rows}, indent=2))
        echo(f"wrote {args.json}")
    return 0
