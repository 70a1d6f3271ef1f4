"""Score mods as values (``attnrs.scores``): the bucket functions and ALiBi slopes equal transformers' own; every
ScoreMod is a FlexAttention score_mod equal to a hand-written one through ``flex_attention`` (forward, LSE,
gradients into q/k/v and the tables); ``terms()`` rebuilt densely equals the mod evaluated densely; composition
rules, reprs and the typed errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from flex_support import causal, flex

import attnrs
from attnrs import scores
from attnrs.errors import ArgumentError, DtypeError, ShapeError, UnsupportedError

t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")

H, HKV, Q, K, D = 4, 2, 6, 9, 8


def t5_reference(rel: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool) -> torch.Tensor:
    return t5.T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )


# ---------------------------------------------------------------------------------------------------------------
# The published formulas


@pytest.mark.parametrize("num_heads", [*range(1, 18), 24, 40, 64, 80, 96, 112])
def test_alibi_slopes_are_bloom_slopes(num_heads: int) -> None:
    kv_len = 7
    reference = bloom.build_alibi_tensor(torch.ones(1, kv_len, dtype=torch.long), num_heads, torch.float32)
    ours = scores.alibi_slopes(num_heads)
    assert ours.dtype == torch.float32 and ours.shape == (num_heads,)
    assert torch.equal(ours[:, None] * torch.arange(kv_len, dtype=torch.float32), reference[:, 0, :])
    # BLOOM's alibi is slopes[h] * kv_idx: form="key" with these slopes, at every (q, kv) pair
    grid = scores.alibi(num_heads, form="key").terms(batch=1, heads=num_heads, q_len=3, kv_len=kv_len)
    assert grid.key is not None and grid.distance is None
    assert torch.equal(grid.key[0], reference[:, 0, :])


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(
    ("num_buckets", "max_distance"), [(32, 128), (8, 16), (16, 64), (33, 100), (64, 256), (6, 5), (4, 1000)]
)
def test_t5_buckets_are_transformers_buckets(num_buckets: int, max_distance: int, bidirectional: bool) -> None:
    if max_distance <= (num_buckets // 2 if bidirectional else num_buckets) // 2:
        pytest.skip("max_distance within the exact buckets (refused: transformers divides by zero)")
    rel = torch.cat([torch.arange(-3000, 3001), torch.tensor([-(10**9), -123457, 99991, 10**9])])
    buckets = scores.t5_buckets(num_buckets, max_distance, bidirectional)
    ours = buckets(rel)
    assert torch.equal(ours, t5_reference(rel, num_buckets, max_distance, bidirectional))
    assert int(ours.min()) >= 0 and int(ours.max()) < buckets.n_buckets
    # ... and on a broadcast [Q, K] grid, as T5's compute_bias builds it
    q_pos, kv_pos = torch.arange(40)[:, None], torch.arange(50)[None, :]
    assert torch.equal(buckets(kv_pos - q_pos), t5_reference(kv_pos - q_pos, num_buckets, max_distance, bidirectional))


def test_clamp_buckets() -> None:
    rel = torch.arange(-10, 11)
    assert torch.equal(scores.clamp_buckets(3)(rel), rel.clamp(-3, 3) + 3)
    assert scores.clamp_buckets(3).n_buckets == 7


# ---------------------------------------------------------------------------------------------------------------
# Each constructor against a hand-written score_mod through flex_attention


def _tables(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "slopes": torch.rand(H, generator=g, dtype=dtype) * 0.5,
        "t5": torch.randn(H, 32, generator=g, dtype=dtype),
        "shaw": torch.randn(1, 2 * 3 + 1, generator=g, dtype=dtype),
        "causal": torch.randn(H, 5, generator=g, dtype=dtype),
        "docs": torch.randn(H, 3, generator=g, dtype=dtype),
        "head_scale": torch.rand(H, generator=g, dtype=dtype) + 0.5,
    }


DOCS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 2]])  # [B, K]

# name -> (the ScoreMod, the hand-written flex score_mod, the tables whose gradients are compared)
Built = tuple[scores.ScoreMod, Callable[..., Any], list[str]]


def _case(name: str, t: dict[str, torch.Tensor]) -> Built:
    t5b = scores.t5_buckets(32, 16, bidirectional=True)
    if name == "alibi":
        return scores.alibi(t["slopes"]), lambda s, b, h, q, kv: s + t["slopes"][h] * (kv - q), ["slopes"]
    if name == "alibi_key":
        return (
            scores.alibi(t["slopes"], form="key"),
            lambda s, b, h, q, kv: s + t["slopes"][h] * kv,
            ["slopes"],
        )
    if name == "t5":
        return (
            scores.relative_bias(t["t5"], t5b),
            lambda s, b, h, q, kv: s + t["t5"][h, t5_reference(kv - q, 32, 16, True)],
            ["t5"],
        )
    if name == "shaw":
        return (
            scores.relative_bias(t["shaw"], scores.clamp_buckets(3)),
            lambda s, b, h, q, kv: s + t["shaw"][0, (kv - q).clamp(-3, 3) + 3],
            ["shaw"],
        )
    if name == "bias_table":
        return (
            scores.bias_table(t["causal"]),
            lambda s, b, h, q, kv: s + t["causal"][h, (q - kv).clamp(0, 4)],
            ["causal"],
        )
    if name == "documents":
        ids = DOCS
        return (
            scores.bias_table(t["docs"], document_ids=ids),
            lambda s, b, h, q, kv: s + t["docs"][h, ids[b, kv]],
            ["docs"],
        )
    if name == "scale":
        return scores.scale(0.5), lambda s, b, h, q, kv: s * 0.5, []
    if name == "head_scale":
        w = t["head_scale"].detach()
        return scores.scale(w), lambda s, b, h, q, kv: s * w[h], []
    if name == "softcap":
        return scores.softcap(2.0), lambda s, b, h, q, kv: 2.0 * torch.tanh(s / 2.0), []
    if name == "composed":
        w = t["head_scale"].detach()
        mod = scores.compose(
            scores.scale(w),
            scores.alibi(t["slopes"])
            + scores.relative_bias(t["t5"], t5b)
            + scores.bias_table(t["docs"], document_ids=DOCS),
            scores.softcap(3.0),
        )

        def hand(s: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
            x = s * w[h] + t["slopes"][h] * (kv - q) + t["t5"][h, t5_reference(kv - q, 32, 16, True)]
            x = x + t["docs"][h, DOCS[b, kv]]
            return 3.0 * torch.tanh(x / 3.0)

        return mod, hand, ["slopes", "t5", "docs"]
    raise AssertionError(name)


CASES = ["alibi", "alibi_key", "t5", "shaw", "bias_table", "documents", "scale", "head_scale", "softcap", "composed"]


def _flex_run(
    mod: Callable[..., Any], t: dict[str, torch.Tensor], grads: list[str], dtype: torch.dtype, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, Q, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(2, HKV, K, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, HKV, K, D, generator=g, dtype=dtype, requires_grad=True)
    out, lse = flex(q, k, v, mod, causal)
    weights = torch.randn(out.shape, generator=g, dtype=dtype)
    tensors = [q, k, v, *(t[name] for name in grads)]
    gradients = torch.autograd.grad((out * weights).sum() + lse.sum(), tensors)
    return out.detach(), lse.detach(), list(gradients)


@pytest.mark.parametrize("name", CASES)
def test_score_mod_equals_hand_written_flex_score_mod(name: str) -> None:
    dtype = torch.float64
    t = {k: v.requires_grad_() for k, v in _tables(dtype).items()}
    ours, hand, grads = _case(name, t)
    out, lse, gradients = _flex_run(ours, t, grads, dtype)
    ref_out, ref_lse, ref_gradients = _flex_run(hand, t, grads, dtype)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    for got, want in zip(gradients, ref_gradients):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert all(bool(g.abs().sum() > 0) for g in gradients)  # the tables do get gradients


def test_composed_score_mod_in_float32_through_flex() -> None:
    t = {k: v.requires_grad_() for k, v in _tables(torch.float32).items()}
    ours, hand, grads = _case("composed", t)
    out, lse, gradients = _flex_run(ours, t, grads, torch.float32)
    ref_out, ref_lse, ref_gradients = _flex_run(hand, t, grads, torch.float32)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    for got, want in zip(gradients, ref_gradients):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# terms(): the kernel's operands


def dense_from_terms(terms: scores.ScoreTerms, score: torch.Tensor) -> torch.Tensor:
    """The kernel's formula over a dense ``[B, H, Q, K]`` score, from the operands (written from the contract)."""
    q_len, kv_len = score.shape[-2:]
    x = score
    if terms.head_scale is not None:
        x = x * terms.head_scale[None, :, None, None]
    if terms.distance is not None:
        i, j = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
        x = x + terms.distance[:, j - i + q_len - 1][None]
    if terms.key is not None:
        x = x + terms.key[:, :, None, :]
    if terms.softcap is not None:
        x = terms.softcap * torch.tanh(x / terms.softcap)
    return x


def dense_from_mod(mod: Callable[..., Any], score: torch.Tensor, q_offset: int, kv_offset: int) -> torch.Tensor:
    b, h, q_len, kv_len = score.shape
    return mod(
        score,
        torch.arange(b)[:, None, None, None],
        torch.arange(h)[None, :, None, None],
        (torch.arange(q_len) + q_offset)[None, None, :, None],
        (torch.arange(kv_len) + kv_offset)[None, None, None, :],
    )


def vmapped_mod(mod: Callable[..., Any], score: torch.Tensor, q_offset: int, kv_offset: int) -> torch.Tensor:
    """The mod under plain ``torch.vmap`` over b, h, q, kv (no getitem rewriting)."""
    b, h, q_len, kv_len = score.shape
    fn = mod
    for dims in (
        (0, None, None, None, 0),
        (0, None, None, 0, None),
        (0, None, 0, None, None),
        (0, 0, None, None, None),
    ):
        fn = torch.vmap(fn, in_dims=dims)
    return fn(score, torch.arange(b), torch.arange(h), torch.arange(q_len) + q_offset, torch.arange(kv_len) + kv_offset)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize(
    ("q_len", "kv_len", "q_offset", "kv_offset"), [(6, 9, 0, 0), (3, 9, 6, 0), (5, 4, 2, 3), (1, 7, 40, 1)]
)
def test_terms_rebuilt_densely_equal_the_mod(name: str, q_len: int, kv_len: int, q_offset: int, kv_offset: int) -> None:
    if name in ("documents", "composed") and kv_offset + kv_len > DOCS.shape[1]:
        kv_len = DOCS.shape[1] - kv_offset
    t = {k: v.requires_grad_() for k, v in _tables(torch.float64).items()}
    mod, _, grads = _case(name, t)
    score = torch.randn(2, H, q_len, kv_len, dtype=torch.float64)
    terms = mod.terms(
        batch=2, heads=H, q_len=q_len, kv_len=kv_len, q_offset=q_offset, kv_offset=kv_offset, dtype=torch.float64
    )
    for operand in (terms.head_scale, terms.distance, terms.key):
        assert operand is None or (operand.is_contiguous() and operand.dtype == torch.float64)
    if terms.distance is not None:
        assert terms.distance.shape[0] in (1, H) and terms.distance.shape[1] == q_len + kv_len - 1
    if terms.key is not None:
        assert terms.key.shape[0] in (1, 2) and terms.key.shape[1] in (1, H) and terms.key.shape[2] == kv_len
    rebuilt = dense_from_terms(terms, score)
    expected = dense_from_mod(mod, score, q_offset, kv_offset)
    torch.testing.assert_close(rebuilt, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vmapped_mod(mod, score, q_offset, kv_offset), expected, rtol=1e-12, atol=1e-12)
    if grads:  # gradients flow from the operands into the tables, as from the mod
        weights = torch.randn(score.shape, dtype=torch.float64)
        tables = [t[n] for n in grads]
        got = torch.autograd.grad((rebuilt * weights).sum(), tables)
        want = torch.autograd.grad((expected * weights).sum(), tables)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_terms_in_float32_and_in_other_dtypes() -> None:
    mod = scores.scale(2.0).then(scores.alibi(H) + scores.bias_table(torch.randn(1, 3), document_ids=DOCS[:1]))
    terms = mod.terms(batch=2, heads=H, q_len=4, kv_len=9)
    assert terms.head_scale is not None and terms.head_scale.dtype == torch.float32
    assert torch.equal(terms.head_scale, torch.full((H,), 2.0))
    assert terms.distance is not None and terms.distance.shape == (H, 12)
    assert terms.key is not None and terms.key.shape == (1, 1, 9)
    assert mod.terms(batch=1, heads=H, q_len=2, kv_len=3, dtype=torch.bfloat16).distance.dtype == torch.bfloat16  # type: ignore[union-attr]
    no_query = scores.alibi(H).terms(batch=1, heads=H, q_len=0, kv_len=5)
    assert no_query.distance is not None and no_query.distance.shape == (H, 4)
    nothing = scores.alibi(H).terms(batch=1, heads=H, q_len=0, kv_len=0)
    assert nothing.distance is not None and nothing.distance.shape == (H, 0)


def test_terms_trace_under_torch_compile() -> None:
    table = torch.randn(H, 32, requires_grad=True)
    distances = torch.randn(1, 5, requires_grad=True)
    mod = scores.alibi(H) + scores.relative_bias(table, scores.t5_buckets()) + scores.bias_table(distances)

    def operands(x: torch.Tensor) -> torch.Tensor:
        t = mod.terms(batch=1, heads=H, q_len=x.shape[0], kv_len=x.shape[1], q_offset=3)
        assert t.distance is not None
        return t.distance.sum() * x.sum()

    compiled = torch.compile(operands, backend="eager", fullgraph=True, dynamic=True)
    for shape in ((4, 6), (5, 3)):
        x = torch.ones(shape)
        torch.testing.assert_close(compiled(x), operands(x))


# ---------------------------------------------------------------------------------------------------------------
# Composition rules and reprs


def test_composition_rules() -> None:
    a, r = scores.alibi(H), scores.relative_bias(torch.randn(H, 7), scores.clamp_buckets(3))
    assert (a + r).is_additive
    with pytest.raises(ArgumentError, match=r"use a\.then\(b\)"):
        _ = a + scores.softcap(5.0)
    with pytest.raises(ArgumentError, match=r"use a\.then\(b\)"):
        _ = scores.scale(2.0) + a
    with pytest.raises(ArgumentError, match="softcap must come last"):
        scores.softcap(5.0).then(a)
    with pytest.raises(ArgumentError, match="scale first"):
        a.then(scores.scale(2.0))
    per_head = scores.scale(torch.full((H,), 3.0))
    composed = scores.scale(2.0).then(per_head).then(a).then(scores.softcap(5.0))
    terms = composed.terms(batch=1, heads=H, q_len=2, kv_len=2)
    assert terms.head_scale is not None and torch.equal(terms.head_scale, torch.full((H,), 6.0))
    assert terms.softcap == 5.0 and composed.cap == 5.0
    assert repr(scores.compose(scores.scale(2.0), per_head, a, scores.softcap(5.0))) == repr(composed)
    with pytest.raises(ArgumentError, match="compose: mods"):
        scores.compose()
    with pytest.raises(DtypeError, match=r"compose: mods\[1\]"):
        scores.compose(a, "alibi")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _ = a + 1  # type: ignore[operator]


def test_reprs() -> None:
    t5b = scores.t5_buckets(32, 128)
    assert repr(scores.alibi(8) + scores.relative_bias(torch.zeros(8, 32), t5b)) == (
        "alibi(8 heads) + relative_bias(t5_buckets(32, 128, bidirectional))"
    )
    assert repr(scores.alibi(8, form="key")) == 'alibi(8 heads, form="key")'
    assert repr(scores.relative_bias(torch.zeros(1, 7), scores.clamp_buckets(3))) == "relative_bias(clamp_buckets(3))"
    assert repr(scores.t5_buckets(16, 64, bidirectional=False)) == "t5_buckets(16, 64, causal)"
    assert repr(scores.bias_table(torch.zeros(4, 5))) == "bias_table(4 heads x 5)"
    assert (
        repr(scores.bias_table(torch.zeros(4, 3), document_ids=DOCS)) == "bias_table(4 heads x 3, document_ids=[2, 9])"
    )
    assert repr(scores.scale(0.5).then(scores.alibi(4) + scores.alibi(4, form="key")).then(scores.softcap(30))) == (
        'scale(0.5).then(alibi(4 heads) + alibi(4 heads, form="key")).then(softcap(30.0))'
    )
    assert repr((scores.alibi(4) + scores.alibi(4)).then(scores.softcap(1.5))) == (
        "(alibi(4 heads) + alibi(4 heads)).then(softcap(1.5))"
    )
    assert repr(scores.scale(torch.ones(4))) == "scale(4 heads)"


def test_the_package_exports_scores() -> None:
    assert attnrs.scores is scores and "scores" in attnrs.__all__
    assert set(scores.__all__) >= {"ScoreMod", "ScoreTerms", "alibi", "relative_bias", "bias_table", "softcap"}


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (
            lambda: scores.relative_bias([[0.0]], scores.clamp_buckets(1)),
            DtypeError,
            "relative_bias: table: expected a float tensor",
        ),
        (
            lambda: scores.relative_bias(torch.zeros(4, 3, dtype=torch.long), scores.clamp_buckets(1)),
            DtypeError,
            "relative_bias: table",
        ),
        (
            lambda: scores.relative_bias(torch.zeros(4), scores.clamp_buckets(1)),
            ShapeError,
            r"relative_bias: table: expected a float tensor \[H, n_buckets\]",
        ),
        (
            lambda: scores.relative_bias(torch.zeros(32, 4), scores.t5_buckets()),
            ShapeError,
            "relative_bias: table: expected at least 32 columns",
        ),
        (lambda: scores.relative_bias(torch.zeros(4, 32), "t5"), DtypeError, "relative_bias: buckets"),
        (
            lambda: scores.relative_bias(torch.full((4, 32), math.nan), scores.t5_buckets()),
            ArgumentError,
            "relative_bias: table: expected finite",
        ),
        (lambda: scores.alibi(torch.zeros(4, 1)), ShapeError, r"alibi: slopes: expected a float tensor \[H\]"),
        (lambda: scores.alibi(torch.arange(4)), DtypeError, "alibi: slopes"),
        (lambda: scores.alibi(0), ArgumentError, "alibi: num_heads"),
        (lambda: scores.alibi(True), DtypeError, "alibi: slopes"),
        (lambda: scores.alibi(4, form="bloom"), ArgumentError, "alibi: form"),
        (lambda: scores.bias_table(torch.zeros(4, 0)), ShapeError, "bias_table: table"),
        (
            lambda: scores.bias_table(torch.zeros(4, 3), document_ids=torch.zeros(2, 3)),
            DtypeError,
            "bias_table: document_ids",
        ),
        (
            lambda: scores.bias_table(torch.zeros(4, 3), document_ids=torch.zeros(1, 2, 3, dtype=torch.long)),
            ShapeError,
            "bias_table: document_ids",
        ),
        (
            lambda: scores.bias_table(torch.zeros(4, 3), document_ids=torch.tensor([0, 3])),
            ArgumentError,
            r"bias_table: document_ids: expected ids in \[0, 3\)",
        ),
        (lambda: scores.softcap(0.0), ArgumentError, "softcap: c"),
        (lambda: scores.softcap(math.inf), ArgumentError, "softcap: c"),
        (lambda: scores.softcap(-1), ArgumentError, "softcap: c"),
        (lambda: scores.softcap("1"), ArgumentError, "softcap: c"),
        (lambda: scores.scale(math.nan), ArgumentError, "scale: s"),
        (
            lambda: scores.scale(torch.ones(4, requires_grad=True)),
            UnsupportedError,
            r"scale: s requires grad: .* scores\.scale",
        ),
        (lambda: scores.scale(torch.ones(2, 2)), ShapeError, "scale: s"),
        (lambda: scores.t5_buckets(2), ArgumentError, "t5_buckets: num_buckets"),
        (lambda: scores.t5_buckets(32, 8), ArgumentError, "t5_buckets: max_distance"),
        (lambda: scores.t5_buckets(32, 128, bidirectional=1), ArgumentError, "t5_buckets: bidirectional"),
        (lambda: scores.clamp_buckets(-1), ArgumentError, "clamp_buckets: max_distance"),
        (lambda: scores.alibi(4).then(None), DtypeError, "then: other"),
    ],
)
def test_bad_arguments(build: Callable[[], Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match="^" + message):
        build()


def test_bad_calls_to_terms() -> None:
    mod = scores.alibi(4) + scores.relative_bias(torch.zeros(2, 7), scores.clamp_buckets(3))
    with pytest.raises(ShapeError, match=r"^relative_bias: table: expected 4 heads \(the call's\) or 1"):
        mod.terms(batch=1, heads=4, q_len=2, kv_len=2)
    with pytest.raises(ShapeError, match=r"^alibi: slopes: expected 2 heads"):
        scores.alibi(4).terms(batch=1, heads=2, q_len=2, kv_len=2)
    with pytest.raises(ShapeError, match=r"^scale: s: expected 2 heads"):
        scores.scale(torch.ones(4)).terms(batch=1, heads=2, q_len=2, kv_len=2)
    docs = scores.bias_table(torch.zeros(4, 3), document_ids=DOCS)
    with pytest.raises(ShapeError, match=r"^bias_table: document_ids: expected ids for key positions \[4, 10\)"):
        docs.terms(batch=2, heads=4, q_len=2, kv_len=6, kv_offset=4)
    with pytest.raises(ShapeError, match=r"^bias_table: document_ids: expected a batch of 3"):
        docs.terms(batch=3, heads=4, q_len=2, kv_len=6)
    with pytest.raises(ArgumentError, match=r"^terms: q_len"):
        docs.terms(batch=2, heads=4, q_len=-1, kv_len=6)
    with pytest.raises(DtypeError, match=r"^terms: dtype"):
        docs.terms(batch=2, heads=4, q_len=1, kv_len=6, dtype=torch.int32)
    for e in (ArgumentError, DtypeError, ShapeError, UnsupportedError):
        assert issubclass(e, attnrs.AttnrsError)
