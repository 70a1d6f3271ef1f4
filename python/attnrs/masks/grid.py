"""The rectangle a mask is evaluated on (:class:`Grid`) and the checks of the arguments that describe it."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ArgumentError

__all__ = ["Grid", "check_grid"]


class Grid:
    """The rectangle a mask is evaluated on: batch, heads, and absolute query/key position ranges."""

    __slots__ = ("batch", "heads", "kv_len", "kv_offset", "q_len", "q_offset")

    def __init__(self, batch: int, heads: int, q_len: int, kv_len: int, q_offset: int, kv_offset: int) -> None:
        self.batch, self.heads, self.q_len, self.kv_len = batch, heads, q_len, kv_len
        self.q_offset, self.kv_offset = q_offset, kv_offset

    def shifted(self, q: int, kv: int) -> Grid:
        return Grid(self.batch, self.heads, self.q_len, self.kv_len, self.q_offset + q, self.kv_offset + kv)


def check_grid(batch: Any, heads: Any, q_len: Any, kv_len: Any, q_offset: Any, kv_offset: Any) -> Grid:
    """The grid of ``create_dense_mask`` / ``create_block_mask``'s ``B, H, Q_LEN, KV_LEN, q_offset, kv_offset``
    (``B``/``H`` None mean 1), or an :class:`~attnrs.ArgumentError` naming the bad argument."""

    def nonneg(value: Any, name: str, allow_none: bool = False) -> int:
        if value is None and allow_none:
            return 1
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
        return value

    grid = Grid(
        nonneg(batch, "B", allow_none=True),
        nonneg(heads, "H", allow_none=True),
        nonneg(q_len, "Q_LEN"),
        nonneg(kv_len, "KV_LEN"),
        nonneg(q_offset, "q_offset"),
        nonneg(kv_offset, "kv_offset"),
    )
    for name, value in (("B", grid.batch), ("H", grid.heads), ("Q_LEN", grid.q_len), ("KV_LEN", grid.kv_len)):
        if value < 0:
            raise ArgumentError(f"{name}: expected a non-negative int, got {value}")
    return grid
