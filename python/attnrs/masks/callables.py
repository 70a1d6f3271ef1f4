"""Evaluating an arbitrary ``mask_mod(b, h, q_idx, kv_idx)`` over a :class:`~attnrs.masks.grid.Grid` into a Rust
bitmap: in row chunks, by broadcasting index tensors as transformers does, else with ``torch.vmap``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import _attnrs
from ..errors import ArgumentError, AttnrsError, DtypeError, ShapeError
from .grid import Grid

__all__ = ["evaluate_callable"]

# Rows of a callable evaluated per chunk: keeps peak memory at O(chunk x KV) for arbitrary mask_mods.
_CALLABLE_CHUNK_ELEMENTS = 1 << 24


def evaluate_callable(fn: Callable[..., Any], use_vmap: bool, grid: Grid) -> Any:
    """Evaluates a callable leaf over ``grid`` into a Rust bitmap, in row chunks.

    Broadcasting first (transformers' default: index tensors shaped [B,1,1,1], [1,H,1,1], [1,1,Q,1], [1,1,1,K]);
    ``torch.vmap`` over the four indices when that fails or ``use_vmap`` was asked for."""
    if grid.batch == 0 or grid.heads == 0 or grid.q_len == 0 or grid.kv_len == 0:
        return _attnrs.MaskExpr.empty()  # no pair to evaluate (and no bitmap of zero batch or heads to build)
    b_idx = torch.arange(grid.batch)
    h_idx = torch.arange(grid.heads)
    kv_idx = torch.arange(grid.kv_len) + grid.kv_offset
    rows_per_chunk = max(1, _CALLABLE_CHUNK_ELEMENTS // max(1, grid.batch * grid.heads * grid.kv_len))
    builder = None
    for start in range(0, grid.q_len, rows_per_chunk):
        stop = min(grid.q_len, start + rows_per_chunk)
        q_idx = torch.arange(start, stop) + grid.q_offset
        values = _call_mask_mod(fn, b_idx, h_idx, q_idx, kv_idx, use_vmap)
        if builder is None:
            shape = [values.shape[0], values.shape[1], grid.q_len, grid.kv_len]
            builder = _attnrs.BitmapBuilder(shape, grid.q_offset, grid.kv_offset)
        builder.write_rows(start, values)
    assert builder is not None  # q_len > 0: at least one chunk
    return builder.finish()


def _call_mask_mod(
    fn: Callable[..., Any],
    b: torch.Tensor,
    h: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    use_vmap: bool,
) -> torch.Tensor:
    """``fn`` over the grid ``b x h x q x kv`` as a bool tensor [B|1, H|1, q, kv] (batch/head kept at 1 when the
    function ignores them)."""
    errors: list[str] = []
    if not use_vmap:
        try:
            out = fn(b[:, None, None, None], h[None, :, None, None], q[None, None, :, None], kv[None, None, None, :])
            return _as_bool_grid(out, len(b), len(h), len(q), len(kv))
        except AttnrsError:
            raise  # it ran, but returned something unusable: no point trying vmap
        except (RuntimeError, TypeError, IndexError, ValueError) as e:
            errors.append(f"broadcasting failed: {e}")
    try:
        from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

        vmapped = fn
        for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)):
            vmapped = torch.vmap(vmapped, in_dims=dims, out_dims=0)
        with TransformGetItemToIndex():
            out = vmapped(b, h, q, kv)
        return _as_bool_grid(out, len(b), len(h), len(q), len(kv))
    except AttnrsError:
        raise
    except (RuntimeError, TypeError, IndexError, ValueError) as e:
        errors.append(f"vmap failed: {e}")
    raise ArgumentError(
        "mask: the mask_mod cannot be vectorised; mask functions must be built from elementwise tensor ops and "
        "tensor indexing (no .item(), no Python `if` on tensors). " + "; ".join(errors)
    )


def _as_bool_grid(out: Any, batch: int, heads: int, q: int, kv: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise DtypeError(f"mask: the mask_mod returned {type(out).__name__}, expected a bool tensor")
    if out.dtype != torch.bool:
        raise DtypeError(f"mask: the mask_mod returned a {out.dtype} tensor, expected torch.bool")
    while out.dim() < 4:
        out = out.unsqueeze(0)
    keep_b = batch if out.shape[0] != 1 else 1
    keep_h = heads if out.shape[1] != 1 else 1
    try:
        out = out.expand(keep_b, keep_h, q, kv)
    except RuntimeError:
        raise ShapeError(
            f"mask_mod returned shape {list(out.shape)}, which does not broadcast to [{batch}, {heads}, {q}, {kv}]"
        ) from None
    return out.to("cpu").contiguous()
