"""Masks as values: attnrs's dense and block layouts equal transformers' sdpa_mask and torch's create_block_mask
for the same mask, over random lengths, offsets, padding, windows, chunks, documents and compositions."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
from torch.nn.attention.flex_attention import flex_attention

import attnrs
from attnrs import masks

mu = pytest.importorskip("transformers.masking_utils")


@dataclass
class Case:
    """A mask written twice: as transformers/torch mask functions (the reference) and as an attnrs Mask."""

    reference: Callable[..., Any]
    ours: masks.Mask
    label: str


@dataclass
class Grid:
    batch: int
    q_len: int
    kv_len: int
    q_offset: int
    kv_offset: int

    @property
    def span(self) -> int:
        return max(self.q_offset + self.q_len, self.kv_offset + self.kv_len)


grids = st.builds(
    Grid,
    batch=st.integers(1, 3),
    q_len=st.integers(1, 40),
    kv_len=st.integers(1, 40),
    q_offset=st.integers(0, 12),
    kv_offset=st.integers(0, 12),
)


def _prefix_lm_reference(lengths: torch.Tensor) -> Callable[..., Any]:
    def prefix_lm(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (kv < lengths[b]) | (kv <= q)

    return prefix_lm


def _arbitrary(b: Any, h: Any, q: Any, kv: Any) -> Any:
    """A mask no recognizer knows: it must be evaluated."""
    return ((q * 3 + kv * 5 + b) % 4) != 0


@st.composite
def leaves(draw: st.DrawFn, grid: Grid) -> Case:
    kind = draw(st.sampled_from(
        ["causal", "bidirectional", "sliding", "sliding_bidir", "overlay", "chunked", "padding", "document",
         "document_sorted", "prefix_lm", "callable"]
    ))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if kind == "causal":
        return Case(mu.causal_mask_function, masks.causal(), kind)
    if kind == "bidirectional":
        return Case(mu.bidirectional_mask_function, masks.bidirectional(), kind)
    if kind in ("sliding", "sliding_bidir", "overlay"):
        w = draw(st.integers(1, 12))
        if kind == "sliding":
            return Case(mu.sliding_window_causal_mask_function(w), masks.sliding_window(w), f"sliding({w})")
        if kind == "sliding_bidir":
            return Case(mu.sliding_window_bidirectional_overlay(w), masks.sliding_window(w, causal=False), kind)
        return Case(mu.sliding_window_overlay(w), masks.sliding_window_overlay(w), f"overlay({w})")
    if kind == "chunked":
        size = draw(st.integers(1, 9))
        left_padding = torch.randint(0, 6, (grid.batch,), generator=gen)
        return Case(mu.chunked_overlay(size, left_padding), masks.chunked(size, left_padding, causal=False), kind)
    if kind == "padding":
        valid = torch.rand(grid.batch, grid.kv_offset + grid.kv_len, generator=gen) > 0.3
        return Case(mu.padding_mask_function(valid), masks.padding(valid), kind)
    if kind.startswith("document"):
        ids = torch.randint(0, 4, (grid.batch, grid.span), generator=gen)
        if kind == "document_sorted":
            ids = ids.sort(dim=-1).values
        return Case(mu.packed_sequence_mask_function(ids), masks.document(ids), kind)
    if kind == "prefix_lm":
        lengths = torch.randint(0, grid.span + 1, (grid.batch,), generator=gen)
        return Case(_prefix_lm_reference(lengths), masks.prefix_lm(lengths), kind)
    return Case(_arbitrary, masks.from_callable(_arbitrary), kind)


@st.composite
def cases(draw: st.DrawFn, grid: Grid, depth: int = 2) -> Case:
    if depth == 0 or draw(st.booleans()):
        return draw(leaves(grid))
    op = draw(st.sampled_from(["and", "or", "not"]))
    if op == "not":
        inner = draw(cases(grid, depth - 1))

        def negated(b: Any, h: Any, q: Any, kv: Any, fn: Callable[..., Any] = inner.reference) -> Any:
            return ~fn(b, h, q, kv)

        return Case(negated, ~inner.ours, f"~{inner.label}")
    parts = [draw(cases(grid, depth - 1)) for _ in range(draw(st.integers(2, 3)))]
    combine = mu.and_masks if op == "and" else mu.or_masks
    ours = masks.and_masks(*(p.ours for p in parts)) if op == "and" else masks.or_masks(*(p.ours for p in parts))
    return Case(combine(*(p.reference for p in parts)), ours, f"{op}({', '.join(p.label for p in parts)})")


def _reference_dense(case: Case, grid: Grid) -> torch.Tensor:
    return mu.sdpa_mask(
        batch_size=grid.batch, q_length=grid.q_len, kv_length=grid.kv_len, q_offset=grid.q_offset,
        kv_offset=grid.kv_offset, mask_function=case.reference, allow_is_causal_skip=False,
    )


@given(st.data())
def test_dense_masks_equal_transformers_sdpa_mask(data: st.DataObject) -> None:
    grid = data.draw(grids)
    case = data.draw(cases(grid))
    expected = _reference_dense(case, grid)
    for mask in (case.ours, case.reference):  # built by us, and recognised from transformers' functions
        got = attnrs.create_dense_mask(
            mask, grid.batch, 1, grid.q_len, grid.kv_len, q_offset=grid.q_offset, kv_offset=grid.kv_offset
        )
        assert got.shape == expected.shape, case.label
        assert torch.equal(got, expected), case.label


@given(st.data())
def test_additive_masks_use_finfo_min(data: st.DataObject) -> None:
    grid = data.draw(grids)
    case = data.draw(cases(grid, depth=1))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    visible = _reference_dense(case, grid)
    got = attnrs.create_dense_mask(
        case.ours, grid.batch, 1, grid.q_len, grid.kv_len, q_offset=grid.q_offset, kv_offset=grid.kv_offset,
        dtype=dtype,
    )
    expected = torch.where(visible, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)
    assert got.dtype == dtype and torch.equal(got, expected)


def _torch_block_mask(case: Case, grid: Grid, block: tuple[int, int], heads: int | None) -> Any:
    fn = mu.add_offsets_to_mask_function(case.reference, grid.q_offset, grid.kv_offset)
    return torch_create_block_mask(fn, grid.batch, heads, grid.q_len, grid.kv_len, device="cpu", BLOCK_SIZE=block)


@given(st.data())
def test_block_masks_equal_torch_create_block_mask(data: st.DataObject) -> None:
    grid = data.draw(grids)
    case = data.draw(cases(grid))
    block = data.draw(st.tuples(st.integers(1, 9), st.integers(1, 9)))
    heads = data.draw(st.sampled_from([None, 2]))
    expected = _torch_block_mask(case, grid, block, heads)
    got = attnrs.create_block_mask(
        case.ours, grid.batch, heads, grid.q_len, grid.kv_len, BLOCK_SIZE=block, q_offset=grid.q_offset,
        kv_offset=grid.kv_offset,
    )
    assert isinstance(got, torch.nn.attention.flex_attention.BlockMask)
    assert got.shape == expected.shape and got.BLOCK_SIZE == expected.BLOCK_SIZE
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        mine, theirs = getattr(got, name), getattr(expected, name)
        assert mine.shape == theirs.shape, (name, case.label)
        assert torch.equal(mine, theirs), (name, case.label)
    assert torch.equal(got.to_dense(), expected.to_dense())


def test_flex_attention_gives_the_same_output_with_either_block_mask() -> None:
    grid = Grid(batch=2, q_len=37, kv_len=45, q_offset=8, kv_offset=0)
    valid = torch.ones(2, 45, dtype=torch.bool)
    valid[1, :5] = False
    ids = torch.tensor([[0] * 20 + [1] * 25, [0] * 10 + [1] * 35])
    for ours, reference in (
        (masks.causal() & masks.padding(valid), mu.and_masks(mu.causal_mask_function, mu.padding_mask_function(valid))),
        (masks.sliding_window(7), mu.sliding_window_causal_mask_function(7)),
        (masks.document(ids) & masks.causal(), mu.and_masks(mu.packed_sequence_mask_function(ids), mu.causal_mask_function)),
    ):
        case = Case(reference, ours, repr(ours))
        torch.manual_seed(0)
        q = torch.randn(2, 2, grid.q_len, 16)
        k = torch.randn(2, 2, grid.kv_len, 16)
        v = torch.randn(2, 2, grid.kv_len, 16)
        theirs = _torch_block_mask(case, grid, (16, 16), None)
        mine = attnrs.create_block_mask(ours, 2, None, grid.q_len, grid.kv_len, BLOCK_SIZE=16, q_offset=8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex_attention warns that it runs unfused without torch.compile
            expected = flex_attention(q, k, v, block_mask=theirs)
            got = flex_attention(q, k, v, block_mask=mine)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_masks_are_mask_mods_for_torch_and_transformers() -> None:
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    mask = (masks.sliding_window(3) | masks.prefix_lm([2, 0])) & masks.padding(valid)
    expected = attnrs.create_dense_mask(mask, 2, 1, 6, 6)
    through_transformers = mu.sdpa_mask(batch_size=2, q_length=6, kv_length=6, mask_function=mask,
                                        allow_is_causal_skip=False)
    assert torch.equal(through_transformers, expected)
    through_torch = torch_create_block_mask(mask, 2, None, 6, 6, device="cpu", BLOCK_SIZE=2)
    assert torch.equal(through_torch.to_dense(), attnrs.create_block_mask(mask, 2, None, 6, 6, BLOCK_SIZE=2).to_dense())


def test_head_dependent_callables_keep_their_heads() -> None:
    def by_head(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (kv <= q) & ((kv + h) % 2 == 0)

    dense = attnrs.create_dense_mask(by_head, 1, 3, 5, 5)
    assert dense.shape == (1, 3, 5, 5)
    h = torch.arange(3)[:, None, None]
    q = torch.arange(5)[None, :, None]
    kv = torch.arange(5)[None, None, :]
    assert torch.equal(dense[0], (kv <= q) & ((kv + h) % 2 == 0))
    assert attnrs.create_dense_mask(masks.causal(), 1, 3, 5, 5).shape == (1, 1, 5, 5)


def test_batch_independent_masks_are_broadcast_views() -> None:
    dense = attnrs.create_dense_mask(masks.causal(), 4, 1, 8, 8)
    assert dense.shape == (4, 1, 8, 8) and dense.stride(0) == 0


def test_composition_operators() -> None:
    c, w = masks.causal(), masks.sliding_window(2)
    assert (c & w).kind == "and" and (c | w).kind == "or" and (~c).kind == "not" and (~~c) is c
    assert masks.and_masks().kind == "full" and masks.or_masks().kind == "empty"
    # A plain callable composes on either side.
    assert (mu.causal_mask_function & w).kind == "and"
    full = attnrs.create_dense_mask(c | ~c, 1, 1, 4, 4)
    assert bool(full.all())
    assert not bool(attnrs.create_dense_mask(c & ~c, 1, 1, 4, 4).any())


@pytest.mark.parametrize(
    ("build", "error", "words"),
    [
        (lambda: masks.sliding_window(0), attnrs.ArgumentError, "window: expected a positive integer, got 0"),
        (lambda: masks.sliding_window(-3), ValueError, "window"),
        (lambda: masks.chunked(0), ValueError, "size: expected a positive integer"),
        (lambda: masks.sliding_window(2.5), ValueError, "window"),
        (lambda: masks.padding(torch.ones(2, 3)), attnrs.DtypeError, "mask2d: expected a bool tensor"),
        (lambda: masks.padding(torch.ones(3, dtype=torch.bool)), attnrs.ShapeError, "mask2d: expected a 2-D"),
        (lambda: masks.padding([[True]]), TypeError, "mask2d"),
        (lambda: masks.padding(torch.ones(2, 3, dtype=torch.bool, device="meta")), attnrs.DeviceError, "mask2d"),
        (lambda: masks.document(torch.ones(2, 3)), attnrs.DtypeError, "seq_ids: expected an integer tensor"),
        (lambda: masks.document(torch.ones(2, 3, 4, dtype=torch.long)), attnrs.ShapeError, "seq_ids"),
        (lambda: masks.prefix_lm([-1]), ValueError, "prefix_lengths"),
        (lambda: masks.from_callable(3), TypeError, "callable"),
    ],
)
def test_bad_mask_arguments(build: Callable[[], Any], error: type, words: str) -> None:
    with pytest.raises(error, match=words.replace("(", r"\(")):
        build()


def test_tables_must_agree_with_the_batch() -> None:
    pad = masks.padding(torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(attnrs.ShapeError, match="padding"):
        attnrs.create_dense_mask(pad, 2, 1, 8, 8)
    docs = masks.document(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(attnrs.ShapeError):
        attnrs.create_block_mask(docs, 4, None, 8, 8)


def test_unvectorisable_callables_explain_why() -> None:
    def data_dependent(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return torch.tensor(True) if int(q) > int(kv) else torch.tensor(False)

    with pytest.raises(attnrs.ArgumentError, match="cannot be vectorised"):
        attnrs.create_dense_mask(data_dependent, 1, 1, 4, 4)

    def wrong_type(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return q - kv

    with pytest.raises(TypeError, match="bool"):
        attnrs.create_dense_mask(wrong_type, 1, 1, 4, 4)


def test_bad_grid_and_dtype_arguments() -> None:
    with pytest.raises(attnrs.DtypeError, match="dtype"):
        attnrs.create_dense_mask(masks.causal(), 1, 1, 4, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="BLOCK_SIZE"):
        attnrs.create_block_mask(masks.causal(), 1, 1, 4, 4, BLOCK_SIZE=0)
    with pytest.raises(ValueError, match="Q_LEN"):
        attnrs.create_dense_mask(masks.causal(), 1, 1, -1, 4)
    with pytest.raises(ValueError, match="B"):
        attnrs.create_dense_mask(masks.causal(), -1, 1, 4, 4)
    # Zero sizes are empty masks, as torch's create_mask gives them.
    assert attnrs.create_dense_mask(masks.causal(), 0, 1, 4, 4).shape == (0, 1, 4, 4)


def test_large_structural_block_masks_never_build_dense_grids() -> None:
    """At 64k tokens a dense bool grid would be 4 GiB; the structural path needs only the block lists."""
    length = 65536
    ids = torch.arange(length) // (length // 8)
    for mask in (masks.causal(), masks.sliding_window(512), masks.document(ids) & masks.causal()):
        bm = attnrs.create_block_mask(mask, 1, None, length, length)
        assert bm.kv_num_blocks.shape == (1, 1, length // 128)
    causal = attnrs.create_block_mask(masks.causal(), 1, None, length, length)
    n = length // 128
    assert torch.equal(causal.full_kv_num_blocks[0, 0], torch.arange(n, dtype=torch.int32))
    assert bool((causal.kv_num_blocks == 1).all())


def test_document_ids_must_cover_the_grid() -> None:
    docs = masks.document(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(attnrs.ShapeError, match="seq_ids: expected ids for positions up to 9"):
        attnrs.create_dense_mask(docs, 1, 1, 4, 4, q_offset=6)
    with pytest.raises(attnrs.ShapeError, match="seq_ids"):
        attnrs.create_block_mask(docs & masks.causal(), 1, None, 8, 10)
    # Through a shift (what FlexAttention sees) the covered positions move too.
    assert attnrs.create_dense_mask(docs.shifted(4, 4), 1, 1, 4, 4).all()


@pytest.mark.parametrize(
    "factory",
    [
        lambda: mu.sliding_window_causal_mask_function(4),
        lambda: mu.sliding_window_bidirectional_mask_function(4),
        lambda: mu.chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long)),
        lambda: mu.padding_mask_function(torch.ones(2, 8, dtype=torch.bool)),
        lambda: mu.packed_sequence_mask_function(torch.zeros(2, 8, dtype=torch.long)),
        lambda: mu.add_offsets_to_mask_function(mu.causal_mask_function, 3, 1),
        lambda: mu.or_masks(mu.causal_mask_function, mu.sliding_window_overlay(2)),
        lambda: mu.and_masks(),
    ],
)
def test_transformers_mask_functions_become_structural(factory: Callable[[], Any]) -> None:
    recognized = masks.from_callable(factory())
    assert recognized.is_structural, recognized


def test_lookalike_closures_are_evaluated_not_trusted() -> None:
    def sliding_window_overlay(sliding_window: int) -> Callable[..., Any]:
        def inner_mask(b: Any, h: Any, q: Any, kv: Any) -> Any:  # same names, different meaning
            return kv >= q - sliding_window

        return inner_mask

    impostor = masks.from_callable(sliding_window_overlay(2))
    assert impostor.kind == "callable"
    expected = torch.arange(6)[None, :] >= torch.arange(6)[:, None] - 2
    assert torch.equal(attnrs.create_dense_mask(impostor, 1, 1, 6, 6)[0, 0], expected)


_BLOCK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def _assert_same_block_mask(got: Any, expected: Any) -> None:
    assert isinstance(got, attnrs.BlockMask)
    assert got.shape == expected.shape and got.BLOCK_SIZE == expected.BLOCK_SIZE
    for name in _BLOCK_FIELDS:
        mine, theirs = getattr(got, name), getattr(expected, name)
        assert (mine is None) == (theirs is None), name
        if theirs is not None:
            assert mine.shape == theirs.shape and torch.equal(mine, theirs), name


def _causal_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
    return kv <= q


@pytest.mark.parametrize("call", [
    lambda f: f(_causal_mod, 2, 3, 40, 70, "cpu"),                              # positional device
    lambda f: f(_causal_mod, 2, 3, 40, 70, "cpu", 16),                          # positional BLOCK_SIZE
    lambda f: f(mask_mod=_causal_mod, B=2, H=None, Q_LEN=40, KV_LEN=70, device="cpu", BLOCK_SIZE=(16, 32)),
    lambda f: f(_causal_mod, 2, 1, 40, 70, "cpu", 16, separate_full_blocks=False),
    lambda f: f(_causal_mod, 2, 1, 40, 70, device="cpu", BLOCK_SIZE=(16, 8), compute_dq_write_order=True),
    lambda f: f(_causal_mod, 1, 1, 0, 0, "cpu"),                                # empty: Q = K = 0
    lambda f: f(_causal_mod, 2, 1, 0, 16, "cpu", 8),
    lambda f: f(_causal_mod, 2, 1, 16, 0, "cpu", 8),
    lambda f: f(_causal_mod, 0, 1, 16, 16, "cpu"),                              # B = 0
    lambda f: f(_causal_mod, 1, 0, 16, 16, "cpu", separate_full_blocks=False),  # H = 0
], ids=["device", "block", "keywords", "no-full-blocks", "dq-write-order", "empty", "no-queries", "no-keys",
        "no-batch", "no-heads"])
def test_create_block_mask_takes_torchs_whole_signature(call: Callable[..., Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = call(torch_create_block_mask)
    got = call(attnrs.create_block_mask)
    _assert_same_block_mask(got, expected)
    if expected.dq_write_order is not None:
        assert torch.equal(got.dq_write_order, expected.dq_write_order)
        assert got.dq_kv_order_spt == expected.dq_kv_order_spt


def test_create_block_mask_accepts_compile_and_refuses_non_bool_flags() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch_create_block_mask(_causal_mod, 1, 1, 40, 40, "cpu", 16)
    _assert_same_block_mask(attnrs.create_block_mask(_causal_mod, 1, 1, 40, 40, "cpu", 16, _compile=True), expected)
    with pytest.raises(attnrs.ArgumentError, match="separate_full_blocks"):
        attnrs.create_block_mask(_causal_mod, 1, 1, 40, 40, separate_full_blocks="no")
    with pytest.raises(attnrs.ArgumentError, match="B: expected a non-negative"):
        attnrs.create_block_mask(_causal_mod, -1, 1, 40, 40)


def test_an_attnrs_block_mask_without_full_blocks_still_masks_in_attention() -> None:
    q, k = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 70, 16)
    block_mask = attnrs.create_block_mask(masks.sliding_window(9), 1, 1, 40, 70, "cpu", 16, separate_full_blocks=False)
    assert block_mask.full_kv_num_blocks is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = flex_attention(q, k, k, block_mask=block_mask)
    torch.testing.assert_close(attnrs.attention(q, k, k, block_mask), expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(attnrs.attention(q, k, k, masks.sliding_window(9)), expected, atol=2e-5, rtol=2e-5)
