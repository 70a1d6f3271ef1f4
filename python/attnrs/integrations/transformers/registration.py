"""Making attnrs's attention functions ``attn_implementation`` values of transformers.

**By name, automatically** (:func:`enable_auto_register`, run by ``import attnrs``): every entry of attnrs's
:class:`~attnrs.AttentionInterface` global mapping (the built-in ``"attnrs"``, one per native kernel and plugin,
and whatever users register later, however: ``register``, ``_global_mapping[name] = fn``, ``update``, ...)
is put into transformers' ``AttentionInterface`` with a mask builder in its ``AttentionMaskInterface`` under
the same name, so ``from_pretrained(..., attn_implementation=name)`` and ``set_attn_implementation(name)``
accept it. The choices:

* **transformers is never imported by attnrs.** A ``sys.meta_path`` finder (:mod:`.import_hook`) runs
  :func:`sync` right after ``transformers.modeling_utils`` (attention functions) or
  ``transformers.masking_utils`` (mask builders) executes, which is when their registries come to exist;
  when they were imported before ``attnrs``, :func:`enable_auto_register` syncs at once. After that, a
  subscriber of attnrs's global mappings mirrors each new store as it happens. Reloading either transformers
  module re-runs :func:`sync` (its registries are rebuilt). Installed kernel plugins are loaded at the first
  sync, so that they are ``attn_implementation`` values too.
* **The mask builder** of a name is attnrs's :class:`~attnrs.AttentionMaskInterface` entry of that name when
  there is one (``"attnrs"`` and every native kernel have one: attnrs's structural block masks), otherwise
  transformers' own ``sdpa_mask``: what transformers' documentation tells users to register for a custom
  function ("to leave the existing mask untouched"), and what its Hub-kernel loader registers. transformers
  itself would register none, and then silently passes ``attention_mask=None`` (padding and causality
  dropped). Registering a mask builder in attnrs later replaces the one transformers has for that name.
* **transformers' names stay transformers'.** Names transformers reads specially (containing ``"flash"``,
  ``"sdpa"``, ``"flex_attention"``, ``"/"``, ``":"`` or ``"|"``, as for :func:`register`) and ``"eager"`` (the
  model's own function) are never mirrored: attnrs's ``"sdpa"`` entry does not replace transformers'. Nor is
  any entry that transformers holds and attnrs did not put there (a user's or a Hub kernel's).
* **Additions, not removals.** Removing an entry from attnrs's mapping leaves transformers' as it is (pop it
  from transformers' ``_global_mapping`` too); a name attnrs stores again replaces what attnrs put there.
* **Opting out**: ``ATTNRS_DISABLE_AUTO_REGISTER=1`` in the environment before ``import attnrs``, or
  :func:`disable_auto_register` (entries already in transformers stay). Thread-safe: one lock orders every
  write into transformers' registries.

**Explicitly**, :func:`register` puts a given function (any name, any callable) into transformers' registries
at once, importing transformers; it stays for custom names and explicit use.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ... import plugins
from ...registry import AttentionInterface, AttentionMaskInterface
from . import import_hook
from .forward import attention_forward
from .mask_builders import attention_forward_mask

__all__ = [
    "AUTO_REGISTER_ENV",
    "disable_auto_register",
    "enable_at_import",
    "enable_auto_register",
    "register",
    "sync",
]

logger = logging.getLogger("attnrs")

AUTO_REGISTER_ENV = "ATTNRS_DISABLE_AUTO_REGISTER"
# The transformers modules whose registries attnrs fills: attention functions, mask builders.
ATTENTION_MODULE = "transformers.modeling_utils"
MASK_MODULE = "transformers.masking_utils"

# transformers treats names containing these specially (flash imports, sdpa checks, hub kernels).
_RESERVED = ("flash", "sdpa", "flex_attention", "/", ":", "|")
# transformers reads "eager" as "the model's own eager function": an entry would replace it in every model.
_NOT_MIRRORED = ("eager",)

_lock = threading.RLock()
_enabled = False
# What attnrs put into transformers' registries, per registry: name -> the value put there. An entry
# transformers holds under a name is replaced only when it is still this value.
_ours: dict[str, dict[str, Callable[..., Any]]] = {ATTENTION_MODULE: {}, MASK_MODULE: {}}
_warned: set[str] = set()


def _reserved_part(name: str) -> str | None:
    return next((r for r in _RESERVED if r in name), None)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    reserved = _reserved_part(name)
    if reserved is not None:
        raise ValueError(
            f"name: transformers treats names containing {reserved!r} specially; choose another, e.g. 'attnrs'"
        )
    return name


def register(name: str = "attnrs", function: Callable[..., Any] | None = None) -> str:
    """Registers ``function`` (default: :func:`attention_forward`; any callable or entry of attnrs's
    :class:`~attnrs.AttentionInterface`) with its mask builder in transformers' global registries.

    With ``function=None`` and a ``name`` that attnrs's ``AttentionInterface`` holds (a native kernel registered
    with :func:`attnrs.register_native` or found as a plugin), that entry is used: ``register("example")``.

    Idempotent; returns the name. The mask builder is attnrs's :class:`~attnrs.AttentionMaskInterface` entry
    of that name when there is one, otherwise attnrs's ``"attnrs"`` builder (block masks that carry the
    structure). ``import attnrs`` already does this for every entry of attnrs's ``AttentionInterface``
    (:func:`enable_auto_register`); this function is for other names and functions, and explicit use."""
    from transformers.masking_utils import AttentionMaskInterface as HFAttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface as HFAttentionInterface

    _check_name(name)
    if function is None:
        function = AttentionInterface().get(name, attention_forward)
    if not callable(function):
        raise TypeError(f"function: expected a callable attention function, got {type(function).__name__}")
    mask_builder = AttentionMaskInterface._global_mapping.get(name, attention_forward_mask)
    with _lock:
        HFAttentionInterface.register(name, function)
        HFAttentionMaskInterface.register(name, mask_builder)
        _ours[ATTENTION_MODULE][name] = function
        _ours[MASK_MODULE][name] = mask_builder
    return name


# ---- automatic registration ------------------------------------------------------------------------------


def _registry_of(module_name: str) -> tuple[ModuleType, Any] | None:
    """The module and its registry class (a transformers ``GeneralInterface``) once the module has executed far
    enough to define it."""
    module = sys.modules.get(module_name)
    if module is None:
        return None
    cls = getattr(module, "AttentionInterface" if module_name == ATTENTION_MODULE else "AttentionMaskInterface", None)
    if not isinstance(getattr(cls, "_global_mapping", None), dict):
        return None
    return module, cls


def _mirrored(name: str) -> bool:
    """Whether ``name`` may reach transformers (warns once for a name transformers would misread)."""
    if name in _NOT_MIRRORED:
        return False
    reserved = _reserved_part(name)
    if reserved is None:
        return True
    plain = name.removeprefix("paged|")
    builtin = plain in ("sdpa", "flex_attention", "eager") or plain.startswith("flash_attention_")
    if not builtin and name not in _warned:
        _warned.add(name)
        logger.warning(
            "attnrs: %r is not made an attn_implementation of transformers, which treats names containing %r "
            "specially; register it under another name to use it there",
            name,
            reserved,
        )
    return False


def _put(module_name: str, cls: Any, name: str, value: Callable[..., Any]) -> bool:
    """``cls.register(name, value)`` unless transformers holds something else there that attnrs did not put;
    whether transformers holds ``value`` now."""
    current = cls._global_mapping.get(name)
    if current is not None and current is not value and current is not _ours[module_name].get(name):
        logger.debug("attnrs: transformers already has %r in %s; left as it is", name, cls.__name__)
        return False
    if current is not value:
        cls.register(name, value)
    _ours[module_name][name] = value
    return True


def _mirror(name: str) -> None:
    """Puts attnrs's entry ``name`` (and its mask builder) into the transformers registries that exist."""
    function = AttentionInterface._global_mapping.get(name)
    if function is None or not _mirrored(name):
        return
    attention = _registry_of(ATTENTION_MODULE)
    if attention is not None and not _put(ATTENTION_MODULE, attention[1], name, function):
        return  # the name is someone else's in transformers: its mask builder (or none) stays theirs too
    masks = _registry_of(MASK_MODULE)
    if masks is not None:
        module, cls = masks
        builder = AttentionMaskInterface._global_mapping.get(name) or getattr(module, "sdpa_mask", None)
        if builder is not None:
            _put(MASK_MODULE, cls, name, builder)


def sync() -> None:
    """Puts every entry of attnrs's ``AttentionInterface`` global mapping into transformers' registries (those
    whose module has been imported), as described in the module docstring. Loads installed kernel plugins
    first. Idempotent; run by the import hook, and callable by hand."""
    plugins.load_once()  # before the lock: loading registers kernels, whose subscribers take it
    with _lock:
        for name in list(AttentionInterface._global_mapping):
            _mirror(name)


def _safely(action: Callable[[], None], what: str) -> None:
    """Runs ``action``; a failure is logged, never raised into transformers' import or the user's registration."""
    try:
        action()
    except Exception as e:  # attnrs must never break transformers' import or the user's registration
        logger.warning("attnrs: could not register %s with transformers: %s: %s", what, type(e).__name__, e)


def _after_import(module: ModuleType) -> None:
    _safely(sync, f"its attention functions in {module.__name__}")


def _on_attention_entry(name: str, value: Callable[..., Any]) -> None:
    if _registry_of(ATTENTION_MODULE) is None and _registry_of(MASK_MODULE) is None:
        return  # transformers not imported: the import hook will sync

    def mirror() -> None:
        with _lock:
            _mirror(name)

    _safely(mirror, repr(name))


def _on_mask_entry(name: str, value: Callable[..., Any]) -> None:
    if name in AttentionInterface._global_mapping:
        _on_attention_entry(name, value)


def enable_auto_register() -> None:
    """Makes every entry of attnrs's ``AttentionInterface`` an ``attn_implementation`` of transformers, now
    and when transformers is imported later, without importing it (see the module docstring). Run by
    ``import attnrs`` unless ``ATTNRS_DISABLE_AUTO_REGISTER`` is set to something other than ``0``; calling it
    again does nothing."""
    global _enabled
    with _lock:
        if _enabled:
            return
        _enabled = True
        AttentionInterface._global_mapping.subscribe(_on_attention_entry)
        AttentionMaskInterface._global_mapping.subscribe(_on_mask_entry)
        import_hook.install({ATTENTION_MODULE: _after_import, MASK_MODULE: _after_import})
    if _registry_of(ATTENTION_MODULE) is not None or _registry_of(MASK_MODULE) is not None:
        _safely(sync, "its attention functions")


def disable_auto_register() -> None:
    """Stops the automatic registration: the import hook is removed and new attnrs entries no longer reach
    transformers. Entries already registered there stay (pop them from its ``_global_mapping``)."""
    global _enabled
    with _lock:
        _enabled = False
        AttentionInterface._global_mapping.unsubscribe(_on_attention_entry)
        AttentionMaskInterface._global_mapping.unsubscribe(_on_mask_entry)
        import_hook.uninstall()


def enable_at_import() -> None:
    """What ``import attnrs`` runs: :func:`enable_auto_register`, unless the environment variable
    ``ATTNRS_DISABLE_AUTO_REGISTER`` is set to something other than ``""`` or ``"0"``."""
    if os.environ.get(AUTO_REGISTER_ENV, "") in ("", "0"):
        enable_auto_register()
