"""What every command shares: printing (escaped, one line for errors), plain-text tables, the busy
bar, the common options every subcommand takes, the options several commands share (MODEL and
``--no-verify``, the evaluation windows, ``--kernel``), and small presentation helpers.

Presentation only: no numerics (``measure_speed`` calls ``lowbit.eval.speed``), nothing read from
files (``lowbit.cli.sources`` loads things).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from lowbit.scheme import QuantScheme

DEBUG_HELP = "on failure, print the full traceback as well as the one-line error"

KERNEL_HELP = ("matmul kernel for quantized layers ('auto': the fastest that supports each layer; "
               "'reference': dequantize + F.linear; a named kernel that cannot run a layer is an error)")

NO_VERIFY_HELP = ("skip the SHA-256 digest check, for files you trust, or files written before lowbit "
                  "stored digests (the other checks of the file still run)")

MODEL_HELP = "a lowbit checkpoint, or a source: 'default', a .gguf file, an HF directory"

SPEED_PREFILL_LEN = 128
SPEED_PROMPT_LEN = 64


# ---------------------------------------------------------------------------
# subcommand parsers
# ---------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows '(default: X)' except where there is nothing to show (None / off flags);
    those options say their default in words."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _common_options() -> argparse.ArgumentParser:
    """The options every subcommand takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    common.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (torch.set_num_threads); default: torch's choice. "
                             "On a machine busy with other work, fewer threads than cores is often much faster")
    return common


def add_command(subparsers, name: str, help_: str, description: str,
                run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """Register subcommand ``name`` (with the common options); ``run(args)`` carries it out."""
    p = subparsers.add_parser(name, help=help_, description=description, formatter_class=HelpFormatter,
                              parents=[_common_options()], allow_abbrev=False)
    p.set_defaults(func=run)
    return p


def kernel_choices() -> list[str]:
    """'auto' plus every kernel in lowbit.kernels.registry (imports torch)."""
    from lowbit.kernels.registry import kernel_names

    return ["auto", *kernel_names()]


def add_kernel_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", choices=kernel_choices(), default="auto",
                   help=KERNEL_HELP)


def add_no_verify_argument(p: argparse.ArgumentParser) -> None:
    """``--no-verify`` (``args.no_verify``) for commands that read a lowbit checkpoint."""
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)


def add_model_argument(p: argparse.ArgumentParser, help_: str = MODEL_HELP) -> None:
    """The MODEL positional (``args.model``): a lowbit checkpoint or a full-precision source; with
    ``--no-verify`` for the checkpoint (lowbit.cli.sources.model_manifest / load_model read both)."""
    p.add_argument("model", metavar="MODEL", help=help_)
    add_no_verify_argument(p)


def add_eval_data_arguments(p: argparse.ArgumentParser, windows: int, window_len: int, data_default: str) -> None:
    """--windows, --window-len and --data: the evaluation windows (lowbit.cli.sources.eval_windows)."""
    p.add_argument("--windows", type=int, default=windows, metavar="N", help="evaluate the first N windows")
    p.add_argument("--window-len", type=int, default=window_len, metavar="L", help="tokens per window")
    p.add_argument("--data", metavar="PATH", default=None,
                   help=f"a raw text file (joined like WikiText-2). Default: {data_default}")


# ---------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------
def printable(text: str, stream) -> str:
    """``text`` as ``stream`` can show it: control characters (terminal escapes from a file's notes),
    lone surrogates and what the stream cannot encode become backslash escapes."""
    if not text.replace("\n", "").isprintable():
        text = "".join(c if c.isprintable() or c == "\n" else c.encode("unicode_escape").decode() for c in text)
    enc = getattr(stream, "encoding", None) or "utf-8"
    return text.encode(enc, "backslashreplace").decode(enc)


def echo(*parts: Any) -> None:
    print(printable(" ".join(str(p) for p in parts), sys.stdout), flush=True)


def echo_error(line: str) -> None:
    """One line on stderr, whatever the message holds."""
    print(printable(" ".join(line.splitlines()), sys.stderr), file=sys.stderr, flush=True)


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """Plain-text table; ``right[i]`` right-aligns column i (numbers)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    right = right or [False] * len(headers)

    def fmt(r):
        return "  ".join(c.rjust(w) if ra else c.ljust(w) for c, w, ra in zip(r, widths, right)).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def skipped_lines(skipped: Sequence[tuple[str, str]], hint: str, show: int = 2) -> list[str]:
    """'name: reason' per skipped module; modules that share a reason (every norm, every layer of
    one skip rule) on one line with a count and the first few names."""
    groups: dict[str, list[str]] = {}
    for name, reason in skipped:
        groups.setdefault(reason, []).append(name)
    lines = []
    for reason, names in groups.items():
        if len(names) == 1:
            lines.append(f"  {names[0]}: {reason}")
        else:
            shown = ", ".join(names[:show]) + (", ..." if len(names) > show else "")
            lines.append(f"  {len(names)} modules ({shown}): {reason}")
    if len(groups) < len(skipped):
        lines.append(f"  ({hint} lists every module)")
    return lines


def scheme_label(counts: dict[str, int]) -> str:
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def rule_text(rule: dict) -> str:
    if rule["scheme"] is None:
        return f"{rule['pattern']!r} -> keep full precision"
    return f"{rule['pattern']!r} -> {QuantScheme.from_dict(rule['scheme']).short_name}"


@contextlib.contextmanager
def busy(desc: str, enabled: bool = True):
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


# ---------------------------------------------------------------------------
# small helpers around the model being run
# ---------------------------------------------------------------------------
def check_writable(path: str) -> None:
    """Fail before the work, not after it: the directory ``path`` goes into must exist and be writable."""
    parent = Path(path).expanduser().absolute().parent
    if not parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "directory does not exist (create it first)", str(parent))
    if not os.access(parent, os.W_OK):
        raise PermissionError(errno.EACCES, "directory is not writable", str(parent))


def fp_label(model) -> str:
    for p in model.parameters():
        return str(p.dtype).replace("torch.", "")
    return "full precision"


def kernels_used(model) -> str:
    """The kernels that will run the model's QuantLinear layers (per lowbit.kernels.registry.resolve)."""
    from lowbit.kernels.registry import resolve
    from lowbit.nn import QuantLinear

    names = sorted({resolve(m, m.kernel).name for m in model.modules() if isinstance(m, QuantLinear)})
    return "+".join(names) if names else "-"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def measure_speed(model, progress: bool, decode_tokens: int = 32, prefill: bool = False) -> dict[str, dict]:
    """Batch-1 speed by lowbit.eval.speed under a busy bar: ``{"prefill": ..., "decode": ...}``
    (``to_dict()`` of each; prefill of SPEED_PREFILL_LEN tokens only with ``prefill``; decode:
    ``decode_tokens`` greedy tokens after a SPEED_PROMPT_LEN-token prompt, median of 3)."""
    from lowbit.eval.speed import measure_decode, measure_prefill

    out = {}
    with busy("measuring speed" if prefill else "measuring decode speed", progress):
        if prefill:
            out["prefill"] = measure_prefill(model, batch=1, seqlen=SPEED_PREFILL_LEN).to_dict()
        out["decode"] = measure_decode(model, batch=1, prompt_len=SPEED_PROMPT_LEN, new_tokens=decode_tokens,
                                       repeats=3).to_dict()
    return out


def kernel_context(name: Optional[str]):
    if not name:
        return contextlib.nullcontext()
    from lowbit.kernels.registry import use_kernel

    return use_kernel(name)
