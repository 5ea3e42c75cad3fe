"""The ``lowbit`` command line: turns arguments into a ``Recipe`` and calls the API.

    lowbit demo                                   # quantize SmolLM2-135M two ways, one table
    lowbit quantize default -o smollm2-w4.safetensors --bits 4 --group-size 64
    lowbit inspect smollm2-w4.safetensors
    lowbit eval smollm2-w4.safetensors --windows 8 --window-len 2048 --speed
    lowbit generate smollm2-w4.safetensors --prompt "What is 2+2?" --chat

No numerics live here: every number comes from ``lowbit.api``,
``lowbit.eval`` or the checkpoint manifest. A failure is one line on stderr,
never a traceback (``lowbit --debug ...`` adds it): ``error: <message>`` with
exit status 2 for errors lowbit raises on purpose (``LowbitError``) and for
checkpoint files it cannot parse (a digest mismatch also names ``--no-verify``);
``error: <path>: <reason>`` with status 1 for
operating-system errors (a missing or read-only directory, a full disk);
``internal error: ...`` with status 1 for anything else; ``interrupted`` with
status 130 for Ctrl-C. Text from files (notes, names) is printed with
unprintable characters escaped.

Layout: one module per command (``quantize``, ``eval``, ``export``, ``generate``,
``inspect``, ``demo``), each with ``add_parser(subparsers)`` registering its
subcommand and flags and ``run(args) -> int`` carrying it out; shared helpers in
``common`` (printing, tables, busy bar, common options), ``sources`` (loading
sources, tokenizers, checkpoints) and ``recipe_args`` (scheme flags -> Recipe).
This module assembles the parser and turns failures into one line and an exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Optional, Sequence

from lowbit.cli import demo, export, generate, inspect, quantize
from lowbit.cli import eval as evaluate
from lowbit.cli.common import DEBUG_HELP, HelpFormatter, echo_error, kernel_choices
from lowbit.cli.demo import DEMO_SCHEMES
from lowbit.cli.export import EXPORT_FORMATS
from lowbit.cli.recipe_args import RECIPE_FLAGS, recipe_from_args
from lowbit.cli.sources import manifest_summary
from lowbit.errors import IntegrityError, LowbitError

__all__ = [
    "DEMO_SCHEMES",
    "EXPORT_FORMATS",
    "RECIPE_FLAGS",
    "build_parser",
    "kernel_choices",
    "main",
    "manifest_summary",
    "recipe_from_args",
]

# the subcommands, in the order `lowbit --help` lists them
COMMANDS = (export, quantize, evaluate, generate, inspect, demo)


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__

    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantize LLMs to low bit widths, save self-describing checkpoints, evaluate and run them on CPU.",
        epilog="Run `lowbit demo` first; `lowbit COMMAND --help` explains each command.",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    check_argv = getattr(args, "check_argv", None)  # a command's checks that need the raw argv
    problem = check_argv(args, argv) if check_argv is not None else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    for opt in ("windows", "window_len", "max_new_tokens", "threads"):
        if getattr(args, opt, 1) is not None and getattr(args, opt, 1) < 1:
            print(f"error: --{opt.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    threads_before = None
    try:
        if args.threads is not None:
            import torch

            threads_before = torch.get_num_threads()
            torch.set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except LowbitError as e:
        return _fail(args, f"error: {e}{_cli_hint(args, e)}", 2)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    except BrokenPipeError:  # `lowbit inspect ... | head`: stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except MemoryError:
        return _fail(args, "error: out of memory (try a smaller model, --stream, or --calib-batch-size 1)", 1)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(args, f"error: {where}{e.strerror or e}", 1)
    except UnicodeError as e:
        return _fail(args, f"error: {e} (is the input a UTF-8 text file?)", 2)
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        return _fail(args, f"internal error: {type(e).__name__}: {e}; rerun with --debug for the traceback", 1)
    finally:
        if threads_before is not None:  # main() may run in-process (tests): leave torch as it was
            import torch

            torch.set_num_threads(threads_before)


def _cli_hint(args: argparse.Namespace, e: LowbitError) -> str:
    """How to get past ``e`` on the command line, where the message names only the Python API."""
    if isinstance(e, IntegrityError) and hasattr(args, "no_verify") and not args.no_verify:
        return f"; on the command line, `lowbit {args.command} --no-verify ...` skips the digest check for a file you trust"
    return ""


def _fail(args: argparse.Namespace, line: str, code: int) -> int:
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exc()
    echo_error(line)
    return code
