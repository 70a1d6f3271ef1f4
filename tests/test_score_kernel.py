"""The Rust kernel's score-mod terms through the ``attnrs::attention`` operator: head scales, distance and key
terms (see :class:`attnrs.scores.ScoreTerms`) against a float64 formula written with plain torch, forward, LSE and
backward (the terms' gradients included, reduced over broadcast dims), and ``torch.autograd.gradcheck`` in
float64. The values that produce these terms are tested in ``test_scores*.py``."""

from __future__ import annotations

import pytest
import torch

import attnrs
from attnrs import masks
from attnrs.attention.resolve import ResolvedMask, kernel_operands


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _reference(q, k, v, head_scale, distance, key_terms, softcap, mask, scale):
    """The formula in float64: x = head_scale[h]·scale·q·k + distance[h, j - i + Q - 1] + key[b, h, j], then the
    softcap, then the mask."""
    h, q_len, kv_len = q.shape[1], q.shape[2], k.shape[2]
    g = h // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    x = q.double() @ kk.transpose(-1, -2) * scale
    if head_scale is not None:
        x = x * head_scale.double().reshape(1, h, 1, 1)
    if distance is not None:
        rel = torch.arange(kv_len)[None, :] - torch.arange(q_len)[:, None] + q_len - 1  # [Q, K]
        x = x + distance.double()[:, rel].reshape(1, -1, q_len, kv_len)
    if key_terms is not None:
        x = x + key_terms.double()[:, :, None, :]
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(x, -1)
    out = torch.softmax(x, -1) @ vv
    return out, lse


def _kernel(q, k, v, head_scale, distance, key_terms, softcap, structural, scale):
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    operands = kernel_operands(ResolvedMask(structural), shape, None, scale, softcap, (head_scale, distance, key_terms))
    out, lse = torch.ops.attnrs.attention(q, k, v, *operands, 0.0, None)
    return out.transpose(1, 2), lse


CASES = [
    # (B, H, Hkv, Q, K, head scales, distance heads (0: none), key dims (None: none), softcap, causal)
    (2, 4, 2, 37, 53, False, 4, None, None, True),
    (1, 4, 1, 20, 70, True, 1, (1, 4), 2.0, True),
    (2, 2, 2, 45, 30, True, 2, (2, 1), None, False),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_terms_match_the_float64_formula_forward_and_backward(case, dtype):
    b, h, hkv, q_len, kv_len, with_scale, dist_heads, key_dims, softcap, causal = case
    q = _randn(b, h, q_len, 16, seed=1, dtype=dtype).requires_grad_()
    k = _randn(b, hkv, kv_len, 16, seed=2, dtype=dtype).requires_grad_()
    v = _randn(b, hkv, kv_len, 16, seed=3, dtype=dtype).requires_grad_()
    term_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    head_scale = (
        (torch.rand(h, generator=torch.Generator().manual_seed(4)) + 0.5).to(term_dtype) if with_scale else None
    )
    distance = _randn(dist_heads, q_len + kv_len - 1, seed=5, dtype=term_dtype).requires_grad_() if dist_heads else None
    key_terms = _randn(*key_dims, kv_len, seed=6, dtype=term_dtype).requires_grad_() if key_dims else None
    diagonal = kv_len - q_len
    structural = masks.causal(diagonal) if causal else None
    dense = (torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + diagonal) if causal else None
    scale = 0.3
    out, lse = _kernel(q, k, v, head_scale, distance, key_terms, softcap, structural, scale)
    want_out, want_lse = _reference(q, k, v, head_scale, distance, key_terms, softcap, dense, scale)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=max(tol, 1e-5), rtol=max(tol, 1e-5))
    grad_out = _randn(*out.shape, seed=7, dtype=dtype)
    leaves = [t for t in (q, k, v, distance, key_terms) if t is not None]
    got = torch.autograd.grad((out * grad_out).sum() + lse.sum(), leaves)
    want = torch.autograd.grad((want_out * grad_out.double()).sum() + want_lse.sum(), leaves)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g.double(), w.double(), atol=tol * 4, rtol=tol * 4)


def test_gradcheck_float64_through_every_term():
    q = _randn(1, 2, 9, 4, seed=10).requires_grad_()
    k = _randn(1, 1, 11, 4, seed=11).requires_grad_()
    v = _randn(1, 1, 11, 4, seed=12).requires_grad_()
    head_scale = torch.tensor([0.7, 1.3], dtype=torch.float64)
    distance = _randn(2, 19, seed=13).requires_grad_()
    key_terms = _randn(1, 1, 11, seed=14).requires_grad_()

    def f(q, k, v, distance, key_terms):
        # The output only: the LSE is float32 whatever the inputs, too coarse for finite differences.
        out, _ = _kernel(q, k, v, head_scale, distance, key_terms, 1.7, masks.causal(2), 0.5)
        return out

    assert torch.autograd.gradcheck(f, (q, k, v, distance, key_terms), atol=1e-7)


def test_term_gradients_do_not_depend_on_the_thread_count(monkeypatch):
    q = _randn(1, 4, 80, 8, seed=20, dtype=torch.float32).requires_grad_()
    k = _randn(1, 2, 90, 8, seed=21, dtype=torch.float32)
    v = _randn(1, 2, 90, 8, seed=22, dtype=torch.float32)
    distance = _randn(4, 169, seed=23, dtype=torch.float32).requires_grad_()
    grads = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("ATTNRS_NUM_THREADS", threads)
        out, lse = _kernel(q, k, v, None, distance, None, None, masks.causal(10), 0.4)
        grads.append(torch.autograd.grad(out.sum() + lse.sum(), (q, distance)))
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


@pytest.mark.parametrize(
    ("terms", "arg"),
    [
        ((torch.zeros(3), None, None), "head_scale"),
        ((None, torch.zeros(2, 10), None), "score_distance"),
        ((None, None, torch.zeros(1, 2, 6)), "score_key"),
        ((None, torch.zeros(2, 11, dtype=torch.int64), None), "score_distance"),
    ],
)
def test_bad_term_operands_are_refused_by_name(terms, arg):
    q, k, v = (torch.zeros(1, 2, 4, 8) for _ in range(3))
    k = v = torch.zeros(1, 2, 8, 8)
    operands = kernel_operands(ResolvedMask(None), (1, 2, 4, 8), None, 1.0, None, terms)
    with pytest.raises(attnrs.AttnrsError, match=f"^{arg}"):
        torch.ops.attnrs.attention(q, k, v, *operands, 0.0, None)
