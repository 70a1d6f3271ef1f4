"""The :class:`Mask` value: its nodes, its algebra (``&``, ``|``, ``~``, :func:`from_callable`), its constructors,
and the recognition of transformers' own mask functions as structural masks.

A :class:`Mask` says which keys each query may see. It is built from structural pieces that Rust understands
(causal, sliding window, chunked, padding, packed documents, prefix-LM) and from arbitrary ``mask_mod``
callables, composed with ``&``, ``|`` and ``~``. Positions are absolute: row ``i`` of a grid built with
``q_offset`` is position ``q_offset + i`` (transformers' convention).

A ``Mask`` is also a ``mask_mod``: ``mask(b, h, q_idx, kv_idx)`` returns a bool tensor for broadcastable index
tensors and under ``torch.vmap``, so it can be handed unchanged to torch's ``create_block_mask`` or to
transformers' ``sdpa_mask``.

:func:`from_callable` (used by every function that takes a mask) turns transformers' mask functions (its
``causal_mask_function`` and the closures of the factories in ``transformers.masking_utils``) into structural
masks. A closure is recognised only when its code object is the very code object the *installed* factory
produces, so a changed transformers release can never be misread: anything not recognised is evaluated as a
callable, which is always correct, only slower. Recognition, conversion and composition call each other (a
transformers ``and_masks`` closure holds mask functions to convert and combine), so they live together here.

Evaluation happens in Rust (:meth:`Mask.to_rust`): :mod:`attnrs.masks.dense` writes bool bytes with per-row
interval fills, and :mod:`attnrs.masks.block_mask` classifies blocks from intervals, in time and memory that
grow with the number of blocks, not with Q*K.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch

from .. import _attnrs
from ..arguments import integer, positive, strided
from ..errors import ArgumentError, DeviceError, DtypeError, ShapeError
from .callables import evaluate_callable
from .grid import Grid
from .program import encode_program

__all__ = [
    "Mask",
    "and_masks",
    "as_mask",
    "bidirectional",
    "causal",
    "chunked",
    "document",
    "from_callable",
    "or_masks",
    "padding",
    "prefix_lm",
    "sliding_window",
    "sliding_window_overlay",
]

MaskLike = Union["Mask", Callable[..., Any]]


class Mask:
    """An attention mask as a value. Build one with the functions of this module, not directly."""

    __slots__ = ("_children", "_kind", "_params", "_program", "_rust")

    def __init__(self, kind: str, params: dict[str, Any] | None = None, children: Sequence[Mask] = ()) -> None:
        self._kind = kind
        self._params = dict(params or {})
        self._children = tuple(children)
        self._rust: Any = None  # the Rust expression, built on first use (never for callables)
        self._program: Any = None  # ((q_offset, kv_offset), its packed operand for the attention operator)

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
        q_offset, kv_offset = integer(q_offset, "q_offset"), integer(kv_offset, "kv_offset")
        if q_offset == 0 and kv_offset == 0:
            return self
        return Mask("shift", {"q": q_offset, "kv": kv_offset}, (self,))

    # -- what it is ----------------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The node kind (``causal``, ``sliding_window``, ``and``, ``callable``, ...)."""
        return self._kind

    @property
    def children(self) -> tuple[Mask, ...]:
        return self._children

    @property
    def params(self) -> Mapping[str, Any]:
        """The node's parameters (``causal``: ``offset``; ``document``/``padding``: ``table``; ...), read-only."""
        return types.MappingProxyType(self._params)

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
    def __call__(
        self, batch_idx: torch.Tensor, head_idx: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        """Evaluates the mask with torch ops (broadcasting index tensors, vmap-friendly)."""
        b, h, q, kv = batch_idx, head_idx, q_idx, kv_idx
        k, p = self._kind, self._params
        if k == "causal":
            return kv <= q + p["offset"]
        if k == "full":  # at every position, negative ones included (shaped like the q/kv grid)
            return torch.ones_like(q - kv, dtype=torch.bool)
        if k == "empty":
            return torch.zeros_like(q - kv, dtype=torch.bool)
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
            return torch.div(kv - start, size, rounding_mode="floor") == torch.div(
                q - start, size, rounding_mode="floor"
            )
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
    def to_rust(self, grid: Grid) -> Any:
        """The Rust expression of this mask for ``grid`` (structural parts are cached; callables are evaluated
        on the grid's rectangle)."""
        if self._rust is not None:
            return self._rust
        k, p = self._kind, self._params
        E = _attnrs.MaskExpr
        if k == "callable":
            return evaluate_callable(p["fn"], p["use_vmap"], grid)
        if k == "shift":
            return self._children[0].to_rust(grid.shifted(p["q"], p["kv"])).shift(p["q"], p["kv"])
        if k == "not":
            expr = self._children[0].to_rust(grid).negate()
        elif k == "and":
            expr = E.and_([c.to_rust(grid) for c in self._children])
        elif k == "or":
            expr = E.or_([c.to_rust(grid) for c in self._children])
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

    def program(self, grid: Grid) -> torch.Tensor:
        """The mask placed at the grid's offsets as the packed uint8 operand the attention operators take, after
        :func:`check_tables`.

        A structural mask is packed with torch ops (:func:`~attnrs.masks.program.encode_program`: its words are
        constants, its tables tensors), so ``torch.compile`` traces it without a graph break and a new padding
        mask of the same shape needs no recompilation. Eagerly its operand is cached for the last offsets it
        was placed at (transformers reuses one mask for every layer of a forward; one entry, so a decode loop
        whose offsets move every step does not grow it). A mask with a callable part is evaluated on the grid
        by Rust, outside any compiled graph (a graph break)."""
        check_tables(self, grid)
        offsets = (grid.q_offset, grid.kv_offset)
        if not self.is_structural:
            return _evaluated_program(self, grid)
        if torch.compiler.is_compiling():
            return encode_program(self, *offsets)
        if self._program is not None and self._program[0] == offsets:
            return self._program[1]
        operand = encode_program(self, *offsets)
        self._program = (offsets, operand)
        return operand


@torch.compiler.disable  # type: ignore[untyped-decorator]
def _evaluated_program(mask: Mask, grid: Grid) -> torch.Tensor:
    """The packed operand of a mask with a callable part, evaluated on ``grid`` in Rust (which calls the
    Python mask_mod), so under torch.compile it runs outside the graph."""
    expr = mask.to_rust(grid)
    return torch.frombuffer(_attnrs.mask_operand(expr, grid.q_offset, grid.kv_offset), dtype=torch.uint8)


def _per_batch(values: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = values.to(like.device)
    return values[b] if values.shape[0] > 1 else values[0]


# ---------------------------------------------------------------------------------------------------------------
# Constructors


def _int_tensor(value: Any, name: str, rank: int) -> torch.Tensor:
    """A CPU int64 tensor of the given rank from ints, sequences or integer tensors."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as e:
            if "overflow" in str(e).lower():
                raise ArgumentError(f"{name}: expected integers that fit in int64, got {value!r}") from None
            raise DtypeError(f"{name}: expected integers, got {type(value).__name__}") from None
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise DtypeError(f"{name}: expected an integer tensor, got {value.dtype}")
    strided(value, name)
    if value.device.type == "meta":
        raise DeviceError(f"{name}: expected a tensor with data, got a tensor on meta")
    if value.dim() == rank - 1:
        value = value.unsqueeze(0)
    if value.dim() != rank:
        raise ShapeError(f"{name}: expected a {rank}-D tensor, got shape {list(value.shape)}")
    if value.numel() == 0:
        raise ShapeError(f"{name}: expected a non-empty tensor, got shape {list(value.shape)}")
    return value.detach().to("cpu", torch.int64).contiguous()


def causal(offset: int = 0) -> Mask:
    """Each query sees itself and earlier keys: ``kv_idx <= q_idx`` (``kv_idx <= q_idx + offset`` with an
    offset)."""
    return Mask("causal", {"offset": integer(offset, "offset")})


def bidirectional() -> Mask:
    """Every query sees every key."""
    return Mask("full")


def sliding_window(window: int, causal: bool = True) -> Mask:
    """A local window.

    ``causal=True``: the last ``window`` keys including self (``q - window < kv <= q``), as transformers'
    ``sliding_window_causal_mask_function``. ``causal=False``: ``|q - kv| <= window``, as transformers'
    ``sliding_window_bidirectional_overlay`` (inclusive, ``2 * window + 1`` keys)."""
    return Mask("sliding_window", {"window": positive(window, "window"), "causal": bool(causal)})


def sliding_window_overlay(window: int) -> Mask:
    """transformers' ``sliding_window_overlay``: ``kv > q - window`` (combine with :func:`causal`)."""
    return Mask("sliding_overlay", {"window": positive(window, "window")})


def chunked(size: int, left_padding: Any = None, causal: bool = True) -> Mask:
    """Attention within fixed-size chunks that start at each row's first real token (Llama 4 style).

    ``left_padding`` ([B] ints, or one int) shifts each row's chunk grid as transformers'
    ``chunked_overlay`` does: ``(kv - lp[b]) // size == (q - lp[b]) // size``. ``causal=True`` also applies
    :func:`causal` (transformers' ``chunked_causal_mask_function``)."""
    size = positive(size, "size")
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
    strided(mask2d, "mask2d")
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
    # Under torch.compile the values are not known while tracing; Rust checks them when the mask is used.
    if not torch.compiler.is_compiling() and bool((lengths < 0).any()):
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
    return simplify_packed(Mask("and", children=parts))


def or_masks(*masks: MaskLike) -> Mask:
    """Visible where any mask is (``or_masks()`` sees nothing, as transformers' does)."""
    parts = _flatten("or", masks)
    if not parts:
        return Mask("empty")
    if len(parts) == 1:
        return parts[0]
    return Mask("or", children=parts)


def check_tables(mask: Mask, grid: Grid) -> None:
    """Document ids must reach the last query and key position of the grid (transformers' packed masks assume
    it); a shorter padding mask is fine (the missing keys are padding, as transformers pads it with False)."""
    if mask.kind == "shift":
        check_tables(mask.children[0], grid.shifted(mask._params["q"], mask._params["kv"]))
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
        check_tables(child, grid)


# ---------------------------------------------------------------------------------------------------------------
# Recognition of transformers' mask functions (from_callable) and the packed-sequence rewrite (and_masks)


_FACTORY_CODES: list[dict[types.CodeType, str] | None] = []  # _probe_factories()'s answer, once known


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def _factory_of(code: types.CodeType | None) -> str | None:
    """The name of the transformers factory whose closures have this code object, or None.

    The table of code objects is computed once and kept in a module global. torch.compile calls this while
    tracing and takes the answer as a constant (no graph break, and no guard on the global, which would
    recompile once it is filled)."""
    if not _FACTORY_CODES:
        _FACTORY_CODES.append(_probe_factories())
    factories = _FACTORY_CODES[0]
    return factories.get(code) if code is not None and factories else None


def _probe_factories() -> dict[types.CodeType, str] | None:
    try:
        from transformers import masking_utils as mu
    except ImportError:
        return None
    probes: dict[str, Callable[[], Any]] = {
        "and_masks": lambda: mu.and_masks(mu.causal_mask_function),
        "or_masks": lambda: mu.or_masks(mu.causal_mask_function),
        "sliding_window_overlay": lambda: mu.sliding_window_overlay(1),
        "sliding_window_bidirectional_overlay": lambda: mu.sliding_window_bidirectional_overlay(1),
        "chunked_overlay": lambda: mu.chunked_overlay(1, torch.zeros(1, dtype=torch.long)),
        "padding_mask_function": lambda: mu.padding_mask_function(torch.ones(1, 1, dtype=torch.bool)),
        "packed_sequence_mask_function": lambda: mu.packed_sequence_mask_function(torch.zeros(1, 1, dtype=torch.long)),
        "add_offsets_to_mask_function": lambda: mu.add_offsets_to_mask_function(mu.causal_mask_function, 0, 0),
        "remap_positions_for_packed_sequence": lambda: mu.remap_positions_for_packed_sequence(
            mu.causal_mask_function, torch.zeros(1, 1, dtype=torch.long)
        ),
    }
    codes: dict[types.CodeType, str] = {}
    for name, make in probes.items():
        try:
            codes[make().__code__] = name
        except Exception:
            continue
    return codes


def _plain_functions() -> dict[Any, Callable[[], Mask]]:
    try:
        from transformers import masking_utils as mu
    except ImportError:
        return {}
    return {mu.causal_mask_function: causal, mu.bidirectional_mask_function: bidirectional}


def _cells(fn: Any) -> dict[str, Any]:
    closure = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in closure)))


def recognize(fn: Any) -> Mask | None:
    """The structural :class:`Mask` equivalent to ``fn``, or None when ``fn`` is not a known transformers mask."""
    plain = _plain_functions().get(fn)
    if plain is not None:
        return plain()
    code = getattr(fn, "__code__", None)
    factory = _factory_of(code)
    if factory is None:
        return None
    cells = _cells(fn)
    if factory == "and_masks":
        return and_masks(*cells["mask_functions"])
    if factory == "or_masks":
        return or_masks(*cells["mask_functions"])
    if factory == "sliding_window_overlay":
        window = integer(cells["sliding_window"], "sliding_window")
        # kv > q - w; for w <= 0 (configs ship sliding_window=0 for "none" and transformers still builds the
        # unused mask) that is exactly "not causal(-w)".
        return sliding_window_overlay(window) if window > 0 else ~causal(-window)
    if factory == "sliding_window_bidirectional_overlay":
        window = integer(cells["sliding_window"], "sliding_window")
        if window > 0:
            return sliding_window(window, causal=False)
        return causal(0) & ~causal(-1) if window == 0 else Mask("empty")  # |q - kv| <= w: the diagonal, or none
    if factory == "chunked_overlay":
        return chunked(cells["chunk_size"], cells["left_padding"], causal=False)
    if factory == "padding_mask_function":
        return padding(cells["padding_mask"])
    if factory == "packed_sequence_mask_function":
        return document(cells["packed_sequence_mask"])
    if factory == "add_offsets_to_mask_function":
        return from_callable(cells["mask_function"]).shifted(cells["q_offset"], cells["kv_offset"])
    if factory == "remap_positions_for_packed_sequence":
        inner = from_callable(cells["mask_function"])
        return _remap(inner, cells)
    return None


def _remap(inner: Mask, cells: dict[str, Any]) -> Mask:
    """``fn(b, h, pos[b, q], pos[b, kv])``: kept as a callable unless an enclosing ``and`` with the matching
    packed-document mask makes it structural (see :func:`simplify_packed`)."""
    fn_remap = _remap_callable(inner, cells["position_ids"])
    leaf = Mask("callable", {"fn": fn_remap, "use_vmap": False})
    leaf._params["remap_of"] = inner
    leaf._params["position_ids"] = cells["position_ids"]
    return leaf


def _remap_callable(inner: Mask, position_ids: torch.Tensor) -> Callable[..., Any]:
    def remapped(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        pos = position_ids.to(q.device)
        return inner(b, h, pos[b, q], pos[b, kv])

    return remapped


_TRANSLATION_INVARIANT = {"causal", "full", "empty", "sliding_window", "sliding_overlay"}


def _translation_invariant(mask: Mask) -> bool:
    """True when visibility depends on q - kv only (so remapping positions inside a document changes nothing)."""
    if mask.kind in ("and", "or", "not"):
        return all(_translation_invariant(c) for c in mask.children)
    return mask.kind in _TRANSLATION_INVARIANT


def simplify_packed(mask: Mask) -> Mask:
    """``and(remap(f, pos), document(ids))`` -> ``and(f, document(ids))`` when it is exact.

    transformers masks packed sequences with causal on per-document positions AND a same-document test. When
    ``ids`` are the documents that ``pos`` describes (a new document wherever ``pos`` does not step by one) and
    ``f`` depends only on ``q - kv``, positions inside one document differ exactly as indices do, so ``f`` can
    read indices directly and the whole mask becomes structural."""
    docs = [c for c in mask.children if c.kind == "document"]
    if not docs:
        return mask
    children = list(mask.children)
    for i, child in enumerate(children):
        inner = child._params.get("remap_of") if child.kind == "callable" else None
        if inner is None or not _translation_invariant(inner):
            continue
        pos = child._params["position_ids"]
        if any(_documents_match(pos, d._params["table"]) for d in docs):
            children[i] = inner
    if children == list(mask.children):
        return mask
    return Mask("and", children=children)


def _documents_match(position_ids: torch.Tensor, ids: torch.Tensor) -> bool:
    """True when ``ids`` are contiguous runs whose boundaries are exactly where ``position_ids`` does not step
    by one."""
    pos = position_ids.detach().to("cpu", torch.int64)
    if pos.dim() == 1:
        pos = pos[None]
    if pos.shape[-1] != ids.shape[-1] or pos.shape[-1] == 0:
        return False
    if pos.shape[0] != ids.shape[0]:
        if pos.shape[0] == 1:
            pos = pos.expand(ids.shape[0], -1)
        elif ids.shape[0] == 1:
            ids = ids.expand(pos.shape[0], -1)
        else:
            return False
    step_ids = torch.diff(ids, dim=-1)
    if bool((step_ids < 0).any()):
        return False  # a document id that comes back later would join two separate runs
    return bool(torch.equal(torch.diff(pos, dim=-1) != 1, step_ids != 0))
