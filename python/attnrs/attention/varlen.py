"""Variable-length (packed) and paged-KV attention: :func:`varlen_attention`, torch 2.15's
``torch.nn.attention.varlen.varlen_attn`` call and meaning, on the Rust kernel on CPU (torch's own raises
``NotImplementedError`` there) and delegated to torch's on CUDA.

A batch of ``N`` sequences is packed without padding: ``query [Tq, H, D]`` holds sequence ``b``'s rows
``cu_seq_q[b]:cu_seq_q[b + 1]``, ``key``/``value [Tk, Hkv, D]`` its keys ``cu_seq_k[b]:cu_seq_k[b + 1]``. With a
paged KV cache, ``key``/``value`` are a pool ``[num_pages, page_size, Hkv, D]`` and ``block_table [N, max_pages]``
(int32) lists each sequence's pages in order, ``seqused_k [N]`` its key count; the kernel reads the pool in place
(no gather). Sequences never see each other. ``window_size=(left, right)`` is flash-attn's window (``-1`` is
unbounded; ``(-1, 0)`` is causal), aligned to the bottom right when a sequence's query and key lengths differ:
query ``i`` sees key ``j`` iff ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``. A query that sees no key gets
zeros and ``lse = -inf``.

One kernel call runs every sequence: its work items are query blocks of all sequences together (threads are
balanced by tokens, not by sequences), and decode-shaped calls split each sequence's keys over threads. A
differentiable call (packed keys only, as torch's) runs through :func:`attnrs.attention`'s autograd instead: one
call with a document mask when every sequence's query and key lengths agree (training), else one per sequence.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import torch

from .. import _attnrs
from ..errors import ArgumentError, DeviceError, DtypeError, LayoutError, ShapeError, UnsupportedError
from ..masks.mask import Mask, and_masks, causal, document, sliding_window_overlay
from ..precision import f32_precision_code
from ..threads import num_threads
from .api import attention

__all__ = ["varlen_attention"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class _Plan(NamedTuple):
    """A checked call: the offsets as Python ints and what the kernel is told."""

    cu_q: list[int]
    cu_k: list[int] | None
    k_lens: list[int]
    scale: float
    softcap: float
    window: tuple[int, int]
    page_size: int


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux: Any = None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed variable-length sequences (see the module documentation); torch's ``varlen_attn``.

    Args:
        query: ``[Tq, H, D]``; key, value: ``[Tk, Hkv, D]`` (``Dv`` for value), or ``[num_pages, page_size, Hkv,
            D]`` pools with ``block_table``. One float dtype; ``H % Hkv == 0`` needs ``enable_gqa=True`` (torch's
            rule).
        cu_seq_q, cu_seq_k: int32/int64 ``[N + 1]`` offsets from 0 to ``Tq`` / ``Tk``, non-decreasing.
            ``cu_seq_k`` is ``None`` exactly when ``block_table`` is given.
        max_q, max_k: the longest query / key sequence (an upper bound is fine; a smaller value is refused).
        return_aux: ``torch.nn.attention.varlen.AuxRequest(lse=True)`` also returns the float32 log-sum-exp
            ``[H, Tq]``.
        scale: multiplies ``q·k`` (default ``1/sqrt(D)``).
        window_size: ``(left, right)``, ``-1`` unbounded; see the module documentation.
        seqused_k: int32/int64 ``[N]``: each sequence uses only its first ``seqused_k[b]`` keys (required with
            ``block_table``). Inference only, as torch's.
        block_table: int32 ``[N, max_pages]``: each sequence's pages of the pool, in order (any order, shared
            pages allowed). Inference only.
        num_splits: must be ``None``: the CPU kernel picks its own key split (torch uses ``1`` for batch
            invariance, which attnrs does not promise).
        softcap: attnrs's extra: ``s = softcap * tanh(s / softcap)`` on the scaled scores (flash-attn's).

    Returns:
        ``out [Tq, H, Dv]`` in the inputs' dtype, and ``lse [H, Tq]`` (float32) when ``return_aux.lse``.
    """
    want_lse = _wants_lse(return_aux)
    if num_splits is not None:
        raise UnsupportedError(
            f"num_splits: expected None (the CPU kernel picks its own key split), got {num_splits!r}"
        )
    if query.device.type == "cuda":
        return _on_cuda(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux, scale, window_size, enable_gqa,
            seqused_k, block_table, softcap,
        )  # fmt: skip
    plan = _check(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, enable_gqa, seqused_k,
        block_table, softcap,
    )  # fmt: skip
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if needs_grad:
        if seqused_k is not None or block_table is not None:
            raise UnsupportedError(
                "seqused_k/block_table: inference only (as torch's varlen_attn); run under torch.no_grad() "
                "or detach query, key and value"
            )
        out, lse = _differentiable(query, key, value, plan)
    else:
        out, lse = _forward(query, key, value, cu_seq_q, cu_seq_k, seqused_k, block_table, plan)
    return (out, lse) if want_lse else out


def _wants_lse(return_aux: Any) -> bool:
    if return_aux is None:
        return False
    lse = getattr(return_aux, "lse", None)
    if not isinstance(lse, bool):
        raise ArgumentError(
            f"return_aux: expected None or torch.nn.attention.varlen.AuxRequest(lse=...), got {return_aux!r}"
        )
    return lse


def _ints(
    t: torch.Tensor | None, name: str, rank: int, int32_only: bool = False, values: bool = True
) -> list[Any] | None:
    """The integer tensor's values (or only its checks, ``values=False``: the kernel reads the block table itself)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise ArgumentError(f"{name}: expected a tensor, got {type(t).__name__}")
    allowed = (torch.int32,) if int32_only else (torch.int32, torch.int64)
    if t.dtype not in allowed:
        want = "int32" if int32_only else "int32 or int64"
        raise DtypeError(f"{name}: expected {want}, got {t.dtype}")
    if t.device.type != "cpu":
        raise DeviceError(f"{name}: expected a CPU tensor like query, got {t.device}")
    if t.dim() != rank:
        raise ShapeError(f"{name}: expected a {rank}-D tensor, got shape {list(t.shape)}")
    return t.tolist() if values else None


def _check(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    scale: float | None,
    window_size: tuple[int, int],
    enable_gqa: bool,
    seqused_k: torch.Tensor | None,
    block_table: torch.Tensor | None,
    softcap: float | None,
) -> _Plan:
    """Every argument checked, each refusal naming it; the Rust kernel checks the offsets and pages again."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise DeviceError(f"{name}: expected a CPU tensor (CUDA calls go to torch's varlen_attn), got {t.device}")
        if t.dtype != query.dtype or t.dtype not in _FLOATS:
            raise DtypeError(f"{name}: expected one float dtype for query, key and value, got {t.dtype}")
    paged = block_table is not None
    kv_rank = 4 if paged else 3
    if query.dim() != 3:
        raise ShapeError(f"query: expected [Tq, H, D], got shape {list(query.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dim() != kv_rank:
            want = "[num_pages, page_size, Hkv, D] (block_table is given)" if paged else "[Tk, Hkv, D]"
            raise ShapeError(f"{name}: expected {want}, got shape {list(t.shape)}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ShapeError(f"value: expected the shape of key but the last dim, got {list(value.shape)}")
    if key.shape[-1] != query.shape[-1]:
        raise ShapeError(f"key: expected head dim {query.shape[-1]} (query's), got {key.shape[-1]}")
    heads, kv_heads = query.shape[1], key.shape[-2]
    if heads != kv_heads and not enable_gqa:
        raise ShapeError(
            f"key: expected {heads} heads like query (pass enable_gqa=True for grouped-query attention), got {kv_heads}"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ShapeError(f"key: expected a number of heads dividing query's {heads}, got {kv_heads}")
    cu_q = _ints(cu_seq_q, "cu_seq_q", 1)
    if cu_q is None:
        raise ArgumentError("cu_seq_q: expected a tensor, got None")
    cu_k = _ints(cu_seq_k, "cu_seq_k", 1)
    used = _ints(seqused_k, "seqused_k", 1)
    _ints(block_table, "block_table", 2, int32_only=True, values=False)  # its page ids: checked in Rust
    if paged and cu_k is not None:
        raise ArgumentError("cu_seq_k: expected None when block_table is given (seqused_k gives the key counts)")
    if paged and used is None:
        raise ArgumentError("seqused_k: expected each sequence's key count when block_table is given, got None")
    if not paged and cu_k is None:
        raise ArgumentError("cu_seq_k: expected a tensor of key offsets when block_table is None, got None")
    _cumulative(cu_q, "cu_seq_q", query.shape[0])
    if cu_k is not None:
        _cumulative(cu_k, "cu_seq_k", key.shape[0])
        if len(cu_k) != len(cu_q):
            raise ShapeError(f"cu_seq_k: expected {len(cu_q)} offsets like cu_seq_q, got {len(cu_k)}")
    n = len(cu_q) - 1
    if used is not None and len(used) != n:
        raise ShapeError(f"seqused_k: expected [{n}] (one count per sequence), got [{len(used)}]")
    k_lens = used if used is not None else [b - a for a, b in itertools.pairwise(cu_k or [])]
    q_lens = [b - a for a, b in itertools.pairwise(cu_q)]
    for name, bound, lens in (("max_q", max_q, q_lens), ("max_k", max_k, k_lens)):
        if isinstance(bound, bool) or not isinstance(bound, int):
            raise ArgumentError(f"{name}: expected an int, got {type(bound).__name__}")
        if lens and bound < max(lens):
            raise ArgumentError(f"{name}: expected at least the longest sequence ({max(lens)}), got {bound}")
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    ):
        raise ArgumentError(f"window_size: expected (left, right) ints, each -1 or >= 0, got {window_size!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ArgumentError(f"scale: expected a finite float, got {scale!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not 0 < softcap < math.inf):
        raise ArgumentError(f"softcap: expected None or a finite float > 0, got {softcap!r}")
    page_size = key.shape[1] if paged else 1
    for name, pool in (("key", key), ("value", value)):
        if paged and pool.stride(0) != page_size * pool.stride(1) and pool.shape[0] > 1:
            raise LayoutError(
                f"{name}: expected a pool whose pages follow each other (stride(0) == page_size * stride(1)), got "
                f"strides {list(pool.stride())}"
            )
    return _Plan(cu_q, cu_k, k_lens, float(scale), float(softcap or 0.0), (window_size[0], window_size[1]), page_size)


def _cumulative(cu: list[int], name: str, total: int) -> None:
    if not cu or cu[0] != 0 or cu[-1] != total or any(b < a for a, b in itertools.pairwise(cu)):
        raise ArgumentError(
            f"{name}: expected offsets starting at 0, non-decreasing and ending at the total length {total}, got "
            f"{cu if len(cu) <= 16 else [*cu[:8], '...', *cu[-4:]]}"
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[T, H, D]`` as the kernel's batch-1 ``[1, H, T, D]`` view."""
    return t.permute(1, 0, 2).unsqueeze(0)


def _pool_rows(pool: torch.Tensor) -> torch.Tensor:
    """A ``[num_pages, page_size, Hkv, D]`` pool as the batch-1 ``[1, Hkv, num_pages * page_size, D]`` view of its
    rows (pages follow each other, checked)."""
    pages, size, heads, dim = pool.shape
    st = pool.stride()
    return pool.as_strided((1, heads, pages * size, dim), (max(pages * size, 1) * st[1], st[2], st[1], st[3]))


def _forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    seqused_k: torch.Tensor | None,
    block_table: torch.Tensor | None,
    plan: _Plan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One kernel call: ``out [Tq, H, Dv]`` and ``lse [H, Tq]``."""
    tq, heads = query.shape[0], query.shape[1]
    out = torch.empty(tq, heads, value.shape[-1], dtype=query.dtype)
    lse = torch.empty(heads, tq, dtype=torch.float32)
    paged = block_table is not None
    k_rows, v_rows = (_pool_rows(key), _pool_rows(value)) if paged else (_rows(key), _rows(value))
    inputs = (_rows(query), k_rows, v_rows, None, None, None, None)
    no_mask = (torch.empty(0, dtype=torch.uint8), None, None)
    scalars = (plan.scale, plan.softcap, 0.0, 0, num_threads(), f32_precision_code())
    ragged = (cu_seq_q, cu_seq_k, seqused_k, block_table, plan.page_size, *plan.window)
    _attnrs.varlen_attention_forward(inputs, (_rows(out), lse.unsqueeze(0)), no_mask, scalars, ragged)
    return out, lse


def _window_mask(window: tuple[int, int]) -> Mask | None:
    """The window over positions of one sequence whose query ``i`` is placed at ``Lk - Lq + i``, as a mask."""
    left, right = window
    parts = ([causal(right)] if right >= 0 else []) + ([sliding_window_overlay(left + 1)] if left >= 0 else [])
    return and_masks(*parts) if parts else None


def _differentiable(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: _Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """The call through :func:`attnrs.attention`'s autograd (gradients of out and lse, no recomputation).

    Sequences of equal query and key lengths (training's packed batches) are one call over the packed rows with a
    document mask, whose positions are each sequence's own up to a shift, so the window needs no alignment; other
    batches run sequence by sequence."""
    assert plan.cu_k is not None  # no pages here: refused before
    window = _window_mask(plan.window)
    if plan.cu_q == plan.cu_k:
        lengths = torch.tensor([b - a for a, b in itertools.pairwise(plan.cu_q)])
        ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None]
        mask = document(ids) if window is None else document(ids) & window
        out, lse = attention(
            _rows(query), _rows(key), _rows(value), attn_mask=mask, scale=plan.scale, enable_gqa=True,
            softcap=plan.softcap or None, return_lse=True, backend="native",
        )  # fmt: skip
        return out[0].transpose(0, 1), lse[0]
    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(itertools.pairwise(plan.cu_q), itertools.pairwise(plan.cu_k)):
        if k1 == k0:  # nothing to see: zeros and -inf, as the kernel gives
            outs.append(query.new_zeros(q1 - q0, query.shape[1], value.shape[-1]))
            lses.append(torch.full((query.shape[1], q1 - q0), -torch.inf))
            continue
        out, lse = attention(
            _rows(query[q0:q1]), _rows(key[k0:k1]), _rows(value[k0:k1]), attn_mask=window, scale=plan.scale,
            enable_gqa=True, q_offset=(k1 - k0) - (q1 - q0) if window is not None else 0,
            softcap=plan.softcap or None, return_lse=True, backend="native",
        )  # fmt: skip
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, -1)


def _on_cuda(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    return_aux: Any,
    scale: float | None,
    window_size: tuple[int, int],
    enable_gqa: bool,
    seqused_k: torch.Tensor | None,
    block_table: torch.Tensor | None,
    softcap: float | None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """torch's own varlen_attn (flash / cuDNN), which has no softcap."""
    if softcap is not None:
        raise UnsupportedError("softcap: torch's CUDA varlen_attn has no softcap; pass None on CUDA")
    from torch.nn.attention.varlen import varlen_attn

    result: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = varlen_attn(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux, scale=scale,
        window_size=window_size, enable_gqa=enable_gqa, seqused_k=seqused_k, block_table=block_table,
    )  # fmt: skip
    return result
