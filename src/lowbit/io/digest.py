"""Content digests of checkpoint parts: ``"sha256:<64 hex digits>"``.

SHA-256 because it is in every Python (``hashlib``), it is the digest the rest of the
ecosystem already prints (Hugging Face LFS pointers, OCI), and with the SHA extensions of
current x86 and ARM CPUs it is about as fast as the memory copy that loading needs anyway
(``benchmarks/fuzz_checkpoint.py --digest-cost`` measures it). It is an integrity check,
not a signature: whoever can write the file can write matching digests.

A tensor's digest covers its bytes exactly as safetensors stores them (row-major,
little-endian), so it can be computed from the tensor in memory when saving and when loading;
:func:`tensor_digests` spreads a whole state dict over a few threads.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor

import torch

ALGORITHM = "sha256"
_FORMAT = re.compile(r"sha256:[0-9a-f]{64}")


def is_digest(value: object) -> bool:
    """Whether ``value`` is a digest string of the form this module writes."""
    return isinstance(value, str) and _FORMAT.fullmatch(value) is not None


def bytes_digest(data: bytes) -> str:
    return f"{ALGORITHM}:{hashlib.sha256(data).hexdigest()}"


def tensor_digest(t: torch.Tensor) -> str:
    """The digest of a CPU tensor's bytes (row-major, the machine's byte order: little-endian
    on every platform lowbit runs on, which is safetensors' order)."""
    flat = t.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8)
    # hashlib reads the buffer in place (no copy) and releases the GIL while it hashes
    return f"{ALGORITHM}:{hashlib.sha256(raw.numpy()).hexdigest()}"


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``tensor_digest`` of every tensor, hashed on a few threads (hashlib releases the GIL
    while it hashes, so the cores share the work)."""
    workers = min(4, os.cpu_count() or 1, max(len(tensors), 1))
    if workers == 1:
        return {k: tensor_digest(t) for k, t in tensors.items()}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(tensors, pool.map(tensor_digest, tensors.values())))
