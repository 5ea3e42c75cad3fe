"""Imports point downward only: every module of ``src/lowbit`` imports its own layer or lower ones.

A layer is a top-level module or package of ``lowbit`` (``lowbit.methods.gptq`` belongs to
``methods``); the package root's ``__init__`` and ``__main__`` are layers of their own. Every
import statement counts, wherever it stands (inside functions too, and under ``TYPE_CHECKING``),
relative imports resolved, and ``from lowbit import x`` read as the submodule ``x`` where there is
one, else as the package root.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"

# Lowest first. A module may import from its own layer and the layers before it, never after.
LAYERS = (
    "version",        # __version__, imports nothing
    "errors",         # the exception types
    "validation",     # range and option checks shared by the configuration dataclasses
    "scheme",         # the numeric vocabulary: formats, Granularity, QuantScheme, group sizes
    "codebooks",      # the nf4 / fp4 / dynamic value tables
    "formats",        # the numerics of each format (quantize, dequantize, qparams)
    "packing",        # bit layouts
    "tensor",         # QuantizedTensor: codes, qparams and their stored form
    "kernels",        # matmul kernels and their registry
    "nn",             # QuantLinear
    "calibration",    # calibration data and statistics
    "methods",        # how codes are chosen, each method beside its spec (GPTQ, AWQ, ...)
    "qat",            # end-to-end scale tuning and its spec (E2ETuning)
    "recipe",         # Rule, Recipe, the method registry and their JSON
    "model",          # loading, swapping layers, the calibration walker
    "io",             # checkpoints and exports
    "integrations",   # transformers' quantizer
    "eval",           # perplexity, speed, memory
    "api",            # quantize / save / load
    "lowbit",         # the package root (lowbit/__init__.py)
    "cli",            # the command line (calls the API through the package root)
    "__main__",       # python -m lowbit
)
RANK = {name: i for i, name in enumerate(LAYERS)}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    """The layer of a module that exists under src/lowbit (``lowbit`` for the package root)."""
    parts = module.split(".")
    assert parts[0] == "lowbit", module
    return parts[1] if len(parts) > 1 else "lowbit"


def _is_submodule(dotted: str) -> bool:
    path = SRC.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The lowbit modules (or ``lowbit`` for names of the package root) an import statement reads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "lowbit" or a.name.startswith("lowbit.")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target != "lowbit" and not target.startswith("lowbit."):
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if _is_submodule(sub) else target)
    return out


def _imports():
    """(file, line, importing module, imported module, statement) for every lowbit import."""
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source, filename=str(path))):
            for target in _imported(node, module, path.name == "__init__.py"):
                yield path, node.lineno, module, target, ast.get_source_segment(source, node)


def _own_layer(module: str, path: Path) -> str:
    return "__main__" if path.name == "__main__.py" and module == "lowbit.__main__" else _layer(module)


def test_every_module_has_a_layer():
    missing = sorted({_own_layer(_module_name(p), p) for p in SRC.rglob("*.py")} - set(RANK))
    assert not missing, f"modules of src/lowbit outside LAYERS: {missing}; place them in the order"


def test_imports_point_downward():
    upward = []
    for path, line, module, target, statement in _imports():
        here, there = _own_layer(module, path), _layer(target)
        if RANK[there] > RANK[here]:
            where = path.relative_to(SRC.parents[1])
            upward.append(f"{where}:{line}: {statement!r} ({here} imports {target}, layer {there} is above {here})")
    assert not upward, "imports that point upward:\n" + "\n".join(upward)


@pytest.mark.parametrize(
    "statement, module, is_package, expected",
    [
        ("from lowbit import formats, __version__", "lowbit.io.checkpoint", False, ["lowbit.formats", "lowbit"]),
        ("from . import digest", "lowbit.io.checkpoint", False, ["lowbit.io.digest"]),
        ("from ..scheme import QuantScheme", "lowbit.io.checkpoint", False, ["lowbit.scheme"]),
        ("from .config import E2ETuning", "lowbit.qat", True, ["lowbit.qat.config"]),
        ("import lowbit.methods.gptq as g", "lowbit.model.swap", False, ["lowbit.methods.gptq"]),
        ("import lowbit", "lowbit.cli.demo", False, ["lowbit"]),
        ("import torch", "lowbit.nn.quant_linear", False, []),
    ],
)
def test_imports_are_read_as_layers(statement, module, is_package, expected):
    assert _imported(ast.parse(statement).body[0], module, is_package) == expected


def test_an_upward_import_is_reported(tmp_path, monkeypatch):
    """The check itself: an import of a higher layer inside a function of a low module fails it."""
    pkg = tmp_path / "lowbit"
    for rel in ("__init__.py", "scheme.py", "recipe.py", "methods/__init__.py"):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text("")
    (pkg / "scheme.py").write_text("def f():\n    from lowbit.recipe import Recipe\n")
    monkeypatch.setitem(globals(), "SRC", pkg)
    with pytest.raises(AssertionError, match=r"lowbit/scheme\.py:2: 'from lowbit\.recipe import Recipe'"):
        test_imports_point_downward()


def test_the_vocabulary_and_the_command_line_import_without_torch():
    """The method specs import torch with their numerics; the vocabulary, recipes (their registry
    loads on first use) and the command line's modules do not."""
    code = (
        "import sys, lowbit, lowbit.cli, lowbit.recipe, lowbit.qat\n"
        "lowbit.Recipe, lowbit.Rule, lowbit.E2ETuning, lowbit.QuantScheme\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('lowbit'))\n"
        "assert lowbit.GPTQ is __import__('lowbit.methods.gptq', fromlist=['GPTQ']).GPTQ\n"
        "assert tuple(lowbit.recipe.method_specs()) == lowbit.recipe.METHODS\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC.parent)})
    assert done.returncode == 0, done.stderr[-3000:]
