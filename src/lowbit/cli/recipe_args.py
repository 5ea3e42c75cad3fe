"""The scheme flags of ``lowbit quantize`` and the ``Recipe`` they describe (or ``--recipe FILE``,
which replaces them all)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from lowbit.errors import SchemeError
from lowbit.qat.config import E2ETuning
from lowbit.recipe import DEFAULT_SKIP_PATTERN, INDIVISIBLE_POLICIES, METHODS, Recipe, Rule
from lowbit.scheme import FORMATS, INT_BITS, SCALE_DTYPES, Granularity, QuantScheme

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


def add_scheme_arguments(p: argparse.ArgumentParser) -> None:
    """--bits ... --w8a8, --recipe and --method (tuning flags: ``add_tuning_arguments``)."""
    p.add_argument("--bits", type=int, choices=INT_BITS, default=4, help="integer bits per weight")
    p.add_argument("--granularity", choices=[g.value for g in Granularity], default="group",
                   help="which weights share one scale: the whole tensor, an output channel (row), or a group of input columns")
    p.add_argument("--group-size", type=int, default=128, metavar="N",
                   help="input columns per scale group (granularity 'group' only)")
    p.add_argument("--asym", action="store_true",
                   help="affine quantization with a per-group integer zero point (default: symmetric, no zero point)")
    p.add_argument("--scale-dtype", choices=SCALE_DTYPES, default="float32", help="dtype the scales are stored in")
    p.add_argument("--skip", action="append", metavar="PATTERN",
                   help="regex (re.fullmatch on the module name, e.g. 'model\\.layers\\.0\\..*') of layers to keep in "
                        f"full precision; repeatable; added to the output-head pattern {DEFAULT_SKIP_PATTERN!r}, "
                        "which is always kept (use --recipe to quantize the head)")
    p.add_argument("--indivisible-groups", choices=INDIVISIBLE_POLICIES, default="error",
                   help="when --group-size does not divide a layer's in_features: 'error' stops and names the layer; "
                        "'shrink' uses the largest power-of-two divisor below it and records a note")
    p.add_argument("--recipe", metavar="FILE.json",
                   help="a Recipe JSON (Recipe.to_json()) with ordered rules; cannot be combined with the scheme flags "
                        + ", ".join(RECIPE_FLAGS))
    p.add_argument("--method", default="rtn", metavar="METHOD",
                   help=f"how codes are chosen: one of {', '.join(METHODS)}, or transforms joined with a rounding "
                        "by '+', e.g. awq+gptq, smoothquant+rtn (default: rtn, round to nearest)")
    p.add_argument("--float-zero", action="store_true",
                   help="with --asym: store a real-valued zero point per group (HQQ, Q4_1-style) instead of an integer")
    p.add_argument("--format", choices=FORMATS, default="int",
                   help="numeric format: integers (--bits), nf4 / fp4 codebooks in blocks of 64, fp8_e4m3 / "
                        "fp8_e5m2 with per-channel scales, or ternary (-1, 0, +1) with an absmean scale "
                        "(bits and granularity default to the format's own)")
    p.add_argument("--double-quant", action="store_true",
                   help="nf4 / fp4: store the block absmax as 8-bit codes (QLoRA double quantization)")
    p.add_argument("--fp8-activations", action="store_true",
                   help="fp8 formats: round activations to fp8 e4m3 per token at run time")
    p.add_argument("--w8a8", action="store_true",
                   help="also quantize activations to int8 per token at run time (needs --bits 8 --granularity channel)")


def add_tuning_arguments(group) -> None:
    """--tune-steps and --tune-lr (end-to-end scale tuning, part of the recipe)."""
    group.add_argument("--tune-steps", type=int, default=0, metavar="N",
                       help="after rounding, tune every layer's scales end to end for N steps by distillation from the "
                            "full-precision model on the calibration windows (E2ETuning; keeps both models in memory; "
                            "0: off)")
    group.add_argument("--tune-lr", type=float, default=E2ETuning().lr, metavar="LR",
                       help=f"step size of the scale tuning (on each scale's log; default {E2ETuning().lr:g})")


def explicit_flags(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """Which of ``flags`` the command line names (before any ``--``), in order, each once."""
    given = []
    for tok in argv:
        if tok == "--":
            break
        opt = tok.split("=", 1)[0]
        if opt in flags and opt not in given:
            given.append(opt)
    return given


def check_recipe_flags(args: argparse.Namespace, argv: Sequence[str]) -> Optional[str]:
    """Record the recipe flags given explicitly (``args._explicit``); the usage error when they
    are combined with --recipe, else None."""
    args._explicit = explicit_flags(argv, RECIPE_FLAGS)
    if args.recipe is not None:
        clash = [f for f in args._explicit if f != "--recipe"]
        if clash:
            return f"--recipe cannot be combined with {', '.join(clash)}; put the scheme in the recipe file"
    return None


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
