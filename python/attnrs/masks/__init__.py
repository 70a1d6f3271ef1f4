"""Masks as values: ``attnrs.masks``.

A :class:`Mask` says which keys each query may see. It is built from structural pieces that Rust understands
(causal, sliding window, chunked, padding, packed documents, prefix-LM) and from arbitrary ``mask_mod``
callables, composed with ``&``, ``|`` and ``~``. Positions are absolute: row ``i`` of a grid built with
``q_offset`` is position ``q_offset + i`` (transformers' convention).

A ``Mask`` is also a ``mask_mod``: ``mask(b, h, q_idx, kv_idx)`` returns a bool tensor for broadcastable index
tensors and under ``torch.vmap``, so it can be handed unchanged to torch's ``create_block_mask`` or to
transformers' ``sdpa_mask``.

Evaluation happens in Rust: :func:`create_dense_mask` writes bool bytes with per-row interval fills, and
:func:`~attnrs.create_block_mask` classifies blocks from intervals, in time and memory that grow with the number
of blocks, not with Q*K.

Modules: :mod:`~attnrs.masks.mask` (the value, its constructors and algebra, recognition of transformers' mask
functions), :mod:`~attnrs.masks.grid` (the rectangle a mask is evaluated on), :mod:`~attnrs.masks.callables`
(evaluating arbitrary mask_mods), :mod:`~attnrs.masks.dense` (dense tensors), :mod:`~attnrs.masks.block_mask`
(FlexAttention block masks).
"""

from __future__ import annotations

from .dense import create_dense_mask
from .mask import (
    Mask,
    MaskLike,
    and_masks,
    as_mask,
    bidirectional,
    causal,
    chunked,
    document,
    from_callable,
    or_masks,
    padding,
    prefix_lm,
    sliding_window,
    sliding_window_overlay,
)

__all__ = [
    "Mask",
    "MaskLike",
    "and_masks",
    "as_mask",
    "bidirectional",
    "causal",
    "chunked",
    "create_dense_mask",
    "document",
    "from_callable",
    "or_masks",
    "padding",
    "prefix_lm",
    "sliding_window",
    "sliding_window_overlay",
]
