"""Fuzzing ``attnrs.attention`` with valid inputs against a naive float64 reference (issue #15).

Every example draws a dtype, head dims (odd ones too), GQA, lengths (``q_len != kv_len``, zero lengths, decode),
layouts (transposed ``[B, S, H, D]`` views, sliced and strided views, stride-0 expanded batch and heads, key is
value, 3-D and 5-D inputs), a mask form (None, ``is_causal``, Mask values and their combinations with offsets,
plain ``mask_mod`` callables, dense bool, additive float, ``attnrs.create_block_mask``, torch BlockMasks) and the
features (scale, softcap, sinks, return_lse, enable_gqa). Masks are checked against references written here from
the documented definitions, not against attnrs's own mask evaluation. Inputs must be unchanged after every call.

Budgets: see :mod:`fuzz_support` (``ATTNRS_FUZZ=large`` for many more examples and larger shapes).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from fuzz_support import (
    assert_close_to_reference,
    assert_lse_close,
    assert_unchanged,
    fuzz_settings,
    reference_attention,
    size,
    snapshot,
)
from hypothesis import assume, given, note
from hypothesis import strategies as st

import attnrs
from attnrs import masks

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
HEAD_DIMS = [1, 3, 8, 16, 17, 32, 64, 80, 96, 128, 256]
RefFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Masks with independent references


@dataclass
class MaskSpec:
    """An attnrs mask (a Mask or a plain mask_mod) and its reference ``ref(b, h, q_pos, kv_pos) -> bool`` on
    absolute positions (broadcasting int64 index tensors), written from the documented definitions."""

    mask: Any
    ref: RefFn
    text: str
    tables: list[torch.Tensor] = field(default_factory=list)


def _per_batch(values: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return values[b] if values.shape[0] > 1 else values[torch.zeros_like(b)]


def _row(table: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b if table.shape[0] > 1 else torch.zeros_like(b)


CALLABLES: list[tuple[str, RefFn]] = [
    ("(q + 2kv + h) % 3 != 0", lambda b, h, q, kv: ((q + 2 * kv + h) % 3) != 0),
    ("kv <= q and (b + h) even, or kv == 0", lambda b, h, q, kv: ((kv <= q) & ((b + h) % 2 == 0)) | (kv == 0)),
    ("|q - kv| < 4", lambda b, h, q, kv: (q - kv).abs() < 4),
    ("kv % 5 != 1", lambda b, h, q, kv: (kv % 5) != 1),
    ("nothing", lambda b, h, q, kv: (q < -(10**9)) & (kv < 0)),
]


@st.composite
def mask_specs(draw: st.DrawFn, batch: int, max_pos: int, depth: int = 0) -> MaskSpec:
    """A random mask whose tables cover positions ``0 .. max_pos - 1`` with batch 1 or ``batch``."""
    leaves = [
        "causal",
        "sliding",
        "sliding_overlay",
        "chunked",
        "padding",
        "document",
        "prefix",
        "bidirectional",
        "callable",
    ]
    kinds = [*leaves, "and", "or", "not", "shift"] if depth < 2 else leaves
    kind = draw(st.sampled_from(kinds))
    table_batch = draw(st.sampled_from(sorted({1, max(1, batch)})))
    n = max(1, max_pos)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "causal":
        off = draw(st.integers(-5, 5))
        return MaskSpec(masks.causal(off), lambda b, h, q, kv: kv <= q + off, f"causal({off})")
    if kind == "sliding":
        w, causal = draw(st.integers(1, 20)), draw(st.booleans())
        if causal:
            return MaskSpec(
                masks.sliding_window(w), lambda b, h, q, kv: (kv > q - w) & (kv <= q), f"sliding_window({w})"
            )
        return MaskSpec(
            masks.sliding_window(w, causal=False),
            lambda b, h, q, kv: (q - kv).abs() <= w,
            f"sliding_window({w}, causal=False)",
        )
    if kind == "sliding_overlay":
        w = draw(st.integers(1, 20))
        return MaskSpec(masks.sliding_window_overlay(w), lambda b, h, q, kv: kv > q - w, f"sliding_window_overlay({w})")
    if kind == "chunked":
        chunk, causal = draw(st.integers(1, 12)), draw(st.booleans())
        lp = torch.randint(0, 6, (table_batch,), generator=gen)
        lp_arg: Any = lp if draw(st.booleans()) else lp.tolist()

        def chunk_ref(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            start = _per_batch(lp, b)
            same = torch.div(kv - start, chunk, rounding_mode="floor") == torch.div(
                q - start, chunk, rounding_mode="floor"
            )
            return same & (kv <= q) if causal else same

        return MaskSpec(
            masks.chunked(chunk, lp_arg, causal=causal), chunk_ref, f"chunked({chunk}, {lp.tolist()})", [lp]
        )
    if kind == "padding":
        width = draw(st.integers(1, n + 3))
        valid = torch.rand(table_batch, width, generator=gen) > draw(st.sampled_from([0.0, 0.3, 0.9]))

        def pad_ref(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            inside = (kv >= 0) & (kv < width)
            return valid[_row(valid, b), kv.clamp(0, width - 1)] & inside

        return MaskSpec(masks.padding(valid), pad_ref, f"padding({list(valid.shape)})", [valid])
    if kind == "document":
        width = n + draw(st.integers(0, 3))
        ids = torch.randint(0, draw(st.integers(1, 4)), (table_batch, width), generator=gen)
        if draw(st.booleans()):
            ids = ids.sort(-1).values
        ids_arg = ids[0] if table_batch == 1 and draw(st.booleans()) else ids

        def doc_ref(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            inside = (q >= 0) & (q < width) & (kv >= 0) & (kv < width)
            row = _row(ids, b)
            return (ids[row, q.clamp(0, width - 1)] == ids[row, kv.clamp(0, width - 1)]) & inside

        return MaskSpec(masks.document(ids_arg), doc_ref, f"document({ids.tolist()})", [ids])
    if kind == "prefix":
        lengths = torch.randint(0, n + 2, (table_batch,), generator=gen)
        return MaskSpec(
            masks.prefix_lm(lengths),
            lambda b, h, q, kv: (kv < _per_batch(lengths, b)) | (kv <= q),
            f"prefix_lm({lengths.tolist()})",
            [lengths],
        )
    if kind == "bidirectional":
        return MaskSpec(masks.bidirectional(), lambda b, h, q, kv: (q == q) & (kv == kv), "bidirectional()")
    if kind == "callable":
        text, fn = draw(st.sampled_from(CALLABLES))
        # A plain mask_mod (not recognised), or the same wrapped in from_callable.
        wrapped = (lambda b, h, q, kv: fn(b, h, q, kv)) if draw(st.booleans()) else masks.from_callable(fn)
        return MaskSpec(wrapped, fn, f"mask_mod[{text}]")
    if kind == "not":
        inner = draw(mask_specs(batch, max_pos, depth + 1))
        return MaskSpec(~masks.as_mask(inner.mask), lambda b, h, q, kv: ~inner.ref(b, h, q, kv), f"~{inner.text}")
    if kind == "shift":
        inner = draw(mask_specs(batch, 0, depth + 1).filter(lambda s: "document" not in s.text))
        dq, dk = draw(st.integers(-4, 4)), draw(st.integers(-4, 4))
        return MaskSpec(
            masks.as_mask(inner.mask).shifted(dq, dk),
            lambda b, h, q, kv: inner.ref(b, h, q + dq, kv + dk),
            f"{inner.text}.shifted({dq}, {dk})",
            inner.tables,
        )
    parts = [draw(mask_specs(batch, max_pos, depth + 1)) for _ in range(draw(st.integers(2, 3)))]
    if kind == "and":
        if draw(st.booleans()):
            combined = masks.and_masks(*(p.mask for p in parts))
        else:
            combined = masks.as_mask(parts[0].mask)
            for p in parts[1:]:
                combined = combined & p.mask

        def and_ref(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            out = parts[0].ref(b, h, q, kv)
            for p in parts[1:]:
                out = out & p.ref(b, h, q, kv)
            return out

        return MaskSpec(
            combined, and_ref, "(" + " & ".join(p.text for p in parts) + ")", [t for p in parts for t in p.tables]
        )
    combined = masks.or_masks(*(p.mask for p in parts))

    def or_ref(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        out = parts[0].ref(b, h, q, kv)
        for p in parts[1:]:
            out = out | p.ref(b, h, q, kv)
        return out

    return MaskSpec(
        combined, or_ref, "(" + " | ".join(p.text for p in parts) + ")", [t for p in parts for t in p.tables]
    )


def evaluate_ref(
    ref: RefFn, batch: int, heads: int, q_len: int, kv_len: int, q_offset: int, kv_offset: int
) -> torch.Tensor:
    b = torch.arange(batch).view(-1, 1, 1, 1)
    h = torch.arange(heads).view(1, -1, 1, 1)
    q = (torch.arange(q_len) + q_offset).view(1, 1, -1, 1)
    kv = (torch.arange(kv_len) + kv_offset).view(1, 1, 1, -1)
    return ref(b, h, q, kv).expand(batch, heads, q_len, kv_len)


# ---------------------------------------------------------------------------------------------------------------
# Layouts: the same values with other strides

LAYOUTS = ["contiguous", "bshd", "sliced_d", "strided_s", "strided_d", "offset", "heads_last"]


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (values unchanged, differentiable) as a view with another memory layout."""
    if layout == "contiguous":
        return x
    if layout == "bshd":  # the transformers layout: [..., S, H, D] transposed to [..., H, S, D]
        return x.transpose(-3, -2).contiguous().transpose(-3, -2)
    if layout == "heads_last":  # D outermost: a very non-contiguous view
        return x.movedim(-1, 0).contiguous().movedim(0, -1)
    if layout == "sliced_d":  # a window of a wider buffer
        wide = x.new_full((*x.shape[:-1], x.shape[-1] + 5), 7.0)
        wide[..., 2 : 2 + x.shape[-1]] = x
        return wide[..., 2 : 2 + x.shape[-1]]
    if layout == "strided_s":  # every other row of a taller buffer
        tall = x.new_full((*x.shape[:-2], 2 * x.shape[-2], x.shape[-1]), -3.0)
        tall[..., 1::2, :] = x
        return tall[..., 1::2, :]
    if layout == "strided_d":  # every other element of the last dim
        wide = x.new_full((*x.shape[:-1], 2 * x.shape[-1]), 5.0)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "offset":  # a storage offset
        flat = x.new_full((x.numel() + 11,), 1.0)
        flat[11:] = x.reshape(-1)
        return flat[11:].view(x.shape)
    raise AssertionError(layout)


def flatten_batch(x: torch.Tensor, batch_shape: tuple[int, ...]) -> torch.Tensor:
    """SDPA's broadcasting of the leading dims, as a 4-D ``[B, H, S, D]`` tensor."""
    return x.expand(*batch_shape, *x.shape[-3:]).reshape(math.prod(batch_shape), *x.shape[-3:])


# ---------------------------------------------------------------------------------------------------------------
# Problems


@dataclass
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    batch_shape: tuple[int, ...]
    mask: Any = None
    is_causal: bool = False
    q_offset: int = 0
    kv_offset: int = 0
    scale: float | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    return_lse: bool = False
    enable_gqa: bool = False
    backend: str = "auto"
    visible: torch.Tensor | None = None  # reference [B, H, Q, K]
    bias: torch.Tensor | None = None  # reference [B, H, Q, K]
    keep: list[Any] = field(default_factory=list)  # every tensor that must be unchanged
    leaves: list[torch.Tensor] = field(default_factory=list)  # q, k, v bases (for gradients)
    text: str = ""
    build: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # leaves -> (q, k, v)

    def dense_bias(self, mask: torch.Tensor) -> torch.Tensor:
        """The reference's ``[B, H, Q, K]`` of an additive mask broadcast to the inputs."""
        full = (*self.batch_shape, self.q.shape[-3], self.q.shape[-2], self.k.shape[-2])
        return flatten_batch(mask.expand(full), self.batch_shape)

    def call(self, **overrides: Any) -> Any:
        kw: dict[str, Any] = dict(
            is_causal=self.is_causal,
            scale=self.scale,
            enable_gqa=self.enable_gqa,
            softcap=self.softcap,
            sinks=self.sinks,
            return_lse=self.return_lse,
            backend=self.backend,
        )
        if (self.q_offset, self.kv_offset) != (0, 0):
            kw.update(q_offset=self.q_offset, kv_offset=self.kv_offset)
        kw.update(overrides)
        return attnrs.attention(self.q, self.k, self.v, self.mask, **kw)

    def reference(
        self,
        q: torch.Tensor | None = None,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (self.q if q is None else q), (self.k if k is None else k), (self.v if v is None else v)
        return reference_attention(
            flatten_batch(q, self.batch_shape),
            flatten_batch(k, self.batch_shape),
            flatten_batch(v, self.batch_shape),
            self.visible,
            self.bias if bias is None else bias,
            self.scale,
            self.softcap,
            self.sinks if sinks is None else sinks,
        )


def _randn(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, spread: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * spread).to(dtype)


@st.composite
def problems(draw: st.DrawFn, dtypes: list[torch.dtype] = DTYPES, grad: bool = False) -> Problem:
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    d = draw(st.sampled_from(HEAD_DIMS))
    dv = draw(st.sampled_from([d, d, 1, 5, 16, 64]))
    h_kv = draw(st.integers(0 if not grad else 1, 3)) if draw(st.integers(0, 9)) else 0
    h = h_kv * draw(st.sampled_from([1, 1, 2, 3, 4]))
    shape_kind = draw(st.sampled_from(["small", "small", "small", "tiles", "decode", "empty"]))
    if shape_kind == "small":
        q_len, kv_len = draw(st.integers(1, size(24, 80))), draw(st.integers(1, size(24, 80)))
    elif shape_kind == "tiles":  # crosses the kernels' tile edges
        q_len, kv_len = draw(st.integers(1, size(140, 300))), draw(st.integers(60, size(200, 400)))
    elif shape_kind == "decode":
        q_len, kv_len = draw(st.integers(1, 3)), draw(st.integers(1, size(600, 5000)))
    else:
        q_len, kv_len = draw(st.sampled_from([(0, 5), (4, 0), (0, 0), (1, 0), (3, 3)]))
    if d * max(1, h) * (q_len + kv_len) > 300_000:  # keeps an example well under a second
        d, dv = min(d, 32), min(dv, 32)
    rank = draw(st.sampled_from([4, 4, 4, 3, 5]))
    if rank == 3:
        lead_q: tuple[int, ...] = ()
        lead_kv: tuple[int, ...] = ()
    elif rank == 4:
        bsz = draw(st.integers(0 if not grad else 1, 3)) if draw(st.integers(0, 9)) else 0
        lead_q = (bsz,)
        lead_kv = (bsz,)
    else:
        b1, b2 = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        lead_q = (b1, b2)
        lead_kv = (draw(st.sampled_from([1, b1])), draw(st.sampled_from([1, b2])))
    batch_shape = tuple(torch.broadcast_shapes(lead_q, lead_kv))
    batch = math.prod(batch_shape)

    # The base tensors (leaves for gradients), then their views in a random layout.
    spread = draw(st.sampled_from([1.0, 1.0, 0.1, 3.0]))
    q_base = _randn(gen, (*lead_q, h, q_len, d), dtype, spread)
    expand_kv = rank == 4 and lead_kv[0] > 1 and draw(st.integers(0, 3)) == 0  # stride-0 batch
    expand_heads = h_kv > 1 and draw(st.integers(0, 3)) == 0  # stride-0 heads
    kv_lead = (1,) if expand_kv else lead_kv
    kv_heads = 1 if expand_heads else h_kv
    k_base = _randn(gen, (*kv_lead, kv_heads, kv_len, d), dtype, spread)
    same_kv = dv == d and draw(st.integers(0, 4)) == 0
    v_base = k_base if same_kv else _randn(gen, (*kv_lead, kv_heads, kv_len, dv), dtype)
    leaves = [q_base, k_base] + ([] if same_kv else [v_base])
    if grad:
        for t in leaves:
            t.requires_grad_(True)

    def view(x: torch.Tensor, layout: str, kv: bool) -> torch.Tensor:
        y = with_layout(x, layout)
        if expand_kv and kv:
            y = y.expand(*lead_kv, *y.shape[1:])
        if expand_heads and kv:
            y = y.expand(*y.shape[:-3], h_kv, *y.shape[-2:])
        return y

    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]

    def build(*bases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qb, kb = bases[0], bases[1]
        k_view = view(kb, layouts[1], kv=True)
        v_view = k_view if same_kv else view(bases[2], layouts[2], kv=True)
        return view(qb, layouts[0], kv=False), k_view, v_view

    q, k, v = build(*leaves)
    p = Problem(q=q, k=k, v=v, batch_shape=batch_shape, leaves=leaves, build=build)
    p.text = (
        f"{dtype} q{list(q.shape)} k{list(k.shape)} v{list(v.shape)} layouts={layouts} expand_kv={expand_kv} "
        f"expand_heads={expand_heads} same_kv={same_kv}"
    )

    # The mask.
    kind = draw(
        st.sampled_from(
            ["none", "causal", "mask", "mask", "mask", "mask_causal", "block", "torch_block", "dense", "additive"]
        )
    )
    if kind in ("mask", "mask_causal"):
        offsets = sorted({0, kv_len - q_len})
        p.q_offset = draw(st.sampled_from([*offsets, draw(st.integers(-3, 8))]))
        p.kv_offset = draw(st.sampled_from([0, 0, draw(st.integers(-3, 8))]))
        max_pos = max(p.q_offset + q_len, p.kv_offset + kv_len)
        spec = draw(mask_specs(batch, max_pos))
        # A mask_mod on an empty batch or head grid: see test_mask_mod_on_an_empty_grid (a finding).
        assume("mask_mod" not in spec.text or (batch > 0 and h > 0))
        p.mask, p.is_causal = spec.mask, kind == "mask_causal"
        p.visible = evaluate_ref(spec.ref, batch, h, q_len, kv_len, p.q_offset, p.kv_offset)
        p.keep += spec.tables
        p.text += f" mask={spec.text} q_offset={p.q_offset} kv_offset={p.kv_offset}"
    elif kind == "block":
        q_off, kv_off = draw(st.sampled_from([(0, 0), (kv_len - q_len, 0), (2, 1)]))
        spec = draw(mask_specs(batch, max(q_off + q_len, kv_off + kv_len)))
        assume("mask_mod" not in spec.text or (batch > 0 and h > 0))
        block = draw(st.sampled_from([1, 3, 16, 64, 128, (16, 32), (128, 64)]))
        mb, mh = draw(st.sampled_from(sorted({1, batch}))), draw(st.sampled_from(sorted({1, max(h, 1)})))
        p.mask = attnrs.create_block_mask(
            spec.mask, None if mb == 1 else mb, mh, q_len, kv_len, BLOCK_SIZE=block, q_offset=q_off, kv_offset=kv_off
        )
        p.visible = evaluate_ref(spec.ref, batch, h, q_len, kv_len, q_off, kv_off)
        p.keep += spec.tables
        p.text += f" block_mask={spec.text} BLOCK_SIZE={block} B={mb} H={mh} offsets=({q_off}, {kv_off})"
    elif kind == "torch_block":
        assume(q_len > 0 and kv_len > 0 and batch > 0 and h > 0)
        text, fn = draw(st.sampled_from(CALLABLES[:4]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p.mask = torch.nn.attention.flex_attention.create_block_mask(
                fn, batch, h, q_len, kv_len, device="cpu", BLOCK_SIZE=draw(st.sampled_from([16, 128]))
            )
        p.visible = evaluate_ref(fn, batch, h, q_len, kv_len, 0, 0)
        p.text += f" torch_block_mask[{text}]"
    elif kind == "causal":
        p.is_causal = True
    elif kind in ("dense", "additive"):
        full = (*batch_shape, h, q_len, kv_len)
        # A shape broadcastable to [*batch, H, Q, K]: some dims 1, some leading dims dropped.
        drop = draw(st.integers(0, len(full) - 2))
        shape = [1 if draw(st.booleans()) else n for n in full[drop:]]
        if kind == "dense":
            dense = torch.rand(shape, generator=gen) > draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
            p.visible = flatten_batch(dense.expand(full), batch_shape)
        else:
            bias_dtype = draw(st.sampled_from([dtype, torch.float32]))
            dense = _randn(gen, tuple(shape), torch.float64, draw(st.sampled_from([0.5, 2.0])))
            dense[torch.rand(shape, generator=gen) > draw(st.sampled_from([1.0, 0.8, 0.3]))] = float("-inf")
            dense = dense.to(bias_dtype)
            p.bias = p.dense_bias(dense)
            if draw(st.booleans()):
                p.is_causal = True
        p.mask = (
            with_layout(dense, draw(st.sampled_from(["contiguous", "bshd", "strided_s"])))
            if dense.dim() >= 3
            else dense
        )
        p.keep.append(p.mask)
        p.text += f" {kind}{list(dense.shape)} {dense.dtype}"
    if p.is_causal:
        causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
        p.visible = causal.expand(batch, h, -1, -1) if p.visible is None else p.visible & causal

    # Features.
    p.scale = draw(st.sampled_from([None, None, 0.0, -0.7, 1e-3, draw(st.floats(0.01, 2.0)), 4.0]))
    p.softcap = draw(st.sampled_from([None, None, 0.5, 5.0, 50.0]))
    if draw(st.booleans()) and h > 0:
        p.sinks = _randn(gen, (h,), draw(st.sampled_from([torch.float32, dtype])), 2.0)
        if draw(st.integers(0, 5)) == 0:
            p.sinks[0] = float("-inf")
        if grad:
            p.sinks.requires_grad_(draw(st.booleans()))
    p.return_lse = draw(st.booleans())
    p.enable_gqa = h != h_kv or draw(st.booleans())
    p.backend = "auto" if grad else draw(st.sampled_from(["auto", "auto", "native"]))
    p.keep += [q_base, k_base, v_base, q, k, v, p.sinks]
    p.text += f" scale={p.scale} softcap={p.softcap} sinks={p.sinks is not None} lse={p.return_lse}"
    return p


# ---------------------------------------------------------------------------------------------------------------
# Tests


@fuzz_settings(260)
@given(problems())
def test_forward_matches_the_float64_reference(p: Problem) -> None:
    note(p.text)
    saved = snapshot(p.keep, p.mask if isinstance(p.mask, torch.Tensor) else None)
    result = p.call()
    assert_unchanged(saved)
    out, lse = result if p.return_lse else (result, None)
    ref_out, ref_lse = p.reference()
    dtype, dv = p.q.dtype, p.v.shape[-1]
    expected_shape = (*p.batch_shape, p.q.shape[-3], p.q.shape[-2], dv)
    assert tuple(out.shape) == expected_shape, (tuple(out.shape), expected_shape)
    assert out.dtype == dtype
    assert not torch.isnan(out).any(), "NaN in the output of finite inputs"
    out4 = out.reshape(ref_out.shape)
    assert_close_to_reference(out4, ref_out, dtype, p.q.shape[-1])
    if p.bias is None:
        seen = p.visible if p.visible is not None else torch.ones(*ref_out.shape[:-1], p.k.shape[-2], dtype=torch.bool)
        hidden = ~seen.any(-1)
        assert bool((out4[hidden] == 0).all()), "rows that see no key must be zeros"
    if lse is not None:
        assert tuple(lse.shape) == expected_shape[:-1]
        assert_lse_close(lse.reshape(ref_lse.shape), ref_lse, dtype, p.sinks is not None)


@fuzz_settings(60)
@given(problems(dtypes=[torch.float32], grad=True))
def test_gradients_match_float64_autograd(p: Problem) -> None:
    note(p.text)
    assume(p.q.numel() > 0 and p.k.numel() > 0)
    bias_leaf = None
    if p.bias is not None and isinstance(p.mask, torch.Tensor) and p.mask.dtype == torch.float32:
        bias_leaf = p.mask.detach().clone().requires_grad_(True)  # a learned additive bias: its gradient too
        p.mask = bias_leaf
    result = p.call()
    out, lse = result if p.return_lse else (result, None)
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=gen)
    loss = (out * grad_out).sum()
    grad_lse = None
    if lse is not None:
        grad_lse = torch.randn(lse.shape, generator=gen).masked_fill(~torch.isfinite(lse), 0.0)
        loss = loss + (lse.masked_fill(~torch.isfinite(lse), 0.0) * grad_lse).sum()
    names = ["dq", "dk", "dv"] if len(p.leaves) == 3 else ["dq", "dk (key is value)"]
    inputs = list(p.leaves)
    if p.sinks is not None and p.sinks.requires_grad:
        inputs.append(p.sinks)
        names.append("dsinks")
    if bias_leaf is not None:
        inputs.append(bias_leaf)
        names.append("dbias")
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)

    # The same views of float64 copies of the leaves, through the reference.
    leaves64 = [t.detach().double().requires_grad_(True) for t in inputs]
    by_name = dict(zip(names, leaves64))
    q64, k64, v64 = p.build(*leaves64[: len(p.leaves)])
    sinks64 = by_name.get("dsinks", p.sinks.detach() if p.sinks is not None else None)
    bias64 = p.dense_bias(by_name["dbias"]) if "dbias" in by_name else None
    ref_out, ref_lse = p.reference(q64, k64, v64, sinks64, bias64)
    ref_loss = (ref_out * grad_out.double().reshape(ref_out.shape)).sum()
    if grad_lse is not None:
        finite = torch.isfinite(ref_lse)
        ref_loss = ref_loss + (ref_lse.masked_fill(~finite, 0.0) * grad_lse.double().reshape(ref_lse.shape)).sum()
    ref_grads = torch.autograd.grad(ref_loss, leaves64, allow_unused=True)
    for name, g, rg, leaf in zip(names, grads, ref_grads, inputs):
        g = torch.zeros_like(leaf) if g is None else g
        rg = torch.zeros_like(leaf, dtype=torch.float64) if rg is None else rg
        assert not torch.isnan(g).any(), f"{name}: NaN"
        magnitude = max(1.0, float(rg.abs().max()) if rg.numel() else 1.0)
        torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-4 * magnitude, msg=lambda m, n=name: f"{n}: {m}")
