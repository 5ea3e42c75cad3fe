"""``lowbit export``: a lowbit checkpoint (or, for GGUF, a full-precision source) in another engine's format."""

from __future__ import annotations

import argparse
from pathlib import Path

from lowbit.cli.common import add_command, add_model_argument, busy, check_writable, echo
from lowbit.cli.sources import load_model, load_tokenizer, model_manifest, recorded_source
from lowbit.errors import ModelSourceError

EXPORT_FORMATS = ("gguf", "gptq", "awq", "compressed-tensors", "hf")


def add_parser(subparsers) -> None:
    x = add_command(
        subparsers, "export",
        "write a lowbit checkpoint in another engine's format (GGUF, GPTQ, AWQ, compressed-tensors, HF)",
        "Exports keep lowbit's codes where the target format holds them exactly (GPTQ, AWQ and "
        "compressed-tensors always do, or refuse naming the layer; GGUF copies them where a block "
        "type fits and re-encodes otherwise). --to hf writes a directory that "
        "AutoModelForCausalLM.from_pretrained loads after `import lowbit`.",
        run,
    )
    add_model_argument(x, "a lowbit checkpoint; for --to gguf also a full-precision source ('default', .gguf, HF directory)")
    x.add_argument("--to", required=True, choices=EXPORT_FORMATS, help="target format")
    x.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="a .gguf file for gguf, a directory otherwise (written atomically)")
    x.add_argument("--gguf-type", default="Q4_K_M", metavar="TYPE",
                   help="llama.cpp file type for --to gguf: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K, Q4_K_M, F16, BF16, F32")
    x.add_argument("--tokenizer", metavar="SOURCE", default=None,
                   help="where the tokenizer comes from (default: the source the checkpoint was quantized from)")
    x.add_argument("--allow-scale-rounding", action="store_true",
                   help="gptq / awq: allow fp32 scales that fp16 cannot hold exactly to be rounded")


def run(args: argparse.Namespace) -> int:
    """A lowbit checkpoint (or a full-precision source, for GGUF) in another engine's format."""
    progress = not args.no_progress
    check_writable(args.output)
    manifest = model_manifest(args)
    if manifest is None and args.to != "gguf":
        raise ModelSourceError(
            f"--to {args.to} writes quantized layers as they are; pass a lowbit checkpoint "
            "(lowbit quantize ... -o FILE) rather than a full-precision source"
        )
    model, _ = load_model(args, manifest)
    tok_source = args.tokenizer or (args.model if manifest is None else recorded_source(manifest))
    tokenizer = load_tokenizer(tok_source) if tok_source else None
    out = Path(args.output).expanduser()
    with busy(f"writing {out.name}", progress):
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
    echo(f"wrote {out} ({args.to}{' ' + args.gguf_type if args.to == 'gguf' else ''})")
    return 0
