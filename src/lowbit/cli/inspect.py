"""``lowbit inspect``: what a checkpoint holds, from its header alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbit.cli.common import add_command, add_no_verify_argument, echo, mb, rule_text, skipped_lines, table
from lowbit.cli.sources import manifest_summary, read_checkpoint_manifest


def add_parser(subparsers) -> None:
    i = add_command(
        subparsers, "inspect", "show what a checkpoint holds (reads only its header)",
        "Print a checkpoint's manifest: lowbit version, model, recipe rules in order, every quantized\n"
        "layer (scheme, bits/weight with scales, bytes, shape), every skipped module and why (modules that\n"
        "share a reason on one line; --json lists each), notes, totals.\n"
        "Reads and validates the header only, no tensor data.",
        run,
    )
    i.add_argument("checkpoint", metavar="CHECKPOINT", help="a lowbit .safetensors checkpoint")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON instead")
    add_no_verify_argument(i)


def run(args: argparse.Namespace) -> int:
    manifest = read_checkpoint_manifest(args.checkpoint, verify=not args.no_verify)
    if args.json:
        echo(json.dumps(manifest, indent=2))
        return 0
    size = Path(args.checkpoint).stat().st_size
    s = manifest_summary(manifest, size)
    model = manifest.get("model") or {}
    arch = model.get("architecture") or model.get("class") or "?"
    cfg = model.get("config") or {}
    echo(f"checkpoint:     {args.checkpoint}")
    echo(f"lowbit version: {manifest.get('lowbit_version')} (format_version {manifest.get('format_version')})")
    echo(f"model:          {arch}" + (f" ({cfg['model_type']})" if cfg.get("model_type") else ""))
    if cfg.get("lowbit_source"):
        echo(f"source:         {cfg['lowbit_source']}")
    recipe = manifest.get("recipe")
    if recipe is None:
        echo("recipe:         (not recorded)")
    else:
        echo(f"recipe:         method {recipe.get('method')}, indivisible_groups={recipe.get('indivisible_groups')!r}")
        for i, rule in enumerate(recipe["rules"]):
            echo(f"  rule {i}: {rule_text(rule)}")
        if recipe.get("tune"):
            t, result = recipe["tune"], manifest.get("tuning") or {}
            outcome = ("" if not result else f"; held-out KL {result['heldout_kl_before']:.4f} -> "
                       f"{result['heldout_kl_after']:.4f}, {'kept' if result['kept'] else 'not kept'}")
            echo(f"  tuned:  e2e scales, {t['steps']} steps, lr {t['lr']:g}{', norms too' if t['norms'] else ''}{outcome}")
    echo("")
    echo(f"quantized layers ({len(s['layers'])}):")
    rows = [
        (r["name"], r["scheme"], f"{r['bits_per_weight']:.3f}", r["bytes"], f"{r['shape'][0]}x{r['shape'][1]}")
        for r in s["layers"]
    ]
    echo(table(("layer", "scheme", "bits/weight", "bytes", "shape [out x in]"), rows, (False, False, True, True, True)))
    skipped = manifest.get("skipped") or []
    echo("")
    echo(f"skipped ({len(skipped)}):")
    for line in skipped_lines([(sk["name"], sk["reason"]) for sk in skipped], "`lowbit inspect --json`"):
        echo(line)
    notes = manifest.get("notes") or []
    if notes:
        echo(f"notes ({len(notes)}):")
        for n in notes:
            echo(f"  {n}")
    if manifest.get("aliases"):
        echo(f"tied tensors stored once: {manifest['aliases']}")
    echo("")
    echo(f"quantized bytes:      {s['quantized_bytes']} ({mb(s['quantized_bytes'])} MB)")
    echo(f"full-precision bytes: {s['full_precision_bytes']} ({mb(s['full_precision_bytes'])} MB)")
    echo(f"file size:            {size} ({mb(size)} MB)")
    echo(f"average bits/weight over quantized layers (scales and zero points included): {s['avg_bits_per_weight']:.3f}")
    return 0
