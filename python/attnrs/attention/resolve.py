"""Resolving the arguments of ``attnrs.attention``: the checks of query/key/value and the scalars, and the mask
argument turned into a :class:`ResolvedMask` (a structural mask placed on the grid plus dense tensors), the form
every backend takes; :func:`kernel_operands` packs it for the custom operators."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.attention.bias import CausalBias, CausalVariant
from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask

from ..errors import ArgumentError, DeviceError, DtypeError, ShapeError
from ..masks.block_mask import BlockMask
from ..masks.grid import Grid
from ..masks.mask import Mask, causal, from_callable
from .ops import KernelOperands

__all__ = ["ResolvedMask", "check_inputs", "check_scalars", "kernel_operands", "resolve_mask"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class ResolvedMask:
    """A mask in the forms the kernels take: a structural mask placed on the grid, plus dense tensors."""

    structural: Mask | None = None
    q_offset: int = 0
    kv_offset: int = 0
    dense_bool: torch.Tensor | None = None  # [B, H, Q, K] view (stride 0 where broadcast)
    bias: torch.Tensor | None = None  # additive float, [B, H, Q, K] view

    def program(self, grid: Grid) -> torch.Tensor:
        """The structural mask placed at the offsets as the packed uint8 operand the custom operators take (empty
        when there is none)."""
        if self.structural is None:
            return torch.empty(0, dtype=torch.uint8)
        return self.structural.program(grid)


def check_inputs(query: Any, key: Any, value: Any) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise DtypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ShapeError(f"{name}: expected a 4-D tensor [B, H, S, D], got shape {list(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise DtypeError(f"{name}: expected float32, bfloat16, float16 or float64, got {t.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise DtypeError(
            f"key/value: expected the query's dtype {query.dtype}, got key {key.dtype} and value {value.dtype}"
        )
    if key.device != query.device or value.device != query.device:
        raise DeviceError(
            f"key/value: expected the query's device {query.device}, got key on {key.device} and value on "
            f"{value.device}"
        )
    b, h, _, d = query.shape
    if key.shape[0] != b or value.shape[0] != b:
        raise ShapeError(f"key/value: expected batch {b}, got key {key.shape[0]} and value {value.shape[0]}")
    if key.shape[1] != value.shape[1] or key.shape[2] != value.shape[2]:
        raise ShapeError(
            f"value: expected the key's heads and length {list(key.shape[1:3])}, got {list(value.shape[1:3])}"
        )
    if key.shape[3] != d:
        raise ShapeError(f"key: expected head dim {d} (the query's), got {key.shape[3]}")
    if key.shape[1] == 0 or h % key.shape[1] != 0:
        raise ShapeError(f"key: expected a head count dividing the query's {h} (GQA), got {key.shape[1]}")


def _check_dense(mask: torch.Tensor, shape: tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
    if mask.device != device:
        raise DeviceError(f"mask: expected a tensor on {device} (the query's device), got {mask.device}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise DtypeError(f"mask: expected a bool or floating tensor, got {mask.dtype}")
    if mask.dim() > 4:
        raise ShapeError(f"mask: expected a tensor broadcastable to {list(shape)}, got shape {list(mask.shape)}")
    try:
        broadcast = torch.broadcast_shapes(mask.shape, shape)  # type: ignore[no-untyped-call]
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(shape):
        raise ShapeError(f"mask: expected a tensor broadcastable to {list(shape)}, got shape {list(mask.shape)}")
    return mask.expand(shape)


def _listed_blocks(counts: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Bool [B, H, rows, n_cols]: the blocks each row lists (the first ``counts`` entries of ``indices``)."""
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    dense = torch.zeros(*indices.shape[:-1], n_cols + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, torch.where(valid, indices.long(), n_cols), True)  # unlisted slots land in a spare column
    return dense[..., :n_cols]


def _block_mask_as_mask(block_mask: TorchBlockMask, batch: int, heads: int) -> Mask:
    """A torch BlockMask as a Mask: full blocks visible, partial blocks through ``mask_mod``, others hidden."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    n_cols = -(-block_mask.seq_lengths[1] // kv_block)
    listed = _listed_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, n_cols).cpu()
    full = torch.zeros_like(listed)
    if block_mask.full_kv_num_blocks is not None:
        full = _listed_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_cols).cpu()  # type: ignore[arg-type]

    def lookup(table: torch.Tensor) -> Any:
        def blocks(b: Any, h: Any, q: Any, kv: Any) -> Any:
            rows = b if table.shape[0] > 1 else torch.zeros_like(b)
            cols = h if table.shape[1] > 1 else torch.zeros_like(h)
            return table[rows, cols, q // q_block, kv // kv_block]

        return blocks

    partial = from_callable(lookup(listed)) & from_callable(block_mask.mask_mod)
    return from_callable(lookup(full)) | partial


def _is_plain_tensor(t: torch.Tensor) -> bool:
    """Whether ``t``'s values are its storage: a torch.Tensor, or a subclass that does not override
    ``__torch_function__`` (Parameter, and the fake and functional tensors of tracing, disable it)."""
    override = getattr(type(t), "__torch_function__", None)
    override = getattr(override, "__func__", override)
    return override in (torch.Tensor.__torch_function__.__func__, torch._C._disabled_torch_function_impl)  # type: ignore[attr-defined]


def _causal_bias_mask(bias: CausalBias, q_len: int, kv_len: int) -> Mask:
    """torch's ``CausalBias`` as the structural mask it means, on row/column indices: ``causal_upper_left``
    lets query ``i`` see keys ``j <= i``, ``causal_lower_right`` keys ``j <= i + (K - Q)``."""
    if (bias.seq_len_q, bias.seq_len_kv) != (q_len, kv_len):
        raise ShapeError(
            f"mask: expected a CausalBias for Q={q_len}, K={kv_len}, got one for Q={bias.seq_len_q}, "
            f"K={bias.seq_len_kv}"
        )
    if bias.variant == CausalVariant.UPPER_LEFT:
        return causal(0)
    if bias.variant == CausalVariant.LOWER_RIGHT:
        return causal(kv_len - q_len)
    raise ArgumentError(f"mask: expected a CausalBias of variant UPPER_LEFT or LOWER_RIGHT, got {bias.variant!r}")


def resolve_mask(mask: Any, is_causal: bool, shape: tuple[int, int, int, int], device: torch.device) -> ResolvedMask:
    batch, heads, q_len, kv_len = shape
    resolved = ResolvedMask()
    structural: Mask | None = None
    if mask is None:
        pass
    elif isinstance(mask, CausalBias):
        structural = _causal_bias_mask(mask, q_len, kv_len)
    elif isinstance(mask, torch.Tensor) and not _is_plain_tensor(mask):
        # Its storage need not hold its values (CausalBias's is uninitialised): never read it.
        raise DtypeError(
            f"mask: expected a plain tensor, a CausalBias or a mask value, got the tensor subclass "
            f"{type(mask).__name__} (it overrides __torch_function__, so its storage may not hold its values)"
        )
    elif isinstance(mask, torch.Tensor):
        dense = _check_dense(mask, shape, device)
        if dense.dtype == torch.bool:
            resolved.dense_bool = dense
        else:
            resolved.bias = dense
    elif isinstance(mask, TorchBlockMask):
        if tuple(mask.seq_lengths) != (q_len, kv_len):
            raise ShapeError(
                f"mask: expected a BlockMask for Q={q_len}, K={kv_len}, got seq_lengths {tuple(mask.seq_lengths)}"
            )
        mb, mh = mask.shape[0], mask.shape[1]
        if mb not in (1, batch) or mh not in (1, heads):
            raise ShapeError(f"mask: expected a BlockMask for B={batch}, H={heads} (or 1), got B={mb}, H={mh}")
        if isinstance(mask, BlockMask) and mask.attnrs_mask is not None:
            structural, resolved.q_offset, resolved.kv_offset = mask.attnrs_mask, mask.q_offset, mask.kv_offset
        else:
            structural = _block_mask_as_mask(mask, batch, heads)
    elif isinstance(mask, Mask) or callable(mask):
        structural = from_callable(mask)
        resolved.q_offset = kv_len - q_len  # bottom-right: the queries are the last Q positions
    else:
        raise DtypeError(
            f"mask: expected None, an attnrs Mask, a mask_mod callable, a BlockMask or a tensor, got "
            f"{type(mask).__name__}"
        )
    if is_causal:
        # SDPA's top-left rule on row/column indices, whatever the offsets of the other mask.
        top_left = causal(resolved.kv_offset - resolved.q_offset)
        structural = top_left if structural is None else structural & top_left
    resolved.structural = structural
    return resolved


def _program(resolved: ResolvedMask, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The mask program for the grid. A structural mask is packed with torch ops, so torch.compile traces it
    into the graph with the operator; a mask with a callable part is evaluated in Rust outside the graph (see
    :meth:`Mask.program`)."""
    grid = Grid(shape[0], shape[1], shape[2], shape[3], resolved.q_offset, resolved.kv_offset)
    return resolved.program(grid)


def _is_real(x: Any) -> bool:
    """A real number that is not a bool: Python's int and float, and NumPy's scalars (numbers.Real)."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_scalars(query: torch.Tensor, scale: Any, softcap: Any, sinks: Any, dropout_p: Any) -> float:
    if scale is None:
        scale = query.shape[-1] ** -0.5 if query.shape[-1] else 1.0
    if not _is_real(scale) or not math.isfinite(scale):
        raise ArgumentError(f"scale: expected a finite number, got {scale!r}")
    if softcap is not None and (not _is_real(softcap) or not math.isfinite(softcap) or softcap <= 0):
        raise ArgumentError(f"softcap: expected None or a positive finite number, got {softcap!r}")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.dtype.is_floating_point:
            raise DtypeError(f"sinks: expected a floating tensor [H], got {getattr(sinks, 'dtype', type(sinks))}")
        if sinks.shape != (query.shape[1],):
            raise ShapeError(f"sinks: expected shape [{query.shape[1]}] (one per query head), got {list(sinks.shape)}")
        if sinks.device != query.device:
            raise DeviceError(f"sinks: expected a tensor on {query.device}, got {sinks.device}")
    if not _is_real(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ArgumentError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    return float(scale)


def kernel_operands(
    resolved: ResolvedMask,
    shape: tuple[int, int, int, int],
    sinks: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> KernelOperands:
    """The operands the custom operators take after query/key/value, for this mask on the ``[B, H, Q, K]`` grid."""
    return KernelOperands(
        resolved.dense_bool, resolved.bias, sinks, _program(resolved, shape), scale, float(softcap or 0.0)
    )
