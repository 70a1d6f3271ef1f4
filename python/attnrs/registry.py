"""Registries of attention functions and mask builders, with the semantics of transformers' ``GeneralInterface``.

* Each class has one **global** mapping shared by all its instances; ``register`` (a classmethod, callable on
  the class or an instance) writes it.
* Each instance has a **local** mapping; ``obj[name] = fn`` writes it and wins over the global one for that
  instance only. ``del obj[name]`` removes local entries only (a global one raises ``KeyError``).
* Iteration and ``len`` cover the union, global names first, in insertion order.

The storage of both mappings is the Rust :class:`attnrs._attnrs.Registry` (thread-safe, insertion-ordered),
which validates names and values before storing anything and records each entry's capabilities.

The global mapping is a :class:`GlobalMapping`: transformers' is a plain ``dict`` that code reads and writes
directly (``_global_mapping.pop(name)``, ``.update({...})``, ``.copy()``, ``name in _global_mapping``), so this
one has a dict's API over the Rust storage. It is a Python class (not more methods on the Rust ``Registry``)
because it also calls subscribers after every store: that is how entries reach transformers' registries
(:mod:`attnrs.integrations.transformers.registration`), whichever way they were written.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, ClassVar

import torch

from ._attnrs import Registry
from .arguments import flag
from .errors import ArgumentError, UnknownNameError
from .plugins import load_once

__all__ = [
    "ALL_ATTENTION_FUNCTIONS",
    "ALL_MASK_ATTENTION_FUNCTIONS",
    "AttentionInterface",
    "AttentionMaskInterface",
    "GeneralInterface",
    "GlobalMapping",
]

logger = logging.getLogger("attnrs")
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


_LIST_CAPABILITIES = ("devices", "dtypes", "mask_kinds")
_FLAG_CAPABILITIES = ("backward", "lse")


def _normalize_capabilities(capabilities: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The capabilities as the Rust registry stores them: torch dtypes and ``torch.device``\\ s become their
    names, and a single name (``{"devices": "cpu"}``) a list of one. Anything else is an ArgumentError naming the
    key (unknown keys are refused by the registry)."""
    if capabilities is None:
        return None
    if not isinstance(capabilities, Mapping):
        raise ArgumentError(
            f"capabilities: expected None or a dict, got {type(capabilities).__name__} {capabilities!r}"
        )
    caps = dict(capabilities)
    for key in _LIST_CAPABILITIES:
        if key not in caps:
            continue
        items = caps[key]
        if isinstance(items, (str, torch.dtype, torch.device)):
            items = [items]
        if not isinstance(items, (list, tuple, set, frozenset)):
            raise ArgumentError(
                f"capabilities['{key}']: expected a list of names, got {type(items).__name__} {items!r}"
            )
        names = [str(item) if isinstance(item, torch.dtype) else getattr(item, "type", item) for item in items]
        for name in names:
            if not isinstance(name, str):
                raise ArgumentError(f"capabilities['{key}']: expected names (str), got {type(name).__name__} {name!r}")
        caps[key] = names
    for key in _FLAG_CAPABILITIES:
        if key in caps:
            caps[key] = flag(caps[key], f"capabilities['{key}']")
    return caps


Subscriber = Callable[[str, Callable[..., Any]], None]


def _pairs(other: Any, kwargs: Mapping[str, Any], argument: str) -> list[tuple[Any, Any]]:
    """The ``(key, value)`` pairs of ``dict.update``'s arguments: a mapping (anything with ``keys()``), an
    iterable of pairs, then keywords."""
    if hasattr(other, "keys"):
        pairs = [(key, other[key]) for key in other.keys()]
    else:
        pairs = []
        for index, item in enumerate(other):
            try:
                key, value = item
            except (TypeError, ValueError):
                raise TypeError(
                    f"{argument}: expected a mapping or an iterable of (name, function) pairs; "
                    f"element {index} is {item!r}"
                ) from None
            pairs.append((key, value))
    return pairs + list(kwargs.items())


class GlobalMapping(MutableMapping[str, Callable[..., Any]]):
    """The class-wide mapping of an interface: the API of a ``dict`` of name -> callable (as transformers'
    ``_global_mapping`` is), stored in a Rust :class:`~attnrs._attnrs.Registry`.

    * Names must be non-empty ``str`` and values callables: anything else raises (``TypeError`` /
      ``ValueError``) and stores nothing; ``update`` checks every pair before it stores any.
    * ``keys()``, ``values()`` and ``items()`` are live views in insertion order, as a dict's; ``copy()`` and
      ``|`` give plain ``dict``\\ s (capabilities are not part of a dict's value); ``copy.copy``,
      ``copy.deepcopy`` and pickling give a new, independent mapping of the same entries.
    * Writes are serialised by a lock, so ``setdefault`` and ``popitem`` are atomic; reads go straight to the
      (thread-safe) storage.
    * :meth:`subscribe` adds a function called as ``subscriber(name, value)`` after every store (``[]=``,
      :meth:`register`, ``update``, ``setdefault``), under the lock, in the order the stores happened.
    """

    __slots__ = ("_lock", "_registry", "_subscribers")

    def __init__(self, entries: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), /, **kwargs: Any) -> None:
        self._registry = Registry()
        self._lock = threading.RLock()
        self._subscribers: list[Subscriber] = []
        self.update(entries, **kwargs)

    # ---- reads --------------------------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Callable[..., Any]:
        return self._registry[key]

    def __contains__(self, key: object) -> bool:
        return key in self._registry

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.keys())

    def __reversed__(self) -> Iterator[str]:
        return reversed(self._registry.keys())

    def __len__(self) -> int:
        return len(self._registry)

    def get(self, key: str, default: Any = None) -> Any:
        """The entry under ``key``, or ``default`` when there is none (``dict.get``)."""
        return self._registry.get(key, default)

    def capabilities(self, key: str) -> dict[str, Any] | None:
        """What the entry under ``key`` declared it supports (None when nothing); ``KeyError`` if missing."""
        return self._registry.capabilities(key)

    def copy(self) -> dict[str, Callable[..., Any]]:
        """A plain ``dict`` of the entries, in insertion order."""
        return dict(self._registry.items())

    def __or__(self, other: Any) -> dict[str, Callable[..., Any]]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**self.copy(), **other}

    def __ror__(self, other: Any) -> dict[str, Callable[..., Any]]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**other, **self.copy()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.copy()!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # copy.copy, copy.deepcopy and pickle: a new, independent mapping of the same entries (no subscribers).
        return (type(self), (self.copy(),))

    # ---- writes -------------------------------------------------------------------------------------------

    def register(self, key: str, value: Callable[..., Any], capabilities: Mapping[str, Any] | None = None) -> None:
        """Stores ``value`` under ``key`` with its declared ``capabilities`` (None: none declared)."""
        caps = _normalize_capabilities(capabilities)
        with self._lock:
            self._registry.register(key, value, caps)
            for subscriber in list(self._subscribers):
                subscriber(key, value)

    def __setitem__(self, key: str, value: Callable[..., Any]) -> None:
        self.register(key, value)

    def __delitem__(self, key: str) -> None:
        with self._lock:
            del self._registry[key]

    def pop(self, key: str, *default: Any) -> Any:
        """Removes and returns the entry under ``key``; ``default`` when given and there is none, else KeyError."""
        with self._lock:
            return self._registry.pop(key, *default)

    def popitem(self) -> tuple[str, Callable[..., Any]]:
        """Removes and returns the last entry stored (LIFO, as ``dict.popitem``); ``KeyError`` when empty."""
        with self._lock:
            keys = self._registry.keys()
            if not keys:
                raise KeyError("popitem(): the mapping is empty")
            return keys[-1], self._registry.pop(keys[-1])

    def setdefault(self, key: str, default: Any = None) -> Any:
        """The entry under ``key``; stores ``default`` there first when there is none (it must be callable)."""
        with self._lock:
            if key in self._registry:
                return self._registry[key]
            self.register(key, default)
            return default

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """``dict.update``, all or nothing: every pair is checked before any is stored. Entries of another
        :class:`GlobalMapping` keep their capabilities."""
        pairs = _pairs(other, kwargs, "update")
        staged = Registry()  # validates every name and value before anything is stored
        for key, value in pairs:
            staged[key] = value
        with self._lock:
            for key, value in pairs:
                caps = other.capabilities(key) if isinstance(other, GlobalMapping) and key in other else None
                self.register(key, value, caps)

    def __ior__(self, other: Any) -> GlobalMapping:
        self.update(other)
        return self

    def clear(self) -> None:
        """Removes every entry."""
        with self._lock:
            self._registry.clear()

    # ---- subscribers ------------------------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> None:
        """Calls ``subscriber(name, value)`` after every store from now on (once, however often subscribed)."""
        if not callable(subscriber):
            raise TypeError(f"subscriber: expected a callable, got {type(subscriber).__name__}")
        with self._lock:
            if subscriber not in self._subscribers:
                self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stops calling ``subscriber``; nothing happens when it was not subscribed."""
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)


class GeneralInterface(MutableMapping[str, Callable[..., Any]]):
    """A class-wide mapping plus an instance-local one (transformers' ``GeneralInterface``)."""

    _global_mapping: ClassVar[GlobalMapping] = GlobalMapping()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Every subclass owns its global mapping; a plain dict literal is accepted and converted.
        declared = cls.__dict__.get("_global_mapping")
        if not isinstance(declared, GlobalMapping):
            cls._global_mapping = GlobalMapping(declared or {})

    def __init__(self) -> None:
        self._local_mapping = Registry()

    def __getitem__(self, key: str) -> Callable[..., Any]:
        if key in self._local_mapping:
            return self._local_mapping[key]
        return self._global_mapping[key]

    def __setitem__(self, key: str, value: Callable[..., Any]) -> None:
        self._local_mapping[key] = value

    def __delitem__(self, key: str) -> None:
        del self._local_mapping[key]

    def __iter__(self) -> Iterator[str]:
        return iter({**dict.fromkeys(self._global_mapping.keys()), **dict.fromkeys(self._local_mapping.keys())})

    def __len__(self) -> int:
        return len(set(self._global_mapping.keys()) | set(self._local_mapping.keys()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)})"

    @classmethod
    def register(cls, key: str, value: Callable[..., Any], *, capabilities: Mapping[str, Any] | None = None) -> None:
        """Adds ``value`` under ``key`` to the class-wide mapping, seen by every instance.

        ``capabilities`` optionally declares what the entry supports:
        ``{"devices": ["cpu"], "dtypes": [torch.float32], "mask_kinds": ["dense"], "backward": True, "lse": False}``.
        """
        cls._global_mapping.register(key, value, capabilities)

    def valid_keys(self) -> list[str]:
        return list(self.keys())

    def capabilities(self, key: str) -> dict[str, Any] | None:
        """What the entry under ``key`` declared it supports (None when it declared nothing)."""
        if key in self._local_mapping:
            return self._local_mapping.capabilities(key)
        if key in self._global_mapping:
            return self._global_mapping.capabilities(key)
        raise UnknownNameError(
            f"`{key}` is not registered in the `{type(self).__name__}`; valid names: {self.valid_keys()}"
        )


class AttentionInterface(GeneralInterface):
    """Attention functions ``fn(module, query, key, value, attention_mask, **kwargs) -> (out, weights)``.

    ``"eager"`` is deliberately not an entry: as in transformers it means "the model's own eager function",
    the ``default`` that models pass to :meth:`get_interface`.
    """

    _global_mapping: ClassVar[GlobalMapping] = GlobalMapping()

    def __getitem__(self, key: str) -> Callable[..., Any]:
        try:
            return super().__getitem__(key)
        except KeyError:
            # Installed kernel plugins register themselves here; they are loaded at the first miss.
            if not load_once():
                raise
        return super().__getitem__(key)

    def get_interface(self, attn_implementation: str | None, default: Callable[..., Any]) -> Callable[..., Any]:
        """The function for ``attn_implementation``, validated exactly as transformers does."""
        if attn_implementation is None:
            _warn_once(
                "You tried to access the `AttentionInterface` with a `config._attn_implementation` set to `None`. "
                "This is expected if you use an Attention Module as a standalone Module."
            )
        elif attn_implementation.startswith("paged|") and attn_implementation != "paged|eager":
            _warn_once("Except for `paged|eager`, the `paged|` prefix is no longer needed.")
            attn_implementation = attn_implementation.removeprefix("paged|")
        elif attn_implementation != "eager" and attn_implementation not in self:
            raise UnknownNameError(
                f"`{attn_implementation}` is not a valid attention implementation registered in the "
                f"`AttentionInterface`; valid names: {['eager', *self.valid_keys()]}"
            )
        return self.get(attn_implementation, default)  # type: ignore[arg-type]


class AttentionMaskInterface(GeneralInterface):
    """Mask builders called with transformers' keywords (``batch_size``, ``q_length``, ``kv_length``, ...)."""

    _global_mapping: ClassVar[GlobalMapping] = GlobalMapping()


ALL_ATTENTION_FUNCTIONS: AttentionInterface = AttentionInterface()
ALL_MASK_ATTENTION_FUNCTIONS: AttentionMaskInterface = AttentionMaskInterface()
