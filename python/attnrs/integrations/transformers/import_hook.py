"""Running a function right after a module executes, without importing that module: a ``sys.meta_path`` finder.

:func:`install` puts one :class:`PostImportFinder` first on ``sys.meta_path``. Asked for one of its target
modules, it lets the other finders find it (so the spec is exactly the one Python would use otherwise) and
wraps the spec's loader in :class:`_ThenCall`, which executes the module with the original loader and then
calls the target's function with the module. For every other name it answers None at once.

Why this shape:

* **Nothing is imported early.** Users who never import the target pay one dict lookup per import.
* **It composes with lazy modules.** transformers' ``_LazyModule`` imports submodules through
  ``importlib.import_module``, which asks ``sys.meta_path``: the hook runs however the module is reached.
* **No trace is left.** Once the module has executed, its ``__loader__`` and ``__spec__.loader`` are the
  original loader again, so ``inspect``, ``importlib.resources``, pickling (by qualified name, through
  ``sys.modules``) and debuggers see the module exactly as without attnrs.
* **importlib.reload** finds the spec again through ``sys.meta_path``, so the function runs again after the
  module re-executes (transformers' registries are rebuilt then, so attnrs's entries must be put back).
* **Thread-safe and idempotent.** Python's per-module import lock serialises executions of one module; a
  thread-local flag keeps the finder from recursing into itself; :func:`install` replaces a previous hook
  (found by a marker attribute, which survives a reload of this module) rather than adding a second one.
* The function runs only when the module executed successfully; what it raises is its own business (the
  caller passes a function that never raises into the import).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

__all__ = ["PostImportFinder", "install", "installed", "uninstall"]

AfterImport = Callable[[ModuleType], None]

# The attribute that marks attnrs's finder on sys.meta_path, whatever copy of this module created it.
_MARKER = "_attnrs_post_import_hook"


class _ThenCall(importlib.abc.Loader):
    """A loader that executes the module with ``loader`` and then calls ``after(module)``; every other
    attribute (``get_source``, ``get_resource_reader``, ``is_package``, ...) is the original loader's."""

    def __init__(self, loader: Any, after: AfterImport) -> None:
        self._loader = loader
        self._after = after

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._loader
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self._loader
        self._after(module)

    def __getattr__(self, name: str) -> Any:
        if name in ("_loader", "_after"):  # not set yet (e.g. copy.copy builds the object without __init__)
            raise AttributeError(name)
        return getattr(self._loader, name)


class PostImportFinder:
    """The ``sys.meta_path`` entry: calls ``targets[name](module)`` after the module ``name`` executes."""

    def __init__(self, targets: Mapping[str, AfterImport]) -> None:
        self._targets = dict(targets)
        self._finding = threading.local()
        setattr(self, _MARKER, True)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self._targets)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        after = self._targets.get(fullname)
        if after is None or getattr(self._finding, "active", False):
            return None
        self._finding.active = True
        try:
            spec = _find_elsewhere(fullname, path, target)
        finally:
            self._finding.active = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ThenCall(spec.loader, after)
        return spec

    def __repr__(self) -> str:
        return f"attnrs.PostImportFinder({list(self._targets)})"


def _find_elsewhere(
    fullname: str, path: Sequence[str] | None, target: ModuleType | None
) -> importlib.machinery.ModuleSpec | None:
    """What the rest of ``sys.meta_path`` finds for ``fullname`` (as ``importlib._bootstrap._find_spec``)."""
    for finder in list(sys.meta_path):
        if getattr(finder, _MARKER, False):
            continue
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        spec: importlib.machinery.ModuleSpec | None = find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def install(targets: Mapping[str, AfterImport]) -> PostImportFinder:
    """Puts a finder for ``targets`` first on ``sys.meta_path``, replacing one a previous call installed."""
    uninstall()
    finder = PostImportFinder(targets)
    sys.meta_path.insert(0, finder)
    return finder


def uninstall() -> None:
    """Removes attnrs's finder from ``sys.meta_path`` (nothing happens when there is none)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, _MARKER, False)]


def installed() -> bool:
    """Whether attnrs's finder is on ``sys.meta_path``."""
    return any(getattr(f, _MARKER, False) for f in sys.meta_path)
