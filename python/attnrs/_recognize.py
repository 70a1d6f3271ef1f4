"""Recognition of transformers' mask closures as structural masks.

transformers builds its masks from a handful of factories in ``transformers.masking_utils``
(``sliding_window_overlay(w)`` returns an ``inner_mask`` closure over ``w``, ``and_masks(*fns)`` an ``and_mask``
closure over ``mask_functions``, ...). A closure is recognised only when its code object is the very code
object the *installed* factory produces, so a changed transformers release can never be misread: anything not
recognised is evaluated as a callable, which is always correct, only slower.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch

from .masks import (
    Mask,
    and_masks,
    bidirectional,
    causal,
    document,
    from_callable,
    or_masks,
    padding,
    sliding_window,
    sliding_window_overlay,
)


@functools.lru_cache(maxsize=1)
def _factories() -> dict[types.CodeType, str] | None:
    """Code object of each known transformers closure -> its factory name (None without transformers)."""
    try:
        from transformers import masking_utils as mu
    except ImportError:
        return None
    probes: dict[str, Callable[[], Any]] = {
        "and_masks": lambda: mu.and_masks(mu.causal_mask_function),
        "or_masks": lambda: mu.or_masks(mu.causal_mask_function),
        "sliding_window_overlay": lambda: mu.sliding_window_overlay(1),
        "sliding_window_bidirectional_overlay": lambda: mu.sliding_window_bidirectional_overlay(1),
        "chunked_overlay": lambda: mu.chunked_overlay(1, torch.zeros(1, dtype=torch.long)),
        "padding_mask_function": lambda: mu.padding_mask_function(torch.ones(1, 1, dtype=torch.bool)),
        "packed_sequence_mask_function": lambda: mu.packed_sequence_mask_function(torch.zeros(1, 1, dtype=torch.long)),
        "add_offsets_to_mask_function": lambda: mu.add_offsets_to_mask_function(mu.causal_mask_function, 0, 0),
        "remap_positions_for_packed_sequence": lambda: mu.remap_positions_for_packed_sequence(
            mu.causal_mask_function, torch.zeros(1, 1, dtype=torch.long)
        ),
    }
    codes: dict[types.CodeType, str] = {}
    for name, make in probes.items():
        try:
            codes[make().__code__] = name
        except Exception:  # noqa: BLE001 - a factory that changed shape is simply not recognised
            continue
    return codes


def _plain_functions() -> dict[Any, Callable[[], Mask]]:
    try:
        from transformers import masking_utils as mu
    except ImportError:
        return {}
    return {mu.causal_mask_function: causal, mu.bidirectional_mask_function: bidirectional}


def _cells(fn: Any) -> dict[str, Any]:
    closure = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in closure)))


def recognize(fn: Any) -> Mask | None:
    """The structural :class:`Mask` equivalent to ``fn``, or None when ``fn`` is not a known transformers mask."""
    plain = _plain_functions().get(fn)
    if plain is not None:
        return plain()
    code = getattr(fn, "__code__", None)
    factories = _factories()
    if code is None or not factories or code not in factories:
        return None
    cells = _cells(fn)
    factory = factories[code]
    if factory == "and_masks":
        return and_masks(*cells["mask_functions"])
    if factory == "or_masks":
        return or_masks(*cells["mask_functions"])
    if factory == "sliding_window_overlay":
        return sliding_window_overlay(int(cells["sliding_window"]))
    if factory == "sliding_window_bidirectional_overlay":
        return sliding_window(int(cells["sliding_window"]), causal=False)
    if factory == "chunked_overlay":
        from .masks import chunked

        return chunked(int(cells["chunk_size"]), cells["left_padding"], causal=False)
    if factory == "padding_mask_function":
        return padding(cells["padding_mask"])
    if factory == "packed_sequence_mask_function":
        return document(cells["packed_sequence_mask"])
    if factory == "add_offsets_to_mask_function":
        return from_callable(cells["mask_function"]).shifted(int(cells["q_offset"]), int(cells["kv_offset"]))
    if factory == "remap_positions_for_packed_sequence":
        inner = from_callable(cells["mask_function"])
        return _remap(inner, cells)
    return None


def _remap(inner: Mask, cells: dict[str, Any]) -> Mask:
    """``fn(b, h, pos[b, q], pos[b, kv])``: kept as a callable unless an enclosing ``and`` with the matching
    packed-document mask makes it structural (see :func:`simplify_packed`)."""
    fn_remap = _remap_callable(inner, cells["position_ids"])
    leaf = Mask("callable", {"fn": fn_remap, "use_vmap": False})
    leaf._params["remap_of"] = inner
    leaf._params["position_ids"] = cells["position_ids"]
    return leaf


def _remap_callable(inner: Mask, position_ids: torch.Tensor) -> Callable[..., Any]:
    def remapped(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        pos = position_ids.to(q.device)
        return inner(b, h, pos[b, q], pos[b, kv])

    return remapped


_TRANSLATION_INVARIANT = {"causal", "full", "empty", "sliding_window", "sliding_overlay"}


def _translation_invariant(mask: Mask) -> bool:
    """True when visibility depends on q - kv only (so remapping positions inside a document changes nothing)."""
    if mask.kind in ("and", "or", "not"):
        return all(_translation_invariant(c) for c in mask.children)
    return mask.kind in _TRANSLATION_INVARIANT


def simplify_packed(mask: Mask) -> Mask:
    """``and(remap(f, pos), document(ids))`` -> ``and(f, document(ids))`` when it is exact.

    transformers masks packed sequences with causal on per-document positions AND a same-document test. When
    ``ids`` are the documents that ``pos`` describes (a new document wherever ``pos`` does not step by one) and
    ``f`` depends only on ``q - kv``, positions inside one document differ exactly as indices do, so ``f`` can
    read indices directly and the whole mask becomes structural."""
    docs = [c for c in mask.children if c.kind == "document"]
    if not docs:
        return mask
    children = list(mask.children)
    for i, child in enumerate(children):
        inner = child._params.get("remap_of") if child.kind == "callable" else None
        if inner is None or not _translation_invariant(inner):
            continue
        pos = child._params["position_ids"]
        if any(_documents_match(pos, d._params["table"]) for d in docs):
            children[i] = inner
    if children == list(mask.children):
        return mask
    return Mask("and", children=children)


def _documents_match(position_ids: torch.Tensor, ids: torch.Tensor) -> bool:
    """True when ``ids`` are contiguous runs whose boundaries are exactly where ``position_ids`` does not step
    by one."""
    pos = position_ids.detach().to("cpu", torch.int64)
    if pos.dim() == 1:
        pos = pos[None]
    if pos.shape[-1] != ids.shape[-1] or pos.shape[-1] == 0:
        return False
    if pos.shape[0] != ids.shape[0]:
        if pos.shape[0] == 1:
            pos = pos.expand(ids.shape[0], -1)
        elif ids.shape[0] == 1:
            ids = ids.expand(pos.shape[0], -1)
        else:
            return False
    step_ids = torch.diff(ids, dim=-1)
    if bool((step_ids < 0).any()):
        return False  # a document id that comes back later would join two separate runs
    return bool(torch.equal(torch.diff(pos, dim=-1) != 1, step_ids != 0))
