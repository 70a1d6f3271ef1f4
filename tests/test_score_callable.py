"""Any Python score_mod, exactly (``attnrs.attention.score_callable``): equal to ``flex_attention`` with the same
callables (forward, LSE, gradients into q/k/v and the tensors a callable closes over), with causal, dense and no
masks, GQA, Q != K, float32 and bfloat16; equal to a float64 reference written here with the softcap, the additive
bias, the sinks and offsets; chunked and unchunked alike, with backward memory bounded by the chunk; the typed
errors of bad callables."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from flex_support import causal, flex

from attnrs import masks, scores
from attnrs.attention import score_callable
from attnrs.attention.resolve import ResolvedMask
from attnrs.attention.score_callable import callable_score_attention, chunk_rows
from attnrs.errors import ArgumentError

B, H, HKV, Q, K, D = 2, 4, 2, 10, 12, 8


def cosine(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return score * torch.cos(kv_idx)


def hide_every_third(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return torch.where((kv_idx + q_idx) % 3 == 0, -math.inf, score)


def _inputs(dtype: torch.dtype, q_len: int = Q, kv_len: int = K, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, q_len, D), (B, HKV, kv_len, D), (B, HKV, kv_len, D)]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three query rows per chunk (one chunk's fp32 scores: B * H * 3 * K * 4 bytes)."""
    monkeypatch.setattr(score_callable, "CHUNK_BYTES", B * H * 3 * K * 4)


def _grads(out: torch.Tensor, lse: torch.Tensor, tensors: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return list(torch.autograd.grad((out * weights).float().sum() + lse.float().sum(), tensors))


# ---------------------------------------------------------------------------------------------------------------
# Against flex_attention (uncompiled, CPU)

DENSE = torch.rand(B, H, Q, K, generator=torch.Generator().manual_seed(5)) > 0.4
DENSE[0, 1, 2] = False  # a row that sees nothing: output 0, LSE -inf


def _learned() -> tuple[Callable[..., Any], torch.Tensor]:
    weight = torch.linspace(-1.0, 1.0, H).requires_grad_()

    def bias_by_head(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return score + weight[h] * (kv_idx - q_idx).to(score.dtype) * 0.25

    return bias_by_head, weight


@pytest.mark.parametrize("mask", ["causal", "dense", "none"])
def test_equals_flex_attention(mask: str, small_chunks: None) -> None:
    fn, weight = _learned() if mask == "dense" else (cosine if mask == "causal" else hide_every_third, None)
    q_len = Q if mask != "none" else 7  # Q != K everywhere; and a Q that is not a multiple of the chunk
    q, k, v = _inputs(torch.float32, q_len=q_len)
    if mask == "causal":
        resolved, mask_mod = ResolvedMask(structural=masks.causal()), causal
    elif mask == "dense":
        resolved, mask_mod = ResolvedMask(dense_bool=DENSE), lambda b, h, qi, kv: DENSE[b, h, qi, kv]
    else:
        resolved, mask_mod = ResolvedMask(), None
    tensors = [q, k, v] if weight is None else [q, k, v, weight]
    out, lse = callable_score_attention(q, k, v, resolved, fn, D**-0.5, None, None, True)
    assert lse is not None and lse.dtype == torch.float32 and out.shape == (B, H, q_len, D)
    ref_out, ref_lse = flex(q, k, v, fn, mask_mod)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    for got, want in zip(_grads(out, lse, tensors), _grads(ref_out, ref_lse, tensors)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if mask == "dense":
        assert torch.equal(out[0, 1, 2], torch.zeros(D)) and lse[0, 1, 2] == -math.inf


def test_equals_flex_attention_in_bfloat16(small_chunks: None) -> None:
    q, k, v = _inputs(torch.bfloat16)
    out, lse = callable_score_attention(
        q, k, v, ResolvedMask(structural=masks.causal()), cosine, D**-0.5, None, None, True
    )
    assert out.dtype == torch.bfloat16 and lse is not None and lse.dtype == torch.float32
    ref_out, ref_lse = flex(q, k, v, cosine, causal)
    torch.testing.assert_close(out, ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-2, atol=1e-2)
    for got, want in zip(_grads(out, lse, [q, k, v]), _grads(ref_out, ref_lse, [q, k, v])):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------------------------
# Against a float64 reference: softcap, bias, sinks, offsets, both masks


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fn: Callable[..., Any],
    *,
    scale: float,
    softcap: float | None,
    bias: torch.Tensor | None,
    visible: torch.Tensor | None,
    sinks: torch.Tensor | None,
    q_offset: int,
    kv_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, densely in float64: the callable on broadcast index tensors, one row at a time in Python
    for the softmax (no vmap, no chunks)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    b, h, q_len, kv_len = s.shape
    x = fn(
        s,
        torch.arange(b)[:, None, None, None],
        torch.arange(h)[None, :, None, None],
        (torch.arange(q_len) + q_offset)[None, None, :, None],
        (torch.arange(kv_len) + kv_offset)[None, None, None, :],
    )
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    if bias is not None:
        x = x + bias.double()
    if visible is not None:
        x = torch.where(visible, x, -math.inf)
    columns = [x]
    if sinks is not None:
        columns.append(sinks.double()[None, :, None, None].expand(b, h, q_len, 1))
    full = torch.cat(columns, dim=-1)
    lse = torch.logsumexp(full, dim=-1)
    seen = lse > -math.inf
    p = torch.exp(x - torch.where(seen, lse, 0.0)[..., None])
    return p @ v, lse


@pytest.mark.parametrize(("q_offset", "kv_offset", "rows"), [(0, 0, 1), (5, 2, 4), (0, 7, 64)])
def test_equals_a_float64_reference(q_offset: int, kv_offset: int, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(score_callable, "CHUNK_BYTES", B * H * rows * K * 8)
    q, k, v = _inputs(torch.float64, q_len=9)
    fn, weight = _learned()
    weight.data = weight.data.double()
    sinks = torch.linspace(-1.0, 2.0, H, dtype=torch.float64).requires_grad_()
    bias = torch.randn(1, H, 9, K, dtype=torch.float64).requires_grad_()
    dense = torch.rand(B, 1, 9, K, generator=torch.Generator().manual_seed(3)) > 0.2
    mask = masks.sliding_window(6)  # at the offsets: q_offset + i sees kv_offset + j in (q - 6, q]
    resolved = ResolvedMask(
        structural=mask,
        q_offset=q_offset,
        kv_offset=kv_offset,
        dense_bool=dense.expand(B, H, 9, K),
        bias=bias.expand(B, H, 9, K),
    )
    out, lse = callable_score_attention(q, k, v, resolved, fn, 0.3, 2.5, sinks, True)
    assert out.dtype == torch.float64 and lse is not None and lse.dtype == torch.float32
    kv_pos = torch.arange(K) + kv_offset
    q_pos = torch.arange(9)[:, None] + q_offset
    visible = dense & (kv_pos > q_pos - 6) & (kv_pos <= q_pos)
    ref_out, ref_lse = reference(
        q,
        k,
        v,
        fn,
        scale=0.3,
        softcap=2.5,
        bias=bias,
        visible=visible,
        sinks=sinks,
        q_offset=q_offset,
        kv_offset=kv_offset,
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse.float())
    tensors = [q, k, v, weight, sinks, bias]
    got = torch.autograd.grad((out * ref_out.detach().cos()).sum() + lse.double().sum(), tensors)
    want = torch.autograd.grad((ref_out * ref_out.detach().cos()).sum() + ref_lse.sum(), tensors)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # the LSE's float32 rounding enters its gradient


def test_a_score_mod_value_is_a_callable_too() -> None:
    """An attnrs.scores value through this path equals its kernel operands (terms) applied by the reference."""
    q, k, v = _inputs(torch.float64, q_len=5)
    table = torch.randn(H, 32, dtype=torch.float64, requires_grad=True)
    mod = scores.scale(0.5).then(scores.alibi(H) + scores.relative_bias(table, scores.t5_buckets(32, 16)))
    resolved = ResolvedMask(structural=masks.causal(), q_offset=7, kv_offset=0)
    out, lse = callable_score_attention(q, k, v, resolved, mod, 0.3, None, None, True)
    terms = mod.terms(batch=B, heads=H, q_len=5, kv_len=K, q_offset=7, dtype=torch.float64)
    assert terms.head_scale is not None and terms.distance is not None

    def from_terms(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (
            score * terms.head_scale[h]
            + terms.distance[0 if terms.distance.shape[0] == 1 else h, kv_idx - q_idx + 4 + 7]
        )

    visible = torch.arange(K) <= torch.arange(5)[:, None] + 7
    ref_out, ref_lse = reference(
        q, k, v, from_terms, scale=0.3, softcap=None, bias=None, visible=visible, sinks=None, q_offset=7, kv_offset=0
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert lse is not None
    torch.testing.assert_close(lse, ref_lse.float())
    torch.testing.assert_close(
        torch.autograd.grad(out.sum(), table)[0], torch.autograd.grad(ref_out.sum(), table)[0], rtol=1e-10, atol=1e-12
    )


def test_a_row_that_sees_only_its_sink() -> None:
    q, k, v = _inputs(torch.float32, q_len=3)
    sinks = torch.zeros(H, requires_grad=True)
    resolved = ResolvedMask(structural=masks.causal(offset=-1))  # row 0 sees no key
    out, lse = callable_score_attention(q, k, v, resolved, cosine, 1.0, None, sinks, True)
    assert (
        lse is not None
        and torch.equal(lse[:, :, 0], torch.zeros(B, H))
        and torch.equal(out[:, :, 0], torch.zeros(B, H, D))
    )
    grads = torch.autograd.grad(out.sum() + lse.sum(), [q, k, v, sinks])
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    # no keys at all: the sink alone, or nothing
    q0, k0, v0 = _inputs(torch.float32, q_len=3, kv_len=0)
    out0, lse0 = callable_score_attention(q0, k0, v0, ResolvedMask(), cosine, 1.0, None, sinks, True)
    assert torch.equal(out0, torch.zeros(B, H, 3, D)) and lse0 is not None and torch.equal(lse0, torch.zeros(B, H, 3))
    _, lse0 = callable_score_attention(q0, k0, v0, ResolvedMask(), cosine, 1.0, None, None, True)
    assert lse0 is not None and bool((lse0 == -math.inf).all())


def test_nan_from_the_callable_gives_nan_rows() -> None:
    q, k, v = _inputs(torch.float32, q_len=4)

    def nan_in_row_two(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return torch.where(q_idx == 2, math.nan, score)

    out, lse = callable_score_attention(q, k, v, ResolvedMask(), nan_in_row_two, 1.0, None, None, True)
    assert lse is not None and bool(out[:, :, 2].isnan().all()) and bool(lse[:, :, 2].isnan().all())
    assert bool(torch.isfinite(out[:, :, [0, 1, 3]]).all())


# ---------------------------------------------------------------------------------------------------------------
# Chunks


def test_chunked_equals_unchunked_and_backward_memory_is_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _inputs(torch.float32, q_len=12)
    resolved = ResolvedMask(structural=masks.causal(offset=2))
    whole, whole_lse = callable_score_attention(q, k, v, resolved, cosine, 0.5, 4.0, None, True)
    monkeypatch.setattr(score_callable, "CHUNK_BYTES", B * H * 2 * K * 4)
    assert chunk_rows(B, H, K, 4) == 2
    saved: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked, chunked_lse = callable_score_attention(q, k, v, resolved, cosine, 0.5, 4.0, None, True)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert chunked_lse is not None and whole_lse is not None
    torch.testing.assert_close(chunked_lse, whole_lse, rtol=1e-6, atol=1e-6)
    # checkpointed chunks keep their inputs only (views of q, k, v), never a chunk's scores or probabilities
    assert saved == {t.untyped_storage().data_ptr() for t in (q, k, v)}
    got = torch.autograd.grad(chunked.sum(), [q, k, v])
    want = torch.autograd.grad(whole.sum(), [q, k, v])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert chunk_rows(B, H, K, 4, chunk_bytes=1) == 1


def test_without_grad_and_without_lse() -> None:
    q, k, v = (t.detach() for t in _inputs(torch.float32))
    with torch.no_grad():
        out, lse = callable_score_attention(q, k, v, ResolvedMask(), cosine, 1.0, None, None, False)
    assert lse is None and out.shape == (B, H, Q, D) and not out.requires_grad
    again, _ = callable_score_attention(q, k, v, ResolvedMask(), cosine, 1.0, None, None, False)  # grad mode, no grad
    assert torch.equal(again, out) and not again.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# Bad callables


def _run(fn: Callable[..., Any]) -> None:
    q, k, v = _inputs(torch.float32, q_len=3, kv_len=4)
    callable_score_attention(q, k, v, ResolvedMask(), fn, 1.0, None, None, False)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda s, b, h, q, kv: 1.0, r"score_mod: expected a tensor \(the modified score\), got float 1.0"),
        (lambda s, b, h, q, kv: None, r"score_mod: expected a tensor \(the modified score\), got NoneType"),
        (lambda s, b, h, q, kv: kv - q, r"score_mod: expected a floating-point score, got a torch.int64 tensor"),
        (lambda s, b, h, q, kv: s > 0, r"score_mod: expected a floating-point score, got a torch.bool tensor"),
        (lambda s, b, h, q, kv: torch.stack([s, s]), r"score_mod: expected one score per \(b, h, q_idx, kv_idx\) pair"),
        (lambda s, b, h, q, kv: 1 / 0, r"score_mod: raised ZeroDivisionError: division by zero"),
        (lambda s, b, h: s, r"score_mod: raised TypeError: .*positional argument"),
        (lambda s, b, h, q, kv: s * float(q), r"score_mod: raised RuntimeError: "),  # .item() under vmap
    ],
)
def test_bad_callables(fn: Callable[..., Any], message: str) -> None:
    with pytest.raises(ArgumentError, match="^" + message) as info:
        _run(fn)
    assert isinstance(info.value, ValueError)
    if "raised" in message:
        assert info.value.__cause__ is not None
