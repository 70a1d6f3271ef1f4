"""Masks as values.

A :class:`Mask` says which keys each query may see. It is built from structural pieces that Rust understands
(causal, sliding window, chunked, padding, packed documents, prefix-LM) and from arbitrary ``mask_mod``
callables, composed with ``&``, ``|`` and ``~``. Positions are absolute: row ``i`` of a grid built with
``q_offset`` is position ``q_offset + i`` (transformers' convention).

A ``Mask`` is also a ``mask_mod``: ``mask(b, h, q_idx, kv_idx)`` returns a bool tensor for broadcastable index
tensors and under ``torch.vmap``, so it can be handed unchanged to torch's ``create_block_mask`` or to
transformers' ``sdpa_mask``.

Evaluation happens in Rust: :func:`create_dense_mask` writes bool bytes with per-row interval fills, and
:func:`create_block_mask` classifies blocks from intervals, in time and memory that grow with the number of
blocks, not with Q*K.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch

from . import _attnrs
from ._threads import num_threads
from .errors import ArgumentError, AttnrsError, DeviceError, DtypeError, ShapeError

__all__ = [
    "Mask",
    "and_masks",
    "as_mask",
    "bidirectional",
    "causal",
    "chunked",
    "create_dense_mask",
    "document",
    "from_callable",
    "or_masks",
    "padding",
    "prefix_lm",
    "sliding_window",
]

MaskLike = Union["Mask", Callable[..., Any]]

# Rows of a callable evaluated per chunk: keeps peak memory at O(chunk x KV) for arbitrary mask_mods.
_CALLABLE_CHUNK_ELEMENTS = 1 << 24


class Mask:
    """An attention mask as a value. Build one with the functions of this module, not directly."""

    __slots__ = ("_children", "_kind", "_params", "_program", "_rust")

    def __init__(self, kind: str, params: dict[str, Any] | None = None, children: Sequence[Mask] = ()) -> None:
        self._kind = kind
        self._params = dict(params or {})
        self._children = tuple(children)
        self._rust: Any = None  # the Rust expression, built on first use (never for callables)
        self._program: Any = None  # its flat encoding for the attention operator, likewise

    # -- composition -------------------------------------------------------------------------------------------
    def __and__(self, other: MaskLike) -> Mask:
        return and_masks(self, other)

    def __rand__(self, other: MaskLike) -> Mask:
        return and_masks(other, self)

    def __or__(self, other: MaskLike) -> Mask:
        return or_masks(self, other)

    def __ror__(self, other: MaskLike) -> Mask:
        return or_masks(other, self)

    def __invert__(self) -> Mask:
        if self._kind == "not":
            return self._children[0]
        return Mask("not", children=(self,))

    def shifted(self, q_offset: int, kv_offset: int) -> Mask:
        """The mask seen through offsets: ``shifted(b, h, q, kv) == self(b, h, q + q_offset, kv + kv_offset)``.

        This is transformers' ``add_offsets_to_mask_function``, which FlexAttention needs because it only takes
        lengths."""
        q_offset, kv_offset = int(q_offset), int(kv_offset)
        if q_offset == 0 and kv_offset == 0:
            return self
        return Mask("shift", {"q": q_offset, "kv": kv_offset}, (self,))

    # -- what it is ----------------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The node kind: ``causal``, ``sliding_window``, ``and``, ``callable``, ..."""
        return self._kind

    @property
    def children(self) -> tuple[Mask, ...]:
        return self._children

    @property
    def is_structural(self) -> bool:
        """True when no part is an arbitrary callable (so every evaluation is O(blocks) or O(rows))."""
        return self._kind != "callable" and all(c.is_structural for c in self._children)

    @property
    def depends_on_batch(self) -> bool:
        if self._kind in ("padding", "document"):
            return self._params["table"].shape[0] > 1
        if self._kind in ("chunked", "prefix_lm"):
            return self._params["per_batch"].shape[0] > 1
        if self._kind == "callable":
            return True
        return any(c.depends_on_batch for c in self._children)

    @property
    def depends_on_head(self) -> bool:
        if self._kind == "callable":
            return bool(self._params.get("heads", True))
        return any(c.depends_on_head for c in self._children)

    def __repr__(self) -> str:
        p, k = self._params, self._kind
        if k == "causal":
            return "causal()" if p["offset"] == 0 else f"causal(offset={p['offset']})"
        if k == "full":
            return "bidirectional()"
        if k == "empty":
            return "~bidirectional()"
        if k == "sliding_window":
            return f"sliding_window({p['window']}, causal={p['causal']})"
        if k == "sliding_overlay":
            return f"sliding_window_overlay({p['window']})"
        if k == "chunked":
            return f"chunked_overlay({p['size']})"
        if k in ("padding", "document"):
            return f"{k}({list(p['table'].shape)})"
        if k == "prefix_lm":
            return f"prefix_lm({p['per_batch'].tolist()})"
        if k == "callable":
            fn = p["fn"]
            return f"from_callable({getattr(fn, '__qualname__', type(fn).__name__)})"
        if k == "shift":
            return f"{self._children[0]!r}.shifted({p['q']}, {p['kv']})"
        if k == "not":
            return f"~{self._children[0]!r}"
        joiner = " & " if k == "and" else " | "
        return "(" + joiner.join(repr(c) for c in self._children) + ")"

    # -- as a mask_mod ---------------------------------------------------------------------------------------------
    def __call__(self, batch_idx: torch.Tensor, head_idx: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Evaluates the mask with torch ops (broadcasting index tensors, vmap-friendly)."""
        b, h, q, kv = batch_idx, head_idx, q_idx, kv_idx
        k, p = self._kind, self._params
        if k == "causal":
            return kv <= q + p["offset"]
        if k == "full":
            return q >= 0
        if k == "empty":
            return q < 0
        if k == "sliding_window":
            w = p["window"]
            if p["causal"]:
                return (kv > q - w) & (kv <= q)
            return (q - kv).abs() <= w
        if k == "sliding_overlay":
            return kv > q - p["window"]
        if k == "chunked":
            start = _per_batch(p["per_batch"], b, q)
            size = p["size"]
            return torch.div(kv - start, size, rounding_mode="floor") == torch.div(q - start, size, rounding_mode="floor")
        if k == "padding":  # keys outside the table are padding, as in Rust
            table = p["table"].to(q.device)
            row = b if table.shape[0] > 1 else torch.zeros_like(b)
            n = table.shape[1]
            return table[row, kv.clamp(0, n - 1)] & (kv >= 0) & (kv < n)
        if k == "document":  # positions outside the ids see nothing, as in Rust
            ids = p["table"].to(q.device)
            row = b if ids.shape[0] > 1 else torch.zeros_like(b)
            n = ids.shape[1]
            inside = (q >= 0) & (q < n) & (kv >= 0) & (kv < n)
            return (ids[row, q.clamp(0, n - 1)] == ids[row, kv.clamp(0, n - 1)]) & inside
        if k == "prefix_lm":
            return (kv < _per_batch(p["per_batch"], b, q)) | (kv <= q)
        if k == "callable":
            return p["fn"](b, h, q, kv)
        if k == "shift":
            return self._children[0](b, h, q + p["q"], kv + p["kv"])
        if k == "not":
            return ~self._children[0](b, h, q, kv)
        if k == "and":
            result = q.new_ones((), dtype=torch.bool)
            for child in self._children:
                result = result & child(b, h, q, kv).to(result.device)
            return result
        if k == "or":
            result = q.new_zeros((), dtype=torch.bool)
            for child in self._children:
                result = result | child(b, h, q, kv).to(result.device)
            return result
        raise AssertionError(f"unknown mask kind {k}")

    # -- the Rust side ---------------------------------------------------------------------------------------------
    def _expr(self, grid: _Grid) -> Any:
        """The Rust expression of this mask for ``grid`` (structural parts are cached; callables are evaluated
        on the grid's rectangle)."""
        if self._rust is not None:
            return self._rust
        k, p = self._kind, self._params
        E = _attnrs.MaskExpr
        if k == "callable":
            return _evaluate_callable(self, grid)
        if k == "shift":
            return self._children[0]._expr(grid.shifted(p["q"], p["kv"])).shift(p["q"], p["kv"])
        if k == "not":
            expr = self._children[0]._expr(grid).negate()
        elif k == "and":
            expr = E.and_([c._expr(grid) for c in self._children])
        elif k == "or":
            expr = E.or_([c._expr(grid) for c in self._children])
        elif k == "causal":
            expr = E.causal(p["offset"])
        elif k == "full":
            expr = E.full()
        elif k == "empty":
            expr = E.empty()
        elif k == "sliding_window":
            expr = E.sliding_window(p["window"], p["causal"])
        elif k == "sliding_overlay":
            expr = E.sliding_window_overlay(p["window"])
        elif k == "chunked":
            expr = E.chunked(p["size"], p["per_batch"].tolist())
        elif k == "padding":
            expr = E.padding(p["table"])
        elif k == "document":
            expr = E.document(p["table"])
        elif k == "prefix_lm":
            expr = E.prefix_lm(p["per_batch"].tolist())
        else:
            raise AssertionError(f"unknown mask kind {k}")
        if self.is_structural:
            self._rust = expr
        return expr


def _per_batch(values: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = values.to(like.device)
    return values[b] if values.shape[0] > 1 else values[0]


class _Grid:
    """The rectangle a mask is evaluated on: batch, heads, and absolute query/key position ranges."""

    __slots__ = ("batch", "heads", "kv_len", "kv_offset", "q_len", "q_offset")

    def __init__(self, batch: int, heads: int, q_len: int, kv_len: int, q_offset: int, kv_offset: int) -> None:
        self.batch, self.heads, self.q_len, self.kv_len = batch, heads, q_len, kv_len
        self.q_offset, self.kv_offset = q_offset, kv_offset

    def shifted(self, q: int, kv: int) -> _Grid:
        return _Grid(self.batch, self.heads, self.q_len, self.kv_len, self.q_offset + q, self.kv_offset + kv)


# ---------------------------------------------------------------------------------------------------------------
# Constructors


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{name}: expected a positive integer, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ArgumentError(f"{name}: expected a positive integer, got {value}")
    return value


def _int_tensor(value: Any, name: str, rank: int) -> torch.Tensor:
    """A CPU int64 tensor of the given rank from ints, sequences or integer tensors."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise DtypeError(f"{name}: expected integers, got {type(value).__name__}") from None
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise DtypeError(f"{name}: expected an integer tensor, got {value.dtype}")
    if value.device.type == "meta":
        raise DeviceError(f"{name}: expected a tensor with data, got a tensor on meta")
    if value.dim() == rank - 1:
        value = value.unsqueeze(0)
    if value.dim() != rank:
        raise ShapeError(f"{name}: expected a {rank}-D tensor, got shape {list(value.shape)}")
    if value.numel() == 0:
        raise ShapeError(f"{name}: expected a non-empty tensor, got shape {list(value.shape)}")
    return value.detach().to("cpu", torch.int64).contiguous()


def causal() -> Mask:
    """Each query sees itself and earlier keys: ``kv_idx <= q_idx``."""
    return Mask("causal", {"offset": 0})


def bidirectional() -> Mask:
    """Every query sees every key."""
    return Mask("full")


def sliding_window(window: int, causal: bool = True) -> Mask:
    """A local window.

    ``causal=True``: the last ``window`` keys including self (``q - window < kv <= q``), as transformers'
    ``sliding_window_causal_mask_function``. ``causal=False``: ``|q - kv| <= window``, as transformers'
    ``sliding_window_bidirectional_overlay`` (inclusive, ``2 * window + 1`` keys)."""
    return Mask("sliding_window", {"window": _positive_int(window, "window"), "causal": bool(causal)})


def sliding_window_overlay(window: int) -> Mask:
    """transformers' ``sliding_window_overlay``: ``kv > q - window`` (combine with :func:`causal`)."""
    return Mask("sliding_overlay", {"window": _positive_int(window, "window")})


def chunked(size: int, left_padding: Any = None, causal: bool = True) -> Mask:
    """Attention within fixed-size chunks that start at each row's first real token (Llama 4 style).

    ``left_padding`` ([B] ints, or one int) shifts each row's chunk grid as transformers'
    ``chunked_overlay`` does: ``(kv - lp[b]) // size == (q - lp[b]) // size``. ``causal=True`` also applies
    :func:`causal` (transformers' ``chunked_causal_mask_function``)."""
    size = _positive_int(size, "size")
    per_batch = _int_tensor(0 if left_padding is None else left_padding, "left_padding", 1)
    overlay = Mask("chunked", {"size": size, "per_batch": per_batch.reshape(-1)})
    return and_masks(overlay, globals()["causal"]()) if causal else overlay


def padding(mask2d: torch.Tensor) -> Mask:
    """Keys that are real tokens: ``mask2d[b, kv_idx]`` (bool ``[B, K]``, True = real). Keys past the end are
    treated as padding."""
    if not isinstance(mask2d, torch.Tensor):
        raise DtypeError(f"mask2d: expected a bool torch.Tensor [B, K], got {type(mask2d).__name__}")
    if mask2d.dtype != torch.bool:
        raise DtypeError(f"mask2d: expected a bool tensor [B, K], got {mask2d.dtype}")
    if mask2d.dim() != 2:
        raise ShapeError(f"mask2d: expected a 2-D tensor [B, K], got shape {list(mask2d.shape)}")
    if mask2d.device.type == "meta":
        raise DeviceError("mask2d: expected a tensor with data, got a tensor on meta")
    if mask2d.numel() == 0:
        raise ShapeError(f"mask2d: expected a non-empty tensor, got shape {list(mask2d.shape)}")
    return Mask("padding", {"table": mask2d.detach().to("cpu").contiguous()})


def document(seq_ids: Any) -> Mask:
    """Packed sequences: a query sees a key only inside the same document, ``ids[b, q] == ids[b, kv]``
    (ints ``[B, L]`` or ``[L]``)."""
    return Mask("document", {"table": _int_tensor(seq_ids, "seq_ids", 2)})


def prefix_lm(prefix_lengths: Any) -> Mask:
    """Bidirectional over each row's prefix, causal after it: ``kv < len[b] or kv <= q``."""
    lengths = _int_tensor(prefix_lengths, "prefix_lengths", 1).reshape(-1)
    if bool((lengths < 0).any()):
        raise ArgumentError(f"prefix_lengths: expected non-negative lengths, got {lengths.tolist()}")
    return Mask("prefix_lm", {"per_batch": lengths})


def from_callable(fn: Callable[..., Any], *, use_vmap: bool = False) -> Mask:
    """Any ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``.

    transformers' own mask functions are recognised and become structural masks; anything else is evaluated
    the way transformers evaluates it (broadcast index tensors; ``torch.vmap`` when broadcasting fails or
    ``use_vmap`` is set) into packed bits, in row chunks."""
    if isinstance(fn, Mask):
        return fn
    if not callable(fn):
        raise TypeError(f"mask: expected a Mask or a callable mask_mod(b, h, q_idx, kv_idx), got {type(fn).__name__}")
    from ._recognize import recognize

    recognized = recognize(fn)
    if recognized is not None:
        return recognized
    return Mask("callable", {"fn": fn, "use_vmap": bool(use_vmap)})


as_mask = from_callable


def _flatten(kind: str, masks: Sequence[MaskLike]) -> list[Mask]:
    parts: list[Mask] = []
    for m in masks:
        m = from_callable(m)
        parts.extend(m.children if m.kind == kind else (m,))
    return parts


def and_masks(*masks: MaskLike) -> Mask:
    """Visible where every mask is (``and_masks()`` sees everything, as transformers' does)."""
    parts = _flatten("and", masks)
    if not parts:
        return bidirectional()
    if len(parts) == 1:
        return parts[0]
    from ._recognize import simplify_packed

    return simplify_packed(Mask("and", children=parts))


def or_masks(*masks: MaskLike) -> Mask:
    """Visible where any mask is (``or_masks()`` sees nothing, as transformers' does)."""
    parts = _flatten("or", masks)
    if not parts:
        return Mask("empty")
    if len(parts) == 1:
        return parts[0]
    return Mask("or", children=parts)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def _check_grid(batch: Any, heads: Any, q_len: Any, kv_len: Any, q_offset: Any, kv_offset: Any) -> _Grid:
    def nonneg(value: Any, name: str, allow_none: bool = False) -> int:
        if value is None and allow_none:
            return 1
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
        return value

    grid = _Grid(
        nonneg(batch, "B", allow_none=True),
        nonneg(heads, "H", allow_none=True),
        nonneg(q_len, "Q_LEN"),
        nonneg(kv_len, "KV_LEN"),
        nonneg(q_offset, "q_offset"),
        nonneg(kv_offset, "kv_offset"),
    )
    for name, value in (("B", grid.batch), ("H", grid.heads)):
        if value < 1:
            raise ArgumentError(f"{name}: expected a positive int, got {value}")
    for name, value in (("Q_LEN", grid.q_len), ("KV_LEN", grid.kv_len)):
        if value < 0:
            raise ArgumentError(f"{name}: expected a non-negative int, got {value}")
    return grid


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
    grid = _check_grid(B, H, Q_LEN, KV_LEN, q_offset, kv_offset)
    if dtype != torch.bool and not dtype.is_floating_point:
        raise DtypeError(f"dtype: expected torch.bool or a floating dtype, got {dtype}")
    _check_tables(mask, grid)
    expr = mask._expr(grid)
    batch_out = grid.batch if expr.depends_on_batch() else 1
    heads_out = grid.heads if expr.depends_on_head() else 1
    visible = torch.empty(batch_out, heads_out, grid.q_len, grid.kv_len, dtype=torch.bool)
    if visible.numel():
        expr.fill_dense(visible, grid.q_offset, grid.kv_offset, num_threads())
    if dtype != torch.bool:
        visible = torch.where(visible, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)
    return visible.expand(grid.batch, -1, -1, -1)


def _check_tables(mask: Mask, grid: _Grid) -> None:
    """Document ids must reach the last query and key position of the grid (transformers' packed masks assume
    it); a shorter padding mask is fine (the missing keys are padding, as transformers pads it with False)."""
    if mask.kind == "shift":
        _check_tables(mask.children[0], grid.shifted(mask._params["q"], mask._params["kv"]))
        return
    if mask.kind == "document" and grid.q_len and grid.kv_len:
        length = mask._params["table"].shape[1]
        needed = max(grid.q_offset + grid.q_len, grid.kv_offset + grid.kv_len)
        if needed > length:  # positions before 0 (queries aligned bottom-right past the keys) see nothing
            raise ShapeError(
                f"seq_ids: expected ids for positions up to {needed - 1} (queries {grid.q_offset}.."
                f"{grid.q_offset + grid.q_len - 1}, keys {grid.kv_offset}..{grid.kv_offset + grid.kv_len - 1}), "
                f"got {length} positions"
            )
    for child in mask.children:
        _check_tables(child, grid)


def _evaluate_callable(mask: Mask, grid: _Grid) -> Any:
    """Evaluates a callable leaf over ``grid`` into a Rust bitmap, in row chunks.

    Broadcasting first (transformers' default: index tensors shaped [B,1,1,1], [1,H,1,1], [1,1,Q,1], [1,1,1,K]);
    ``torch.vmap`` over the four indices when that fails or ``use_vmap`` was asked for."""
    fn, use_vmap = mask._params["fn"], mask._params["use_vmap"]
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
    if builder is None:  # no rows at all
        return _attnrs.MaskExpr.empty()
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

