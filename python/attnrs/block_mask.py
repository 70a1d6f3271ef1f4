"""Block-sparse masks that are FlexAttention ``BlockMask``\\ s, computed in Rust in O(blocks).

:func:`create_block_mask` has the signature and the output of ``torch.nn.attention.flex_attention.
create_block_mask`` (same counts, same index order), plus ``q_offset``/``kv_offset``. It returns an
:class:`attnrs.BlockMask`: a subclass of torch's ``BlockMask`` (so slicing, ``to_dense()``, ``_adjust`` and
``flex_attention`` keep working) that also carries the attnrs :class:`~attnrs.masks.Mask` and the Rust layout,
so the CPU kernel never needs a dense tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask

from ._threads import num_threads
from .errors import ArgumentError
from .masks import Mask, MaskLike, _check_grid, from_callable

__all__ = ["BlockMask", "create_block_mask"]


class BlockMask(TorchBlockMask):
    """A FlexAttention ``BlockMask`` that remembers the attnrs mask it was built from.

    ``attnrs_mask`` is the mask in absolute positions and ``q_offset``/``kv_offset`` place row 0 / column 0;
    ``mask_mod`` is the same mask shifted by those offsets (what FlexAttention evaluates on partial blocks).
    """

    attnrs_mask: Mask | None
    q_offset: int
    kv_offset: int

    def __init__(
        self,
        *args: Any,
        attnrs_mask: Mask | None = None,
        q_offset: int = 0,
        kv_offset: int = 0,
        layout: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if attnrs_mask is None and isinstance(self.mask_mod, Mask):
            # Rebuilt by torch (``_adjust``, ``from_kv_blocks``): the mask_mod is our shifted mask.
            attnrs_mask, q_offset, kv_offset = self.mask_mod, 0, 0
        self.attnrs_mask = attnrs_mask
        self.q_offset = int(q_offset)
        self.kv_offset = int(kv_offset)
        self._layout = layout

    def __repr__(self) -> str:
        return (
            f"attnrs.BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, sparsity={self.sparsity():.2f}%, "
            f"mask={self.attnrs_mask!r}, q_offset={self.q_offset}, kv_offset={self.kv_offset})"
        )


def _block_sizes(block_size: Any) -> tuple[int, int]:
    sizes = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(sizes) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ArgumentError(f"BLOCK_SIZE: expected a positive int or a (q, kv) pair of them, got {block_size!r}")
    return int(sizes[0]), int(sizes[1])


def create_block_mask(
    mask: MaskLike,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    *,
    BLOCK_SIZE: int | tuple[int, int] = 128,
    q_offset: int = 0,
    kv_offset: int = 0,
    device: torch.device | str | None = None,
) -> BlockMask:
    """The block-sparse layout of ``mask`` over ``[B, H, Q_LEN, KV_LEN]``, equal to torch's
    ``create_block_mask`` for the same mask (``B``/``H`` None mean 1; H is kept at 1 when the mask ignores heads
    only if ``H`` is None, as in torch)."""
    mask = from_callable(mask)
    grid = _check_grid(B, H, Q_LEN, KV_LEN, q_offset, kv_offset)
    q_block, kv_block = _block_sizes(BLOCK_SIZE)
    expr = mask._expr(grid)
    layout = expr.block_sparse(
        grid.batch, grid.heads, grid.q_len, grid.kv_len, grid.q_offset, grid.kv_offset, q_block, kv_block,
        num_threads(),
    )
    n_q, n_kv = layout.num_q_blocks, layout.num_kv_blocks
    tensors = {}
    for name, rows, width in (("kv", n_q, n_kv), ("full_kv", n_q, n_kv), ("q", n_kv, n_q), ("full_q", n_kv, n_q)):
        counts = torch.empty(layout.layout_batch, layout.layout_heads, rows, dtype=torch.int32)
        indices = torch.empty(layout.layout_batch, layout.layout_heads, rows, width, dtype=torch.int32)
        layout.write(name, counts, indices)
        # A layout that ignores the batch or the heads is computed once and broadcast, as torch would repeat it.
        tensors[name] = (
            counts.expand(grid.batch, grid.heads, rows),
            indices.expand(grid.batch, grid.heads, rows, width),
        )
    block_mask = BlockMask(
        (grid.q_len, grid.kv_len),
        *tensors["kv"],
        *tensors["full_kv"],
        *tensors["q"],
        *tensors["full_q"],
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=mask.shifted(grid.q_offset, grid.kv_offset),
        attnrs_mask=mask,
        q_offset=grid.q_offset,
        kv_offset=grid.kv_offset,
        layout=layout,
    )
    if device is not None and torch.device(device).type != "cpu":
        return block_mask.to(device)  # type: ignore[return-value]
    return block_mask
