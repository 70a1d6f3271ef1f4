"""The built-in entries of attnrs's registries, in one place (run once, by ``import attnrs``).

* :class:`~attnrs.AttentionMaskInterface`: ``"sdpa"``, ``"eager"`` (dense masks), ``"flex_attention"`` and
  ``"attnrs"`` (block masks that carry the structure);
* :class:`~attnrs.AttentionInterface`: ``"attnrs"`` (:func:`attnrs.integrations.transformers.attention_forward`)
  and ``"sdpa"`` (the plain-torch reference); ``"eager"`` is deliberately not an entry (see the class);
* every native kernel :func:`attnrs.register_native` adds (plugins included) becomes an attention function of
  the same name, with the capabilities the kernel declares, and an ``AttentionMaskInterface`` entry of that
  name (the ``"attnrs"`` builder), which transformers gets paired with it.
"""

from __future__ import annotations

from typing import Any

from . import plugins
from .integrations.transformers import functions, mask_builders
from .integrations.transformers.forward import attention_forward, attention_function
from .registry import AttentionInterface, AttentionMaskInterface

__all__: list[str] = []

# The registry key of attnrs's own attention function and mask builder (transformers' attn_implementation).
ATTENTION_FUNCTION_NAME = "attnrs"

_DENSE_MASK = {"devices": ["cpu", "cuda"], "mask_kinds": ["dense"]}
_BLOCK_MASK = {"devices": ["cpu", "cuda"], "mask_kinds": ["block_sparse", "expression"]}
AttentionMaskInterface.register("sdpa", mask_builders.sdpa_mask, capabilities=_DENSE_MASK)
AttentionMaskInterface.register("eager", mask_builders.eager_mask, capabilities=_DENSE_MASK)
AttentionMaskInterface.register("flex_attention", mask_builders.flex_attention_mask, capabilities=_BLOCK_MASK)
AttentionMaskInterface.register(ATTENTION_FUNCTION_NAME, mask_builders.attention_forward_mask, capabilities=_BLOCK_MASK)

AttentionInterface.register(
    ATTENTION_FUNCTION_NAME,
    attention_forward,
    capabilities={
        "devices": ["cpu", "cuda"],
        "mask_kinds": ["none", "dense", "block_sparse", "expression"],
        "backward": True,
        "lse": True,
    },
)
AttentionInterface.register(
    "sdpa",
    functions.sdpa_attention_forward,
    capabilities={"devices": ["cpu", "cuda"], "mask_kinds": ["none", "dense"], "backward": True},
)


def _native_kernel_as_attention_function(name: str, info: dict[str, Any]) -> None:
    # The mask builder first: the attention entry is what transformers mirrors, with this builder paired.
    AttentionMaskInterface.register(name, mask_builders.attention_forward_mask, capabilities=_BLOCK_MASK)
    AttentionInterface.register(
        name, attention_function(name), capabilities={k: info[k] for k in plugins.CAPABILITY_KEYS}
    )


plugins.on_register(_native_kernel_as_attention_function)
