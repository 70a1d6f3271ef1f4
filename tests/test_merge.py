"""``attnrs.merge_attention_states``: attention over the keys split into disjoint parts, each computed with
``return_lse=True`` and merged by LSE, equals attention over all the keys (forward, LSE, gradients), for causal
masks where some rows see nothing in a part, GQA, n parts, and FlashInfer's ``[tokens, H, D]`` layout; rows that see
nothing anywhere give 0 and ``-inf`` with finite gradients; bad input is refused by name."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnrs
from attnrs import masks


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _parts(bounds: list[int], q, k, v, mask, q_offset):  # type: ignore[no-untyped-def]
    """(out, lse) of each key range [bounds[i], bounds[i + 1]), placed at its positions."""
    return [
        attnrs.attention(q, k[:, :, a:b], v[:, :, a:b], mask, q_offset=q_offset, kv_offset=a, return_lse=True)
        for a, b in itertools.pairwise(bounds)
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bounds", [[0, 30, 70], [0, 10, 11, 45, 70]])
def test_merged_parts_equal_attention_over_all_keys(dtype: torch.dtype, bounds: list[int]) -> None:
    q = _randn(2, 4, 20, 8, seed=1, dtype=dtype).requires_grad_()
    k = _randn(2, 2, 70, 8, seed=2, dtype=dtype).requires_grad_()
    v = _randn(2, 2, 70, 8, seed=3, dtype=dtype).requires_grad_()
    mask = masks.causal()
    q_offset = 70 - 20  # the queries are the last 20 positions: early parts see every row, late ones few
    want_out, want_lse = attnrs.attention(q, k, v, mask, q_offset=q_offset, return_lse=True)
    parts = _parts(bounds, q, k, v, mask, q_offset)
    if len(parts) == 2:
        out, lse = attnrs.merge_attention_states(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    else:
        out, lse = attnrs.merge_attention_states_n([p[0] for p in parts], [p[1] for p in parts])
    tol = 2e-6 if dtype == torch.float64 else 2e-5  # attnrs's LSE is float32 for every dtype
    assert out.dtype == dtype
    torch.testing.assert_close(out, want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=2e-6, rtol=2e-6)
    weight = _randn(*out.shape, seed=4, dtype=dtype)
    got = torch.autograd.grad((out * weight).sum() + lse.sum(), (q, k, v))
    want = torch.autograd.grad((want_out * weight).sum() + want_lse.sum(), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tol * 10, rtol=tol * 10)


def test_rows_that_see_nothing_are_zero_without_nan_and_in_flashinfers_layout() -> None:
    out_a, lse_a = _randn(6, 3, 4, seed=5).requires_grad_(), _randn(6, 3, seed=6).requires_grad_()
    out_b, lse_b = _randn(6, 3, 4, seed=7).requires_grad_(), _randn(6, 3, seed=8).requires_grad_()
    with torch.no_grad():
        lse_a[0] = -torch.inf  # token 0: part a saw nothing
        lse_a[1] = lse_b[1] = -torch.inf  # token 1: nothing at all
    out, lse = attnrs.merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out[0], out_b[0])
    torch.testing.assert_close(lse[0], lse_b[0])
    assert (out[1] == 0).all() and (lse[1] == -torch.inf).all()
    grads = torch.autograd.grad(out.sum() + lse[2:].sum(), (out_a, lse_a, out_b, lse_b))
    assert all(torch.isfinite(g).all() for g in grads)
    # A part merged with itself (a check of the weights): the part again, lse + ln 2; token 1 saw nothing.
    same, same_lse = attnrs.merge_attention_states(out_b, lse_b, out_b, lse_b)
    seen = [0, 2, 3, 4, 5]
    torch.testing.assert_close(same[seen], out_b[seen])
    torch.testing.assert_close(same_lse[seen], lse_b[seen] + torch.log(torch.tensor(2.0, dtype=torch.float64)))


def test_a_nan_part_gives_nan_rows_only() -> None:
    out_a, lse_a, out_b, lse_b = (
        _randn(4, 2, 3, seed=9),
        _randn(4, 2, seed=10),
        _randn(4, 2, 3, seed=11),
        _randn(4, 2, seed=12),
    )
    out_a[2, 1, 0] = torch.nan
    out, lse = attnrs.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert out[2, 1, 0].isnan() and not out[2, 1, 1:].isnan().any() and not lse.isnan().any()
    out_a[2, 1, 0] = 0.0
    assert not attnrs.merge_attention_states(out_a, lse_a, out_b, lse_b)[0].isnan().any()


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (([], []), attnrs.ShapeError, "outs/lses: expected the same number"),
        (([torch.zeros(2, 3)], [torch.zeros(3)]), attnrs.ShapeError, r"lse\[0\]: expected shape \[2\]"),
        (([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(2)] * 2), attnrs.ShapeError, r"out\[1\]"),
        (([torch.zeros(2, 3, dtype=torch.int64)], [torch.zeros(2)]), attnrs.DtypeError, r"out\[0\]"),
    ],
)
def test_bad_input_is_refused_by_name(args, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        attnrs.merge_attention_states_n(*args)
