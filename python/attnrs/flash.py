"""``attnrs.flash``: the flash-attn 2 Python API (``flash_attn.flash_attn_interface``) on attnrs's CPU kernel.

Code written for the flash-attn package runs unchanged on CPU tensors: the same functions, argument names,
defaults, layouts (``[batch, seqlen, nheads, headdim]``; varlen ``[total, nheads, headdim]``) and meanings:

* **Causal** is aligned to the bottom-right corner when ``seqlen_q != seqlen_k``, and ``window_size=(left,
  right)`` (a negative bound is infinite; ``causal=True`` sets ``right = 0``) lets query ``i`` see key ``j``
  iff ``i + sk - sq - left <= j <= i + sk - sq + right``. Built as attnrs :class:`~attnrs.masks.Mask` values
  (``causal(right)`` and ``~causal(-left - 1)``) placed at ``q_offset = sk - sq``: no dense mask.
* **softcap** ``> 0`` caps the scaled score, ``softcap * tanh(s / softcap)``; ``<= 0`` is off (flash's rule).
* **alibi_slopes** (float32 ``[nheads]`` or ``[batch, nheads]``) adds ``-slope * |i + sk - sq - j|``, causal or
  not, to the output *and* to the returned log-sum-exp (the documented formula). attnrs's ``scores.alibi`` adds
  ``slope * (kv - q)`` (signed), which equals it only where ``j <= i + sk - sq``; the exact bias is a
  :func:`~attnrs.scores.relative_bias` table ``-slope * |d|`` over ``clamp_buckets(max(sq, sk))``, which covers
  every distance of the call, evaluated in the kernel (float32, the same product flash computes). flash's CUDA
  kernel, for plain causal (no window), adds ``slope * j`` instead: the same output, but its ``softmax_lse``
  then differs from the documented formula (and from ours) by ``-slope * (i + sk - sq)``. Slopes per batch row
  run one kernel call per row. flash caps the score *before* adding ALiBi, while attnrs's score-mod form caps
  last; softcap together with alibi_slopes therefore runs as an exact Python ``score_mod`` (torch ops, slower).
* **GQA/MQA** by head count (``nheads % nheads_k == 0``), **dropout** by attnrs's kernel (seeded from torch's
  generator), gradients through ``flash_attn_func`` and the packed variants (attnrs's backward is always
  deterministic, so ``deterministic`` changes nothing). Rows that see no key give zeros and, as flash returns,
  a log-sum-exp of ``+inf`` (attnrs itself returns ``-inf`` there).
* ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: flash's third value (the softmax with the
  dropout pattern) "is for testing only", not guaranteed correct, and attnrs never forms the probabilities.

:func:`flash_attn_varlen_func` and :func:`flash_attn_with_kvcache` run on ``attnrs.varlen_attention`` (torch's
``varlen_attn`` call); with ALiBi, dropout or ``cache_leftpad`` they run one attnrs
call per sequence instead (views of the cache, no copy without paging). Anything else attnrs cannot honour is
refused with an :mod:`attnrs.errors` class naming the argument, never ignored. Dtypes are those
:func:`attnrs.attention` takes (float32, bfloat16, float16, float64: a superset of flash's fp16/bf16); index
tensors are int32 and slopes float32, as flash requires.

Import it as ``import attnrs.flash`` or ``from attnrs import flash`` (``import attnrs`` does not load it).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .attention.api import attention
from .attention.varlen import varlen_attention
from .errors import ArgumentError, DtypeError, ShapeError, UnsupportedError
from .masks import Mask
from .masks import mask as masks
from .scores import clamp_buckets, relative_bias

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

_Result = torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]


# ---------------------------------------------------------------------------------------------------------------
# Argument checks


def _tensor(x: Any, name: str, rank: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise DtypeError(f"{name}: expected a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ShapeError(f"{name}: expected a {rank}-D tensor {layout}, got shape {list(x.shape)}")
    return x


def _int_vector(x: Any, name: str, length: int | None, what: str) -> torch.Tensor:
    """An int32 tensor ``[length]`` (flash-attn takes int32 only)."""
    if not isinstance(x, torch.Tensor):
        raise DtypeError(f"{name}: expected an int32 torch.Tensor {what}, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise DtypeError(f"{name}: expected dtype int32 (as flash-attn), got {x.dtype}")
    if x.dim() != 1 or (length is not None and x.shape[0] != length):
        raise ShapeError(f"{name}: expected shape {what}, got {list(x.shape)}")
    return x


def _number(x: Any, name: str) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise ArgumentError(f"{name}: expected a finite number, got {type(x).__name__} {x!r}")
    return float(x)


def _flag(x: Any, name: str) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise ArgumentError(f"{name}: expected a bool, got {type(x).__name__} {x!r}")
    return bool(x)


def _softcap(softcap: Any) -> float | None:
    """flash's rule: anything > 0 caps, anything else is off."""
    value = _number(softcap, "softcap")
    return value if value > 0 else None


def _window(causal: Any, window_size: Any) -> tuple[int, int]:
    """``(left, right)`` with -1 for an infinite bound (every negative value is, as in flash-attn); ``causal``
    sets ``right = 0``."""
    causal = _flag(causal, "causal")
    if (
        not isinstance(window_size, Sequence)
        or len(window_size) != 2
        or any(isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Integral) for w in window_size)
    ):
        raise ArgumentError(f"window_size: expected a pair of ints (left, right), -1 = infinite, got {window_size!r}")
    left, right = (int(w) if int(w) >= 0 else -1 for w in window_size)
    return left, (0 if causal else right)


def _window_mask(left: int, right: int) -> Mask | None:
    """Key ``j`` visible for the query at position ``p`` iff ``p - left <= j <= p + right`` (None: all)."""
    parts = []
    if right >= 0:
        parts.append(masks.causal(right))  # j <= p + right
    if left >= 0:
        parts.append(~masks.causal(-left - 1))  # not (j <= p - left - 1)
    return masks.and_masks(*parts) if parts else None


def _alibi(slopes: Any, batch: int, heads: int) -> torch.Tensor | None:
    """The slopes as float32 ``[batch or 1, heads]``."""
    if slopes is None:
        return None
    expected = f"[{heads}] or [{batch}, {heads}] (nheads or batch_size x nheads)"
    if not isinstance(slopes, torch.Tensor):
        raise DtypeError(f"alibi_slopes: expected a float32 torch.Tensor {expected}, got {type(slopes).__name__}")
    if slopes.dtype != torch.float32:
        raise DtypeError(f"alibi_slopes: expected dtype float32 (as flash-attn), got {slopes.dtype}")
    if tuple(slopes.shape) == (heads,):
        return slopes[None]
    if tuple(slopes.shape) == (batch, heads):
        return slopes
    raise ShapeError(f"alibi_slopes: expected shape {expected}, got {list(slopes.shape)}")


def _check_qkv(q: Any, k: Any, v: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = "(batch_size, seqlen, nheads, headdim)"
    q = _tensor(q, "q", 4, layout)
    k = _tensor(k, "k", 4, "(batch_size, seqlen_k, nheads_k, headdim)")
    v = _tensor(v, "v", 4, "(batch_size, seqlen_k, nheads_k, headdim_v)")
    _check_heads(q, k, v, batch_dim=True)
    return q, k, v


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, batch_dim: bool) -> None:
    """q ``[(B,) S, H, D]``, k/v ``[(B,) Sk, Hkv, D]`` / ``[..., Dv]`` with ``H % Hkv == 0``."""
    if batch_dim and not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ShapeError(
            f"k/v: expected the query's batch size {q.shape[0]}, got k {list(k.shape)} and v {list(v.shape)}"
        )
    if k.shape[:-1] != v.shape[:-1]:
        raise ShapeError(f"v: expected the key's shape {list(k.shape[:-1])} up to headdim, got {list(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ShapeError(f"k: expected the query's headdim {q.shape[-1]}, got shape {list(k.shape)}")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads == 0 or heads % kv_heads:
        raise ShapeError(f"k: expected nheads_k dividing the query's {heads} heads (MQA/GQA), got {kv_heads}")


def _lse_flash(lse: torch.Tensor) -> torch.Tensor:
    """Rows that see no key: flash-attn returns +inf where attnrs returns -inf."""
    return torch.where(lse == -math.inf, math.inf, lse)


# ---------------------------------------------------------------------------------------------------------------
# The fixed-length core


def _alibi_table(slopes: torch.Tensor, q_len: int, kv_len: int) -> tuple[torch.Tensor, int]:
    """``-slopes[h] * |d|`` for ``d`` in ``[-m, m]``, ``m = max(q_len, kv_len)`` (every ``kv - q`` of the call:
    ``d = j - i - (kv_len - q_len)`` lies in ``[1 - kv_len, q_len - 1]``)."""
    m = max(q_len, kv_len, 1)
    distance = torch.arange(-m, m + 1, device=slopes.device).abs().to(torch.float32)
    return -slopes.detach()[:, None] * distance[None, :], m


def _capped_alibi(cap: float, slopes: torch.Tensor) -> Callable[..., torch.Tensor]:
    """flash's order: cap the scaled score, then add ALiBi (attnrs's score-mod value caps last)."""
    slopes = slopes.detach()

    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> Any:
        capped = cap * torch.tanh(score / cap)
        return capped - slopes[h] * (kv - q).abs().to(torch.float32)

    return score_mod


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    scale: float | None,
    window: tuple[int, int],
    cap: float | None,
    slopes: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn's forward on ``[B, S, H, D]`` tensors (one slope row ``[H]`` for the whole batch, or none):
    ``(out [B, Sq, H, Dv], lse [B, H, Sq])``. ``q``/``k``/``v`` enter attnrs as transposed views."""
    q_len, kv_len = q.shape[1], k.shape[1]
    score_mod: Any = None
    if slopes is not None:
        if cap is None:
            table, m = _alibi_table(slopes, q_len, kv_len)
            score_mod = relative_bias(table, clamp_buckets(m))
        else:
            if dropout_p > 0:
                raise UnsupportedError(
                    "dropout_p > 0 with softcap > 0 and alibi_slopes: flash caps the score before adding ALiBi, "
                    "which attnrs runs as a Python score_mod, and that path has no dropout"
                )
            score_mod, cap = _capped_alibi(cap, slopes), None
    mask = _window_mask(*window)
    if mask is None and score_mod is not None and kv_len != q_len:
        mask = masks.bidirectional()  # the score mod's positions need the offset, which only a Mask carries
    out, lse = attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        mask,
        dropout_p,
        scale=scale,
        enable_gqa=True,
        q_offset=kv_len - q_len if mask is not None else 0,
        softcap=cap,
        score_mod=score_mod,
        return_lse=True,
    )
    return out.transpose(1, 2), _lse_flash(lse)


def _attend_batch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    scale: float | None,
    window: tuple[int, int],
    cap: float | None,
    slopes: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_attend` with slopes ``[B or 1, H]``: one call per batch row when the rows' slopes differ."""
    if slopes is None or slopes.shape[0] == 1:
        return _attend(q, k, v, dropout_p, scale, window, cap, None if slopes is None else slopes[0])
    parts = [
        _attend(q[b : b + 1], k[b : b + 1], v[b : b + 1], dropout_p, scale, window, cap, slopes[b])
        for b in range(q.shape[0])
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _scalars(dropout_p: Any, softmax_scale: Any, deterministic: Any, return_attn_probs: Any) -> tuple[float, Any]:
    dropout = _number(dropout_p, "dropout_p")
    if not 0 <= dropout <= 1:
        raise ArgumentError(f"dropout_p: expected a probability in [0, 1], got {dropout_p!r}")
    _flag(deterministic, "deterministic")  # attnrs's backward is deterministic either way
    _flag(return_attn_probs, "return_attn_probs")
    scale = None if softmax_scale is None else _number(softmax_scale, "softmax_scale")
    return dropout, scale


def _result(out: torch.Tensor, lse: torch.Tensor, return_attn_probs: bool) -> _Result:
    return (out, lse, None) if return_attn_probs else out


# ---------------------------------------------------------------------------------------------------------------
# Fixed-length entry points


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> _Result:
    """flash-attn's ``flash_attn_func``: ``q [B, Sq, H, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]`` -> ``out [B, Sq,
    H, D]`` (and ``softmax_lse [B, H, Sq]``, ``None`` with ``return_attn_probs``). Differentiable. See the
    module docstring for causal/window alignment, ALiBi, softcap and what ``return_attn_probs`` returns."""
    q, k, v = _check_qkv(q, k, v)
    dropout, scale = _scalars(dropout_p, softmax_scale, deterministic, return_attn_probs)
    window = _window(causal, window_size)
    slopes = _alibi(alibi_slopes, q.shape[0], q.shape[2])
    out, lse = _attend_batch(q, k, v, dropout, scale, window, _softcap(softcap), slopes)
    return _result(out, lse, bool(return_attn_probs))


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> _Result:
    """flash-attn's ``flash_attn_qkvpacked_func``: ``qkv [B, S, 3, H, D]``; :func:`flash_attn_func` on its
    three views."""
    qkv = _tensor(qkv, "qkv", 5, "(batch_size, seqlen, 3, nheads, headdim)")
    if qkv.shape[2] != 3:
        raise ShapeError(f"qkv: expected shape (batch_size, seqlen, 3, nheads, headdim), got {list(qkv.shape)}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs
    )


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> _Result:
    """flash-attn's ``flash_attn_kvpacked_func``: ``kv [B, Sk, 2, Hkv, D]``; :func:`flash_attn_func` on its
    two views."""
    kv = _tensor(kv, "kv", 5, "(batch_size, seqlen_k, 2, nheads_k, headdim)")
    if kv.shape[2] != 2:
        raise ShapeError(f"kv: expected shape (batch_size, seqlen_k, 2, nheads_k, headdim), got {list(kv.shape)}")
    k, v = kv.unbind(2)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs
    )


# ---------------------------------------------------------------------------------------------------------------
# Variable length and the KV cache: attnrs.varlen_attention


def _lse_request() -> Any:
    from torch.nn.attention.varlen import AuxRequest

    return AuxRequest(lse=True)


def _bounds(cu_seqlens: torch.Tensor, name: str, total: int) -> list[int]:
    """The values of ``cu_seqlens`` (non-decreasing from 0, ending at most at ``total``)."""
    values = [int(x) for x in cu_seqlens.tolist()]
    if values[0] != 0 or any(b < a for a, b in itertools.pairwise(values)) or values[-1] > total:
        raise ArgumentError(
            f"{name}: expected cumulative lengths from 0, non-decreasing, up to the {total} tokens, got {values}"
        )
    return values


def _paged_keys(cache: torch.Tensor, pages: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Positions ``[start, end)`` of one sequence's paged cache ``[num_pages, page, Hkv, D]`` as ``[n, Hkv, D]``
    (a view when its pages are one page, else gathered)."""
    page = cache.shape[1]
    first, last = start // page, -(-end // page)
    used = pages[first:last].long()
    if used.numel() == 1:
        return cache[int(used[0]), start - first * page : end - first * page]
    rows = cache.index_select(0, used).flatten(0, 1)
    return rows[start - first * page : end - first * page]


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> _Result:
    """flash-attn's ``flash_attn_varlen_func``: packed ``q [total_q, H, D]``, ``k``/``v`` ``[total_k, Hkv, D]``
    (or paged ``[num_blocks, page_block_size, Hkv, D]`` with ``block_table`` int32 ``[batch, max_blocks]``, where
    sequence ``b`` has ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` keys), int32 ``cu_seqlens_q``/``cu_seqlens_k``
    ``[batch + 1]`` -> ``out [total_q, H, D]`` (and ``softmax_lse [H, total_q]``, ``None``). Causal and windows
    are aligned bottom-right per sequence.

    Runs on ``attnrs.varlen_attention``; with ``alibi_slopes`` or ``dropout_p > 0`` (which it does not take) one
    attnrs call per sequence instead."""
    paged = block_table is not None
    q = _tensor(q, "q", 3, "(total_q, nheads, headdim)")
    kv_layout = "(num_blocks, page_block_size, nheads_k, headdim)" if paged else "(total_k, nheads_k, headdim)"
    k = _tensor(k, "k", 4 if paged else 3, kv_layout)
    v = _tensor(v, "v", 4 if paged else 3, kv_layout)
    _check_heads(q, k, v, batch_dim=False)
    cu_q = _int_vector(cu_seqlens_q, "cu_seqlens_q", None, "(batch_size + 1,)")
    if cu_q.shape[0] < 1:
        raise ShapeError("cu_seqlens_q: expected shape (batch_size + 1,), got [0]")
    batch = cu_q.shape[0] - 1
    cu_k = _int_vector(cu_seqlens_k, "cu_seqlens_k", batch + 1, f"({batch + 1},) (cu_seqlens_q's)")
    if paged:
        table = _tensor(block_table, "block_table", 2, "(batch_size, max_num_blocks_per_seq)")
        if table.dtype != torch.int32:
            raise DtypeError(f"block_table: expected dtype int32 (as flash-attn), got {table.dtype}")
        if table.shape[0] != batch:
            raise ShapeError(f"block_table: expected {batch} rows (cu_seqlens_q's batch), got {list(table.shape)}")
    dropout, scale = _scalars(dropout_p, softmax_scale, deterministic, return_attn_probs)
    window = _window(causal, window_size)
    cap = _softcap(softcap)
    slopes = _alibi(alibi_slopes, batch, q.shape[1])

    if slopes is not None or dropout > 0:
        q_at = _bounds(cu_q, "cu_seqlens_q", q.shape[0])
        k_at = _bounds(cu_k, "cu_seqlens_k", k.shape[0] * (k.shape[1] if paged else 1))
        outs, lses = [], []
        for b in range(batch):
            if paged:
                keys = _paged_keys(k, table[b], 0, k_at[b + 1] - k_at[b])
                values = _paged_keys(v, table[b], 0, k_at[b + 1] - k_at[b])
            else:
                keys, values = k[k_at[b] : k_at[b + 1]], v[k_at[b] : k_at[b + 1]]
            row = None if slopes is None else slopes[b if slopes.shape[0] > 1 else 0]
            out_b, lse_b = _attend(
                q[None, q_at[b] : q_at[b + 1]], keys[None], values[None], dropout, scale, window, cap, row
            )
            outs.append(out_b[0])
            lses.append(lse_b[0])
        out = torch.cat(outs) if outs else q.new_empty(0, q.shape[1], v.shape[-1])
        lse = torch.cat(lses, dim=1) if lses else q.new_empty(q.shape[1], 0, dtype=torch.float32)
        return _result(out, lse, bool(return_attn_probs))

    varlen = varlen_attention
    out, lse = varlen(
        q,
        k,
        v,
        cu_q,
        None if paged else cu_k,
        max_seqlen_q,
        max_seqlen_k,
        return_aux=_lse_request(),
        scale=scale,
        window_size=window,
        enable_gqa=True,
        seqused_k=(cu_k[1:] - cu_k[:-1]).to(torch.int32) if paged else None,
        block_table=block_table,
        softcap=cap,
    )
    return _result(out, _lse_flash(lse), bool(return_attn_probs))


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> _Result:
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: ``qkv [total, 3, H, D]``."""
    qkv = _tensor(qkv, "qkv", 4, "(total, 3, nheads, headdim)")
    if qkv.shape[1] != 3:
        raise ShapeError(f"qkv: expected shape (total, 3, nheads, headdim), got {list(qkv.shape)}")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> _Result:
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: ``kv [total_k, 2, Hkv, D]``."""
    kv = _tensor(kv, "kv", 4, "(total_k, 2, nheads_k, headdim)")
    if kv.shape[1] != 2:
        raise ShapeError(f"kv: expected shape (total_k, 2, nheads_k, headdim), got {list(kv.shape)}")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """flash-attn's rotary embedding (``flash_attn.layers.rotary.apply_rotary_emb``) of ``x [B, S, H, D]`` with
    ``cos``/``sin`` ``[B, S, rotary_dim / 2]`` (already at each token's position): the first ``rotary_dim``
    features rotated in pairs (``interleaved``: ``(0, 1), (2, 3), ...``; else GPT-NeoX's ``(i, i + rotary_dim /
    2)``), the rest unchanged; computed in float32 as flash's kernel does, returned in ``x``'s dtype."""
    half = cos.shape[-1]
    rotated = x[..., : 2 * half].float()
    c, s = cos[:, :, None, :].float(), sin[:, :, None, :].float()
    if interleaved:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rotated[..., :half], rotated[..., half:]
        out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., 2 * half :]), dim=-1)


def _num_splits(num_splits: Any) -> None:
    if isinstance(num_splits, (bool, np.bool_)) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ArgumentError(f"num_splits: expected an int >= 0 (0 = heuristic), got {num_splits!r}")


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """flash-attn's ``flash_attn_with_kvcache``: ``q [B, Sq, H, D]`` against a cache ``k_cache``/``v_cache``
    ``[B_cache, S_cache, Hkv, D]`` (rows picked by ``cache_batch_idx``, int32 ``[B]``), or paged ``[num_blocks,
    page_block_size, Hkv, D]`` with ``block_table`` int32 ``[B, max_blocks]`` -> ``out [B, Sq, H, D]`` (and
    ``softmax_lse [B, H, Sq]`` with ``return_softmax_lse``).

    Sequence ``b`` sees cache positions ``[cache_leftpad[b], cache_seqlens[b])`` (int or int32 ``[B]``; default:
    the whole cache) followed by the new ``k``/``v`` ``[B, S_new, Hkv, D]``, which are written into the caches
    **in place** at positions ``cache_seqlens[b]...`` first (paged too). With ``rotary_cos``/``rotary_sin``
    ``[seqlen_ro, rotary_dim / 2]`` (only with new ``k``), the new keys are rotated at positions
    ``cache_seqlens[b] + t`` before they are stored, and ``q`` at ``cache_seqlens[b] + i`` when causal or local,
    else at ``cache_seqlens[b]`` for every query (flash's rule); ``rotary_interleaved`` as flash's. Causal and
    windows are aligned bottom-right per sequence. ``num_splits`` (an int >= 0) is a scheduling hint of flash's
    kernel with no effect on the result: attnrs's split-KV decode chooses its own split. No backward (as flash):
    refused when a gradient would be needed.

    Runs on ``attnrs.varlen_attention`` (a contiguous cache as pages of ``S_cache`` positions, so no copy); with
    ``alibi_slopes`` or ``cache_leftpad``, one attnrs call per sequence on views of the cache."""
    q = _tensor(q, "q", 4, "(batch_size, seqlen_q, nheads, headdim)")
    paged = block_table is not None
    cache_layout = "(num_blocks, page_block_size, nheads_k, headdim)" if paged else "(batch_cache, seqlen_cache, ...)"
    k_cache = _tensor(k_cache, "k_cache", 4, cache_layout)
    v_cache = _tensor(v_cache, "v_cache", 4, cache_layout)
    _check_heads(q, k_cache, v_cache, batch_dim=False)
    if torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k_cache, v_cache, k, v)
    ):
        raise UnsupportedError(
            "flash_attn_with_kvcache: no backward pass (as flash-attn); run it under torch.no_grad() or "
            "torch.inference_mode(), or use flash_attn_func for gradients"
        )
    batch, q_len, heads = q.shape[0], q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    _num_splits(num_splits)
    return_lse = _flag(return_softmax_lse, "return_softmax_lse")
    interleaved = _flag(rotary_interleaved, "rotary_interleaved")
    scale = None if softmax_scale is None else _number(softmax_scale, "softmax_scale")
    cap = _softcap(softcap)
    slopes = _alibi(alibi_slopes, batch, heads)
    device = k_cache.device

    # Where each sequence's cache lives.
    if paged:
        table = _tensor(block_table, "block_table", 2, "(batch_size, max_num_blocks_per_seq)")
        if table.dtype != torch.int32:
            raise DtypeError(f"block_table: expected dtype int32 (as flash-attn), got {table.dtype}")
        if table.shape[0] != batch:
            raise ShapeError(f"block_table: expected {batch} rows (the query's batch), got {list(table.shape)}")
        if cache_batch_idx is not None:
            raise UnsupportedError("cache_batch_idx: not supported with a paged cache (block_table), as in flash-attn")
        if cache_leftpad is not None:
            raise UnsupportedError("cache_leftpad: not supported with a paged cache (block_table), as in flash-attn")
        capacity = table.shape[1] * k_cache.shape[1]
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= k_cache.shape[0]):
            raise ArgumentError(f"block_table: expected page indices in [0, {k_cache.shape[0]}), got out-of-range ones")
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None:
            if k_cache.shape[0] < batch:
                raise ShapeError(
                    f"k_cache: expected at least the query's {batch} batch rows (or cache_batch_idx), got "
                    f"{list(k_cache.shape)}"
                )
            rows = torch.arange(batch, dtype=torch.int32, device=device)
        else:
            rows = _int_vector(cache_batch_idx, "cache_batch_idx", batch, f"({batch},)")
            if batch and (int(rows.min()) < 0 or int(rows.max()) >= k_cache.shape[0]):
                raise ArgumentError(
                    f"cache_batch_idx: expected rows in [0, {k_cache.shape[0]}) (k_cache's), got {rows.tolist()}"
                )
        table = rows[:, None]  # a contiguous cache is a paged one with one page of S_cache positions per row

    if cache_seqlens is None:
        lengths = torch.full((batch,), capacity, dtype=torch.int32, device=device)
    elif isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, (bool, np.bool_)):
        lengths = torch.full((batch,), int(cache_seqlens), dtype=torch.int32, device=device)
    else:
        lengths = _int_vector(cache_seqlens, "cache_seqlens", batch, f"({batch},) or an int")
    if batch and (int(lengths.min()) < 0 or int(lengths.max()) > capacity):
        raise ArgumentError(f"cache_seqlens: expected lengths in [0, {capacity}] (the cache's), got {lengths.tolist()}")
    if cache_leftpad is None:
        leftpad = None
    else:
        leftpad = _int_vector(cache_leftpad, "cache_leftpad", batch, f"({batch},)")
        if batch and (bool((leftpad < 0).any()) or bool((leftpad > lengths).any())):
            raise ArgumentError(
                f"cache_leftpad: expected 0 <= cache_leftpad <= cache_seqlens, got {leftpad.tolist()} and "
                f"{lengths.tolist()}"
            )

    # The new keys and values: rotated, then written into the cache at cache_seqlens.
    new_len = 0
    if (k is None) != (v is None):
        raise ArgumentError("k/v: expected both new keys and values, or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ArgumentError("rotary_cos/rotary_sin: expected both or neither")
    if rotary_cos is not None and k is None:
        raise ArgumentError("rotary_cos/rotary_sin: only applicable with new k/v (as flash-attn), got k=None")
    if k is not None and v is not None:
        k = _tensor(k, "k", 4, "(batch_size, seqlen_new, nheads_k, headdim)")
        v = _tensor(v, "v", 4, "(batch_size, seqlen_new, nheads_k, headdim_v)")
        if k.shape[0] != batch or k.shape[2:] != k_cache.shape[2:] or v.shape != (*k.shape[:3], v_cache.shape[3]):
            raise ShapeError(
                f"k/v: expected ({batch}, seqlen_new, {kv_heads}, {k_cache.shape[3]}) and (..., {v_cache.shape[3]}) "
                f"(the query's batch, the caches' heads and headdims), got {list(k.shape)} and {list(v.shape)}"
            )
        if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
            raise DtypeError(f"k/v: expected the caches' dtype {k_cache.dtype}, got {k.dtype} and {v.dtype}")
        if cache_seqlens is None:
            raise ArgumentError("cache_seqlens: required with new k/v (where to append them in the cache)")
        new_len = k.shape[1]
        if batch and int(lengths.max()) + new_len > capacity:
            raise ShapeError(
                f"k: {new_len} new positions after cache_seqlens {lengths.tolist()} exceed the cache's {capacity}"
            )

    window = _window(causal, window_size)
    # flash-attn drops a bound that reaches past the cache (the same keys); it also decides the query rotary.
    window = (window[0] if window[0] < capacity else -1, window[1] if window[1] < capacity else -1)
    local = window != (-1, -1)

    if rotary_cos is not None and rotary_sin is not None and k is not None:
        cos = _tensor(rotary_cos, "rotary_cos", 2, "(seqlen_ro, rotary_dim / 2)")
        sin = _tensor(rotary_sin, "rotary_sin", 2, "(seqlen_ro, rotary_dim / 2)")
        if sin.shape != cos.shape or 2 * cos.shape[1] > q.shape[3] or cos.shape[1] == 0:
            raise ShapeError(
                f"rotary_cos/rotary_sin: expected equal shapes (seqlen_ro, rotary_dim / 2) with rotary_dim <= "
                f"headdim {q.shape[3]}, got {list(cos.shape)} and {list(sin.shape)}"
            )
        needed = (int(lengths.max()) + max(new_len, q_len if local else 1)) if batch else 0
        if needed > cos.shape[0]:
            raise ShapeError(f"rotary_cos: expected at least {needed} positions (seqlen_ro), got {cos.shape[0]}")
        start = lengths.long()[:, None]
        k_pos = start + torch.arange(new_len, device=device)[None]
        k = _rotary(k, cos[k_pos], sin[k_pos], interleaved)
        q_pos = start + (torch.arange(q_len, device=device)[None] if local else torch.zeros_like(start))
        q = _rotary(q, cos[q_pos], sin[q_pos], interleaved)
    if k is not None and v is not None and new_len:
        page = k_cache.shape[1]
        pos = lengths.long()[:, None] + torch.arange(new_len, device=device)[None]  # [B, S_new]
        pages = table.long().gather(1, pos // page)
        with torch.no_grad():
            k_cache[pages, pos % page] = k
            v_cache[pages, pos % page] = v

    seqused = lengths + new_len
    if leftpad is not None or slopes is not None:
        starts = [0] * batch if leftpad is None else [int(x) for x in leftpad.tolist()]
        ends = [int(x) for x in seqused.tolist()]
        outs, lses = [], []
        for b in range(batch):
            keys = _paged_keys(k_cache, table[b], starts[b], ends[b])
            values = _paged_keys(v_cache, table[b], starts[b], ends[b])
            row = None if slopes is None else slopes[b if slopes.shape[0] > 1 else 0]
            out_b, lse_b = _attend(q[b : b + 1], keys[None], values[None], 0.0, scale, window, cap, row)
            outs.append(out_b)
            lses.append(lse_b)
        out = torch.cat(outs) if outs else q.new_empty(0, q_len, heads, v_cache.shape[3])
        lse = torch.cat(lses) if lses else q.new_empty(0, heads, q_len, dtype=torch.float32)
    else:
        varlen = varlen_attention
        cu_q = (torch.arange(batch + 1, device=q.device) * q_len).to(torch.int32)
        flat, lse = varlen(
            q.reshape(batch * q_len, heads, q.shape[3]),
            k_cache,
            v_cache,
            cu_q,
            None,
            q_len,
            int(seqused.max()) if batch else 0,
            return_aux=_lse_request(),
            scale=scale,
            window_size=window,
            enable_gqa=True,
            seqused_k=seqused.to(torch.int32),
            block_table=table.to(torch.int32),
            softcap=cap,
        )
        out = flat.reshape(batch, q_len, heads, -1)
        lse = _lse_flash(lse).reshape(heads, batch, q_len).permute(1, 0, 2)
    return (out, lse) if return_lse else out
