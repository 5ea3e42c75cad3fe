"""Memory measurements: process RSS, file sizes, and the bytes a model holds."""

from __future__ import annotations

import os
import pathlib
import resource

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    From ``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux, bytes on macOS).
    It never decreases, so it measures the high-water mark since start. The
    kernel updates that mark lazily, so the result is at least
    ``current_rss_bytes()``.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if os.uname().sysname == "Darwin":  # pragma: no cover - not our platform
        return int(peak)
    return max(int(peak) * 1024, current_rss_bytes())


def current_rss_bytes() -> int:
    """Resident set size of this process now, in bytes (``/proc/self/statm`` field 2 * page size)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def file_size_bytes(path: str | pathlib.Path) -> int:
    """Size of a file on disk in bytes (``st_size``)."""
    return pathlib.Path(path).stat().st_size


def _tensor_bytes(t: torch.Tensor) -> int:
    try:
        return int(t.nbytes)
    except (AttributeError, RuntimeError, NotImplementedError):  # pragma: no cover
        return t.numel() * t.element_size()


def _tensor_key(t: torch.Tensor):
    # Tensors that share memory (tied embeddings) have the same data_ptr.
    # Meta and empty tensors have data_ptr 0 and are told apart by identity.
    try:
        ptr = t.data_ptr()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic subclasses
        ptr = 0
    if ptr == 0 or t.device.type == "meta":
        return ("id", id(t))
    return ("ptr", t.device.type, ptr, _tensor_bytes(t))


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a model's parameters and persistent buffers (its state dict).

    Each tensor counts ``numel * element_size``; tensors that share memory
    (tied weights, same ``data_ptr`` and size) count once. Non-persistent
    buffers (e.g. rotary ``inv_freq``) are not counted; nor are activations,
    caches or allocator overhead.
    """
    seen = set()
    total = 0
    tensors = list(model.parameters())
    for module in model.modules():
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for name, buf in module._buffers.items():
            if buf is not None and name not in non_persistent:
                tensors.append(buf)
    for t in tensors:
        key = _tensor_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += _tensor_bytes(t)
    return total
