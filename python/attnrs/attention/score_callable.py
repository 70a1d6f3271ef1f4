"""Attention with an arbitrary Python ``score_mod`` callable, computed exactly as FlexAttention defines it, one
chunk of query rows at a time: :func:`callable_score_attention`.

The Rust kernel evaluates score mods that are :class:`~attnrs.scores.ScoreMod` values; any other callable
``score_mod(score, b, h, q_idx, kv_idx)`` runs here, in torch, with FlexAttention's semantics: the callable sees
the scaled logit ``scale * q . k`` in the working precision (float32, float64 for float64 inputs) and is
vectorised over ``b, h, q_idx, kv_idx`` with ``torch.vmap`` as flex's uncompiled path does; the optional softcap,
the additive bias and the masks come after it; ``-inf`` from the callable hides a pair; the LSE and the gradients
see the modified score. A NaN from the callable makes its row NaN (as torch's softmax does); it never crashes.

Cost, plainly: O(B·H·Q·K) torch work, the callable included, at torch's elementwise speed: much slower than the
Rust kernel with a ``ScoreMod`` value (which evaluates its terms inside the tile loop), and than FlexAttention
compiled. What it bounds is memory: the scores exist for one chunk of query rows at a time (:data:`CHUNK_BYTES`
per chunk's ``[B, H, rows, K]``), and each chunk runs under ``torch.utils.checkpoint``, so the backward pass
recomputes it instead of keeping every chunk's scores: O(chunk) memory both ways. It lives apart from the
kernel's operators because nothing in it is the kernel: it is the exact, general fallback.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import ArgumentError
from .resolve import ResolvedMask
from .torch_backends import math_attention, visibility

__all__ = ["CHUNK_BYTES", "callable_score_attention", "chunk_rows"]

# The bytes of one chunk's scores [B, H, rows, K] in the working precision (each temporary of the chunk is this
# size; tests shrink it to exercise chunking).
CHUNK_BYTES = 64 << 20


class _ResultError(ArgumentError):
    """The callable ran but returned something unusable (raised as is, never re-wrapped)."""


def chunk_rows(batch: int, heads: int, kv_len: int, itemsize: int, chunk_bytes: int | None = None) -> int:
    """Query rows per chunk: as many as keep one chunk's scores ``[batch, heads, rows, kv_len]`` under
    ``chunk_bytes`` (default :data:`CHUNK_BYTES`), and at least one."""
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, budget // max(1, batch * heads * kv_len * itemsize))


def callable_score_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: ResolvedMask,
    score_mod: Callable[..., Any],
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``query [B, H, Q, D]`` over ``key [B, Hkv, K, D]`` / ``value [B, Hkv, K, Dv]`` (GQA:
    ``H % Hkv == 0``) with ``score_mod`` applied to every scaled logit, FlexAttention's way.

    Per pair: ``x = score_mod(scale * q . k, b, h, q_offset + i, kv_offset + j)``, then ``softcap * tanh(x /
    softcap)`` when set, plus ``resolved.bias``, and ``-inf`` where ``resolved``'s structural or dense mask hides
    the pair; ``sinks [H]`` adds one logit per row to the softmax's denominator only. Returns the output ``[B, H,
    Q, Dv]`` in the query's dtype and, with ``return_lse``, the float32 log-sum-exp ``[B, H, Q]`` (natural log,
    sink included; ``-inf`` for a row that sees nothing, whose output is 0). Gradients reach query, key, value,
    sinks and every tensor the callable closes over.

    Raises :class:`~attnrs.ArgumentError` (``"score_mod: ..."``) when the callable raises, or returns anything but
    a floating tensor of the chunk's scores' shape."""
    batch, heads, q_len, _ = query.shape
    kv_len, dv = key.shape[2], value.shape[-1]
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    if batch * heads * q_len == 0 or kv_len == 0:
        return _no_keys(query, dv, heads, sinks, return_lse)
    rows = chunk_rows(batch, heads, kv_len, work.itemsize)

    def one_chunk(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor | None, start: int) -> Any:
        # The plain formula on these rows, the callable applied to their scaled scores at their positions.
        n = q_rows.shape[2]
        visible = visibility(resolved, (batch, heads, n, kv_len), q_rows.device, start)
        bias = None if resolved.bias is None else resolved.bias[:, :, start : start + n]
        return math_attention(
            q_rows,
            k,
            v,
            visible,
            bias,
            scale,
            softcap,
            sink,
            score_mod=lambda x: _modded(score_mod, x, start, resolved),
        )

    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    for start in range(0, q_len, rows):
        q_rows = query[:, :, start : start + rows]
        if torch.is_grad_enabled():
            out, lse = checkpoint(one_chunk, q_rows, key, value, sinks, start, use_reentrant=False)
        else:
            out, lse = one_chunk(q_rows, key, value, sinks, start)
        outs.append(out)
        lses.append(lse)
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).to(query.dtype)
    if not return_lse:
        return out, None
    return out, (lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)).to(torch.float32)


def _no_keys(
    query: torch.Tensor, dv: int, heads: int, sinks: torch.Tensor | None, return_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """No pair to score (no keys, or nothing to compute): output 0, LSE the sink (or -inf)."""
    batch, _, q_len, _ = query.shape
    out = query.new_zeros(batch, heads, q_len, dv)
    if not return_lse:
        return out, None
    if sinks is None:
        return out, torch.full((batch, heads, q_len), -math.inf, dtype=torch.float32, device=query.device)
    return out, sinks.to(torch.float32)[None, :, None].expand(batch, heads, q_len)


def _modded(score_mod: Callable[..., Any], scores: torch.Tensor, start: int, resolved: ResolvedMask) -> torch.Tensor:
    """``score_mod`` over one chunk's scores ``[B, H, rows, K]``, vectorised with vmap as flex's uncompiled path
    does, at the absolute positions ``q_offset + start + i`` and ``kv_offset + j``; its result checked."""
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
    from torch.nn.attention.flex_attention import _vmap_for_bhqkv

    batch, heads, n, kv_len = scores.shape
    device = scores.device

    def checked(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> Any:
        try:
            result = score_mod(score, b, h, q, kv)
        except Exception as e:
            raise ArgumentError(f"score_mod: raised {type(e).__name__}: {e}") from e
        if not isinstance(result, torch.Tensor):
            raise _ResultError(
                f"score_mod: expected a tensor (the modified score), got {type(result).__name__} {result!r}"
            )
        if not result.dtype.is_floating_point:
            raise _ResultError(f"score_mod: expected a floating-point score, got a {result.dtype} tensor")
        return result

    b_idx = torch.arange(batch, device=device)
    h_idx = torch.arange(heads, device=device)
    q_idx = torch.arange(start, start + n, device=device) + resolved.q_offset
    kv_idx = torch.arange(kv_len, device=device) + resolved.kv_offset
    with TransformGetItemToIndex():
        result = _vmap_for_bhqkv(checked, prefix=(0,))(scores, b_idx, h_idx, q_idx, kv_idx)
    if result.shape != scores.shape:
        raise _ResultError(
            f"score_mod: expected one score per (b, h, q_idx, kv_idx) pair, a tensor of shape "
            f"{list(scores.shape)} over the chunk, got shape {list(result.shape)} (a result of per-pair shape "
            f"{list(result.shape[4:])} instead of a scalar)"
        )
    return result.to(scores.dtype)
