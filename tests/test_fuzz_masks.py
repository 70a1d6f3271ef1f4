"""Fuzzing the masks (issue #15): random Mask values (structural pieces, mask_mods, ``&``/``|``/``~``, shifts)
evaluated three ways must agree with the references written here from the documented definitions: in Rust
(``attnrs.create_dense_mask``, bool and additive), as a mask_mod (``mask(b, h, q_idx, kv_idx)`` with tensors), and
as block tables (``attnrs.create_block_mask`` against torch's ``create_block_mask``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from fuzz_support import evaluate_ref, fuzz_settings, mask_specs, size
from hypothesis import assume, given, note
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

import attnrs
from attnrs import masks


@st.composite
def grids(draw: st.DrawFn, negative: bool = False) -> tuple[int, int, int, int, int, int]:
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    q_len, kv_len = draw(st.integers(0, size(40, 300))), draw(st.integers(0, size(40, 300)))
    low = -8 if negative else 0
    q_offset, kv_offset = draw(st.integers(low, 10)), draw(st.integers(low, 10))
    if negative:
        assume(q_offset < 0 or kv_offset < 0)
    return batch, heads, q_len, kv_len, q_offset, kv_offset


def _python_call(mask: object, batch: int, heads: int, q_len: int, kv_len: int, qo: int, ko: int) -> torch.Tensor:
    m = masks.as_mask(mask)  # type: ignore[arg-type]
    return evaluate_ref(m, batch, heads, q_len, kv_len, qo, ko)


@fuzz_settings(150)
@given(st.data(), grids())
def test_rust_python_and_reference_evaluations_agree(data: st.DataObject, grid: tuple[int, ...]) -> None:
    batch, heads, q_len, kv_len, qo, ko = grid
    spec = data.draw(mask_specs(batch, max(qo + q_len, ko + kv_len)))
    note(spec.text)
    assume("mask_mod" not in spec.text or q_len * kv_len > 0)
    expected = evaluate_ref(spec.ref, batch, heads, q_len, kv_len, qo, ko)
    dense = attnrs.create_dense_mask(spec.mask, batch, heads, q_len, kv_len, q_offset=qo, kv_offset=ko)
    assert dense.dtype == torch.bool and dense.shape[0] == batch and dense.shape[2:] == (q_len, kv_len)
    assert torch.equal(dense.expand(batch, heads, q_len, kv_len), expected), "create_dense_mask differs"
    additive = attnrs.create_dense_mask(spec.mask, batch, heads, q_len, kv_len, q_offset=qo, kv_offset=ko,
                                        dtype=torch.float16)  # fmt: skip
    assert torch.equal(additive.expand_as(expected) == 0, expected), "the additive mask differs"
    if q_len * kv_len:
        minimum = torch.finfo(torch.float16).min
        assert bool((additive.expand_as(expected)[~expected] == minimum).all())
    python = _python_call(spec.mask, batch, heads, q_len, kv_len, qo, ko)
    assert torch.equal(python, expected), "the Mask called as a mask_mod differs"


@fuzz_settings(40)
@given(st.data(), grids(negative=True))
def test_rust_evaluation_at_negative_positions_matches_the_reference(
    data: st.DataObject, grid: tuple[int, ...]
) -> None:
    """Offsets may place rows or keys before position 0 (a KV-cache placement with Q > K): positions outside
    a table see nothing (document) or are padding; the other pieces are formulas on positions."""
    batch, heads, q_len, kv_len, qo, ko = grid
    spec = data.draw(mask_specs(batch, max(qo + q_len, ko + kv_len)))
    note(spec.text)
    assume("mask_mod" not in spec.text or q_len * kv_len > 0)
    expected = evaluate_ref(spec.ref, batch, heads, q_len, kv_len, qo, ko)
    dense = attnrs.create_dense_mask(spec.mask, batch, heads, q_len, kv_len, q_offset=qo, kv_offset=ko)
    assert torch.equal(dense.expand(batch, heads, q_len, kv_len), expected), "create_dense_mask differs"


@fuzz_settings(40)
@given(st.data(), grids(negative=True))
def test_python_evaluation_at_negative_positions_agrees_with_rust(data: st.DataObject, grid: tuple[int, ...]) -> None:
    """The same as a mask_mod: ``mask(b, h, q, kv)`` with tensors must agree with the Rust evaluation."""
    batch, heads, q_len, kv_len, qo, ko = grid
    spec = data.draw(mask_specs(batch, max(qo + q_len, ko + kv_len)))
    note(spec.text)
    assume(q_len * kv_len > 0)
    rust = attnrs.create_dense_mask(spec.mask, batch, heads, q_len, kv_len, q_offset=qo, kv_offset=ko)
    python = _python_call(spec.mask, batch, heads, q_len, kv_len, qo, ko)
    assert torch.equal(python, rust.expand_as(python))


@pytest.mark.parametrize("mask", [masks.bidirectional(), ~masks.bidirectional()], ids=["bidirectional", "negated"])
def test_bidirectional_as_a_mask_mod_agrees_with_rust_at_negative_positions(mask: masks.Mask) -> None:
    for qo, ko in [(-2, 0), (0, -3), (-4, -4)]:
        rust = attnrs.create_dense_mask(mask, 1, 1, 6, 6, q_offset=qo, kv_offset=ko)
        python = _python_call(mask, 1, 1, 6, 6, qo, ko)
        assert torch.equal(python, rust.expand_as(python)), (qo, ko)


@fuzz_settings(40)
@given(st.data(), grids())
def test_block_tables_equal_torchs_create_block_mask(data: st.DataObject, grid: tuple[int, ...]) -> None:
    batch, heads, q_len, kv_len, qo, ko = grid
    assume(q_len > 0 and kv_len > 0)
    spec = data.draw(mask_specs(batch, max(qo + q_len, ko + kv_len)))
    note(spec.text)
    block = data.draw(st.sampled_from([16, 32, 128, (16, 32), (32, 16)]))
    per_batch = any(t.dim() and t.shape[0] > 1 for t in spec.tables)  # its tables' batch must match B
    mb = batch if per_batch else data.draw(st.sampled_from([None, batch]))
    mh = data.draw(st.sampled_from([None, heads]))
    ours = attnrs.create_block_mask(spec.mask, mb, mh, q_len, kv_len, BLOCK_SIZE=block, q_offset=qo, kv_offset=ko)

    def shifted(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return spec.ref(b, h, q + qo, kv + ko)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch_create_block_mask(shifted, mb, mh, q_len, kv_len, device="cpu", BLOCK_SIZE=block)
    assert ours.shape == theirs.shape
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    for counts, name in (
        ("kv_num_blocks", "kv_indices"),
        ("full_kv_num_blocks", "full_kv_indices"),
        ("q_num_blocks", "q_indices"),
        ("full_q_num_blocks", "full_q_indices"),
    ):
        n = getattr(theirs, counts)
        a, b = getattr(ours, name), getattr(theirs, name)
        listed = torch.arange(a.shape[-1]) < n[..., None]
        assert torch.equal(a[listed], b[listed]), name
