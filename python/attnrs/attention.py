"""``attnrs.attention``: scaled dot-product attention with masks as values, on a Rust CPU kernel.

Layout and conventions follow ``torch.nn.functional.scaled_dot_product_attention``: ``query [B, H, Q, D]``,
``key [B, Hkv, K, D]``, ``value [B, Hkv, K, Dv]``, GQA when ``H % Hkv == 0``, output ``[B, H, Q, Dv]``.

Masks:

* ``None``; ``is_causal=True`` is SDPA's top-left causal mask (``kv <= q`` on row/column indices);
* an attnrs :class:`~attnrs.masks.Mask` or a plain ``mask_mod`` callable works on absolute positions and is
  aligned bottom-right when ``Q != K`` (query ``i`` sits at position ``K - Q + i``, the KV-cache convention);
* an :class:`attnrs.BlockMask` carries its own offsets and lengths, which must match the inputs exactly; a
  torch ``BlockMask`` is honoured block by block with its ``mask_mod`` on partial blocks;
* a dense bool (True = attend) or additive float tensor broadcastable to ``[B, H, Q, K]``.

Rows that see no key give zeros (and a log-sum-exp of ``-inf``), never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask

from . import _attnrs
from ._threads import num_threads
from .block_mask import BlockMask
from .errors import ArgumentError, DeviceError, DtypeError, ShapeError, UnsupportedError
from .masks import Mask, _check_tables, _Grid, from_callable

__all__ = ["BACKENDS", "attention", "check_backend"]

BACKENDS = ("auto", "native", "sdpa", "flex", "flash", "math")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class _ResolvedMask:
    """A mask in the forms the kernels take: a structural mask placed on the grid, plus dense tensors."""

    structural: Mask | None = None
    q_offset: int = 0
    kv_offset: int = 0
    dense_bool: torch.Tensor | None = None  # [B, H, Q, K] view (stride 0 where broadcast)
    bias: torch.Tensor | None = None  # additive float, [B, H, Q, K] view

    def program(self, grid: _Grid) -> torch.Tensor:
        """The structural mask placed at the offsets as the packed uint8 operand the custom operator takes (empty
        when there is none)."""
        if self.structural is None:
            return torch.empty(0, dtype=torch.uint8)
        _check_tables(self.structural, grid)
        offsets = (self.q_offset, self.kv_offset)
        cached = self.structural._program
        if cached is not None and cached[0] == offsets:
            # Structural masks encode the same on every grid (transformers reuses one per forward): one entry,
            # for the last offsets.
            return cached[1]
        operand = torch.frombuffer(_attnrs.mask_operand(self.structural._expr(grid), *offsets), dtype=torch.uint8)
        if self.structural.is_structural:
            self.structural._program = (offsets, operand)
        return operand


def _check_inputs(query: Any, key: Any, value: Any) -> None:
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
        broadcast = torch.broadcast_shapes(mask.shape, shape)
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
        full = _listed_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_cols).cpu()

    def lookup(table: torch.Tensor) -> Any:
        def blocks(b: Any, h: Any, q: Any, kv: Any) -> Any:
            rows = b if table.shape[0] > 1 else torch.zeros_like(b)
            cols = h if table.shape[1] > 1 else torch.zeros_like(h)
            return table[rows, cols, q // q_block, kv // kv_block]

        return blocks

    partial = from_callable(lookup(listed)) & from_callable(block_mask.mask_mod)
    return from_callable(lookup(full)) | partial


def _resolve_mask(
    mask: Any, is_causal: bool, shape: tuple[int, int, int, int], device: torch.device
) -> _ResolvedMask:
    batch, heads, q_len, kv_len = shape
    resolved = _ResolvedMask()
    structural: Mask | None = None
    if mask is None:
        pass
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
        causal = Mask("causal", {"offset": resolved.kv_offset - resolved.q_offset})
        structural = causal if structural is None else structural & causal
    resolved.structural = structural
    return resolved


@torch.compiler.disable
def _program(resolved: _ResolvedMask, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The mask program for the grid. Mask evaluation runs in Rust (and may call Python mask_mods), so under
    torch.compile it stays outside the graph; the operator itself is traced."""
    grid = _Grid(shape[0], shape[1], shape[2], shape[3], resolved.q_offset, resolved.kv_offset)
    return resolved.program(grid)


def _check_scalars(query: torch.Tensor, scale: Any, softcap: Any, sinks: Any, dropout_p: Any) -> float:
    if scale is None:
        scale = query.shape[-1] ** -0.5 if query.shape[-1] else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ArgumentError(f"scale: expected a finite number, got {scale!r}")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap)
        or softcap <= 0
    ):
        raise ArgumentError(f"softcap: expected None or a positive finite number, got {softcap!r}")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.dtype.is_floating_point:
            raise DtypeError(f"sinks: expected a floating tensor [H], got {getattr(sinks, 'dtype', type(sinks))}")
        if sinks.shape != (query.shape[1],):
            raise ShapeError(f"sinks: expected shape [{query.shape[1]}] (one per query head), got {list(sinks.shape)}")
        if sinks.device != query.device:
            raise DeviceError(f"sinks: expected a tensor on {query.device}, got {sinks.device}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ArgumentError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    return float(scale)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Any = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
) -> Any:
    """Attention over ``[B, H, S, D]`` tensors; see the module documentation for masks and alignment.

    Args:
        scale: multiplies ``Q Kᵀ`` (default ``D ** -0.5``).
        softcap: ``s = softcap * tanh(s / softcap)`` after scaling, before the mask (Gemma 2).
        sinks: ``[H]`` logits that join each row's softmax denominator only (GPT-OSS).
        return_lse: also return the float32 log-sum-exp ``[B, H, Q]`` of each row.
        dropout_p: dropout on the attention weights (always applied when > 0, as SDPA does). On CPU the Rust
            kernel drops with a counter-based generator seeded by one draw from torch's default generator
            (:func:`draw_dropout_seed`), so ``torch.manual_seed`` reproduces a run and the backward regenerates
            the forward's pattern (see :func:`dropout_keep_pattern`).
        backend: ``"auto"`` (see :mod:`attnrs.dispatch`), ``"native"`` (the Rust CPU kernel), ``"sdpa"``,
            ``"flex"``, ``"flash"`` (flash-attn, CUDA), ``"math"`` (plain differentiable torch), or the name of a
            registered native kernel (:func:`attnrs.register_native`, installed plugins, ``"attnrs"``: the
            built-in kernel through the kernel table).
    """
    _check_inputs(query, key, value)
    scale = _check_scalars(query, scale, softcap, sinks, dropout_p)
    check_backend(backend)
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    resolved = _resolve_mask(mask, bool(is_causal), shape, query.device)
    out, lse = run_resolved(query, key, value, resolved, scale, softcap, sinks, dropout_p, backend, return_lse)
    return (out, lse) if return_lse else out


def check_backend(backend: Any) -> None:
    """Raises ArgumentError unless ``backend`` is one of :data:`BACKENDS` or a registered native kernel (installed
    plugins are loaded the first time an unknown name is asked for)."""
    from .plugins import is_native

    if isinstance(backend, str) and (backend in BACKENDS or is_native(backend)):
        return
    raise ArgumentError(
        f"backend: expected one of {BACKENDS} or a registered native kernel {_attnrs.native_kernels()}, got "
        f"{backend!r}"
    )


def _run_kernel(
    name: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: _ResolvedMask,
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout_p: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs the registered native kernel ``name`` (forward only)."""
    from .dispatch import _needs_grad

    if dropout_p > 0:
        raise UnsupportedError(f"dropout_p > 0: native kernel {name!r} has no dropout; use backend='native'")
    if _needs_grad(query, key, value, sinks, resolved.bias):
        raise UnsupportedError(
            f"native kernel {name!r}: gradients through plugin kernels are not supported yet; run under "
            "torch.no_grad() / torch.inference_mode(), or use backend='auto'"
        )
    if query.device.type != "cpu":
        raise DeviceError(f"query: native kernel {name!r} gets CPU tensors from attnrs, got a tensor on {query.device}")
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out, lse = torch.ops.attnrs.native_attention(
        name, query, key, value, resolved.dense_bool, resolved.bias, sinks, _program(resolved, shape), scale,
        float(softcap or 0.0), return_lse,
    )
    return out.transpose(1, 2), (lse if return_lse else None)


def run_resolved(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: _ResolvedMask,
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout_p: float,
    backend: str,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs attention on an already resolved mask with the chosen backend (``auto``: see :mod:`attnrs.dispatch`)."""
    from .dispatch import _needs_grad, choose_backend

    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    if backend == "attnrs" and (dropout_p > 0 or _needs_grad(query, key, value, sinks, resolved.bias)):
        # The built-in kernel's dropout and backward are wired through autograd on the "native" operator.
        backend = "native"
    if backend not in BACKENDS:
        check_backend(backend)
        return _run_kernel(name=backend, query=query, key=key, value=value, resolved=resolved, scale=scale,
                           softcap=softcap, sinks=sinks, dropout_p=dropout_p, return_lse=return_lse)
    if backend == "auto":
        backend, _reason = choose_backend(query, key, value, resolved, softcap, sinks, dropout_p, return_lse)
    if backend == "native":
        if query.device.type != "cpu":
            raise DeviceError(f"query: the native backend runs on CPU, got a tensor on {query.device}")
        mask_program = _program(resolved, shape)
        seed = draw_dropout_seed() if dropout_p > 0 else None
        out, lse = torch.ops.attnrs.attention(
            query, key, value, resolved.dense_bool, resolved.bias, sinks, mask_program, scale, float(softcap or 0.0),
            float(dropout_p), seed,
        )
        return out.transpose(1, 2), lse
    from ._reference import torch_attention

    return torch_attention(backend, query, key, value, resolved, shape, scale, softcap, sinks, return_lse, dropout_p)


def draw_dropout_seed() -> torch.Tensor:
    """The int64 scalar seed one dropout call takes from torch's default CPU generator (one draw, so
    ``torch.manual_seed`` reproduces the pattern; under ``torch.compile`` the draw is traced like any random op)."""
    return torch.empty((), dtype=torch.int64).random_()


def dropout_keep_pattern(shape: tuple[int, int, int, int], dropout_p: float, seed: torch.Tensor | int) -> torch.Tensor:
    """The bool ``[B, H, Q, K]`` pattern (True = kept) the Rust kernel applies for this probability and seed:
    kept weights are scaled by ``1 / (1 - dropout_p)``. For tests and debugging; O(B·H·Q·K)."""
    out = torch.empty(tuple(shape), dtype=torch.bool)
    _attnrs.dropout_keep_pattern(out, float(dropout_p), _seed_value(float(dropout_p), torch.as_tensor(seed)))
    return out


def _seed_value(dropout_p: float, seed: torch.Tensor | None) -> int:
    """The seed tensor as the unsigned 64-bit integer the kernel takes (0 without dropout)."""
    if dropout_p == 0:
        return 0
    if seed is None or seed.numel() != 1 or seed.dtype != torch.int64:
        raise ArgumentError(f"dropout_seed: expected an int64 scalar tensor with dropout_p > 0, got {seed!r}")
    return int(seed.item()) & 0xFFFF_FFFF_FFFF_FFFF


@torch.library.custom_op("attnrs::attention", mutates_args=(), device_types="cpu")
def _attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dense_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    sinks: torch.Tensor | None,
    mask_program: torch.Tensor,
    scale: float,
    softcap: float,
    dropout_p: float,
    dropout_seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Rust CPU kernel. Returns ``out`` laid out ``[B, Q, H, Dv]`` (contiguous) and the f32 LSE [B, H, Q].
    ``dropout_seed`` is an int64 scalar tensor (a tensor, so that a new seed per call needs no recompilation)."""
    b, h, q_len, _ = query.shape
    out = torch.empty(b, q_len, h, value.shape[-1], dtype=query.dtype)
    lse = torch.empty(b, h, q_len, dtype=torch.float32)
    _attnrs.attention_forward(
        (query, key, value, sinks), (out.transpose(1, 2), lse), (mask_program, dense_mask, bias),
        (scale, softcap, dropout_p, _seed_value(dropout_p, dropout_seed), num_threads()),
    )
    return out, lse


@_attention_op.register_fake
def _(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dense_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    sinks: torch.Tensor | None,
    mask_program: torch.Tensor,
    scale: float,
    softcap: float,
    dropout_p: float,
    dropout_seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, q_len, _ = query.shape
    out = query.new_empty(b, q_len, h, value.shape[-1])
    lse = query.new_empty(b, h, q_len, dtype=torch.float32)
    return out, lse


@torch.library.custom_op("attnrs::attention_backward", mutates_args=(), device_types="cpu")
def _attention_backward_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dense_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    sinks: torch.Tensor | None,
    mask_program: torch.Tensor,
    scale: float,
    softcap: float,
    dropout_p: float,
    dropout_seed: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    want_sinks: bool,
    want_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Rust backward. ``out``/``grad_out`` are laid out [B, Q, H, Dv] like the forward's output. Returns
    (dq, dk, dv, dsinks f32 [H] or empty, dbias f32 [B, H, Q, K] or empty)."""
    grad_query = torch.empty(query.shape, dtype=query.dtype)
    grad_key = torch.empty(key.shape, dtype=key.dtype)
    grad_value = torch.empty(value.shape, dtype=value.dtype)
    grad_sinks = torch.empty(query.shape[1] if want_sinks else 0, dtype=torch.float32)
    b, h, q_len, _ = query.shape
    grad_bias = torch.empty((b, h, q_len, key.shape[2]) if want_bias else (0,), dtype=torch.float32)
    _attnrs.attention_backward(
        (query, key, value, sinks), (out.transpose(1, 2), lse), (mask_program, dense_mask, bias),
        (scale, softcap, dropout_p, _seed_value(dropout_p, dropout_seed), num_threads()),
        (grad_out.transpose(1, 2), grad_lse, grad_query, grad_key, grad_value, grad_sinks if want_sinks else None,
         grad_bias if want_bias else None),
    )
    return grad_query, grad_key, grad_value, grad_sinks, grad_bias


@_attention_backward_op.register_fake
def _(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dense_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    sinks: torch.Tensor | None,
    mask_program: torch.Tensor,
    scale: float,
    softcap: float,
    dropout_p: float,
    dropout_seed: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    want_sinks: bool,
    want_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, q_len, _ = query.shape
    return (
        torch.empty_like(query), torch.empty_like(key), torch.empty_like(value),
        query.new_empty(h if want_sinks else 0, dtype=torch.float32),
        query.new_empty((b, h, q_len, key.shape[2]) if want_bias else (0,), dtype=torch.float32),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    query, key, value, dense_mask, bias, sinks, mask_program, scale, softcap, dropout_p, dropout_seed = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, dense_mask, bias, sinks, mask_program, dropout_seed, out, lse)
    ctx.params = (scale, softcap, dropout_p)


def _backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple[Any, ...]:
    query, key, value, dense_mask, bias, sinks, mask_program, dropout_seed, out, lse = ctx.saved_tensors
    want_bias, want_sinks = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
    dq, dk, dv, dsinks, dbias = torch.ops.attnrs.attention_backward(
        query, key, value, dense_mask, bias, sinks, mask_program, *ctx.params, dropout_seed, out, lse, grad_out,
        grad_lse, bool(want_sinks), bool(want_bias),
    )
    return (
        dq, dk, dv, None,
        dbias.to(bias.dtype) if want_bias else None,
        dsinks.to(sinks.dtype) if want_sinks else None,
        None, None, None, None, None,
    )


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
    raise UnsupportedError(
        "attnrs.attention: second-order gradients (double backward, e.g. create_graph=True then backward) are not "
        "supported by the Rust kernel; use backend='math' for them"
    )


_attention_backward_op.register_autograd(_no_double_backward)


@torch.library.custom_op("attnrs::native_attention", mutates_args=(), device_types="cpu")
def _native_attention_op(
    name: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dense_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    sinks: torch.Tensor | None,
    mask_program: torch.Tensor,
    scale: float,
    softcap: float,
    want_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A registered native kernel by name. Returns ``out`` laid out ``[B, Q, H, Dv]`` and the f32 LSE [B, H, Q]
    (left unwritten when ``want_lse`` is False: kernels without an LSE are not asked for one)."""
    b, h, q_len, _ = query.shape
    out = torch.empty(b, q_len, h, value.shape[-1], dtype=query.dtype)
    lse = torch.empty(b, h, q_len, dtype=torch.float32)
    _attnrs.native_attention_forward(
        name, (query, key, value, sinks), (out.transpose(1, 2), lse if want_lse else None),
        (mask_program, dense_mask, bias), (scale, softcap, 0.0, 0, num_threads()),
    )
    return out, lse


@_native_attention_op.register_fake
def _(
    name: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dense_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    sinks: torch.Tensor | None,
    mask_program: torch.Tensor,
    scale: float,
    softcap: float,
    want_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, q_len, _ = query.shape
    out = query.new_empty(b, q_len, h, value.shape[-1])
    lse = query.new_empty(b, h, q_len, dtype=torch.float32)
    return out, lse
