"""The :class:`ScoreMod` value: changes to attention logits that the Rust kernel evaluates in its tile loop, its
constructors (:func:`scale`, :func:`alibi`, :func:`relative_bias`, :func:`bias_table`, :func:`softcap`), its
composition (``+``, :meth:`ScoreMod.then`, :func:`compose`) and the kernel's operands (:meth:`ScoreMod.terms`).

Every score mod has one canonical form, whatever it was built from::

    x = cap(multiplier[h] * score + sum of additive terms)      cap(x) = c * tanh(x / c), when a softcap is set

where ``score`` is the already-scaled logit ``scale * q . k``. The additive terms are of two shapes only, which is
what lets the kernel evaluate any of them from two small tensors instead of a ``[Q, K]`` bias: a function of the
relative position ``kv_idx - q_idx`` (ALiBi, T5 and Shaw relative biases, a learned causal-distance table), and a
function of the key alone (BLOOM's ALiBi, a per-document key bias). :meth:`ScoreMod.terms` evaluates them on the
``Q + K - 1`` distances and the ``K`` keys of one call, with torch ops from the user's tables, so gradients flow
back into the tables and ``torch.compile`` traces it.

A ``ScoreMod`` is also a FlexAttention ``score_mod``: ``mod(score, b, h, q_idx, kv_idx)`` computes the same
formula with torch ops on broadcastable index tensors and under ``torch.vmap``, so the same value can be handed
to ``torch.nn.attention.flex_attention`` (the tests check the two agree).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ..arguments import FLOAT32_MAX, FLOAT32_TINY, integer, is_real, non_negative
from ..errors import ArgumentError, DtypeError, ShapeError, UnsupportedError
from .buckets import BucketFn, alibi_slopes

__all__ = [
    "ScoreMod",
    "ScoreTerms",
    "alibi",
    "bias_table",
    "compose",
    "relative_bias",
    "scale",
    "softcap",
]


class ScoreTerms(NamedTuple):
    """A score mod evaluated for one call: the operands of the kernel's tile loop. For row ``i``, column ``j`` of
    head ``h``, batch ``b``: ``x = head_scale[h] * score + distance[h, j - i + Q - 1] + key[b, h, j]``, then
    ``x = softcap * tanh(x / softcap)``; a missing operand is the identity. Head and batch dims of size 1
    broadcast; every tensor is contiguous."""

    head_scale: torch.Tensor | None  # [H]: multiplies the scaled score of head h
    distance: (
        torch.Tensor | None
    )  # [H or 1, Q + K - 1]: at index (j - i) + (Q - 1), i.e. kv_pos - q_pos = j - i + kv_offset - q_offset
    key: torch.Tensor | None  # [B or 1, H or 1, K]: added to every pair with key column j
    softcap: float | None  # applied last


# ---------------------------------------------------------------------------------------------------------------
# Argument checks


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def _checking_values() -> bool:
    """Whether to look at tensor values (finite, ids in range): eagerly yes; under torch.compile a value check
    would be a data-dependent branch, so the tracer skips it."""
    return not torch.compiler.is_compiling()


def _float_table(value: Any, name: str, what: str, rank: int) -> torch.Tensor:
    """A floating tensor of ``rank`` dims with no empty dim, or the typed error naming ``name``."""
    expected = f"{name}: expected a float tensor {what}, got {_describe(value)}"
    if not isinstance(value, torch.Tensor):
        raise DtypeError(expected)
    if not value.dtype.is_floating_point:
        raise DtypeError(expected)
    if value.dim() != rank or value.numel() == 0:
        raise ShapeError(expected)
    if _checking_values() and value.device.type != "meta" and not bool(torch.isfinite(value.detach()).all()):
        raise ArgumentError(f"{name}: expected finite values, got a tensor with inf or NaN entries")
    return value


def _head(h: torch.Tensor, heads: int) -> torch.Tensor:
    """The row of a per-head table for head index ``h`` (row 0 when the table broadcasts over heads)."""
    return h if heads > 1 else torch.zeros_like(h)


# ---------------------------------------------------------------------------------------------------------------
# Additive terms: each evaluates itself elementwise (the score_mod form) and on one call's distances or keys.


class _Term:
    """One additive term. ``on_distance``: a function of ``kv_idx - q_idx`` (evaluated by :meth:`distance`);
    otherwise of the key (and batch) alone (:meth:`key`)."""

    __slots__ = ()
    on_distance: bool = True
    label = ""  # the argument that holds the term's tensor, for messages

    @property
    def heads(self) -> int:
        raise NotImplementedError

    @property
    def tensor(self) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def distance(self, rel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[heads, n]`` at the relative positions ``rel`` (``kv_pos - q_pos``, int64 ``[n]``)."""
        raise NotImplementedError

    def key(self, batch: int, kv_len: int, kv_offset: int, dtype: torch.dtype) -> torch.Tensor:
        """``[B or 1, heads, kv_len]`` at key positions ``kv_offset + j``."""
        raise NotImplementedError


class _Alibi(_Term):
    __slots__ = ("form", "on_distance", "slopes")
    label = "alibi: slopes"

    def __init__(self, slopes: torch.Tensor, form: str) -> None:
        self.slopes, self.form = slopes, form
        self.on_distance = form == "relative"

    @property
    def heads(self) -> int:
        return self.slopes.shape[0]

    @property
    def tensor(self) -> torch.Tensor:
        return self.slopes

    def __call__(self, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        position = kv - q if self.on_distance else kv
        return self.slopes[_head(h, self.heads)] * position.to(self.slopes.dtype)

    def distance(self, rel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.slopes.to(dtype)[:, None] * rel.to(dtype)[None, :]

    def key(self, batch: int, kv_len: int, kv_offset: int, dtype: torch.dtype) -> torch.Tensor:
        positions = torch.arange(kv_len, device=self.slopes.device) + kv_offset
        return (self.slopes.to(dtype)[:, None] * positions.to(dtype)[None, :])[None]

    def __repr__(self) -> str:
        return f"alibi({self.heads} heads)" if self.on_distance else f'alibi({self.heads} heads, form="key")'


class _TableTerm(_Term):
    """A term read from a learned ``[H, N]`` table."""

    __slots__ = ("table",)
    table: torch.Tensor

    @property
    def heads(self) -> int:
        return self.table.shape[0]

    @property
    def tensor(self) -> torch.Tensor:
        return self.table


class _RelativeBias(_TableTerm):
    __slots__ = ("buckets",)
    label = "relative_bias: table"

    def __init__(self, table: torch.Tensor, buckets: BucketFn) -> None:
        self.table, self.buckets = table, buckets

    def __call__(self, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.table[_head(h, self.heads), self.buckets(kv - q)]

    def distance(self, rel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.table[:, self.buckets(rel)].to(dtype)

    def __repr__(self) -> str:
        return f"relative_bias({self.buckets!r})"


class _DistanceTable(_TableTerm):
    __slots__ = ()
    label = "bias_table: table"

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def __call__(self, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.table[_head(h, self.heads), (q - kv).clamp(0, self.table.shape[1] - 1)]

    def distance(self, rel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.table[:, (-rel).clamp(0, self.table.shape[1] - 1)].to(dtype)

    def __repr__(self) -> str:
        return f"bias_table({self.heads} heads x {self.table.shape[1]})"


class _DocumentBias(_TableTerm):
    __slots__ = ("document_ids",)
    on_distance = False
    label = "bias_table: table"

    def __init__(self, table: torch.Tensor, document_ids: torch.Tensor) -> None:
        self.table, self.document_ids = table, document_ids

    def __call__(self, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        ids = self.document_ids
        row = b if ids.shape[0] > 1 else torch.zeros_like(b)
        return self.table[_head(h, self.heads), ids[row, kv]]

    def key(self, batch: int, kv_len: int, kv_offset: int, dtype: torch.dtype) -> torch.Tensor:
        ids = self.document_ids
        if ids.shape[0] not in (1, batch):
            raise ShapeError(
                f"bias_table: document_ids: expected a batch of {batch} (the call's) or 1, got shape {list(ids.shape)}"
            )
        if kv_offset < 0 or kv_offset + kv_len > ids.shape[1]:
            raise ShapeError(
                f"bias_table: document_ids: expected ids for key positions [{kv_offset}, {kv_offset + kv_len}) "
                f"(kv_offset + the key length), got {ids.shape[1]} positions"
            )
        window = ids[:, kv_offset : kv_offset + kv_len]
        return self.table[:, window].permute(1, 0, 2).to(dtype)  # [heads, B, K] -> [B, heads, K]

    def __repr__(self) -> str:
        return f"bias_table({self.heads} heads x {self.table.shape[1]}, document_ids={list(self.document_ids.shape)})"


# ---------------------------------------------------------------------------------------------------------------
# The value


def _scale_repr(factor: float | torch.Tensor) -> str:
    return f"scale({factor!r})" if isinstance(factor, float) else f"scale({factor.shape[0]} heads)"


def _slots(term: _Term) -> list[str]:
    """The instance attributes of a term (its classes' ``__slots__``)."""
    return [name for cls in type(term).__mro__ for name in getattr(cls, "__slots__", ()) if hasattr(term, name)]


class ScoreMod:
    """A change to attention logits as a value: ``cap(multiplier[h] * score + sum of terms)``. Build one with
    :func:`scale`, :func:`alibi`, :func:`relative_bias`, :func:`bias_table`, :func:`softcap` and combine them
    with ``+`` (additive mods), :meth:`then` and :func:`compose`; not directly.

    Calling it, ``mod(score, b, h, q_idx, kv_idx)``, is FlexAttention's ``score_mod`` protocol."""

    __slots__ = ("_cap", "_factors", "_terms")

    def __init__(
        self, factors: Sequence[float | torch.Tensor] = (), terms: Sequence[_Term] = (), cap: float | None = None
    ) -> None:
        self._factors: tuple[float | torch.Tensor, ...] = tuple(factors)
        self._terms: tuple[_Term, ...] = tuple(terms)
        self._cap = cap

    # -- what it is ------------------------------------------------------------------------------------------------
    @property
    def has_multiplier(self) -> bool:
        """Whether the score is multiplied (by :func:`scale`)."""
        return bool(self._factors)

    @property
    def is_additive(self) -> bool:
        """Whether the mod only adds terms (no multiplier, no softcap), as the operands of ``+`` must."""
        return not self._factors and self._cap is None

    @property
    def cap(self) -> float | None:
        """The softcap applied last, or None."""
        return self._cap

    def __repr__(self) -> str:
        pieces = [_scale_repr(f) for f in self._factors]
        if self._terms:
            pieces.append(" + ".join(repr(t) for t in self._terms))
        if self._cap is not None:
            pieces.append(f"softcap({self._cap!r})")
        if not pieces:
            return "compose()"
        first = f"({pieces[0]})" if " + " in pieces[0] and len(pieces) > 1 else pieces[0]
        return first + "".join(f".then({p})" for p in pieces[1:])

    # -- as a score_mod --------------------------------------------------------------------------------------------
    def __call__(
        self, score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        """The modified score, with torch ops (broadcastable index tensors, vmap-friendly): FlexAttention's
        ``score_mod(score, b, h, q_idx, kv_idx)``."""
        x = score
        for f in self._factors:
            x = x * (f if isinstance(f, float) else f.to(x.dtype)[_head(h, f.shape[0])])
        for t in self._terms:
            x = x + t(b, h, q_idx, kv_idx).to(x.dtype)
        if self._cap is not None:
            x = self._cap * torch.tanh(x / self._cap)
        return x

    # -- composition -----------------------------------------------------------------------------------------------
    def __add__(self, other: ScoreMod) -> ScoreMod:
        if not isinstance(other, ScoreMod):
            return NotImplemented
        for side, mod in (("left", self), ("right", other)):
            if not mod.is_additive:
                what = "a softcap" if mod._cap is not None else "a multiplier (scale)"
                raise ArgumentError(
                    f"scores: a + b sums additive score mods only; the {side} side {mod!r} has {what}: use "
                    "a.then(b) (b applied to a's result) to apply one after the other"
                )
        return ScoreMod((), self._terms + other._terms, None)

    def to(self, device: torch.device | str) -> ScoreMod:
        """The same mod with its tensors (tables, slopes, per-head scales, document ids) on ``device``; moved with
        ``Tensor.to``, so gradients still reach the originals. ``self`` when they are there already."""
        device = torch.device(device)
        tensors = [f for f in self._factors if isinstance(f, torch.Tensor)]
        tensors += [getattr(t, n) for t in self._terms for n in _slots(t) if isinstance(getattr(t, n), torch.Tensor)]
        if all(x.device == device for x in tensors):
            return self

        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, torch.Tensor) else x

        terms = []
        for term in self._terms:
            copy = object.__new__(type(term))
            for name in _slots(term):
                object.__setattr__(copy, name, move(getattr(term, name)))
            terms.append(copy)
        return ScoreMod([move(f) for f in self._factors], terms, self._cap)

    def then(self, other: ScoreMod) -> ScoreMod:
        """``other`` applied to this mod's result: ``other(self(score))``. A softcap must come last, and a
        multiplier cannot follow additive terms (the canonical form scales the score before adding: write the
        scale first)."""
        if not isinstance(other, ScoreMod):
            raise DtypeError(f"then: other: expected a ScoreMod, got {_describe(other)}")
        if self._cap is not None:
            raise ArgumentError(
                f"then: softcap must come last: {self!r} ends with a softcap, so {other!r} cannot follow it"
            )
        if other._factors and self._terms:
            raise ArgumentError(
                f"then: scale first: {other!r} multiplies the score, which would scale the additive terms of "
                f"{self!r}; apply the scale before adding terms (scale(s).then(...))"
            )
        return ScoreMod(self._factors + other._factors, self._terms + other._terms, other._cap)

    # -- the kernel's operands -------------------------------------------------------------------------------------
    def terms(
        self,
        *,
        batch: int,
        heads: int,
        q_len: int,
        kv_len: int,
        q_offset: int = 0,
        kv_offset: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> ScoreTerms:
        """The mod evaluated for one call of ``batch`` x ``heads`` x ``q_len`` queries (positions ``q_offset + i``)
        x ``kv_len`` keys (positions ``kv_offset + j``): the :class:`ScoreTerms` the kernel takes, in ``dtype``.

        Built with torch ops from the tables (gradients flow from the returned tensors into them; traceable by
        ``torch.compile``). Raises :class:`~attnrs.ShapeError` when a table's heads are neither ``heads`` nor 1,
        or document ids do not cover the call's batch and key positions."""
        batch = non_negative(batch, "terms: batch")
        heads = non_negative(heads, "terms: heads")
        q_len = non_negative(q_len, "terms: q_len")
        kv_len = non_negative(kv_len, "terms: kv_len")
        q_offset = integer(q_offset, "terms: q_offset")
        kv_offset = integer(kv_offset, "terms: kv_offset")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DtypeError(f"terms: dtype: expected a floating torch.dtype, got {dtype!r}")
        for f in self._factors:
            if isinstance(f, torch.Tensor) and f.shape[0] not in (1, heads):
                raise ShapeError(f"scale: s: expected {heads} heads (the call's) or 1, got shape {list(f.shape)}")
        for t in self._terms:
            if t.heads not in (1, heads):
                raise ShapeError(
                    f"{t.label}: expected {heads} heads (the call's) or 1, got shape {list(t.tensor.shape)}"
                )
        device = self._device()

        head_scale = None
        if self._factors:
            head_scale = torch.ones(heads, dtype=dtype, device=device)
            for f in self._factors:
                head_scale = head_scale * (f if isinstance(f, float) else f.to(dtype))
            head_scale = head_scale.contiguous()

        distance = None
        n = max(q_len + kv_len - 1, 0)
        rel = torch.arange(n, device=device) - (q_len - 1) + (kv_offset - q_offset)
        for t in self._terms:
            if t.on_distance:
                d = t.distance(rel, dtype)
                distance = d if distance is None else distance + d
        if distance is not None:
            distance = distance.contiguous()

        key = None
        for t in self._terms:
            if not t.on_distance:
                k = t.key(batch, kv_len, kv_offset, dtype)
                key = k if key is None else key + k
        if key is not None:
            key = key.contiguous()
        return ScoreTerms(head_scale, distance, key, self._cap)

    def _device(self) -> torch.device:
        for f in self._factors:
            if isinstance(f, torch.Tensor):
                return f.device
        for t in self._terms:
            return t.tensor.device
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# Constructors


def scale(s: float | torch.Tensor) -> ScoreMod:
    """Multiplies the (already scaled) score: by ``s``, a number, or per head by a float tensor ``[H]`` (or
    ``[1]``). A learned per-head scale (a tensor that requires grad) is not supported: pass ``s.detach()``."""
    if isinstance(s, torch.Tensor):
        s = _float_table(s, "scale: s", "[H]", 1)
        if s.requires_grad:
            raise UnsupportedError(
                "scale: s requires grad: a learned per-head scale is not supported by scores.scale (the kernel "
                "computes no gradient for the multiplier); pass s.detach()"
            )
        return ScoreMod((s,))
    if not is_real(s) or not math.isfinite(s) or abs(s) > FLOAT32_MAX:
        raise ArgumentError(f"scale: s: expected a finite number or a float tensor [H], got {_describe(s)}")
    return ScoreMod((float(s),))


def alibi(slopes: torch.Tensor | int, *, form: str = "relative") -> ScoreMod:
    """ALiBi: adds ``slopes[h] * (kv_idx - q_idx)`` (``form="relative"``: flex's ALiBi example, MPT) or
    ``slopes[h] * kv_idx`` (``form="key"``: BLOOM's; the same softmax, a different LSE).

    ``slopes``: a float tensor ``[H]`` (it may require grad), or the number of heads for the standard slopes
    (:func:`~attnrs.scores.alibi_slopes`, BLOOM's)."""
    if form not in ("relative", "key"):
        raise ArgumentError(f"alibi: form: expected 'relative' or 'key', got {form!r}")
    if isinstance(slopes, numbers.Integral) and not isinstance(slopes, (bool, np.bool_)):
        slopes = alibi_slopes(slopes)
    slopes = _float_table(slopes, "alibi: slopes", "[H] (or an int: the number of heads)", 1)
    return ScoreMod((), (_Alibi(slopes, form),))


def relative_bias(table: torch.Tensor, buckets: BucketFn) -> ScoreMod:
    """A learned relative-position bias: adds ``table[h, buckets(kv_idx - q_idx)]``.

    ``table``: float ``[H, n_buckets]`` (or ``[1, n_buckets]`` for all heads). T5 stores its bias as
    ``nn.Embedding(num_buckets, H)``, whose weight is ``[n_buckets, H]``: pass ``weight.T``.
    ``buckets``: :func:`~attnrs.scores.t5_buckets` or :func:`~attnrs.scores.clamp_buckets`."""
    if not isinstance(buckets, BucketFn):
        raise DtypeError(
            f"relative_bias: buckets: expected a bucket function (t5_buckets(...), clamp_buckets(...)), got "
            f"{_describe(buckets)}"
        )
    table = _float_table(table, "relative_bias: table", "[H, n_buckets]", 2)
    if table.shape[1] < buckets.n_buckets:
        raise ShapeError(
            f"relative_bias: table: expected at least {buckets.n_buckets} columns (the buckets of {buckets!r}), got "
            f"shape {list(table.shape)} (T5's embedding weight is [n_buckets, H]: pass weight.T)"
        )
    return ScoreMod((), (_RelativeBias(table, buckets),))


def bias_table(table: torch.Tensor, *, document_ids: torch.Tensor | None = None) -> ScoreMod:
    """A learned bias looked up in ``table`` (float ``[H, N]``, or ``[1, N]`` for all heads).

    Without ``document_ids``: a causal-distance bias, ``table[h, clamp(q_idx - kv_idx, 0, N - 1)]``: entry ``d``
    for a key ``d`` positions before the query; distances past the end use the last entry, and keys after the
    query (``kv_idx > q_idx``, hidden by a causal mask anyway) use entry 0.

    With ``document_ids`` (an int tensor ``[B or 1, L]`` or ``[L]``: the document of each key position, in
    ``[0, N)``): a per-document key bias, ``table[h, document_ids[b, kv_idx]]``. The ids must cover the key
    positions of each call (``kv_offset + K <= L``)."""
    table = _float_table(table, "bias_table: table", "[H, N]", 2)
    if document_ids is None:
        return ScoreMod((), (_DistanceTable(table),))
    ids = document_ids
    expected = f"bias_table: document_ids: expected an int tensor [B, K] (or [K]), got {_describe(ids)}"
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise DtypeError(expected)
    if ids.dtype == torch.bool:
        raise DtypeError(expected)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise ShapeError(expected)
    ids = ids.to(device=table.device, dtype=torch.long)
    if _checking_values() and ids.device.type != "meta":
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= table.shape[1]:
            raise ArgumentError(
                f"bias_table: document_ids: expected ids in [0, {table.shape[1]}) (the table's columns), got ids "
                f"in [{low}, {high}]"
            )
    return ScoreMod((), (_DocumentBias(table, ids.contiguous()),))


def softcap(c: float) -> ScoreMod:
    """Caps the score smoothly, last: ``x = c * tanh(x / c)`` (Gemma 2's attention softcap). ``c``: a finite
    positive number."""
    if not is_real(c) or not math.isfinite(c) or not FLOAT32_TINY <= c <= FLOAT32_MAX:
        raise ArgumentError(f"softcap: c: expected a finite positive number, got {_describe(c)}")
    return ScoreMod((), (), float(c))


def compose(*mods: ScoreMod) -> ScoreMod:
    """``mods`` applied left to right: ``compose(a, b, c) == a.then(b).then(c)``."""
    if not mods:
        raise ArgumentError("compose: mods: expected at least one ScoreMod, got none")
    for i, mod in enumerate(mods):
        if not isinstance(mod, ScoreMod):
            raise DtypeError(f"compose: mods[{i}]: expected a ScoreMod, got {_describe(mod)}")
    result = mods[0]
    for mod in mods[1:]:
        result = result.then(mod)
    return result
