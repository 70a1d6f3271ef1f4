"""All-gather attention: every rank gathers the whole K/V once and runs one attention call per query chunk at
the chunk's global positions (torch's ``context_parallel`` all-gather rotation). Fewer, larger messages than the
ring and no per-step merge; the price is holding the global K/V on every rank, so it suits short rings and
sequences. The backward reduce-scatters dK/dV to their owners: ``reduce_scatter_tensor`` where the backend has
it, and on gloo (which has no reduce-scatter) an ``all_reduce`` of the global gradient followed by each rank
slicing its own shard (``W`` times the traffic of a reduce-scatter; fine for the short rings this is for).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .checks import check_call
from .pairs import pair_forward
from .sharding import rank_chunks, reorder_to_global

__all__ = ["allgather_attention"]


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
        if dist.get_backend(group) == "gloo":
            total = grad.contiguous()
            dist.all_reduce(total, group=group)
            return _sharded_from_global(total, rank, world_size, layout), None, None, None, None
        # Rank-major order along a leading dim, as reduce_scatter_tensor splits its input.
        by_rank = torch.stack([_sharded_from_global(grad, r, world_size, layout) for r in range(world_size)])
        mine = torch.empty_like(by_rank[0])
        dist.reduce_scatter_tensor(mine, by_rank.contiguous(), group=group)
        return mine, None, None, None, None


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
