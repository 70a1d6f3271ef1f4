"""Registries of attention functions and mask builders, with the semantics of transformers' ``GeneralInterface``.

* Each class has one **global** mapping shared by all its instances; ``register`` (a classmethod, callable on
  the class or an instance) writes it.
* Each instance has a **local** mapping; ``obj[name] = fn`` writes it and wins over the global one for that
  instance only. ``del obj[name]`` removes local entries only (a global one raises ``KeyError``).
* Iteration and ``len`` cover the union, global names first, in insertion order.

The storage of both mappings is the Rust :class:`attnrs._attnrs.Registry` (thread-safe, insertion-ordered),
which validates names and values before storing anything and records each entry's capabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, ClassVar

from ._attnrs import Registry
from .errors import UnknownNameError
from .plugins import load_once

__all__ = [
    "ALL_ATTENTION_FUNCTIONS",
    "ALL_MASK_ATTENTION_FUNCTIONS",
    "AttentionInterface",
    "AttentionMaskInterface",
    "GeneralInterface",
]

logger = logging.getLogger("attnrs")
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _normalize_capabilities(capabilities: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Accepts torch dtypes and ``torch.device``\\ s as well as their names."""
    if capabilities is None:
        return None
    caps = dict(capabilities)
    if "dtypes" in caps:
        caps["dtypes"] = [str(t) for t in caps["dtypes"]]
    if "devices" in caps:
        caps["devices"] = [getattr(d, "type", d) for d in caps["devices"]]
    return caps


class GeneralInterface(MutableMapping[str, Callable[..., Any]]):
    """A class-wide mapping plus an instance-local one (transformers' ``GeneralInterface``)."""

    _global_mapping: ClassVar[Registry] = Registry()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Every subclass owns its global mapping; a plain dict literal is accepted and converted.
        declared = cls.__dict__.get("_global_mapping")
        if not isinstance(declared, Registry):
            registry = Registry()
            for name, fn in dict(declared or {}).items():
                registry[name] = fn
            cls._global_mapping = registry

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
        cls._global_mapping.register(key, value, _normalize_capabilities(capabilities))

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

    _global_mapping: ClassVar[Registry] = Registry()

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

    _global_mapping: ClassVar[Registry] = Registry()


ALL_ATTENTION_FUNCTIONS: AttentionInterface = AttentionInterface()
ALL_MASK_ATTENTION_FUNCTIONS: AttentionMaskInterface = AttentionMaskInterface()
