"""How a global sequence is split over the ranks of a context-parallel group: the ``zigzag`` (head-tail) and
``contiguous`` layouts, the chunks each rank holds (:func:`rank_chunks`), and the user-facing helpers
:func:`shard_sequence`, :func:`unshard_sequence` and :func:`shard_positions`.

``contiguous``: rank ``r`` of ``W`` holds positions ``[r * L/W, (r + 1) * L/W)``. Under a causal mask the last
rank does ``2W - 1`` times the work of the first. ``zigzag``: the sequence is cut in ``2W`` chunks and rank ``r``
holds chunks ``r`` and ``2W - 1 - r`` (concatenated in that order), so every rank has one early and one late chunk
and does the same causal work (ring-flash-attention's zigzag, torch's ``_HeadTailLoadBalancer``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..arguments import integer
from ..errors import ArgumentError, ShapeError

__all__ = [
    "LAYOUTS",
    "Chunk",
    "check_layout",
    "chunks_per_rank",
    "group_rank_and_size",
    "rank_chunks",
    "reorder_to_global",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]

LAYOUTS = ("zigzag", "contiguous")


class Chunk(NamedTuple):
    """A run of consecutive global positions held by one rank: ``size`` positions from ``start`` (global), stored
    from ``local`` in that rank's shard."""

    start: int
    local: int
    size: int


def check_layout(layout: Any) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`, else an ArgumentError."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ArgumentError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    """2 for zigzag (a head and a tail chunk), 1 for contiguous."""
    return 2 if check_layout(layout) == "zigzag" else 1


def rank_chunks(local_len: int, world_size: int, rank: int, layout: str) -> list[Chunk]:
    """The chunks rank ``rank`` of ``world_size`` holds when each rank holds ``local_len`` positions."""
    if chunks_per_rank(layout) == 1:
        return [Chunk(rank * local_len, 0, local_len)]
    c = local_len // 2
    return [Chunk(rank * c, 0, c), Chunk((2 * world_size - 1 - rank) * c, c, c)]


def group_rank_and_size(group: Any, world_size: Any = None, rank: Any = None) -> tuple[int, int]:
    """``(rank, world_size)``: the explicit ones when both are given (no process group needed), else the
    group's (the default group when ``group`` is None)."""
    if world_size is not None or rank is not None:
        if world_size is None or rank is None or group is not None:
            raise ArgumentError("world_size/rank: pass both (and no group), or a group (or neither: the default group)")
        size = integer(world_size, "world_size")
        where = integer(rank, "rank")
        if size < 1 or not 0 <= where < size:
            raise ArgumentError(
                f"world_size/rank: expected world_size >= 1 and 0 <= rank < world_size, got {size} and {where}"
            )
        return where, size
    if not dist.is_available() or not dist.is_initialized():
        raise ArgumentError(
            "group: torch.distributed is not initialised (call init_process_group first, or pass world_size and rank)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _divisible(length: int, world_size: int, layout: str, name: str) -> int:
    parts = world_size * chunks_per_rank(layout)
    if length % parts:
        raise ShapeError(
            f"{name}: the {layout} layout over {world_size} ranks cuts the sequence in {parts} equal chunks; "
            f"length {length} is not divisible by {parts}"
        )
    return length // world_size


def shard_positions(
    global_len: int, *, group: Any = None, world_size: Any = None, rank: Any = None, layout: str = "zigzag"
) -> torch.Tensor:
    """The global positions (int64 ``[L_local]``) of the rank's shard, in shard order: what a rank needs for its
    position ids (RoPE) or to build per-token tables. Masks passed to ring attention are over global positions
    already and need no translation."""
    where, size = group_rank_and_size(group, world_size, rank)
    local = _divisible(integer(global_len, "global_len"), size, layout, "global_len")
    return torch.cat([torch.arange(c.start, c.start + c.size) for c in rank_chunks(local, size, where, layout)])


def shard_sequence(
    x: torch.Tensor, dim: int, *, group: Any = None, world_size: Any = None, rank: Any = None, layout: str = "zigzag"
) -> torch.Tensor:
    """The rank's shard of the global tensor ``x`` along ``dim`` (a copy, contiguous), for ``layout``."""
    if not isinstance(x, torch.Tensor):
        raise ArgumentError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    where, size = group_rank_and_size(group, world_size, rank)
    dim = integer(dim, "dim") % max(x.dim(), 1)
    local = _divisible(x.shape[dim], size, layout, "x")
    return torch.cat([x.narrow(dim, c.start, c.size) for c in rank_chunks(local, size, where, layout)], dim)


def unshard_sequence(x_local: torch.Tensor, dim: int, *, group: Any = None, layout: str = "zigzag") -> torch.Tensor:
    """The global tensor from every rank's shard along ``dim`` (an all-gather, then the chunks put back in
    order); a collective: every rank of the group calls it. Not differentiable (the gradient of a shard is the
    rank's shard of the global gradient: :func:`shard_sequence`)."""
    if not isinstance(x_local, torch.Tensor):
        raise ArgumentError(f"x_local: expected a torch.Tensor, got {type(x_local).__name__}")
    _, size = group_rank_and_size(group)
    dim = integer(dim, "dim") % max(x_local.dim(), 1)
    local = x_local.shape[dim]
    if local % chunks_per_rank(layout):
        raise ShapeError(f"x_local: the {layout} layout needs an even local length along dim {dim}, got {local}")
    parts = [torch.empty_like(x_local) for _ in range(size)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    return reorder_to_global(parts, dim, layout)


def reorder_to_global(parts: list[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    """The global tensor from the shards of ranks ``0..W-1`` (each ``[.., L_local, ..]`` along ``dim``)."""
    size, local = len(parts), parts[0].shape[dim]
    pieces: list[tuple[int, torch.Tensor]] = []
    for r, part in enumerate(parts):
        pieces += [(c.start, part.narrow(dim, c.local, c.size)) for c in rank_chunks(local, size, r, layout)]
    return torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim)
