"""Registers the "sta" attention implementation with transformers, without making ``import sta_cache`` slow.

Registering needs ``transformers.modeling_utils`` (with torch, ~5 s to import), which every model load imports
anyway. So ``import sta_cache`` registers "sta" at once if that module is already loaded, and otherwise right after
it is first imported, whichever way it is reached (``AutoModelForCausalLM``, a model class, ...). A model can only
ask for ``attn_implementation="sta"`` after that import, so it always finds it; ``sta-cache --help`` and other
light uses of the package never pay for torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading

TRIGGER = "transformers.modeling_utils"
_lock = threading.Lock()


def register() -> None:
    """Import :mod:`sta_cache.attention`, whose import registers "sta" (idempotent)."""
    importlib.import_module("sta_cache.attention")


class _RegisterAfterLoading(importlib.abc.Loader):
    """Wraps the loader of :data:`TRIGGER`: runs it, then registers; everything else is the wrapped loader's."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        register()

    def __getattr__(self, name: str):  # get_source, get_code, ...: tracebacks and inspect keep working
        return getattr(self.loader, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """A one-shot finder: hands back :data:`TRIGGER`'s usual spec with its loader wrapped, then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER:
            return None
        with _lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoading(spec.loader)
        return spec


def register_when_transformers_loads() -> None:
    """Register now if transformers' modelling code is loaded, else right after it is."""
    if TRIGGER in sys.modules:
        register()
        return
    with _lock:
        if not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterOnImport())
