"""What the loader fuzzers share (tests/checkpoint_fuzz.py, tests/gguf_fuzz.py): running one case in a
forked child under a wall-clock limit and an address-space limit (``RLIMIT_AS``), classifying what
happened, running many cases, and counting the outcomes into a Markdown table.

Outcomes:

    typed-error          a ``lowbit.errors.LowbitError`` (the file was refused)
    identical            loaded, and the logits equal the reference exactly
    silently-different   loaded, and the logits differ (or are not finite)
    non-typed-exception  any other exception (or the child died)
    hang                 no answer within the time limit (the child is killed)
    memory-blow-up       an allocation failed under the limit, the peak RSS grew past it, or the
                         child was SIGKILLed (the kernel's OOM killer)
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence

OUTCOMES = ("typed-error", "identical", "silently-different", "non-typed-exception", "hang", "memory-blow-up")
ACCEPTABLE = ("typed-error", "identical")


@dataclass
class Result:
    """What running one case gave; harnesses subclass it to describe their cases (and may judge
    ``failed`` differently)."""

    case: Any
    outcome: str
    detail: str
    seconds: float
    peak_rss_growth: Optional[int] = None  # bytes; None where /proc cannot tell
    one_line: bool = True  # a typed error's message is one line

    @property
    def failed(self) -> bool:
        return self.outcome not in ACCEPTABLE


# ---------------------------------------------------------------------------
# one case in a forked child
# ---------------------------------------------------------------------------
def _vm_kib(field_name: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _is_alloc_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "not enough memory" in text


def classify(run: Callable[[], Any], ref) -> dict:
    """Call ``run()`` (load the mutated file, return its logits on the fixed ids) and name the
    outcome against the reference logits ``ref``."""
    import torch

    from lowbit.errors import LowbitError

    try:
        with torch.no_grad():
            out = run()
        same = torch.equal(out, ref)
        return {"outcome": "identical" if same else "silently-different", "detail": ""}
    except LowbitError as exc:
        return {"outcome": "typed-error", "detail": f"{type(exc).__name__}: {exc}", "one_line": "\n" not in str(exc)}
    except BaseException as exc:  # noqa: BLE001 - the point is to see everything
        outcome = "memory-blow-up" if _is_alloc_failure(exc) else "non-typed-exception"
        return {"outcome": outcome, "detail": f"{type(exc).__name__}: {exc}"}


def _child(run: Callable[[], Any], ref, wfd: int, mem_bytes: int) -> None:
    code = 0
    try:
        import torch

        torch.set_num_threads(1)
        vm = _vm_kib("VmSize")
        if vm is not None:
            limit = vm * 1024 + mem_bytes
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        peak_ok = _reset_peak_rss()
        rss0 = _vm_kib("VmRSS") or 0
        res = classify(run, ref)
        hwm = _vm_kib("VmHWM")
        res["peak_rss_growth"] = (hwm - rss0) * 1024 if (peak_ok and hwm is not None) else None
        if res["peak_rss_growth"] is not None and res["peak_rss_growth"] > mem_bytes:
            res["outcome"] = "memory-blow-up"
        res["detail"] = res["detail"].replace("\n", " ")[:600]
        os.write(wfd, json.dumps(res).encode())
    except BaseException:  # noqa: BLE001
        code = 3
    finally:
        os._exit(code)


def run_in_child(case, run: Callable[[], Any], ref, time_limit: float, mem_bytes: int,
                 result: type[Result] = Result) -> Result:
    """``classify(run, ref)`` in a forked child that may take ``time_limit`` seconds and add
    ``mem_bytes`` of address space; the outcome as a ``result`` of ``case``."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        _child(run, ref, w, mem_bytes)
    os.close(w)
    chunks, deadline, timed_out = [], t0 + time_limit, False
    try:
        while True:
            left = deadline - time.perf_counter()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                timed_out = True
                break
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - t0
    if timed_out:
        return result(case, "hang", f"no answer within {time_limit:g} s", seconds)
    if not chunks:
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit code {os.WEXITSTATUS(status)}"
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL  # the kernel's OOM killer
        outcome = "memory-blow-up" if killed else "non-typed-exception"
        return result(case, outcome, f"the child died ({how}) without an answer", seconds)
    res = json.loads(b"".join(chunks))
    return result(case, res["outcome"], res["detail"], seconds, res.get("peak_rss_growth"), res.get("one_line", True))


def run_all(cases: Iterable, run_case: Callable[[Any, Path], Result], workdir: Optional[Path] = None,
            on_result: Optional[Callable[[Result], None]] = None) -> list[Result]:
    """``run_case(case, workdir)`` for every case, in order (``workdir``: a temporary directory
    when None); ``on_result`` sees each result as it comes."""
    import torch

    torch.set_num_threads(1)  # forked children must not inherit a running OpenMP pool
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    workdir = Path(tmp.name) if tmp is not None else workdir
    results = []
    try:
        for case in cases:
            res = run_case(case, workdir)
            results.append(res)
            if on_result is not None:
                on_result(res)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
def counts(results: Iterable[Result], key: Callable[[Result], Hashable]) -> dict[Hashable, Counter]:
    """``key(result)`` -> outcome -> number of cases."""
    out: dict[Hashable, Counter] = defaultdict(Counter)
    for r in results:
        out[key(r)][r.outcome] += 1
    return out


def markdown_table(label_headers: Sequence[str], rows: Iterable[tuple[Sequence[str], Counter]]) -> str:
    """One row per (label cells, outcome counts): the labels, the number of cases, one column per
    outcome; then the total row."""

    def numbers(c: Counter) -> str:
        return " | ".join([str(sum(c.values())), *(str(c[o]) for o in OUTCOMES)]) + " |"

    lines = ["| " + " | ".join([*label_headers, "cases", *OUTCOMES]) + " |",
             "|" + "---|" * (len(label_headers) + 1 + len(OUTCOMES))]
    total: Counter = Counter()
    for labels, c in rows:
        lines.append("| " + " | ".join(labels) + " | " + numbers(c))
        total.update(c)
    lines.append("| **total** |" + " |" * (len(label_headers) - 1) + " " + numbers(total))
    return "\n".join(lines)
