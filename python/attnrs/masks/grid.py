"""The rectangle a mask is evaluated on (:class:`Grid`) and the checks of the arguments that describe it."""

from __future__ import annotations

from typing import Any

from ..arguments import integer, non_negative

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

    def size(value: Any, name: str) -> int:
        return 1 if value is None else non_negative(value, name)

    return Grid(
        size(batch, "B"),
        size(heads, "H"),
        non_negative(q_len, "Q_LEN"),
        non_negative(kv_len, "KV_LEN"),
        integer(q_offset, "q_offset"),
        integer(kv_offset, "kv_offset"),
    )
