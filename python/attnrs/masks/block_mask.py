"""Block-sparse masks that are FlexAttention ``BlockMask``\\ s, computed in Rust in O(blocks).

:func:`create_block_mask` has the signature and the output of ``torch.nn.attention.flex_attention.
create_block_mask`` (same counts, same index order), plus ``q_offset``/``kv_offset``. It returns an
:class:`attnrs.BlockMask`: a subclass of torch's ``BlockMask`` (so slicing, ``to_dense()``, ``_adjust`` and
``flex_attention`` keep working) that also carries the attnrs :class:`~attnrs.masks.Mask` and the Rust layout,
so the CPU kernel never needs a dense tensor.

Under ``torch.compile`` the tables come from the ``attnrs::block_tables`` operator on the mask's packed program (a
graph tensor, see :mod:`attnrs.masks.program`), so building a block mask in a compiled function is no graph break
and a new padding mask of the same shape needs no recompilation; the indices are then computed with the counts.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask

from .. import _attnrs
from ..arguments import check_memory, flag, positive
from ..errors import ArgumentError
from ..threads import num_threads
from .grid import Grid, check_grid
from .mask import Mask, MaskLike, check_tables, from_callable

__all__ = ["BlockMask", "create_block_mask"]


class _LazyIndices:
    """A ``BlockMask`` index tensor that is materialised from the Rust layout on first access.

    The Rust layout lists only the blocks that exist; torch's format pads every row to all blocks
    (``[B, H, rows, n_blocks]``), which is what costs memory at long lengths. The CPU kernel reads the Rust
    layout directly, so the padded tensors are only built when torch code (``flex_attention``, ``to_dense``,
    slicing) asks for them. Assigning the attribute (as torch's constructor does) stores the value as usual.
    """

    def __init__(self, direction: str) -> None:
        self.direction = direction

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}_value"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__.get(self.slot)
        if value is None and obj.__dict__.get("_layout") is not None:
            value = obj._materialize(self.direction)[1]
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value


class BlockMask(TorchBlockMask):
    """A FlexAttention ``BlockMask`` that remembers the attnrs mask it was built from.

    ``attnrs_mask`` is the mask in absolute positions and ``q_offset``/``kv_offset`` place row 0 / column 0;
    ``mask_mod`` is the same mask shifted by those offsets (what FlexAttention evaluates on partial blocks).
    The index tensors are built lazily from the Rust layout (see :class:`_LazyIndices`); counts are eager.
    """

    kv_indices = _LazyIndices("kv")
    full_kv_indices = _LazyIndices("full_kv")
    q_indices = _LazyIndices("q")
    full_q_indices = _LazyIndices("full_q")

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
        if layout is not None:
            # The constructor was handed placeholders; the real tensors come from the layout on demand.
            for name in ("kv_indices", "full_kv_indices", "q_indices", "full_q_indices"):
                self.__dict__.pop(f"_{name}_value", None)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(B, H, Q_LEN, KV_LEN)``, read from the counts so that no index tensor is materialised."""
        return tuple(self.kv_num_blocks.shape[:-1]) + tuple(self.seq_lengths)

    def _materialize(self, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts and torch-ordered indices of one direction (``kv``, ``full_kv``, ``q``, ``full_q``)."""
        batch, heads = self.kv_num_blocks.shape[:2]
        return _tables(self._layout, direction, batch, heads)

    def __repr__(self) -> str:
        return (
            f"attnrs.BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, sparsity={self.sparsity():.2f}%, "
            f"mask={self.attnrs_mask!r}, q_offset={self.q_offset}, kv_offset={self.kv_offset})"
        )


def _tables(layout: Any, direction: str, batch: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``[batch, heads, rows]`` and torch-ordered indices ``[batch, heads, rows, width]`` of one direction
    of a Rust layout. A layout that ignores the batch or the heads is computed once and broadcast (stride 0), as
    torch repeats it."""
    n_q, n_kv = layout.num_q_blocks, layout.num_kv_blocks
    rows, width = (n_q, n_kv) if direction.endswith("kv") else (n_kv, n_q)
    shape = [layout.layout_batch, layout.layout_heads, rows, width]
    check_memory("BLOCK_SIZE", 4 * math.prod(shape), f"torch's {direction}_indices {shape} (int32)")
    counts = torch.empty(layout.layout_batch, layout.layout_heads, rows, dtype=torch.int32)
    indices = torch.empty(layout.layout_batch, layout.layout_heads, rows, width, dtype=torch.int32)
    layout.write(direction, counts, indices)
    return counts.expand(batch, heads, rows), indices.expand(batch, heads, rows, width)


_DIRECTIONS = ("kv", "full_kv", "q", "full_q")


@torch.library.custom_op(
    "attnrs::block_tables",
    mutates_args=(),
    device_types="cpu",
    schema="(Tensor mask_program, SymInt batch, SymInt heads, SymInt q_len, SymInt kv_len, SymInt q_block, "
    "SymInt kv_block) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def block_tables_op(
    mask_program: torch.Tensor, batch: int, heads: int, q_len: int, kv_len: int, q_block: int, kv_block: int
) -> tuple[torch.Tensor, ...]:
    """The eight tables of a FlexAttention ``BlockMask`` (counts and indices of ``kv``, ``full_kv``, ``q``,
    ``full_q``; int32, contiguous) of a packed mask program placed at offset 0 on ``[batch, heads, q_len,
    kv_len]``. :func:`create_block_mask` calls it under ``torch.compile``: the program's tables are graph
    tensors, so the layout is computed at run time and a new padding mask needs no recompilation."""
    expr = _attnrs.operand_mask(mask_program)
    if expr is None:
        expr = _attnrs.MaskExpr.full()
    layout = expr.block_sparse(batch, heads, q_len, kv_len, 0, 0, q_block, kv_block, num_threads())
    return tuple(t.contiguous() for d in _DIRECTIONS for t in _tables(layout, d, batch, heads))


@block_tables_op.register_fake
def _(
    mask_program: torch.Tensor, batch: int, heads: int, q_len: int, kv_len: int, q_block: int, kv_block: int
) -> tuple[torch.Tensor, ...]:
    n_q, n_kv = (q_len + q_block - 1) // q_block, (kv_len + kv_block - 1) // kv_block
    tables: list[torch.Tensor] = []
    for direction in _DIRECTIONS:
        rows, width = (n_q, n_kv) if direction.endswith("kv") else (n_kv, n_q)
        tables.append(mask_program.new_empty(batch, heads, rows, dtype=torch.int32))
        tables.append(mask_program.new_empty(batch, heads, rows, width, dtype=torch.int32))
    return tuple(tables)


def _counts(layout: Any, direction: str, grid: Grid) -> torch.Tensor:
    rows = layout.num_q_blocks if direction.endswith("kv") else layout.num_kv_blocks
    counts = torch.empty(layout.layout_batch, layout.layout_heads, rows, dtype=torch.int32)
    layout.write_counts(direction, counts)
    return counts.expand(grid.batch, grid.heads, rows)


def _block_sizes(block_size: Any) -> tuple[int, int]:
    """torch's ``BLOCK_SIZE``: one positive int for both sides, or a ``(q, kv)`` pair."""
    expected = "a positive int or a (q, kv) pair of them"
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ArgumentError(f"BLOCK_SIZE: expected {expected}, got {block_size!r}")
        return positive(block_size[0], "BLOCK_SIZE[0]"), positive(block_size[1], "BLOCK_SIZE[1]")
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise ArgumentError(f"BLOCK_SIZE: expected {expected}, got {type(block_size).__name__} {block_size!r}")
    size = positive(block_size, "BLOCK_SIZE")
    return size, size


def index_table(indices: torch.Tensor, n: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[..., n]``: True at the entries of ``indices [..., k]`` that are ``valid`` (default: the
    non-negative ones, the "no entry" convention of top-k selections)."""
    indices = indices.long()
    valid = indices >= 0 if valid is None else valid
    dense = torch.zeros(*indices.shape[:-1], n + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, torch.where(valid, indices, n), True)  # invalid entries land in a spare column
    return dense[..., :n]


def listed_blocks(counts: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Bool [B, H, rows, n_cols]: the blocks each row lists (the first ``counts`` entries of ``indices``)."""
    return index_table(indices, n_cols, torch.arange(indices.shape[-1], device=indices.device) < counts[..., None])


def _from_kv_blocks(
    blocks: torch.Tensor, mask: Mask, grid: Grid, block_size: tuple[int, int], full: torch.Tensor | None = None
) -> BlockMask:
    """A BlockMask with torch's counts and index order (listed columns ascending, then the rest: torch's
    ``_dense_to_ordered``) from bool block tables ``[B, H, rows, cols]``; ``full`` None: no full blocks kept apart."""

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = dense.sum(-1, dtype=torch.int32)
        return counts, torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)

    kv_counts, kv_indices = ordered(blocks)
    full_counts, full_indices = ordered(full) if full is not None else (None, None)
    block_mask = BlockMask.from_kv_blocks(
        kv_counts,
        kv_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=mask.shifted(grid.q_offset, grid.kv_offset),
        seq_lengths=(grid.q_len, grid.kv_len),
    )
    block_mask.attnrs_mask, block_mask.q_offset, block_mask.kv_offset = mask, grid.q_offset, grid.kv_offset
    return block_mask


def _from_layout(mask: Mask, grid: Grid, block_size: tuple[int, int]) -> BlockMask:
    """The BlockMask of the Rust layout of ``mask`` on ``grid`` (indices materialised lazily)."""
    expr = mask.to_rust(grid)
    layout = expr.block_sparse(
        grid.batch,
        grid.heads,
        grid.q_len,
        grid.kv_len,
        grid.q_offset,
        grid.kv_offset,
        *block_size,
        num_threads(),
    )
    counts = {name: _counts(layout, name, grid) for name in ("kv", "full_kv", "q", "full_q")}
    placeholder = torch.empty(0, 0, dtype=torch.int32)  # replaced by the lazily built indices
    return BlockMask(
        (grid.q_len, grid.kv_len),
        counts["kv"],
        placeholder,
        counts["full_kv"],
        placeholder,
        counts["q"],
        placeholder,
        counts["full_q"],
        placeholder,
        BLOCK_SIZE=block_size,
        mask_mod=mask.shifted(grid.q_offset, grid.kv_offset),
        attnrs_mask=mask,
        q_offset=grid.q_offset,
        kv_offset=grid.kv_offset,
        layout=layout,
    )


def _traced_block_mask(mask: Mask, grid: Grid, block_size: tuple[int, int]) -> BlockMask:
    """The block mask under torch.compile: every table from :func:`block_tables_op` on the mask's program (a
    graph tensor), built in the graph without reading a value while tracing (Rust checks the tables when the
    operator runs)."""
    tables = torch.ops.attnrs.block_tables(
        mask.program(grid), grid.batch, grid.heads, grid.q_len, grid.kv_len, *block_size
    )
    return BlockMask(
        (grid.q_len, grid.kv_len),
        *tables,
        BLOCK_SIZE=block_size,
        mask_mod=mask.shifted(grid.q_offset, grid.kv_offset),
        attnrs_mask=mask,
        q_offset=grid.q_offset,
        kv_offset=grid.kv_offset,
    )


def create_block_mask(
    mask_mod: MaskLike,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str | None = None,
    BLOCK_SIZE: int | tuple[int, int] = 128,
    _compile: bool = False,
    separate_full_blocks: bool = True,
    compute_dq_write_order: bool = False,
    dq_kv_order: bool = True,
    *,
    q_offset: int = 0,
    kv_offset: int = 0,
) -> BlockMask:
    """The block-sparse layout of ``mask_mod`` over ``[B, H, Q_LEN, KV_LEN]``, equal to torch's
    ``create_block_mask`` for the same arguments (torch's signature, in its order), computed in Rust in O(blocks).

    ``B``/``H`` None mean 1; zero sizes give empty masks as torch's do. ``device`` places the result (the layout is
    computed on the CPU either way). ``separate_full_blocks=False`` lists full blocks as partial ones, as torch
    does; ``compute_dq_write_order``/``dq_kv_order`` add torch's deterministic-backward metadata (torch computes
    it). ``_compile`` is accepted for torch compatibility and changes nothing: there is no Python mask evaluation
    to compile when ``mask_mod`` is an attnrs Mask or a recognised function. attnrs's own keywords ``q_offset`` and
    ``kv_offset`` place row 0 and column 0 at those positions."""
    mask = from_callable(mask_mod)
    grid = check_grid(B, H, Q_LEN, KV_LEN, q_offset, kv_offset)
    block_size = _block_sizes(BLOCK_SIZE)
    flag(_compile, "_compile")
    flag(separate_full_blocks, "separate_full_blocks")
    flag(compute_dq_write_order, "compute_dq_write_order")
    flag(dq_kv_order, "dq_kv_order")
    rows, cols = -(-grid.q_len // block_size[0]), -(-grid.kv_len // block_size[1])
    if grid.batch == 0 or grid.heads == 0:
        empty = torch.zeros(grid.batch, grid.heads, rows, cols, dtype=torch.bool)
        block_mask = _from_kv_blocks(empty, mask, grid, block_size, empty if separate_full_blocks else None)
    elif torch.compiler.is_compiling():
        block_mask = _traced_block_mask(mask, grid, block_size)
    else:
        check_tables(mask, grid)
        block_mask = _from_layout(mask, grid, block_size)
        if not separate_full_blocks:
            listed = listed_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, cols)
            full = listed_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, cols)  # type: ignore[arg-type]
            block_mask = _from_kv_blocks(listed | full, mask, grid, block_size)
    if compute_dq_write_order:
        from torch.nn.attention.flex_attention import _compute_dq_write_order_from_block_mask

        block_mask.dq_write_order, block_mask.dq_write_order_full = _compute_dq_write_order_from_block_mask(
            block_mask, dq_kv_order=dq_kv_order
        )
        block_mask.dq_kv_order, block_mask.dq_kv_order_spt = None, dq_kv_order
    if device is not None and torch.device(device).type != "cpu":
        return block_mask.to(device)  # type: ignore[return-value]
    return block_mask
