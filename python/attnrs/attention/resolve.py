"""Resolving the arguments of ``attnrs.attention``: the checks of query/key/value and the scalars, and the mask
argument turned into a :class:`ResolvedMask` (a structural mask placed on the grid plus dense tensors), the form
every backend takes; :func:`kernel_operands` packs it for the custom operators."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn.attention.bias import CausalBias, CausalVariant
from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask

from ..arguments import FLOAT32_MAX, FLOAT32_TINY, MEMORY_BUDGET, check_memory, integer, is_real, strided
from ..errors import ArgumentError, DeviceError, DtypeError, ShapeError
from ..masks.block_mask import BlockMask, listed_blocks
from ..masks.grid import Grid
from ..masks.mask import Mask, causal, from_callable
from .ops import KernelOperands

__all__ = [
    "Batched",
    "ResolvedMask",
    "batched_inputs",
    "check_inputs",
    "check_scalars",
    "kernel_operands",
    "resolve_mask",
]

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


def _check_tensors(query: Any, key: Any, value: Any, *, exact_dim: int | None) -> None:
    """Types, dtypes, devices and ranks of query/key/value (``exact_dim`` None: any rank >= 3, ``[..., S, D]``)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise DtypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        strided(t, name)
        if exact_dim is not None and t.dim() != exact_dim:
            raise ShapeError(f"{name}: expected a 4-D tensor [B, H, S, D], got shape {list(t.shape)}")
        if t.dim() < 3:
            raise ShapeError(f"{name}: expected a tensor [..., H, S, D] of at least 3 dims, got shape {list(t.shape)}")
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


def _check_head_shapes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """The last three dims ``[H, S, D]``: K and V agree on heads and length, D matches, ``H % Hkv == 0`` (GQA)."""
    (h, _, d), (hkv, k_len, dk), (hv, v_len, _) = query.shape[-3:], key.shape[-3:], value.shape[-3:]
    if hkv != hv or k_len != v_len:
        raise ShapeError(f"value: expected the key's heads and length {[hkv, k_len]}, got {[hv, v_len]}")
    if dk != d:
        raise ShapeError(f"key: expected head dim {d} (the query's), got {dk}")
    if (hkv == 0 and h != 0) or (hkv != 0 and h % hkv != 0):
        raise ShapeError(f"key: expected a head count dividing the query's {h} (GQA), got {hkv}")


def _check_output_memory(batch: int, query: torch.Tensor, value: torch.Tensor) -> None:
    """The output ``[batch, H, Q, Dv]`` and its LSE must fit in memory (stride-0 inputs can describe any size)."""
    heads, q_len, dv = query.shape[-3], query.shape[-2], value.shape[-1]
    nbytes = batch * heads * q_len * (dv * query.dtype.itemsize + 4)
    if nbytes > MEMORY_BUDGET:  # every call passes here: the message is built only for the refusal
        check_memory("query", nbytes, f"an output of [{batch}, {heads}, {q_len}, {dv}] ({query.dtype}) and its LSE")


def check_inputs(query: Any, key: Any, value: Any) -> None:
    """query/key/value as the kernels take them: 4-D ``[B, H, S, D]`` with one batch size (transformers' form)."""
    _check_tensors(query, key, value, exact_dim=4)
    b = query.shape[0]
    if key.shape[0] != b or value.shape[0] != b:
        raise ShapeError(f"key/value: expected batch {b}, got key {key.shape[0]} and value {value.shape[0]}")
    _check_head_shapes(query, key, value)
    _check_output_memory(b, query, value)


class Batched(NamedTuple):
    """SDPA-style inputs ``[..., H, S, D]`` with their batch dims broadcast and flattened into one: the 4-D
    ``[B, H, S, D]`` tensors the kernels take (views where the strides allow), and the batch shape to restore."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    batch_shape: tuple[int, ...]

    def restore(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` -> ``[*batch_shape, ...]`` (for the output and the LSE)."""
        if len(self.batch_shape) == 1:
            return t  # one batch dim: already in shape (a reshape costs ~1.5 µs a call)
        return t.reshape(*self.batch_shape, *t.shape[1:])


def _broadcasts(shape: torch.Size, target: tuple[int, ...]) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == torch.Size(target)  # type: ignore[no-untyped-call]
    except RuntimeError:
        return False


def batched_inputs(query: Any, key: Any, value: Any, enable_gqa: Any) -> Batched:
    """SDPA's ``query [..., H, Q, D]``, ``key [..., Hkv, K, D]``, ``value [..., Hkv, K, Dv]`` checked and flattened
    to 4-D: the dims before the last three are batch dims and broadcast as SDPA's do (3-D inputs have none: their
    first dim is the heads, as in SDPA's GQA); GQA (``H % Hkv == 0``) is accepted with or without ``enable_gqa``."""
    if not isinstance(enable_gqa, (bool, np.bool_)):
        raise ArgumentError(f"enable_gqa: expected a bool, got {type(enable_gqa).__name__} {enable_gqa!r}")
    _check_tensors(query, key, value, exact_dim=None)
    _check_head_shapes(query, key, value)
    leading = [t.shape[:-3] for t in (query, key, value)]
    try:
        # Equal batch dims (the usual call) need no broadcast: torch.broadcast_shapes costs ~20 µs a call.
        same = leading[0] == leading[1] == leading[2]
        batch_shape = tuple(leading[0] if same else torch.broadcast_shapes(*leading))  # type: ignore[no-untyped-call]
    except RuntimeError:
        raise ShapeError(
            f"key/value: expected batch dims broadcastable with the query's {list(leading[0])}, got key "
            f"{list(leading[1])} and value {list(leading[2])}"
        ) from None
    batch = math.prod(batch_shape)
    _check_output_memory(batch, query, value)

    if same and len(batch_shape) == 1:
        return Batched(query, key, value, batch_shape)  # already the kernels' [B, H, S, D]: no view to make

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.expand(*batch_shape, *t.shape[-3:]).reshape(batch, *t.shape[-3:])

    return Batched(flat(query), flat(key), flat(value), batch_shape)


def _check_dense(
    mask: torch.Tensor, shape: tuple[int, int, int, int], device: torch.device, arg: str, batch_shape: tuple[int, ...]
) -> torch.Tensor:
    """A dense mask broadcastable to ``[*batch_shape, H, Q, K]`` as a ``[B, H, Q, K]`` view (a copy only where
    several broadcast batch dims cannot be merged by strides)."""
    strided(mask, arg)
    if mask.device != device:
        raise DeviceError(f"{arg}: expected a tensor on {device} (the query's device), got {mask.device}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise DtypeError(f"{arg}: expected a bool or floating tensor, got {mask.dtype}")
    full = (*batch_shape, *shape[1:])
    if mask.dim() > len(full) or not _broadcasts(mask.shape, full):
        raise ShapeError(f"{arg}: expected a tensor broadcastable to {list(full)}, got shape {list(mask.shape)}")
    return mask.expand(full).reshape(shape)


def _block_mask_as_mask(block_mask: TorchBlockMask, batch: int, heads: int) -> Mask:
    """A torch BlockMask as a Mask: full blocks visible, partial blocks through ``mask_mod``, others hidden."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    n_cols = -(-block_mask.seq_lengths[1] // kv_block)
    listed = listed_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, n_cols).cpu()
    full = torch.zeros_like(listed)
    if block_mask.full_kv_num_blocks is not None:
        full = listed_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_cols).cpu()  # type: ignore[arg-type]

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


def _causal_bias_mask(bias: CausalBias, q_len: int, kv_len: int, arg: str) -> Mask:
    """torch's ``CausalBias`` as the structural mask it means, on row/column indices: ``causal_upper_left``
    lets query ``i`` see keys ``j <= i``, ``causal_lower_right`` keys ``j <= i + (K - Q)``."""
    if (bias.seq_len_q, bias.seq_len_kv) != (q_len, kv_len):
        raise ShapeError(
            f"{arg}: expected a CausalBias for Q={q_len}, K={kv_len}, got one for Q={bias.seq_len_q}, "
            f"K={bias.seq_len_kv}"
        )
    if bias.variant == CausalVariant.UPPER_LEFT:
        return causal(0)
    if bias.variant == CausalVariant.LOWER_RIGHT:
        return causal(kv_len - q_len)
    raise ArgumentError(f"{arg}: expected a CausalBias of variant UPPER_LEFT or LOWER_RIGHT, got {bias.variant!r}")


def resolve_mask(
    mask: Any,
    is_causal: bool,
    shape: tuple[int, int, int, int],
    device: torch.device,
    *,
    arg: str = "attn_mask",
    batch_shape: tuple[int, ...] | None = None,
    q_offset: Any = 0,
    kv_offset: Any = 0,
) -> ResolvedMask:
    """The mask argument (named ``arg`` in errors) as a :class:`ResolvedMask` on the ``[B, H, Q, K]`` grid.

    The alignment rule, the same for every form: a ``Mask`` or ``mask_mod`` callable sees query row ``i`` at
    position ``q_offset + i`` and key ``j`` at ``kv_offset + j`` (default 0 and 0: FlexAttention's indices); a
    BlockMask carries its own offsets; ``is_causal`` and ``CausalBias`` work on row/column indices as SDPA's do.
    ``batch_shape`` is the SDPA batch shape a dense mask broadcasts against (default ``[B]``)."""
    batch, heads, q_len, kv_len = shape
    offsets = (integer(q_offset, "q_offset"), integer(kv_offset, "kv_offset"))
    takes_offsets = isinstance(mask, Mask) or (callable(mask) and not isinstance(mask, (torch.Tensor, TorchBlockMask)))
    if offsets != (0, 0) and not takes_offsets:
        raise ArgumentError(
            f"q_offset/kv_offset: place a Mask or mask_mod callable; {arg} is {type(mask).__name__}, which has no "
            "positions to shift (a BlockMask carries its own offsets; tensors and CausalBias index rows/columns)"
        )
    resolved = ResolvedMask()
    structural: Mask | None = None
    if mask is None:
        pass
    elif isinstance(mask, CausalBias):
        structural = _causal_bias_mask(mask, q_len, kv_len, arg)
    elif isinstance(mask, torch.Tensor) and not _is_plain_tensor(mask):
        # Its storage need not hold its values (CausalBias's is uninitialised): never read it.
        raise DtypeError(
            f"{arg}: expected a plain tensor, a CausalBias or a mask value, got the tensor subclass "
            f"{type(mask).__name__} (it overrides __torch_function__, so its storage may not hold its values)"
        )
    elif isinstance(mask, torch.Tensor):
        dense = _check_dense(mask, shape, device, arg, (batch,) if batch_shape is None else batch_shape)
        if dense.dtype == torch.bool:
            resolved.dense_bool = dense
        else:
            resolved.bias = dense
    elif isinstance(mask, TorchBlockMask):
        if tuple(mask.seq_lengths) != (q_len, kv_len):
            raise ShapeError(
                f"{arg}: expected a BlockMask for Q={q_len}, K={kv_len}, got seq_lengths {tuple(mask.seq_lengths)}"
            )
        mb, mh = mask.shape[0], mask.shape[1]
        if mb not in (1, batch) or mh not in (1, heads):
            raise ShapeError(f"{arg}: expected a BlockMask for B={batch}, H={heads} (or 1), got B={mb}, H={mh}")
        if isinstance(mask, BlockMask) and mask.attnrs_mask is not None:
            structural, resolved.q_offset, resolved.kv_offset = mask.attnrs_mask, mask.q_offset, mask.kv_offset
        else:
            structural = _block_mask_as_mask(mask, batch, heads)
    elif takes_offsets:
        structural = from_callable(mask)
        resolved.q_offset, resolved.kv_offset = offsets
    else:
        raise DtypeError(
            f"{arg}: expected None, an attnrs Mask, a mask_mod callable, a BlockMask or a tensor, got "
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
    if resolved.structural is None:
        return torch.empty(0, dtype=torch.uint8)  # no mask program (the grid need not be built)
    grid = Grid(shape[0], shape[1], shape[2], shape[3], resolved.q_offset, resolved.kv_offset)
    return resolved.program(grid)


def check_scalars(query: torch.Tensor, scale: Any, softcap: Any, sinks: Any, dropout_p: Any) -> float:
    if scale is None:
        scale = query.shape[-1] ** -0.5 if query.shape[-1] else 1.0
    # The kernels compute in float32 (float64 inputs in float64): a scale float32 cannot hold would become inf.
    if not is_real(scale) or not math.isfinite(scale) or abs(scale) > FLOAT32_MAX:
        raise ArgumentError(f"scale: expected a finite number of magnitude at most {FLOAT32_MAX:.4g}, got {scale!r}")
    if softcap is not None and (
        not is_real(softcap) or not math.isfinite(softcap) or not FLOAT32_TINY <= softcap <= FLOAT32_MAX
    ):
        raise ArgumentError(
            f"softcap: expected None or a positive finite number in [{FLOAT32_TINY:.4g}, {FLOAT32_MAX:.4g}], "
            f"got {softcap!r}"
        )
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.dtype.is_floating_point:
            raise DtypeError(f"sinks: expected a floating tensor [H], got {getattr(sinks, 'dtype', type(sinks))}")
        strided(sinks, "sinks")
        if sinks.shape != (query.shape[1],):
            raise ShapeError(f"sinks: expected shape [{query.shape[1]}] (one per query head), got {list(sinks.shape)}")
        if sinks.device != query.device:
            raise DeviceError(f"sinks: expected a tensor on {query.device}, got {sinks.device}")
    if not is_real(dropout_p) or not 0.0 <= dropout_p <= 1.0:
        raise ArgumentError(f"dropout_p: expected a probability in [0, 1], got {dropout_p!r}")
    return float(scale)


def kernel_operands(
    resolved: ResolvedMask,
    shape: tuple[int, int, int, int],
    sinks: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    terms: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None),
) -> KernelOperands:
    """The operands the custom operators take after query/key/value, for this mask on the ``[B, H, Q, K]`` grid,
    and the score mod's ``terms`` ``(head_scale, distance, key)`` (see :class:`attnrs.scores.ScoreTerms`)."""
    head_scale, distance, key = terms
    return KernelOperands(
        resolved.dense_bool,
        resolved.bias,
        sinks,
        head_scale,
        distance,
        key,
        _program(resolved, shape),
        scale,
        float(softcap or 0.0),
    )
