"""Integrations with other libraries, registered without importing them.

:func:`register_transformers_on_import` makes ``AutoModelForCausalLM.from_pretrained`` understand
``quant_method: "lowbit"`` directories (see :mod:`lowbit.integrations.transformers`). It never
imports transformers itself: if transformers' quantizer registry
(``transformers.quantizers.auto``) is already imported, the quantizer is registered at once;
otherwise a one-shot import hook registers it right after that module is first executed. Both
paths are idempotent, and when transformers is not installed nothing happens.
"""

from __future__ import annotations

import sys

_AUTO = "transformers.quantizers.auto"
_MODULE = "lowbit.integrations.transformers"


def register_transformers() -> None:
    """Register lowbit's quantizer with transformers now (imports transformers)."""
    partial = sys.modules.get(_MODULE)
    if partial is not None and not hasattr(partial, "register"):
        # lowbit.integrations.transformers is being imported and its own import of
        # transformers.quantizers got us here; that module registers when it finishes
        return
    from lowbit.integrations.transformers import register

    register()


class _RegisterAfterLoad:
    """Wraps the real loader of ``transformers.quantizers.auto`` and registers after it ran."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            register_transformers()
        except Exception as e:  # never break transformers' own import
            import warnings

            warnings.warn(f"lowbit could not register its transformers quantizer: {e!r}", stacklevel=2)

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


class _TransformersHook:
    """A meta path finder (duck-typed: importing importlib.abc would cost ~9 ms)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO:
            return None
        _remove_hook()
        spec = _find_with(path, fullname, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def _find_with(path, fullname, target):
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        spec = find(fullname, path, target)
        if spec is not None:
            return spec
    return None


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TransformersHook)]


def register_transformers_on_import() -> None:
    """Register with transformers now if its quantizer registry is loaded, else when it loads."""
    if _AUTO in sys.modules:
        register_transformers()
        return
    if any(isinstance(f, _TransformersHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TransformersHook())
