"""Shared guard of the tests of lowbit's compiled kernels: a kernel that the CPU could run
must be built and usable (a missing build fails, never skips); on a CPU without the
instructions it needs, its tests skip."""

from __future__ import annotations

from pathlib import Path

import pytest


def cpu_has(flags) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    have = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return all(f in have for f in flags)


def require_kernel(name: str, available, flags) -> None:
    """Skip when the CPU lacks ``flags``; fail when it has them but ``available()`` says no."""
    ok, why = available()
    if not ok:
        if not cpu_has(flags):
            pytest.skip(f"CPU cannot run {name}: {why}")
        pytest.fail(f"{name} is not usable on a CPU that supports it: {why}")
