"""Shared guard of the tests of lowbit's compiled kernels: a kernel that the CPU could run
must be built and usable (a missing build fails, never skips); on a CPU without the
instructions it needs, its tests skip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


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


def assert_missing_library_falls_back(monkeypatch, module, name: str, layer, x) -> None:
    """With ``module``'s library gone: the kernel reports why, ``auto`` picks the reference
    kernel for ``layer`` (same output), and asking for the kernel by ``name`` raises."""
    from lowbit.errors import KernelError
    from lowbit.kernels.registry import use_kernel

    monkeypatch.setattr(module, "_library", lambda: (None, "the compiled kernels are missing"))
    assert module.available() == (False, "the compiled kernels are missing")
    assert layer.kernel_name == "reference"
    with use_kernel("reference"):
        ref = layer(x)
    assert torch.equal(layer(x), ref)
    with pytest.raises(KernelError, match="missing"):
        with use_kernel(name):
            layer(x)
