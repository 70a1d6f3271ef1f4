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

import pytest
import torch
from fuzz_support import (
    CALLABLES,
    assert_close_to_reference,
    assert_lse_close,
    assert_unchanged,
    evaluate_ref,
    fuzz_settings,
    mask_specs,
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

    def logit_range(self) -> float:
        """The largest |q kᵀ scale| (an upper bound of the logits after softcap)."""
        q, k = flatten_batch(self.q, self.batch_shape).double(), flatten_batch(self.k, self.batch_shape).double()
        if q.numel() == 0 or k.numel() == 0:
            return 0.0
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        return float((q @ k.transpose(-1, -2)).abs().max()) * abs(scale)

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
    if grad:  # the float64 autograd reference is the slow part
        q_len, kv_len = min(q_len, 100), min(kv_len, size(200, 1000))
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
        per_batch = any(t.dim() and t.shape[0] > 1 for t in spec.tables)  # its tables' batch must be B
        mb = batch if per_batch else draw(st.sampled_from(sorted({1, batch})))
        mh = draw(st.sampled_from(sorted({1, max(h, 1)})))
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
    # "attnrs": the built-in kernel through the native-kernel table (forward only)
    p.backend = "auto" if grad else draw(st.sampled_from(["auto", "auto", "native", "attnrs"]))
    p.keep += [q_base, k_base, v_base, q, k, v, p.sinks]
    p.text += f" scale={p.scale} softcap={p.softcap} sinks={p.sinks is not None} lse={p.return_lse}"
    return p


# ---------------------------------------------------------------------------------------------------------------
# Tests


@fuzz_settings(250)
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
    assert_close_to_reference(out4, ref_out, dtype, p.q.shape[-1], logit_range=p.logit_range())
    if p.bias is None:
        seen = p.visible if p.visible is not None else torch.ones(*ref_out.shape[:-1], p.k.shape[-2], dtype=torch.bool)
        hidden = ~seen.any(-1)
        assert bool((out4[hidden] == 0).all()), "rows that see no key must be zeros"
    if lse is not None:
        assert tuple(lse.shape) == expected_shape[:-1]
        assert_lse_close(lse.reshape(ref_lse.shape), ref_lse, dtype, p.sinks is not None)


@fuzz_settings(50)
@given(problems(dtypes=[torch.float32], grad=True))
def test_gradients_match_float64_autograd(p: Problem) -> None:
    note(p.text)
    assume(p.q.numel() > 0 and p.k.numel() > 0)
    bias_leaf = None
    if p.bias is not None and isinstance(p.mask, torch.Tensor) and p.mask.dtype == torch.float32:
        bias_leaf = p.mask.detach().clone().requires_grad_(True)  # a learned additive bias: its gradient too
        p.mask = bias_leaf
    saved = snapshot(p.keep, p.mask if isinstance(p.mask, torch.Tensor) else None)
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
    assert_unchanged(saved)

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
    scale = p.scale if p.scale is not None else q64.shape[-1] ** -0.5
    biggest = max(float(t.detach().abs().max()) if t.numel() else 0.0 for t in (q64, k64, v64, grad_out))
    cancelling = abs(scale) * biggest**3
    for name, g, rg, leaf in zip(names, grads, ref_grads, inputs):
        g = torch.zeros_like(leaf) if g is None else g
        rg = torch.zeros_like(leaf, dtype=torch.float64) if rg is None else rg
        assert not torch.isnan(g).any(), f"{name}: NaN"
        magnitude = max(1.0, float(rg.abs().max()) if rg.numel() else 1.0)
        if name.startswith(("dq", "dk")):
            # dS = P * (dP - delta) cancels terms of size |dO| |v|, in float32: dq and dk carry an absolute error of
            # that size times the scale and |k| / |q|, however small the exact gradient is (one key: exactly 0).
            magnitude = max(magnitude, cancelling)
        torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-4 * magnitude, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# NaN inputs: torch's math path is the reference where the NaN is visible


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    if mask is not None and mask.dtype == torch.bool:  # the raw op adds a bool mask; SDPA converts it first
        mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    out, _ = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, mask, 0.0, False, scale=scale, enable_gqa=True)
    return out


@fuzz_settings(60)
@given(st.data())
def test_nan_in_keys_and_values_propagates_like_torch_math(data: st.DataObject) -> None:
    """A NaN in a key or a value reaches exactly the rows that see it, as in torch's math path; rows that do not
    see it (masked out) keep their NaN-free values."""
    b, h_kv = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    h = h_kv * data.draw(st.integers(1, 2))
    q_len, kv_len, d = data.draw(st.integers(1, size(20, 150))), data.draw(st.integers(1, size(20, 150))), 8
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    q, k, v = (torch.randn(s, generator=gen) for s in ((b, h, q_len, d), (b, h_kv, kv_len, d), (b, h_kv, kv_len, d)))
    dense = torch.rand(b, 1, q_len, kv_len, generator=gen) > 0.4 if data.draw(st.booleans()) else None
    where = data.draw(st.sampled_from(["key", "value"]))
    bi, hi, j, di = (data.draw(st.integers(0, n - 1)) for n in (b, h_kv, kv_len, d))
    (k if where == "key" else v)[bi, hi, j, di] = float("nan")
    note(f"NaN in {where}[{bi}, {hi}, {j}, {di}], dense mask: {dense is not None}")
    saved = snapshot(q, k, v, dense)
    out = attnrs.attention(q, k, v, dense, scale=0.5)
    assert_unchanged(saved)
    visible = torch.ones(b, h, q_len, kv_len, dtype=torch.bool) if dense is None else dense.expand(b, h, -1, -1)
    sees = torch.zeros(b, h, q_len, dtype=torch.bool)
    group = h // h_kv
    sees[bi, hi * group : (hi + 1) * group] = visible[bi, hi * group : (hi + 1) * group, :, j]
    if where == "key":
        # A row whose only visible key is the NaN one: see test_nan_in_the_only_visible_key_gives_a_nan_row.
        assume(not bool((sees & (visible.sum(-1) == 1)).any()))
    expected = _math(q, k, v, None if dense is None else dense, 0.5)
    torch.testing.assert_close(out[sees], expected[sees], equal_nan=True, msg="rows that see the NaN")
    clean_k, clean_v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    ref, _ = reference_attention(q, clean_k, clean_v, visible, scale=0.5)
    if where == "key":  # a masked NaN value leaks as 0 * NaN: see test_a_masked_nan_value_does_not_leak
        torch.testing.assert_close(out[~sees].double(), ref[~sees], rtol=2e-5, atol=2e-5, msg="rows that miss it")


@pytest.mark.parametrize("mask", ["none", "causal", "dense"])
def test_nan_in_a_query_row_propagates_like_torch_math(mask: str) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=gen) for _ in range(3))
    q[0, 1, 5, 3] = float("nan")
    dense = torch.ones(16, 16, dtype=torch.bool).tril() if mask != "none" else None
    out = attnrs.attention(q, k, v, dense if mask == "dense" else None, is_causal=mask == "causal", scale=0.5)
    expected = _math(q, k, v, dense, 0.5)
    torch.testing.assert_close(out, expected, equal_nan=True)


@pytest.mark.parametrize("kv_len", [1, 5])
def test_nan_in_the_only_visible_key_gives_a_nan_row(kv_len: int) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 5, 8, generator=gen) for _ in range(3))
    k, v = k[:, :, :kv_len].clone(), v[:, :, :kv_len]
    k[0, 0, 0, 0] = float("nan")
    mask = torch.zeros(5, kv_len, dtype=torch.bool)
    mask[:, 0] = True  # key 0 (the NaN one) is the only key every row sees
    out = attnrs.attention(q, k, v, mask if kv_len > 1 else None, scale=0.5)
    torch.testing.assert_close(out, _math(q, k, v, mask, 0.5), equal_nan=True)


@pytest.mark.parametrize("row", ["nan_among_minus_inf", "all_nan"])
def test_nan_in_an_additive_mask_propagates_like_torch_math(row: str) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    bias = torch.zeros(1, 1, 6, 6)
    if row == "all_nan":
        bias[0, 0, 2] = float("nan")
    else:
        bias[0, 0, 2] = float("-inf")
        bias[0, 0, 2, 4] = float("nan")
    out = attnrs.attention(q, k, v, bias, scale=0.5)
    torch.testing.assert_close(out, _math(q, k, v, bias, 0.5), equal_nan=True)


def test_nan_in_an_additive_mask_at_a_visible_position_gives_a_nan_row() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen) for _ in range(3))
    bias = torch.randn(40, 40, generator=gen)
    bias[7, 30] = float("nan")
    out = attnrs.attention(q, k, v, bias, scale=0.5)
    torch.testing.assert_close(out, _math(q, k, v, bias, 0.5), equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# Other defects


@pytest.mark.parametrize("shape", [(0, 2, 4, 8), (1, 0, 4, 8), (0, 0, 1, 1)])
def test_a_mask_mod_on_an_empty_grid_gives_an_empty_output(shape: tuple[int, ...]) -> None:
    q = torch.randn(shape)
    expected = attnrs.attention(q, q, q, masks.causal())
    out = attnrs.attention(q, q, q, lambda b, h, qi, kv: (kv <= qi) & (b + h >= 0))
    assert out.shape == expected.shape


def test_an_infinite_sink_takes_the_whole_row() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=gen) for _ in range(3))
    sinks = torch.tensor([float("inf"), 0.0])
    out, lse = attnrs.attention(q, k, v, sinks=sinks, return_lse=True)
    _, ref_lse = reference_attention(q, k, v, sinks=sinks)
    assert bool((out[0, 0] == 0).all())
    assert not torch.isnan(lse).any(), lse
    torch.testing.assert_close(lse.double(), ref_lse)
