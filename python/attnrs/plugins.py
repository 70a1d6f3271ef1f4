"""The table of native attention kernels: registered from a capsule, or discovered as installed plugins.

A native kernel is a table of C function pointers (``AttnKernelV1`` of the ``attnrs-abi`` crate) in a capsule
named ``"attnrs.kernel.v1"``. :func:`register_native` checks the capsule and the table (ABI version, struct size,
null pointers) and stores the kernel in attnrs's Rust kernel table, then adds an attention function of the
transformers signature under the same name to :class:`~attnrs.AttentionInterface`. After that:

* ``attnrs.attention(q, k, v, mask, backend=name)`` runs it (the GIL is released, masks reach it as tile
  callbacks implemented in Rust, no Python runs per block);
* with transformers imported, it is an ``attn_implementation`` of that name (with attnrs's mask builder).

Plugins are installed packages that declare an entry point in the ``attnrs.kernels`` group, whose object is a
capsule or a function returning one; the entry point's name is the kernel's name::

    [project.entry-points."attnrs.kernels"]
    example = "attnrs_example_kernel:kernel_capsule"

They are loaded lazily, the first time a name attnrs does not know is looked up (an unknown ``backend=``, an
:class:`~attnrs.AttentionInterface` miss), or explicitly with :func:`load_plugins`. A plugin that fails to load is
logged as a warning and recorded in :func:`plugin_errors`; it never breaks ``import attnrs`` or other plugins.
``ATTNRS_DISABLE_PLUGINS=1`` turns discovery off.

This module imports nothing above the compiled module: the attention function of each new kernel is added by
a subscriber (:func:`on_register`; :mod:`attnrs.registrations` subscribes when ``attnrs`` is imported), because
that function is built on :func:`attnrs.attention`, which itself looks kernels up here.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from . import _attnrs
from .errors import ArgumentError

__all__ = [
    "BUILTIN_KERNEL",
    "CAPABILITY_KEYS",
    "ENTRY_POINT_GROUP",
    "is_native",
    "load_once",
    "load_plugins",
    "native_kernels",
    "on_register",
    "plugin_errors",
    "register_native",
]

ENTRY_POINT_GROUP = "attnrs.kernels"

logger = logging.getLogger("attnrs")

# The name of the Rust kernel in the native kernel table (``backend="attnrs"``).
BUILTIN_KERNEL = "attnrs"
# Names attnrs.attention reads as backends of its own, and the built-in kernel: a plugin cannot take them.
_RESERVED = ("auto", "native", "sdpa", "flex", "flash", "math", "eager", BUILTIN_KERNEL)
# What a kernel's native_info says it supports, in the form of registry capabilities.
CAPABILITY_KEYS = ("devices", "dtypes", "mask_kinds", "backward", "lse")

_lock = threading.RLock()
_loaded = False
_errors: dict[str, str] = {}
_subscribers: list[Callable[[str, dict[str, Any]], None]] = []


def on_register(subscriber: Callable[[str, dict[str, Any]], None]) -> None:
    """Calls ``subscriber(name, native_info(name))`` for every kernel :func:`register_native` adds from now on
    (still under the table's lock, before ``register_native`` returns)."""
    _subscribers.append(subscriber)


def register_native(name: str, capsule: Any) -> None:
    """Registers the native kernel in ``capsule`` under ``name`` (replacing a native kernel of that name).

    Raises ``TypeError`` when ``capsule`` is not a capsule, and :class:`~attnrs.ArgumentError` when its name is
    not ``"attnrs.kernel.v1"``, when the table's ABI version differs, when its ``struct_size`` is too small, or
    when its name or forward function is null. Nothing is registered then.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    if name in _RESERVED:
        raise ArgumentError(f"name: {name!r} is reserved by attnrs (its backends and built-in kernel); choose another")
    with _lock:
        _attnrs.register_native(name, capsule)
        info = _attnrs.native_info(name)
        for subscriber in _subscribers:
            subscriber(name, info)


def native_kernels() -> dict[str, dict[str, Any]]:
    """Every registered native kernel (the built-in ``"attnrs"`` first, then plugins) with what it declares:
    ``devices``, ``dtypes``, ``mask_kinds``, ``backward``, ``lse``, ``features`` and ``origin``. Loads plugins
    first if they were not loaded yet."""
    load_once()
    return {name: _attnrs.native_info(name) for name in _attnrs.native_kernels()}


def is_native(name: str) -> bool:
    """Whether ``name`` is a registered native kernel, loading plugins first when it is not (yet)."""
    if name in _attnrs.native_kernels():
        return True
    return load_once() and name in _attnrs.native_kernels()


def plugin_errors() -> dict[str, str]:
    """Entry points of the ``attnrs.kernels`` group that failed to load, with the reason."""
    with _lock:
        return dict(_errors)


def load_once() -> bool:
    """Loads the plugins unless that was done; True when this call loaded them."""
    with _lock:
        if _loaded:
            return False
        load_plugins()
        return True


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _capsule_of(obj: Any) -> Any:
    if type(obj).__name__ == "PyCapsule":
        return obj
    if callable(obj):
        return obj()
    return obj  # register_native reports what it got


def load_plugins(*, reload: bool = False) -> dict[str, str | None]:
    """Loads every ``attnrs.kernels`` entry point and registers its kernel under the entry point's name.

    Returns ``{name: None}`` for each plugin loaded and ``{name: reason}`` for each that failed (also logged as a
    warning and kept in :func:`plugin_errors`). Plugins already loaded are skipped unless ``reload``.
    """
    global _loaded
    results: dict[str, str | None] = {}
    with _lock:
        _loaded = True  # set first: lookups made while loading must not start another load
        if os.environ.get("ATTNRS_DISABLE_PLUGINS", "") not in ("", "0"):
            return results
        known = set(_attnrs.native_kernels())
        try:
            entry_points = _entry_points()
        except Exception as e:  # a broken distribution's metadata must not break attnrs
            logger.warning("attnrs: could not list the %r entry points: %s", ENTRY_POINT_GROUP, e)
            entry_points = []
        for ep in entry_points:
            if ep.name in results:
                reason = f"another installed plugin already provides {ep.name!r}; {ep.value} was skipped"
            elif ep.name in known and not reload:
                continue
            else:
                try:
                    register_native(ep.name, _capsule_of(ep.load()))
                    results[ep.name] = None
                    _errors.pop(ep.name, None)
                    continue
                except Exception as e:
                    reason = f"{type(e).__name__}: {e}"
            results.setdefault(ep.name, reason)
            _errors[ep.name] = reason
            logger.warning("attnrs: the kernel plugin %r (%s) failed to load: %s", ep.name, ep.value, reason)
    return results
