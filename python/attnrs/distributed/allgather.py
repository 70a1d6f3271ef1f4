"""All-gather attention: every rank gathers the whole K/V once and runs one attention call per query chunk at
the chunk's global positions (torch's ``context_parallel`` all-gather rotation). Fewer, larger messages than the
ring and no per-step merge; the price is holding the global K/V on every rank, so it suits short rings and
sequences. The backward reduce-scatters dK/dV to their owners with ``reduce_scatter_tensor`` (gloo has it in
the torch this is tested with, 2.15; older gloo builds refuse it as unsupported); where the backend refuses it,
an ``all_reduce`` of the global gradient followed by each rank slicing its own shard (``W`` times the traffic of
a reduce-scatter; fine for the short rings this variant is for).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .checks import check_call
from .pairs import pair_forward
from .sharding import rank_chunks, reorder_to_global

__all__ = ["all_reduce_sequence", "allgather_attention", "reduce_scatter_sequence"]


def _sharded_from_global(x: torch.Tensor, rank: int, world_size: int, layout: str) -> torch.Tensor:
    local = x.shape[2] // world_size
    return torch.cat([x.narrow(2, c.start, c.size) for c in rank_chunks(local, world_size, rank, layout)], 2)


class _GatherSequence(torch.autograd.Function):
    """All-gather of a shard ``[B, H, L_local, D]`` into the global ``[B, H, L, D]``; backward: the sum over
    ranks of the global gradient, each rank keeping its own shard."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, rank: int, world_size: int, layout: str) -> torch.Tensor:
        ctx.args = (group, rank, world_size, layout)
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return reorder_to_global(parts, 2, layout)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        group, rank, world_size, layout = ctx.args
        try:
            mine = reduce_scatter_sequence(grad, group, rank, world_size, layout)
        except (RuntimeError, NotImplementedError) as e:
            # The same backend on every rank refuses it the same way, so every rank falls back together.
            if "support" not in str(e).lower():
                raise
            mine = all_reduce_sequence(grad, group, rank, world_size, layout)
        return mine, None, None, None, None


def reduce_scatter_sequence(grad: torch.Tensor, group: Any, rank: int, world_size: int, layout: str) -> torch.Tensor:
    """This rank's shard of the sum over ranks of the global ``grad`` ``[B, H, L, D]``, by ``reduce_scatter_tensor``
    (the shards concatenated rank-major along dim 0, as it splits its input)."""
    by_rank = torch.cat([_sharded_from_global(grad, r, world_size, layout) for r in range(world_size)])
    mine = grad.new_empty(by_rank.shape[0] // world_size, *by_rank.shape[1:])
    dist.reduce_scatter_tensor(mine, by_rank, group=group)
    return mine


def all_reduce_sequence(grad: torch.Tensor, group: Any, rank: int, world_size: int, layout: str) -> torch.Tensor:
    """:func:`reduce_scatter_sequence`'s result by ``all_reduce`` and a slice, for backends without a
    reduce-scatter."""
    total = grad.contiguous().clone()
    dist.all_reduce(total, group=group)
    return _sharded_from_global(total, rank, world_size, layout)


def allgather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Any = None,
    *,
    group: Any = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    layout: str = "zigzag",
    return_lse: bool = False,
) -> Any:
    """:func:`~attnrs.distributed.ring_attention`'s call and result, computed by gathering K/V on every rank
    (see the module documentation). A collective: every rank of ``group`` calls it."""
    checked = check_call(q, k, v, mask, scale, layout, group, "allgather_attention")
    gather = (group, checked.rank, checked.world_size, layout)
    k_all = _GatherSequence.apply(k, *gather)
    v_all = _GatherSequence.apply(v, *gather)
    outs, lses = [], []
    for c in rank_chunks(q.shape[2], checked.world_size, checked.rank, layout):
        out, lse = pair_forward(q.narrow(2, c.local, c.size), k_all, v_all, checked.mask, c.start, 0, checked.scale)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    return (out, lse) if return_lse else out
