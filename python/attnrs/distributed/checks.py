"""Argument checks of the context-parallel calls that cannot hang: every rank checks its own arguments without
raising, then the ranks exchange one small record (the error, if any, and the shapes, dtype, layout and mask kind)
and every rank raises the same typed error, or none. A rank that raised alone would leave the others blocked in
the ring's first receive.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .. import errors
from ..attention.resolve import check_scalars
from ..errors import ArgumentError, AttnrsError, DeviceError, DtypeError, ShapeError
from ..masks.grid import Grid
from ..masks.mask import Mask, causal, check_tables, from_callable
from .sharding import check_layout, chunks_per_rank, group_rank_and_size

__all__ = ["Checked", "check_call"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class Checked(NamedTuple):
    """What a checked call runs with."""

    mask: Mask | None
    scale: float
    rank: int
    world_size: int


class _Record(NamedTuple):
    """What one rank tells the others: its error (class name, message) or None, and what must agree."""

    error: tuple[str, str] | None
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    layout: str
    mask: str


def _mask(mask: Any) -> Mask | None:
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask == "causal":
            return causal()
        raise ArgumentError(f"mask: expected None, 'causal', an attnrs Mask or a mask_mod callable, got {mask!r}")
    if isinstance(mask, torch.Tensor) or not callable(mask):
        raise ArgumentError(
            f"mask: expected None, 'causal', an attnrs Mask or a mask_mod callable over global positions, got "
            f"{type(mask).__name__} (dense masks and BlockMasks are per (query, key) rectangle and are not sharded "
            "by context parallelism; build an attnrs.masks value instead)"
        )
    return from_callable(mask)


def _local(q: Any, k: Any, v: Any, mask: Any, scale: Any, layout: str, world_size: int) -> tuple[Mask | None, float]:
    """This rank's own checks; raises the first problem."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise DtypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ShapeError(f"{name}: expected a 4-D shard [B, H, L_local, D], got shape {list(t.shape)}")
        if t.dtype not in _DTYPES:
            raise DtypeError(f"{name}: expected float32, bfloat16, float16 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise DtypeError(f"k/v: expected the dtype of q ({q.dtype}), got k {k.dtype} and v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise DeviceError(f"k/v: expected the device of q ({q.device}), got k on {k.device} and v on {v.device}")
    b, h, n, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[2] != n or v.shape[2] != n:
        raise ShapeError(
            f"k/v: expected the batch and local length of q ({b}, {n}) (self-attention over one sequence), got "
            f"k {list(k.shape)} and v {list(v.shape)}"
        )
    if k.shape[3] != d or v.shape[1] != k.shape[1]:
        raise ShapeError(
            f"k/v: expected head dim {d} and v's heads equal to k's, got k {list(k.shape)}, v {list(v.shape)}"
        )
    if k.shape[1] == 0 or h % k.shape[1]:
        raise ShapeError(f"k: expected a head count dividing q's {h} (GQA), got {k.shape[1]}")
    parts = chunks_per_rank(layout)
    if n == 0 or n % parts:
        raise ShapeError(
            f"q: the {layout} layout holds {parts} equal chunk(s) per rank, so L_local must be a positive multiple "
            f"of {parts}; got {n}"
        )
    checked_mask = _mask(mask)
    if checked_mask is not None:
        try:
            check_tables(checked_mask, Grid(b, h, n * world_size, n * world_size, 0, 0))
        except ShapeError as e:
            raise ShapeError(
                f"mask: tables must cover the global sequence ({world_size} ranks x L_local {n} = {n * world_size} "
                f"positions): {e}"
            ) from None
    return checked_mask, check_scalars(q, scale, None, None, 0.0)


def check_call(q: Any, k: Any, v: Any, mask: Any, scale: Any, layout: Any, group: Any, kind: str) -> Checked:
    """Checks a ``ring_attention``/``allgather_attention`` call on every rank of ``group``; a collective. Raises
    the same typed error on every rank (naming the argument and the rank that has it), or returns the checked
    arguments."""
    rank, world_size = group_rank_and_size(group)  # not initialised: the same on every rank, nothing to agree on
    error: tuple[str, str] | None = None
    checked: tuple[Mask | None, float] = (None, 1.0)
    layout_name = str(layout)
    try:
        layout_name = check_layout(layout)
        checked = _local(q, k, v, mask, scale, layout_name, world_size)
    except AttnrsError as e:
        error = (type(e).__name__, str(e))
    except Exception as e:  # anything else must not leave the other ranks waiting either
        error = ("ArgumentError", f"{type(e).__name__}: {e}")
    shapes = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else () for t in (q, k, v))
    dtype = str(getattr(q, "dtype", type(q).__name__))
    mask_kind = "none" if checked[0] is None else checked[0].kind
    record = _Record(error, shapes, dtype, layout_name, mask_kind)
    records: list[Any] = [None] * world_size
    with torch.no_grad():
        dist.all_gather_object(records, record, group=group)
    for r, other in enumerate(records):
        if other.error is not None:
            cls = getattr(errors, other.error[0], AttnrsError)
            raise cls(f"{kind} (rank {r} of {world_size}): {other.error[1]}")
    first = records[0]
    for name, i in (("q", 0), ("k", 1), ("v", 2)):
        for r, other in enumerate(records):
            if other.shapes[i] != first.shapes[i]:
                raise ShapeError(
                    f"{kind}: {name}: expected the same shard shape on every rank, got {list(first.shapes[i])} on "
                    f"rank 0 and {list(other.shapes[i])} on rank {r}"
                )
    for field, arg in (("dtype", "q"), ("layout", "layout"), ("mask", "mask")):
        values = [getattr(other, field) for other in records]
        if len(set(values)) > 1:
            cls = DtypeError if field == "dtype" else ArgumentError
            raise cls(f"{kind}: {arg}: expected the same {field} on every rank, got {values} (rank by rank)")
    return Checked(checked[0], checked[1], rank, world_size)
