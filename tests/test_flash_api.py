"""attnrs.flash: flash-attn 2's Python API on CPU, against a float64 reference written from flash-attn's documented
semantics (bottom-right causal, windows, softcap before ALiBi ``-slope * |i + sk - sq - j|``, +inf LSE for empty
rows) and against torch SDPA with explicit masks.

The varlen and KV-cache wrappers run on ``attnrs.varlen_attention`` (tested on its own in ``test_varlen.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnrs
from attnrs import flash
from attnrs.errors import ArgumentError, DtypeError, ShapeError, UnsupportedError

# ---------------------------------------------------------------------------------------------------------------
# References


def _visible(sq: int, sk: int, causal: bool, window: tuple[int, int]) -> torch.Tensor:
    left, right = window
    if causal:
        right = 0
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if right >= 0:
        vis &= j <= i + right
    if left >= 0:
        vis &= j >= i - left
    return vis


def naive(q, k, v, causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None):
    """flash-attn's documented forward in float64: ``(out [B, Sq, H, Dv], lse [B, H, Sq])``."""
    _, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qf = q.double().transpose(1, 2)
    kf = k.double().transpose(1, 2).repeat_interleave(h // hkv, 1)
    vf = v.double().transpose(1, 2).repeat_interleave(h // hkv, 1)
    s = qf @ kf.transpose(-1, -2) * (d**-0.5 if scale is None else scale)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        slopes = alibi.double().reshape(-1, h, 1, 1)
        dist = (torch.arange(sq)[:, None] + sk - sq - torch.arange(sk)[None, :]).abs().double()
        s = s - slopes * dist
    s = s.masked_fill(~_visible(sq, sk, causal, window), -math.inf)
    lse = torch.logsumexp(s, -1)
    w = torch.softmax(s, -1).nan_to_num(0.0)
    out = w @ vf
    return out.transpose(1, 2), torch.where(lse == -math.inf, math.inf, lse)


def _close(got, want, dtype, what):
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=2e-5)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), what
    torch.testing.assert_close(got.double()[finite], want.double()[finite], **tol, msg=what)
    assert torch.equal(got[~finite], want.to(got.dtype)[~finite]), what


def _qkv(b, sq, sk, h, hkv, d, dtype, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, n, d, generator=g).to(dtype) for s, n in ((sq, h), (sk, hkv), (sk, hkv)))
    return [t.requires_grad_(grad) for t in (q, k, v)]


# ---------------------------------------------------------------------------------------------------------------
# flash_attn_func

CASES = [
    # b, sq, sk, h, hkv, d, causal, window, softcap, alibi ("h", "bh" or None)
    (2, 5, 9, 4, 2, 16, True, (-1, -1), 0.0, None),
    (1, 9, 4, 2, 1, 8, True, (-1, -1), 0.0, None),  # sq > sk: the first rows see nothing
    (2, 6, 6, 4, 4, 16, False, (2, 1), 0.0, None),
    (2, 3, 11, 4, 1, 8, True, (3, -1), 0.0, None),
    (1, 7, 7, 2, 2, 16, False, (-1, 0), 5.0, None),
    (2, 4, 10, 4, 2, 8, True, (-1, -1), 0.0, "h"),
    (2, 6, 5, 4, 2, 8, False, (-1, -1), 0.0, "bh"),  # non-causal: |distance| on both sides
    (2, 5, 8, 2, 2, 8, False, (2, 3), 0.0, "h"),
    (2, 5, 8, 4, 2, 8, True, (-1, -1), 4.0, "bh"),  # softcap then ALiBi: the score_mod path
    (1, 1, 12, 4, 2, 16, True, (4, -1), 0.0, None),  # decode with a window
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_the_reference(case, dtype):
    b, sq, sk, h, hkv, d, causal, window, softcap, alibi = case
    q, k, v = _qkv(b, sq, sk, h, hkv, d, dtype)
    slopes = {None: None, "h": torch.rand(h) * 0.5, "bh": torch.rand(b, h) * 0.5}[alibi]
    out, lse, probs = flash.flash_attn_func(
        q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, return_attn_probs=True
    )
    want_out, want_lse = naive(q, k, v, causal, window, softcap, slopes)
    assert out.shape == (b, sq, h, d) and out.dtype == dtype and lse.shape == (b, h, sq) and probs is None
    _close(out, want_out, dtype, f"out {case}")
    _close(lse, want_lse, torch.float32 if dtype == torch.float32 else dtype, f"lse {case}")


@pytest.mark.parametrize("seed", range(8))
def test_random_calls_match_the_reference(seed):
    """Random shapes (seqlen_q above, equal to or below seqlen_k), GQA ratios, windows, softcap and ALiBi."""
    g = torch.Generator().manual_seed(100 + seed)

    def draw(n):
        return int(torch.randint(n, (1,), generator=g))

    b, sq, sk, hkv = 1 + draw(2), 1 + draw(9), 1 + draw(12), 1 + draw(2)
    h, d = hkv * (1 + draw(3)), (8, 16)[draw(2)]
    causal = bool(draw(2))
    window = (draw(6) - 1, draw(6) - 1)
    softcap = (0.0, 3.0)[draw(2)]
    slopes = (None, (h,), (b, h))[draw(3)]
    slopes = None if slopes is None else torch.rand(*slopes, generator=g)
    dtype = (torch.float32, torch.bfloat16)[draw(2)]
    q, k, v = _qkv(b, sq, sk, h, hkv, d, dtype, seed=seed)
    out, lse, _ = flash.flash_attn_func(
        q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, return_attn_probs=True
    )
    want_out, want_lse = naive(q, k, v, causal, window, softcap, slopes)
    what = f"{(b, sq, sk, h, hkv, d, causal, window, softcap, slopes is not None, dtype)}"
    _close(out, want_out, dtype, f"out {what}")
    _close(lse, want_lse, torch.float32 if dtype == torch.float32 else dtype, f"lse {what}")
    if softcap == 0 and slopes is None and dtype == torch.float32:  # SDPA with the explicit mask, where it applies
        mask = _visible(sq, sk, causal, window)
        sdpa = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask, enable_gqa=True
        ).transpose(1, 2)
        seen = mask.any(-1)  # SDPA gives NaN for rows that see nothing; flash (and attnrs) give zeros
        torch.testing.assert_close(out[:, seen], sdpa[:, seen], atol=1e-5, rtol=1e-5)
        assert out[:, ~seen].abs().sum() == 0


def test_bottom_right_causal_and_gqa_match_sdpa_with_an_explicit_mask():
    q, k, v = _qkv(2, 3, 8, 6, 2, 16, torch.float32)
    out = flash.flash_attn_func(q, k, v, causal=True, softmax_scale=0.3)
    mask = torch.ones(3, 8, dtype=torch.bool).tril(8 - 3)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=0.3, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "case",
    [
        (2, 5, 7, 4, 2, 8, True, (-1, -1), 0.0, None),
        (1, 6, 6, 2, 1, 8, False, (2, 2), 3.0, None),
        (2, 4, 6, 2, 2, 8, False, (-1, -1), 0.0, "bh"),
        (1, 5, 5, 2, 2, 8, True, (-1, -1), 3.0, "h"),
    ],
)
def test_backward_matches_the_reference(case):
    b, sq, sk, h, hkv, d, causal, window, softcap, alibi = case
    q, k, v = _qkv(b, sq, sk, h, hkv, d, torch.float32, grad=True, seed=1)
    slopes = {None: None, "h": torch.rand(h), "bh": torch.rand(b, h)}[alibi]
    grad = torch.randn(b, sq, h, d)
    out = flash.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want_out, _ = naive(q, k, v, causal, window, softcap, slopes)
    want = torch.autograd.grad(want_out, (q, k, v), grad.double())
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w.float(), atol=1e-4, rtol=1e-4, msg=f"d{name}")


def test_packed_variants_are_views_of_flash_attn_func():
    q, k, v = _qkv(2, 6, 6, 4, 4, 8, torch.float32)
    qkv = torch.stack((q, k, v), dim=2)
    want = flash.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(flash.flash_attn_qkvpacked_func(qkv, causal=True), want, atol=0, rtol=0)
    torch.testing.assert_close(flash.flash_attn_kvpacked_func(q, qkv[:, :, 1:], causal=True), want, atol=0, rtol=0)


def test_dropout_runs_in_the_kernel_and_is_seeded_by_torch():
    q, k, v = _qkv(1, 8, 8, 2, 2, 8, torch.float32)
    torch.manual_seed(3)
    a = flash.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    torch.manual_seed(3)
    b = flash.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, flash.flash_attn_func(q, k, v, causal=True))
    assert flash.flash_attn_func(q, k, v, dropout_p=1.0).abs().max() == 0


# ---------------------------------------------------------------------------------------------------------------
# flash_attn_varlen_func


def _packed(lengths_q, lengths_k, h, hkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), h, d, generator=g).to(dtype)
    k = torch.randn(sum(lengths_k), hkv, d, generator=g).to(dtype)
    v = torch.randn(sum(lengths_k), hkv, d, generator=g).to(dtype)

    def cu(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    return q, k, v, cu(lengths_q), cu(lengths_k)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(causal=True),
        dict(window_size=(2, 1), softcap=4.0),
        dict(causal=True, alibi_slopes="h"),  # the per-sequence path
        dict(alibi_slopes="bh"),
    ],
)
def test_varlen_matches_the_reference_per_sequence(kwargs):
    lq, lk = [3, 1, 5], [6, 4, 2]
    q, k, v, cu_q, cu_k = _packed(lq, lk, 4, 2, 8)
    slopes = {"h": torch.rand(4), "bh": torch.rand(3, 4)}.get(kwargs.pop("alibi_slopes", None))
    out, lse, _ = flash.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lq), max(lk), alibi_slopes=slopes, return_attn_probs=True, **kwargs
    )
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    for b in range(3):
        rows, keys = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        row_slopes = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b])
        want_out, want_lse = naive(
            q[None, rows],
            k[None, keys],
            v[None, keys],
            kwargs.get("causal", False),
            kwargs.get("window_size", (-1, -1)),
            kwargs.get("softcap", 0.0),
            row_slopes,
        )
        _close(out[rows], want_out[0], torch.float32, f"out of sequence {b}")
        _close(lse[:, rows], want_lse[0], torch.float32, f"lse of sequence {b}")


def test_varlen_paged_keys():
    lq, lk = [2, 3], [7, 5]
    q, k, v, cu_q, cu_k = _packed(lq, lk, 4, 2, 8, seed=2)
    page, pages = 3, torch.tensor([[5, 0, 3], [1, 6, 2]], dtype=torch.int32)  # non-monotone pages
    k_pages, v_pages = torch.zeros(8, page, 2, 8), torch.zeros(8, page, 2, 8)
    for b in range(2):
        for t in range(lk[b]):
            k_pages[pages[b, t // page], t % page] = k[int(cu_k[b]) + t]
            v_pages[pages[b, t // page], t % page] = v[int(cu_k[b]) + t]
    want = flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 7, causal=True)
    got = flash.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 3, 7, causal=True, block_table=pages)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    slopes = torch.rand(4)
    want = flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 7, alibi_slopes=slopes)
    got = flash.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 3, 7, alibi_slopes=slopes, block_table=pages)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache


def rotary_reference(x, cos, sin, interleaved):
    """flash_attn.layers.rotary.apply_rotary_emb_torch (x [B, S, H, D], cos/sin [B, S, rotary_dim / 2])."""
    ro = cos.shape[-1] * 2
    if interleaved:
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        x1, x2 = x[..., :ro:2], x[..., 1:ro:2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        cos, sin = cos.repeat(1, 1, 2), sin.repeat(1, 1, 2)
        x1, x2 = x[..., : ro // 2], x[..., ro // 2 : ro]
        rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return torch.cat((x[..., :ro] * cos + rotated * sin, x[..., ro:]), dim=-1)


def _rotary_tables(n, half):
    angles = torch.arange(n)[:, None] * (10000 ** (-torch.arange(half) / half))[None]
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_appends_in_place_rotates_and_attends(interleaved, causal):
    b, sq, snew, h, hkv, d, cap = 3, 2, 2, 4, 2, 16, 12
    g = torch.Generator().manual_seed(4)
    k_cache, v_cache = torch.randn(4, cap, hkv, d, generator=g), torch.randn(4, cap, hkv, d, generator=g)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(b, sq, h, d, generator=g)
    k_new, v_new = torch.randn(b, snew, hkv, d, generator=g), torch.randn(b, snew, hkv, d, generator=g)
    lengths = torch.tensor([3, 0, 7], dtype=torch.int32)
    rows = torch.tensor([2, 0, 3], dtype=torch.int32)
    cos, sin = _rotary_tables(16, 4)  # rotary_dim 8 of headdim 16
    out, lse = flash.flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        rotary_cos=cos,
        rotary_sin=sin,
        cache_seqlens=lengths,
        cache_batch_idx=rows,
        causal=causal,
        rotary_interleaved=interleaved,
        return_softmax_lse=True,
    )
    assert out.shape == (b, sq, h, d) and lse.shape == (b, h, sq)
    for i in range(b):
        n, r = int(lengths[i]), int(rows[i])
        k_pos = torch.arange(n, n + snew)
        k_rot = rotary_reference(k_new[i : i + 1], cos[k_pos][None], sin[k_pos][None], interleaved)
        q_pos = torch.arange(n, n + sq) if causal else torch.full((sq,), n)
        q_rot = rotary_reference(q[i : i + 1], cos[q_pos][None], sin[q_pos][None], interleaved)
        torch.testing.assert_close(k_cache[r, n : n + snew], k_rot[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v_cache[r, n : n + snew], v_new[i], atol=0, rtol=0)
        untouched = torch.ones(cap, dtype=torch.bool)
        untouched[n : n + snew] = False
        assert torch.equal(k_cache[r, untouched], before_k[r, untouched])
        keys, values = k_cache[r : r + 1, : n + snew], v_cache[r : r + 1, : n + snew]
        want_out, want_lse = naive(q_rot, keys, values, causal)
        _close(out[i : i + 1], want_out, torch.float32, f"out {i}")
        _close(lse[i : i + 1], want_lse, torch.float32, f"lse {i}")
    assert torch.equal(k_cache[1], before_k[1]) and torch.equal(v_cache[1], before_v[1])  # row 1 is not used


def test_kvcache_paged_equals_contiguous():
    b, sq, snew, h, hkv, d, page = 2, 1, 1, 4, 2, 8, 4
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([5, 9], dtype=torch.int32)
    table = torch.randperm(8, generator=g)[:6].reshape(2, 3).to(torch.int32)  # random pages, in any order
    flat_k, flat_v = torch.randn(b, 12, hkv, d, generator=g), torch.randn(b, 12, hkv, d, generator=g)
    k_pages, v_pages = torch.randn(8, page, hkv, d, generator=g), torch.randn(8, page, hkv, d, generator=g)
    for i in range(b):
        for t in range(12):
            k_pages[table[i, t // page], t % page] = flat_k[i, t]
            v_pages[table[i, t // page], t % page] = flat_v[i, t]
    q = torch.randn(b, sq, h, d, generator=g)
    k_new, v_new = torch.randn(b, snew, hkv, d, generator=g), torch.randn(b, snew, hkv, d, generator=g)
    cos, sin = _rotary_tables(16, 2)
    args = dict(
        cache_seqlens=lengths,
        causal=True,
        window_size=(6, -1),
        softcap=3.0,
        rotary_cos=cos,
        rotary_sin=sin,
        rotary_interleaved=False,
        return_softmax_lse=True,
    )
    want, want_lse = flash.flash_attn_with_kvcache(q, flat_k, flat_v, k_new, v_new, **args)
    got, got_lse = flash.flash_attn_with_kvcache(q, k_pages, v_pages, k_new, v_new, block_table=table, **args)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-6, rtol=1e-6)
    for i in range(b):
        n = int(lengths[i])
        assert torch.equal(k_pages[table[i, n // page], n % page], flat_k[i, n])  # rotated, stored in place
        assert torch.equal(v_pages[table[i, n // page], n % page], v_new[i, 0])
        assert torch.equal(v_pages[table[i, n // page], n % page], flat_v[i, n])


def test_kvcache_leftpad_and_alibi_run_per_sequence():
    b, h, hkv, d = 2, 4, 2, 8
    g = torch.Generator().manual_seed(6)
    k_cache, v_cache = torch.randn(b, 10, hkv, d, generator=g), torch.randn(b, 10, hkv, d, generator=g)
    q = torch.randn(b, 3, h, d, generator=g)
    lengths, leftpad = torch.tensor([8, 6], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32)
    slopes = torch.rand(b, h)
    out = flash.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=lengths, cache_leftpad=leftpad, causal=True, alibi_slopes=slopes
    )
    for i in range(b):
        keys = slice(int(leftpad[i]), int(lengths[i]))
        want, _ = naive(q[i : i + 1], k_cache[i : i + 1, keys], v_cache[i : i + 1, keys], True, alibi=slopes[i])
        _close(out[i : i + 1], want, torch.float32, f"sequence {i}")
    # Without leftpad or alibi the varlen path gives the same as flash_attn_func on the used prefix.
    out = flash.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=6, window_size=(2, 2))
    want = flash.flash_attn_func(q, k_cache[:, :6], v_cache[:, :6], window_size=(2, 2))
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Refusals


def test_refusals_name_the_argument():
    q, k, v = _qkv(2, 4, 4, 4, 2, 8, torch.float32)
    cases = [
        (DtypeError, "alibi_slopes", lambda: flash.flash_attn_func(q, k, v, alibi_slopes=torch.rand(4).double())),
        (ShapeError, "alibi_slopes", lambda: flash.flash_attn_func(q, k, v, alibi_slopes=torch.rand(3))),
        (ShapeError, "q", lambda: flash.flash_attn_func(q[0], k, v)),
        (
            ShapeError,
            "k",
            lambda: flash.flash_attn_func(q, k[:, :, :1].expand(2, 4, 3, 8), v[:, :, :1].expand(2, 4, 3, 8)),
        ),
        (ArgumentError, "window_size", lambda: flash.flash_attn_func(q, k, v, window_size=(1.5, 0))),
        (ArgumentError, "dropout_p", lambda: flash.flash_attn_func(q, k, v, dropout_p=1.5)),
        (ArgumentError, "causal", lambda: flash.flash_attn_func(q, k, v, causal="yes")),
        (DtypeError, "query", lambda: flash.flash_attn_func(q.int(), k.int(), v.int())),
        (
            UnsupportedError,
            "dropout_p",
            lambda: flash.flash_attn_func(q, k, v, dropout_p=0.1, softcap=2.0, alibi_slopes=torch.rand(4)),
        ),
        (ArgumentError, "num_splits", lambda: flash.flash_attn_with_kvcache(q, k, v, num_splits=-1)),
        (ArgumentError, "cache_seqlens", lambda: flash.flash_attn_with_kvcache(q, k, v, k[:, :1], v[:, :1])),
        (
            DtypeError,
            "cache_seqlens",
            lambda: flash.flash_attn_with_kvcache(q, k, v, cache_seqlens=torch.tensor([1, 2])),
        ),
        (ArgumentError, "cache_seqlens", lambda: flash.flash_attn_with_kvcache(q, k, v, cache_seqlens=9)),
        (ShapeError, "k", lambda: flash.flash_attn_with_kvcache(q, k, v, k, v, cache_seqlens=1)),
        (
            ArgumentError,
            "rotary_cos",
            lambda: flash.flash_attn_with_kvcache(q, k, v, rotary_cos=torch.ones(8, 2), rotary_sin=torch.ones(8, 2)),
        ),
        (
            UnsupportedError,
            "cache_batch_idx",
            lambda: flash.flash_attn_with_kvcache(
                q,
                k,
                v,
                block_table=torch.zeros(2, 1, dtype=torch.int32),
                cache_batch_idx=torch.zeros(2, dtype=torch.int32),
            ),
        ),
        (
            DtypeError,
            "cu_seqlens_q",
            lambda: flash.flash_attn_varlen_func(q[0], k[0], v[0], torch.tensor([0, 4]), torch.tensor([0, 4]), 4, 4),
        ),
    ]
    for error, name, call in cases:
        with pytest.raises(error, match=name):
            call()
    with pytest.raises(UnsupportedError, match="no backward"):
        flash.flash_attn_with_kvcache(q.requires_grad_(), k, v)


# ---------------------------------------------------------------------------------------------------------------
# transformers (docs/serving.md, "transformers' flash path and continuous batching")


def test_transformers_refuses_attnrs_in_its_flash_path_and_continuous_batching():
    """The refusals docs/serving.md records: when one of these stops raising, transformers has opened a way in."""
    transformers = pytest.importorskip("transformers")
    from attnrs.integrations.transformers import attention_forward

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    llama = transformers.LlamaForCausalLM
    with pytest.raises(ImportError, match="FlashAttention2 has been toggled on"):  # is_flash_attn_2_available: CUDA
        llama._from_config(config, attn_implementation="flash_attention_2")
    name = "attnrs_flash_probe"  # a flash-named custom function: _lazy_imports finds no flash functions for it
    transformers.AttentionInterface.register(name, attention_forward)
    try:
        with pytest.raises(ValueError, match="Could not find the currently requested flash attention implementation"):
            llama._from_config(config, attn_implementation=name)
    finally:
        transformers.AttentionInterface._global_mapping.pop(name, None)
    model = llama._from_config(config, attn_implementation="attnrs")
    with pytest.raises(ValueError, match="not supported for continuous batching"):
        model.init_continuous_batching()
