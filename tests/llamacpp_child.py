"""Run llama.cpp (through llama-cpp-python) in a child process, never in pytest's own.

llama.cpp is foreign native code: an illegal instruction or a segfault in it must
become one failed test that names the signal and the command, not the end of the
test session. The parent side (``run``) starts ``python tests/llamacpp_child.py JOB
ARGS...``, waits with a time limit, and turns a signal, a non-zero exit or a
time-out into ``pytest.fail``. The child side (``main``) imports only llama_cpp and
numpy and does one job:

* ``quantize SRC DST FTYPE_ID``: llama.cpp's own quantizer (``llama_model_quantize``);
* ``logits GGUF IDS OUT``: the logits of every position of the comma-separated
  token ids, saved as a float32 ``.npy``.

``cpu_mismatch()`` compares the running CPU with the instruction sets the
installed build was made for (``$venv/llama_cpp_build.json``, written by
``scripts/setup_interop.sh``), so a build made for another machine fails with
the command that rebuilds it instead of dying on an illegal instruction.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

CHILD = Path(__file__).resolve()
BUILD_RECORD = Path(sys.prefix) / "llama_cpp_build.json"


def installed() -> bool:
    """Whether llama-cpp-python is importable (checked without loading its native library)."""
    return importlib.util.find_spec("llama_cpp") is not None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> Optional[set[str]]:
    """The running CPU's feature flags, or None where /proc/cpuinfo is not readable."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def cpu_mismatch(record: Path = BUILD_RECORD, flags: Optional[set[str]] = None) -> Optional[str]:
    """Why the installed llama.cpp build cannot run on this CPU, or None when it can (or is unknown)."""
    if not record.is_file():
        return None
    build = json.loads(record.read_text())
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    missing = sorted(set(build["required_cpu_flags"].split()) - flags)
    if not missing:
        return None
    return (
        f"llama.cpp in this venv was built for the {build['isa']} level, and this CPU lacks {', '.join(missing)}; "
        "rebuild it for this CPU: LOWBIT_LLAMACPP_ISA=avx2 bash scripts/setup_interop.sh"
    )


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def run(job: str, *args: str, timeout: float = 300) -> str:
    """Run one job in a child process; ``pytest.fail`` (one message) if it does not succeed."""
    import pytest

    why = cpu_mismatch()
    if why is not None:
        pytest.fail(why)
    cmd = [sys.executable, str(CHILD), job, *map(str, args)]
    shown = " ".join(cmd)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"llama.cpp did not finish within {timeout:.0f} s: {shown}")
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        pytest.fail(f"llama.cpp child {describe_exit(done.returncode)}: {shown}\n{tail}", pytrace=False)
    return done.stdout


# ---------------------------------------------------------------------------
# child side
# ---------------------------------------------------------------------------
def _quantize(src: str, dst: str, ftype: str) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")


def _logits(path: str, ids_csv: str, out: str) -> None:
    import llama_cpp
    import numpy as np

    ids = [int(t) for t in ids_csv.split(",")]
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)), logits_all=True,
                          verbose=False, n_threads=2)
    try:
        llm.reset()
        llm.eval(ids)
        np.save(out, np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()


def _selftest_signal(signum: str) -> None:
    """Die of a signal, as a native crash would (tests the parent's reporting)."""
    import os

    os.kill(os.getpid(), int(signum))


JOBS = {"quantize": _quantize, "logits": _logits, "selftest-signal": _selftest_signal}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in JOBS:
        raise SystemExit(f"usage: {Path(__file__).name} {{{'|'.join(JOBS)}}} ARGS...")
    JOBS[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
