"""Making attnrs's attention functions ``attn_implementation`` values of transformers: :func:`register` puts an
attention function *and* its mask builder into transformers' global registries under the same name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...registry import AttentionInterface
from .forward import attention_forward
from .mask_builders import attention_forward_mask

__all__ = ["register"]

# transformers treats names containing these specially (flash imports, sdpa checks, hub kernels).
_RESERVED = ("flash", "sdpa", "flex_attention", "/", ":", "|")


def register(name: str = "attnrs", function: Callable[..., Any] | None = None) -> str:
    """Registers ``function`` (default: :func:`attention_forward`; any callable or entry of attnrs's
    :class:`~attnrs.AttentionInterface`) with its mask builder in transformers' global registries.

    With ``function=None`` and a ``name`` that attnrs's ``AttentionInterface`` holds (a native kernel registered
    with :func:`attnrs.register_native` or found as a plugin), that entry is used: ``register("example")``.

    Idempotent; returns the name. The mask builder is attnrs's ``"attnrs"`` builder (block masks that carry
    the structure)."""
    from transformers.masking_utils import AttentionMaskInterface as HFAttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface as HFAttentionInterface

    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    reserved = [r for r in _RESERVED if r in name]
    if reserved:
        raise ValueError(
            f"name: transformers treats names containing {reserved[0]!r} specially; choose another, e.g. 'attnrs'"
        )
    if function is None:
        function = AttentionInterface().get(name, attention_forward)
    if not callable(function):
        raise TypeError(f"function: expected a callable attention function, got {type(function).__name__}")
    HFAttentionInterface.register(name, function)
    HFAttentionMaskInterface.register(name, attention_forward_mask)
    return name
