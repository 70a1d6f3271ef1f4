"""``attnrs.attention(..., score_mod=...)`` end to end: every :mod:`attnrs.scores` value and compositions of them
on the Rust kernel against torch's ``flex_attention`` (uncompiled, the same value as its score_mod) and against a
float64 evaluation, forward, LSE and backward (gradients into q, k, v and the learned tables), with masks, GQA,
Q != K, bf16 and fp32; arbitrary callables through the same call; the routing of each form to its backend; bad
score_mods refused by name."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from flex_support import flex

import attnrs
from attnrs import masks, scores

B, H, HKV, Q, K, D = 2, 4, 2, 24, 40, 16


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _values() -> dict[str, tuple[Any, list[torch.Tensor]]]:
    """name -> (score mod, its learned tensors)."""
    table = _randn(H, 32, seed=50).requires_grad_()
    clamp_table = _randn(H, 2 * 8 + 1, seed=51).requires_grad_()
    distance_table = _randn(H, 12, seed=52).requires_grad_()
    doc_table = _randn(H, 3, seed=53).requires_grad_()
    slopes = (torch.rand(H, generator=torch.Generator().manual_seed(54), dtype=torch.float64) * 0.5).requires_grad_()
    docs = (torch.arange(K) // 15).reshape(1, K)
    return {
        "alibi": (scores.alibi(H), []),
        "alibi_learned_key_form": (scores.alibi(slopes, form="key"), [slopes]),
        "t5_bidirectional": (scores.relative_bias(table, scores.t5_buckets(32, 128, bidirectional=True)), [table]),
        "t5_causal": (scores.relative_bias(table, scores.t5_buckets(32, 20, bidirectional=False)), [table]),
        "clamp": (scores.relative_bias(clamp_table, scores.clamp_buckets(8)), [clamp_table]),
        "distance_table": (scores.bias_table(distance_table), [distance_table]),
        "document_table": (scores.bias_table(doc_table, document_ids=docs), [doc_table]),
        "softcap": (scores.softcap(2.5), []),
        "head_scale": (scores.scale(torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)), []),
        "alibi_plus_t5_then_softcap": (
            (scores.alibi(H) + scores.relative_bias(table, scores.t5_buckets(32, 128, True))).then(scores.softcap(3.0)),
            [table],
        ),
        "scale_then_table_then_softcap": (
            scores.compose(scores.scale(0.7), scores.bias_table(distance_table), scores.softcap(4.0)),
            [distance_table],
        ),
    }


VALUES = list(_values())


def _inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    return [
        _randn(B, H, Q, D, seed=1, dtype=dtype).requires_grad_(),
        _randn(B, HKV, K, D, seed=2, dtype=dtype).requires_grad_(),
        _randn(B, HKV, K, D, seed=3, dtype=dtype).requires_grad_(),
    ]


def _bottom_right_causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return kv_idx <= q_idx + (K - Q)


def _grads(out: torch.Tensor, lse: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    weight = _randn(*out.shape, seed=9, dtype=out.dtype)
    return torch.autograd.grad((out * weight).sum() + lse.sum(), leaves)


@pytest.mark.parametrize("name", VALUES)
@pytest.mark.parametrize("masked", [True, False])
def test_values_on_the_rust_kernel_match_flex_attention_in_float64(name: str, masked: bool) -> None:
    mod, tables = _values()[name]
    q, k, v = _inputs(torch.float64)
    mask = masks.causal(K - Q) if masked else None
    out, lse = attnrs.attention(q, k, v, mask, score_mod=mod, return_lse=True)
    want_out, want_lse = flex(q, k, v, mod, _bottom_right_causal if masked else None)
    torch.testing.assert_close(out, want_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=1e-6)  # attnrs's LSE is float32
    leaves = [q, k, v, *tables]
    for got, want, leaf in zip(_grads(out, lse.double(), leaves), _grads(want_out, want_lse, leaves), leaves):
        assert got.shape == leaf.shape
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["alibi", "t5_bidirectional", "alibi_plus_t5_then_softcap", "document_table"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_in_low_precision_are_close_to_float64(name: str, dtype: torch.dtype) -> None:
    mod, tables = _values()[name]
    q, k, v = _inputs(dtype)
    mask = masks.sliding_window(16) & masks.causal()
    out, lse = attnrs.attention(q, k, v, mask, q_offset=K - Q, score_mod=mod, return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out, want_lse = attnrs.attention(
        q64, k64, v64, mask, q_offset=K - Q, score_mod=mod, return_lse=True, backend="math"
    )
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=tol, rtol=tol)
    got = _grads(out, lse, [q, k, v, *tables])
    want = _grads(want_out, want_lse, [q64, k64, v64, *tables])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=tol * 5, rtol=tol * 5)


def test_learned_relative_bias_table_gradient_is_the_float64_one_and_passes_gradcheck() -> None:
    table = _randn(2, 8, seed=60).requires_grad_()
    mod = scores.relative_bias(table, scores.t5_buckets(8, 20, bidirectional=True))
    q = _randn(1, 2, 7, 4, seed=61).requires_grad_()
    k = _randn(1, 1, 9, 4, seed=62).requires_grad_()
    v = _randn(1, 1, 9, 4, seed=63).requires_grad_()

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        m = scores.relative_bias(table, scores.t5_buckets(8, 20, bidirectional=True)).then(scores.softcap(2.0))
        return attnrs.attention(q, k, v, masks.causal(2), score_mod=m)

    assert torch.autograd.gradcheck(run, (q, k, v, table))
    # And the table's gradient equals the float64 dense evaluation's (torch math on [B, H, Q, K] scores).
    out = attnrs.attention(q, k, v, score_mod=mod)
    want = attnrs.attention(q, k, v, score_mod=mod, backend="math")
    (g,) = torch.autograd.grad(out.sum(), table)
    (w,) = torch.autograd.grad(want.sum(), table)
    torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


def test_a_softcap_keyword_joins_a_value_as_its_last_step() -> None:
    q, k, v = (t.detach() for t in _inputs(torch.float64))
    mod = scores.alibi(H)
    got = attnrs.attention(q, k, v, is_causal=True, score_mod=mod, softcap=5.0)
    want = attnrs.attention(q, k, v, is_causal=True, score_mod=mod.then(scores.softcap(5.0)))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(attnrs.ArgumentError, match=r"softcap: score_mod .* already ends with a softcap"):
        attnrs.attention(q, k, v, score_mod=scores.softcap(2.0), softcap=5.0)


def test_an_additive_mask_is_added_after_the_score_mod() -> None:
    q, k, v = (t.detach() for t in _inputs(torch.float64))
    bias = _randn(B, 1, Q, K, seed=70)
    mod = scores.alibi(H).then(scores.softcap(2.0))
    got = attnrs.attention(q, k, v, bias, score_mod=mod)
    want, _ = flex(q, k, v, lambda s, b, h, qi, ki: mod(s, b, h, qi, ki) + bias[b, 0, qi, ki])
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_callables_run_exactly_and_values_route_to_the_kernel() -> None:
    q, k, v = (t.detach() for t in _inputs(torch.float32))

    def wavy(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return score * torch.cos(kv_idx.to(score.dtype) / 7) - (q_idx - kv_idx).abs() * 0.01

    got = attnrs.attention(q, k, v, is_causal=True, score_mod=wavy)
    want, _ = flex(q, k, v, wavy, lambda b, h, qi, ki: ki <= qi)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(attnrs.UnsupportedError, match=r"score_mod: the Rust kernel evaluates attnrs\.scores values"):
        attnrs.attention(q, k, v, score_mod=wavy, backend="native")
    for backend in ("sdpa", "flash"):
        with pytest.raises(attnrs.UnsupportedError, match=f"score_mod: backend '{backend}' has no score_mod"):
            attnrs.attention(q, k, v, score_mod=scores.alibi(H), backend=backend)
    # A value through flex and through the math path agrees with the kernel.
    native = attnrs.attention(q, k, v, is_causal=True, score_mod=scores.alibi(H))
    for backend in ("flex", "math"):
        other = attnrs.attention(q, k, v, is_causal=True, score_mod=scores.alibi(H), backend=backend)
        torch.testing.assert_close(native, other, atol=1e-5, rtol=1e-5)


def test_torch_identity_is_no_score_mod_and_the_builtin_kernel_name_runs_values() -> None:
    from torch.nn.attention.flex_attention import _identity

    q, k, v = (t.detach() for t in _inputs(torch.float32))
    torch.testing.assert_close(attnrs.attention(q, k, v, score_mod=_identity), attnrs.attention(q, k, v))
    by_name = attnrs.attention(q, k, v, score_mod=scores.alibi(H), backend="attnrs")
    torch.testing.assert_close(by_name, attnrs.attention(q, k, v, score_mod=scores.alibi(H)))
    with pytest.raises(attnrs.UnsupportedError, match="dropout_p > 0 with a score_mod"):
        attnrs.attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s, dropout_p=0.5)


def test_dropout_with_a_value_on_the_kernel_reproduces_under_manual_seed() -> None:
    q, k, v = (t.detach() for t in _inputs(torch.float32))
    torch.manual_seed(3)
    a = attnrs.attention(q, k, v, score_mod=scores.alibi(H), dropout_p=0.3)
    torch.manual_seed(3)
    b = attnrs.attention(q, k, v, score_mod=scores.alibi(H), dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, attnrs.attention(q, k, v, score_mod=scores.alibi(H)))


@pytest.mark.parametrize(
    ("score_mod", "error", "message"),
    [
        (3.0, attnrs.DtypeError, "score_mod: expected None, an attnrs.scores value or a callable"),
        (torch.zeros(3), attnrs.DtypeError, "score_mod: expected None"),
        (lambda s, b, h, qi, ki: torch.stack([s, s]), attnrs.ArgumentError, "score_mod: expected"),
        (lambda s, b, h, qi, ki: s > 0, attnrs.ArgumentError, "score_mod: expected"),
        (lambda s, b, h, qi, ki: 1 / 0, attnrs.ArgumentError, "score_mod: raised ZeroDivisionError"),
        (scores.alibi(3), attnrs.ShapeError, "alibi"),
    ],
)
def test_bad_score_mods_are_refused_by_name(score_mod: Any, error: type[Exception], message: str) -> None:
    q, k, v = (t.detach() for t in _inputs(torch.float32))
    with pytest.raises(error, match=message):
        attnrs.attention(q, k, v, score_mod=score_mod)


def test_nan_from_a_score_mod_gives_nan_rows_not_a_crash() -> None:
    q, k, v = (t.detach() for t in _inputs(torch.float32))
    table = torch.zeros(H, 32)
    mod = scores.relative_bias(table, scores.t5_buckets(32, 128, True))  # checked finite when built
    table[1, :] = float("nan")  # a learned table that diverged later
    out = attnrs.attention(q, k, v, score_mod=mod)
    assert out[:, 1].isnan().all() and not out[:, [0, 2, 3]].isnan().any()


def test_a_value_moves_to_another_device_differentiably() -> None:
    table = _randn(H, 32, seed=80).requires_grad_()
    mod = scores.alibi(H) + scores.relative_bias(table, scores.t5_buckets(32, 128, True))
    assert mod.to("cpu") is mod
    moved = mod.to("meta")
    assert repr(moved) == repr(mod)
    terms = moved.terms(batch=1, heads=H, q_len=3, kv_len=5, dtype=torch.float64)
    assert terms.distance is not None and terms.distance.device.type == "meta"
    assert terms.distance.requires_grad  # the moved table is still connected to the original


def test_a_value_compiles_into_one_graph_with_its_table_gradient() -> None:
    q, k, v = (t.detach() for t in _inputs(torch.float32))
    table = _randn(H, 32, seed=81, dtype=torch.float32).requires_grad_()
    mod = scores.alibi(H) + scores.relative_bias(table, scores.t5_buckets(32, 128, True))

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attnrs.attention(q, k, v, is_causal=True, score_mod=mod)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    got, want = compiled(q, k, v), f(q, k, v)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), table)[0], torch.autograd.grad(want.sum(), table)[0])
