"""lowbit's compiled kernel library (``_lut_cpu``: ``csrc/lut_linear.c``, ``csrc/fp8_linear.c``
and their thread pool ``csrc/pool.c``), found and loaded once with ctypes.

Each kernel module (``cpu_lut``, ``cpu_fp8``) declares the signatures of its own functions
and checks the CPU features it needs; this module only finds the file, loads it and checks
that it was built from these sources (``ABI``). See ``setup.py`` for why the kernels are
plain C loaded with ctypes.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path
from typing import Optional

LIB_STEM = "_lut_cpu"
ABI = 4  # lowbit_lut_abi_version() in csrc/lut_linear.c; raise both when a signature changes


@functools.lru_cache(maxsize=1)
def load() -> tuple[Optional[ctypes.CDLL], str]:
    """(library, "") or (None, why it cannot be used)."""
    here = Path(__file__).resolve().parent
    paths = [here / (LIB_STEM + s) for s in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return None, (
            f"lowbit's compiled kernels ({LIB_STEM}*.so in {here}) are missing; "
            "rebuild them with `pip install -e .` (needs a C compiler)"
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"cannot load {path}: {e}; rebuild it with `pip install -e .`"
    lib.lowbit_lut_abi_version.restype = ctypes.c_int
    if lib.lowbit_lut_abi_version() != ABI:
        return None, f"{path} is from another lowbit version; rebuild it with `pip install -e .`"
    return lib, ""


def bind(functions: dict, cpu_check: str, cpu_missing: str) -> tuple[Optional[ctypes.CDLL], str]:
    """The library with ``functions`` (``{name: (restype, argtypes)}``) declared, if this CPU
    passes ``cpu_check`` (a function of the library returning nonzero when it can run the
    kernel); else ``(None, why)``, ``cpu_missing`` being the why for a CPU that cannot."""
    lib, why = load()
    if lib is None:
        return None, why
    for name, (restype, argtypes) in functions.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    check = getattr(lib, cpu_check)
    check.restype = ctypes.c_int
    if not check():
        return None, cpu_missing
    return lib, ""
