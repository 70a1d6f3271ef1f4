"""attnrs.varlen_attention: torch's varlen_attn on CPU, against torch SDPA run sequence by sequence with an explicit
mask (forward, LSE, backward), paged KV against packed KV (bitwise), and its argument errors."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.varlen import AuxRequest

import attnrs
from attnrs import _attnrs
from attnrs.errors import ArgumentError, AttnrsError, DtypeError, LayoutError, ShapeError, UnsupportedError

WINDOWS = [(-1, -1), (-1, 0), (3, 0), (2, 5), (0, 0), (-1, 4)]


def offsets(lengths: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=dtype)


def window_mask(lq: int, lk: int, window: tuple[int, int]) -> torch.Tensor:
    """flash-attn's bottom-right aligned window, written from its documentation."""
    i = torch.arange(lq)[:, None] + lk - lq
    j = torch.arange(lk)[None]
    visible = torch.ones(lq, lk, dtype=torch.bool)
    if window[0] >= 0:
        visible &= j >= i - window[0]
    if window[1] >= 0:
        visible &= j <= i + window[1]
    return visible


def per_sequence_sdpa(q, k, v, lq, lk, window, scale=None):
    """Output and float64 LSE of each sequence by torch SDPA with the sequence's bool mask (rows that see nothing:
    zeros and -inf, the varlen convention)."""
    outs, lses = [], []
    cq, ck = offsets(lq).tolist(), offsets(lk).tolist()
    groups = q.shape[1] // k.shape[1]
    for b in range(len(lq)):
        qs = q[cq[b] : cq[b + 1]].transpose(0, 1)
        ks = k[ck[b] : ck[b + 1]].transpose(0, 1).repeat_interleave(groups, 0)
        vs = v[ck[b] : ck[b + 1]].transpose(0, 1).repeat_interleave(groups, 0)
        mask = window_mask(lq[b], lk[b], window)
        seen = mask.any(-1)
        if lk[b] == 0:
            outs.append(q.new_zeros(lq[b], q.shape[1], v.shape[-1]))
            lses.append(torch.full((q.shape[1], lq[b]), -torch.inf, dtype=torch.float64))
            continue
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out = torch.where(seen[:, None], out, torch.zeros_like(out))
        s = (qs.double() @ ks.double().transpose(-1, -2)) * (scale or qs.shape[-1] ** -0.5)
        lses.append(torch.logsumexp(s.masked_fill(~mask, -torch.inf), -1))
        outs.append(out.transpose(0, 1))
    return torch.cat(outs), torch.cat(lses, -1)


def random_case(rng: random.Random, n: int, max_len: int, same: bool):
    lq = [rng.choice([0, 1, rng.randint(0, max_len)]) for _ in range(n)]
    lk = lq if same else [rng.choice([0, 1, rng.randint(0, max_len)]) for _ in range(n)]
    return lq, lk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(6))
def test_forward_matches_sdpa_per_sequence(dtype, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    heads, kv_heads = rng.choice([(4, 4), (4, 2), (6, 1)])
    dim = rng.choice([8, 16, 24])
    lq, lk = random_case(rng, rng.randint(1, 6), 80, same=seed % 2 == 0)
    q = torch.randn(sum(lq), heads, dim, dtype=dtype)
    k = torch.randn(sum(lk), kv_heads, dim, dtype=dtype)
    v = torch.randn(sum(lk), kv_heads, dim, dtype=dtype)
    for window in WINDOWS:
        out, lse = attnrs.varlen_attention(
            q, k, v, offsets(lq), offsets(lk), max(lq), max(lk), window_size=window,
            enable_gqa=heads != kv_heads, return_aux=AuxRequest(lse=True),
        )  # fmt: skip
        ref_out, ref_lse = per_sequence_sdpa(q.float(), k.float(), v.float(), lq, lk, window)
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
        assert out.dtype == dtype and out.shape == (sum(lq), heads, dim)
        torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
        assert lse.shape == (heads, sum(lq)) and lse.dtype == torch.float32
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        assert (lse[~finite] == -torch.inf).all()
        torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=tol, rtol=tol)


def test_forward_matches_attnrs_attention_per_sequence():
    torch.manual_seed(0)
    lq, lk = [7, 1, 40, 0, 23], [9, 5, 40, 3, 23]
    q, k, v = torch.randn(sum(lq), 4, 16), torch.randn(sum(lk), 2, 16), torch.randn(sum(lk), 2, 16)
    out = attnrs.varlen_attention(q, k, v, offsets(lq), offsets(lk), 40, 40, window_size=(-1, 0), enable_gqa=True)
    cq, ck = offsets(lq).tolist(), offsets(lk).tolist()
    for b in range(len(lq)):
        if lq[b] == 0:
            continue
        qs, ks, vs = (t.transpose(0, 1) for t in (q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]]))
        ref = attnrs.attention(qs, ks, vs, attn_mask=attnrs.masks.causal(), q_offset=lk[b] - lq[b], enable_gqa=True)
        torch.testing.assert_close(out[cq[b] : cq[b + 1]], ref.transpose(0, 1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("window", [(-1, 0), (-1, -1), (4, 1)])
@pytest.mark.parametrize("lengths", [([5, 0, 1, 33, 12], [9, 4, 1, 33, 3]), ([5, 0, 1, 33, 12], [5, 0, 1, 33, 12])])
def test_backward_matches_sdpa_per_sequence(dtype, window, lengths):
    """Unequal query and key lengths run sequence by sequence; equal ones as one call with a document mask."""
    torch.manual_seed(7)
    lq, lk = lengths
    q = torch.randn(sum(lq), 4, 8, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lk), 2, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lk), 2, 8, dtype=dtype, requires_grad=True)
    out = attnrs.varlen_attention(q, k, v, offsets(lq), offsets(lk), 33, 33, window_size=window, enable_gqa=True)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref_out, _ = per_sequence_sdpa(q, k, v, lq, lk, window)
    want = torch.autograd.grad(ref_out, (q, k, v), grad)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def test_lse_is_differentiable():
    torch.manual_seed(2)
    lq = [6, 1, 9]
    q, k, v = (torch.randn(16, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = offsets(lq)
    out, lse = attnrs.varlen_attention(q, k, v, cu, cu, 9, 9, window_size=(-1, 0), return_aux=AuxRequest(lse=True))
    gq, gk = torch.autograd.grad(lse.sum() + out.sum(), (q, k))
    ref_out, ref_lse = per_sequence_sdpa(q, k, v, lq, lq, (-1, 0))
    wq, wk = torch.autograd.grad(ref_lse.sum() + ref_out.sum(), (q, k))
    torch.testing.assert_close(gq, wq)
    torch.testing.assert_close(gk, wk)


def paged_copy(k, v, lk, page, rng: random.Random, share_first: bool = False):
    """The packed keys scattered into a pool of pages in random (non-monotone) order, plus spare pages of noise;
    with ``share_first`` every sequence's first page is one shared page (their first ``page`` keys are equal)."""
    need = [-(-n // page) for n in lk]
    total = sum(need) + 3
    ids = list(range(total))
    rng.shuffle(ids)
    pool_k = torch.randn(total, page, *k.shape[1:], dtype=k.dtype)
    pool_v = torch.randn(total, page, *v.shape[1:], dtype=v.dtype)
    width = max(need, default=0) + 1
    table = torch.full((len(lk), width), 10_000, dtype=torch.int32)  # entries past the used pages are never read
    ck = offsets(lk).tolist()
    shared = ids[0]
    for b, n in enumerate(lk):
        for p in range(need[b]):
            pid = shared if share_first and p == 0 else ids.pop()
            table[b, p] = pid
            rows = slice(ck[b] + p * page, ck[b] + min(n, (p + 1) * page))
            count = rows.stop - rows.start
            if share_first and p == 0 and b > 0:
                k[rows], v[rows] = pool_k[pid, :count], pool_v[pid, :count]  # the shared page's keys
            else:
                pool_k[pid, :count], pool_v[pid, :count] = k[rows], v[rows]
    return pool_k, pool_v, table


@pytest.mark.parametrize("page", [1, 3, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_equals_packed_bitwise(page, dtype):
    rng = random.Random(page)
    torch.manual_seed(page)
    lq = [4, 1, 0, 30, 1]
    lk = [20, 70, 5, 30, 1]
    q = torch.randn(sum(lq), 4, 16, dtype=dtype)
    k, v = torch.randn(sum(lk), 2, 16, dtype=dtype), torch.randn(sum(lk), 2, 16, dtype=dtype)
    pool_k, pool_v, table = paged_copy(k, v, lk, page, rng, share_first=page >= 16)
    used = torch.tensor(lk, dtype=torch.int32)
    for window in [(-1, 0), (6, 0), (-1, -1)]:
        packed = attnrs.varlen_attention(q, k, v, offsets(lq), offsets(lk), 30, 70, window_size=window, enable_gqa=True)
        paged = attnrs.varlen_attention(
            q, pool_k, pool_v, offsets(lq), None, 30, 70, window_size=window, enable_gqa=True, seqused_k=used,
            block_table=table,
        )  # fmt: skip
        assert torch.equal(packed, paged)


def test_paged_decode_and_seqused_k():
    """Decode: one query per sequence against a paged cache whose used length is below its capacity; equal to
    SDPA over each sequence's used keys, and seqused_k with packed keys uses only the first keys."""
    rng = random.Random(3)
    torch.manual_seed(3)
    lk = [rng.randint(1, 90) for _ in range(9)]
    lq = [1] * len(lk)
    q = torch.randn(len(lq), 8, 32)
    k, v = torch.randn(sum(lk), 2, 32), torch.randn(sum(lk), 2, 32)
    pool_k, pool_v, table = paged_copy(k, v, lk, 16, rng)
    used = torch.tensor(lk, dtype=torch.int32)
    out = attnrs.varlen_attention(
        q, pool_k, pool_v, offsets(lq), None, 1, max(lk), enable_gqa=True, seqused_k=used, block_table=table
    )
    ref, _ = per_sequence_sdpa(q, k, v, lq, lk, (-1, 0))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    # seqused_k below the packed lengths: the keys past it are ignored.
    shorter = torch.tensor([max(1, n // 2) for n in lk], dtype=torch.int32)
    got = attnrs.varlen_attention(q, k, v, offsets(lq), offsets(lk), 1, max(lk), enable_gqa=True, seqused_k=shorter)
    cut_k = torch.cat([k[a : a + s] for a, s in zip(offsets(lk)[:-1].tolist(), shorter.tolist())])
    cut_v = torch.cat([v[a : a + s] for a, s in zip(offsets(lk)[:-1].tolist(), shorter.tolist())])
    ref, _ = per_sequence_sdpa(q, cut_k, cut_v, lq, shorter.tolist(), (-1, 0))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_int64_offsets_softcap_and_scale():
    torch.manual_seed(1)
    lq = [6, 10]
    q, k, v = torch.randn(16, 2, 8), torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    cu = offsets(lq, torch.int64)
    out = attnrs.varlen_attention(q, k, v, cu, cu, 10, 10, window_size=(-1, 0), scale=0.3, softcap=2.0)
    for b, (a, z) in enumerate([(0, 6), (6, 16)]):
        qs, ks, vs = (t[a:z].transpose(0, 1) for t in (q, k, v))
        s = 2.0 * torch.tanh(qs @ ks.transpose(-1, -2) * 0.3 / 2.0)
        s = s.masked_fill(~window_mask(z - a, z - a, (-1, 0)), -torch.inf)
        torch.testing.assert_close(out[a:z], (s.softmax(-1) @ vs).transpose(0, 1), atol=1e-5, rtol=1e-5)
        del b


def test_empty_batch_and_no_tokens():
    q, k = torch.randn(0, 2, 8), torch.randn(0, 2, 8)
    cu = torch.zeros(4, dtype=torch.int32)
    out, lse = attnrs.varlen_attention(q, k, k, cu, cu, 0, 0, return_aux=AuxRequest(lse=True))
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)


def _call(**changes):
    torch.manual_seed(0)
    args = dict(
        query=torch.randn(10, 2, 8), key=torch.randn(12, 2, 8), value=torch.randn(12, 2, 8),
        cu_seq_q=torch.tensor([0, 4, 10], dtype=torch.int32), cu_seq_k=torch.tensor([0, 5, 12], dtype=torch.int32),
        max_q=6, max_k=7,
    )  # fmt: skip
    args.update(changes)
    positional = [args.pop(n) for n in ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k")]
    return attnrs.varlen_attention(*positional, **args)


@pytest.mark.parametrize(
    ("changes", "error", "names"),
    [
        ({"cu_seq_q": torch.tensor([0, 6, 4], dtype=torch.int32)}, ArgumentError, "cu_seq_q"),
        ({"cu_seq_q": torch.tensor([0, 4, 9], dtype=torch.int32)}, ArgumentError, "cu_seq_q"),
        ({"cu_seq_k": torch.tensor([1, 5, 12], dtype=torch.int32)}, ArgumentError, "cu_seq_k"),
        ({"cu_seq_k": torch.tensor([0, 12], dtype=torch.int32)}, ShapeError, "cu_seq_k"),
        ({"cu_seq_q": torch.tensor([0.0, 4.0, 10.0])}, DtypeError, "cu_seq_q"),
        ({"cu_seq_k": None}, ArgumentError, "cu_seq_k"),
        ({"max_q": 5}, ArgumentError, "max_q"),
        ({"max_k": 6}, ArgumentError, "max_k"),
        ({"key": torch.randn(12, 2, 8, dtype=torch.float64)}, DtypeError, "key"),
        ({"key": torch.randn(12, 3, 8), "value": torch.randn(12, 3, 8)}, ShapeError, "key"),
        ({"key": torch.randn(12, 1, 8), "value": torch.randn(12, 1, 8)}, ShapeError, "enable_gqa"),
        ({"window_size": (-2, 0)}, ArgumentError, "window_size"),
        ({"window_size": 4}, ArgumentError, "window_size"),
        ({"num_splits": 1}, UnsupportedError, "num_splits"),
        ({"return_aux": True}, ArgumentError, "return_aux"),
        ({"seqused_k": torch.tensor([6, 1], dtype=torch.int32)}, AttnrsError, "seqused_k"),
        ({"seqused_k": torch.tensor([1], dtype=torch.int32)}, ShapeError, "seqused_k"),
        ({"softcap": -1.0}, ArgumentError, "softcap"),
    ],
)
def test_bad_arguments_are_named(changes, error, names):
    with pytest.raises(error, match=names):
        _call(**changes)


def test_bad_paged_arguments_are_named():
    pool = torch.randn(4, 4, 2, 8)
    used = torch.tensor([5, 7], dtype=torch.int32)
    table = torch.tensor([[0, 1], [3, 2]], dtype=torch.int32)
    base = dict(key=pool, value=pool, cu_seq_k=None, seqused_k=used, block_table=table)
    _call(**base)  # valid
    with pytest.raises(AttnrsError, match="block_table"):
        _call(**{**base, "block_table": torch.tensor([[0, 1], [3, 4]], dtype=torch.int32)})
    with pytest.raises(AttnrsError, match="block_table"):
        _call(**{**base, "block_table": torch.tensor([[0, -1], [3, 2]], dtype=torch.int32)})
    with pytest.raises(DtypeError, match="block_table"):
        _call(**{**base, "block_table": table.long()})
    with pytest.raises(AttnrsError, match="seqused_k"):
        _call(**{**base, "seqused_k": torch.tensor([5, 9], dtype=torch.int32), "max_k": 9})
    with pytest.raises(ArgumentError, match="seqused_k"):
        _call(**{**base, "seqused_k": None})
    with pytest.raises(ArgumentError, match="cu_seq_k"):
        _call(**{**base, "cu_seq_k": torch.tensor([0, 5, 12], dtype=torch.int32)})
    with pytest.raises(LayoutError, match="key"):
        _call(**{**base, "key": torch.randn(4, 8, 2, 8)[:, :4]})
    with pytest.raises(UnsupportedError, match="inference only"):
        _call(**{**base, "query": torch.randn(10, 2, 8, requires_grad=True)})


def test_the_kernel_checks_offsets_itself():
    """The Rust core refuses bad offsets and page ids even when Python's checks are bypassed: never a crash or a
    read outside the tensors."""
    q = torch.randn(10, 2, 8)
    k = torch.randn(12, 2, 8)
    out, lse = torch.empty(10, 2, 8), torch.empty(2, 10)
    rows = lambda t: t.permute(1, 0, 2).unsqueeze(0)  # noqa: E731
    call = lambda cu_q, cu_k, used=None, table=None, page=1, view=rows(k): _attnrs.varlen_attention_forward(  # noqa: E731
        (rows(q), view, view, None, None, None, None), (rows(out), lse.unsqueeze(0)),
        (torch.empty(0, dtype=torch.uint8), None, None), (0.3, 0.0, 0.0, 0, 1, 0), (cu_q, cu_k, used, table, page, -1, 0),
    )  # fmt: skip
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ArgumentError, match="cu_seq_q"):
        call(torch.tensor([0, 11, 10], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32))
    with pytest.raises(ArgumentError, match="cu_seq_k"):
        call(good, torch.tensor([0, 5, 13], dtype=torch.int32))
    with pytest.raises(ArgumentError, match="block_table"):
        call(good, None, torch.tensor([3, 3], dtype=torch.int32), torch.tensor([[0], [3]], dtype=torch.int32), page=4)
    with pytest.raises(AttnrsError, match="key"):
        call(good, None, torch.tensor([3, 3], dtype=torch.int32), torch.tensor([[0], [1]], dtype=torch.int32), page=5)
