"""Masks as dense tensors: :func:`create_dense_mask` (bool, or additive float), written by Rust with per-row
interval fills."""

from __future__ import annotations

import math

import torch

from ..arguments import check_memory
from ..errors import DtypeError
from ..threads import num_threads
from .grid import check_grid
from .mask import MaskLike, check_tables, from_callable

__all__ = ["create_dense_mask"]


def create_dense_mask(
    mask: MaskLike,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    *,
    q_offset: int = 0,
    kv_offset: int = 0,
    dtype: torch.dtype = torch.bool,
) -> torch.Tensor:
    """The mask as a dense ``[B, H|1, Q_LEN, KV_LEN]`` tensor.

    ``dtype=torch.bool``: True = attend. A floating dtype gives an additive mask: 0 where visible,
    ``torch.finfo(dtype).min`` where masked (transformers' eager convention). The head dimension is 1 when the
    mask ignores heads; a mask that ignores the batch is computed once and expanded (batch stride 0), like
    transformers' ``sdpa_mask``."""
    mask = from_callable(mask)
    grid = check_grid(B, H, Q_LEN, KV_LEN, q_offset, kv_offset)
    if dtype != torch.bool and not dtype.is_floating_point:
        raise DtypeError(f"dtype: expected torch.bool or a floating dtype, got {dtype}")
    check_tables(mask, grid)
    expr = mask.to_rust(grid)
    batch_out = grid.batch if expr.depends_on_batch() else 1
    heads_out = grid.heads if expr.depends_on_head() else 1
    shape = [batch_out, heads_out, grid.q_len, grid.kv_len]
    element = 1 if dtype == torch.bool else 1 + dtype.itemsize  # the bool grid, then the additive copy
    check_memory("Q_LEN/KV_LEN", element * math.prod(shape), f"a dense mask of {shape} ({dtype})")
    visible = torch.empty(*shape, dtype=torch.bool)
    if visible.numel():
        expr.fill_dense(visible, grid.q_offset, grid.kv_offset, num_threads())
    if dtype != torch.bool:
        visible = torch.where(visible, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)
    return visible.expand(grid.batch, -1, -1, -1)
