"""attnrs's mask builders plugged into transformers' mask creation: the cases of transformers'
tests/utils/test_masking_utils.py reproduced, and random calls compared with transformers' own builders."""

from __future__ import annotations

import types

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnrs
from attnrs import mask_builders

transformers = pytest.importorskip("transformers")
mu = pytest.importorskip("transformers.masking_utils")
from transformers import DynamicCache, LlamaConfig  # noqa: E402
from transformers.modeling_utils import AttentionInterface as HFAttentionInterface  # noqa: E402

# The packed-sequence expectation of transformers' test_masking_utils.py: documents of 4, 2, 4 and 6, 4 tokens.
PACKED_POSITION_IDS = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])


def _block_causal(lengths: list[int]) -> torch.Tensor:
    total = sum(lengths)
    out = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in lengths:
        out[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    return out


EXPECTED_PACKED = torch.stack([_block_causal([4, 2, 4]), _block_causal([6, 4])])[:, None]


@contextlib.contextmanager
def registered(builder: Callable[..., Any]) -> Iterator[str]:
    """Registers ``builder`` as a transformers mask builder (with sdpa attention) under a fresh name."""
    name = f"attnrs_test_{uuid.uuid4().hex[:8]}"
    HFAttentionInterface.register(name, HFAttentionInterface._global_mapping["sdpa"])
    mu.AttentionMaskInterface.register(name, builder)
    try:
        yield name
    finally:
        HFAttentionInterface._global_mapping.pop(name)
        mu.AttentionMaskInterface._global_mapping.pop(name)


def _config(name: str, **kwargs: Any) -> Any:
    config = LlamaConfig(**kwargs)
    config._attn_implementation = name
    return config


def test_packed_sequences() -> None:
    embeds = torch.empty(2, 10, dtype=torch.float16)
    for builder, expected in (
        (mask_builders.sdpa_mask, EXPECTED_PACKED),
        (mask_builders.eager_mask, torch.where(EXPECTED_PACKED, 0.0, torch.finfo(torch.float16).min)),
    ):
        with registered(builder) as name:
            mask = mu.create_causal_mask(
                config=_config(name), inputs_embeds=embeds, attention_mask=None, cache=None,
                position_ids=PACKED_POSITION_IDS,
            )
        assert mask.shape == (2, 1, 10, 10)
        assert torch.equal(mask, expected.to(mask.dtype))


def test_packed_sequences_become_a_structural_block_mask() -> None:
    with registered(mask_builders.attnrs_mask) as name:
        mask = mu.create_causal_mask(
            config=_config(name), inputs_embeds=torch.empty(2, 10), attention_mask=None, cache=None,
            position_ids=PACKED_POSITION_IDS,
        )
    assert isinstance(mask, attnrs.BlockMask)
    assert mask.attnrs_mask is not None and mask.attnrs_mask.is_structural  # the remap was recognised exactly

    def expected_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return EXPECTED_PACKED[b, h, q, kv]

    expected = torch.nn.attention.flex_attention.create_block_mask(expected_mod, 2, None, 10, 10, device="cpu")
    assert mask.to_string() == expected.to_string()
    assert torch.equal(mask.to_dense(), expected.to_dense())


def test_nonpacked_sequences_skip_the_mask() -> None:
    with registered(mask_builders.sdpa_mask) as name:
        mask = mu.create_causal_mask(
            config=_config(name), inputs_embeds=torch.empty(2, 10), attention_mask=None, cache=None,
            position_ids=torch.arange(10)[None],
        )
    assert mask is None


def test_chunked_mask_with_left_padding_and_large_prefill() -> None:
    attention_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [1] * 8])
    position_ids = torch.stack([torch.tensor([1, 1, 1, 1, 0, 1, 2, 3]), torch.arange(8)])
    with registered(mask_builders.sdpa_mask) as name:
        mask = mu.create_chunked_causal_mask(
            config=_config(name, attention_chunk_size=3), inputs_embeds=torch.empty(2, 8, dtype=torch.float16),
            attention_mask=attention_mask, cache=None, position_ids=position_ids,
        )
    # Row 0: chunks start at the first real token (index 4): {4, 5, 6}, {7}. Row 1: {0, 1, 2}, {3, 4, 5}, {6, 7}.
    expected = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    for row, chunks in ((0, [(4, 7), (7, 8)]), (1, [(0, 3), (3, 6), (6, 8)])):
        for start, stop in chunks:
            n = stop - start
            expected[row, 0, start:stop, start:stop] = torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(mask, expected)


def test_chunked_mask_with_left_padding_decoding() -> None:
    config = _config("sdpa", attention_chunk_size=4, num_hidden_layers=1)
    cache = DynamicCache(config=config)
    fake_kv = torch.rand(2, 32, 8, 32)
    cache.update(fake_kv, fake_kv, 0)
    attention_mask = torch.tensor([[0] * 7 + [1, 1], [1] * 9])
    with registered(mask_builders.sdpa_mask) as name:
        config._attn_implementation = name
        mask = mu.create_chunked_causal_mask(
            config=config, inputs_embeds=torch.empty(2, 1, dtype=torch.float16), attention_mask=attention_mask,
            cache=cache, position_ids=torch.tensor([[1], [8]]),
        )
    # The sliding cache keeps the last 3 keys plus the new one (positions 5..8). Row 0's only chunk starts at 7;
    # row 1's chunks are 0-3, 4-7, 8, so its last token sees only itself.
    expected = torch.tensor([[[[False, False, True, True]]], [[[False, False, False, True]]]])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("builder", [mask_builders.sdpa_mask, mask_builders.eager_mask])
def test_bidirectional_masks_skip_only_without_padding(builder: Callable[..., Any]) -> None:
    embeds = torch.ones(2, 10, 1)
    encoder_states = torch.ones(2, 5, 1)
    with registered(builder) as name:
        config = _config(name)
        for attention_mask, states in ((None, None), (torch.ones(2, 10), None), (torch.ones(2, 5), encoder_states)):
            kwargs = {"encoder_hidden_states": states} if states is not None else {}
            assert mu.create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=attention_mask,
                                                **kwargs) is None
        padded = torch.ones(2, 5)
        padded[:, -1] = 0
        mask = mu.create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=padded,
                                            encoder_hidden_states=encoder_states)
    assert mask is not None and mask.shape == (2, 1, 10, 5)
    visible = mask if mask.dtype == torch.bool else mask == 0
    assert bool(visible[..., :4].all()) and not bool(visible[..., 4].any())


# Random calls with transformers' keyword signature: every builder gives what transformers' own gives.
@st.composite
def builder_calls(draw: st.DrawFn) -> dict[str, Any]:
    batch = draw(st.integers(1, 3))
    q_length = draw(st.integers(1, 24))
    kv_offset = draw(st.integers(0, 8))
    kv_length = draw(st.integers(1, 24))
    q_offset = draw(st.integers(0, kv_offset + kv_length))
    kind = draw(st.sampled_from(["causal", "sliding", "chunked", "bidirectional"]))
    seen = draw(st.integers(max(1, kv_offset), kv_offset + kv_length + 4))  # shorter or longer than needed
    padded = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    attention_mask = None
    if padded:
        attention_mask = torch.ones(batch, seen, dtype=torch.bool)
        for b in range(batch):
            attention_mask[b, : int(torch.randint(0, seen, (1,), generator=gen))] = False
    window = draw(st.integers(1, 10))
    kwargs: dict[str, Any] = {}
    if kind == "causal":
        fn = mu.causal_mask_function
    elif kind == "sliding":
        fn = mu.sliding_window_causal_mask_function(window)
        kwargs["local_size"] = window
    elif kind == "chunked":
        fn = mu.chunked_causal_mask_function(window, torch.randint(0, 4, (batch,), generator=gen))
        kwargs["local_size"] = window
    else:
        fn = mu.bidirectional_mask_function
        kwargs["allow_is_bidirectional_skip"] = draw(st.booleans())
    return dict(
        batch_size=batch, q_length=q_length, kv_length=kv_length, q_offset=torch.tensor(q_offset) if draw(
            st.booleans()) else q_offset, kv_offset=kv_offset, mask_function=fn, attention_mask=attention_mask,
        allow_is_causal_skip=draw(st.booleans()) and kind != "bidirectional", dtype=torch.float32,
        use_vmap=draw(st.booleans()), device="cpu", config=None, **kwargs,
    )


@given(builder_calls())
def test_sdpa_and_eager_builders_match_transformers(call: dict[str, Any]) -> None:
    for ours, theirs in ((mask_builders.sdpa_mask, mu.sdpa_mask), (mask_builders.eager_mask, mu.eager_mask)):
        expected = theirs(**call)
        got = ours(**call)
        if expected is None:
            assert got is None
            continue
        assert got is not None and got.shape == expected.shape and got.dtype == expected.dtype
        assert torch.equal(got, expected)


@given(builder_calls())
def test_block_mask_builders_match_torch(call: dict[str, Any]) -> None:
    """What transformers' flex_attention_mask builds (an offset-shifted mask_mod), but without compiling."""
    padding_mask = call["attention_mask"]
    fn = call["mask_function"]
    if padding_mask is not None and not bool(padding_mask.all()):
        padding_mask = mu.prepare_padding_mask(padding_mask, call["kv_length"], call["kv_offset"])
        fn = mu.and_masks(fn, mu.padding_mask_function(padding_mask))
    fn = mu.add_offsets_to_mask_function(fn, int(call["q_offset"]), call["kv_offset"])
    expected = torch.nn.attention.flex_attention.create_block_mask(
        fn, call["batch_size"], None, call["q_length"], call["kv_length"], device="cpu"
    )
    flex_family = types.SimpleNamespace(model_type="llama")  # "attnrs" gives families with flex support a BlockMask
    for builder in (mask_builders.flex_attention_mask, mask_builders.attnrs_mask):
        got = builder(**{**call, "config": flex_family})
        assert isinstance(got, attnrs.BlockMask)
        assert torch.equal(got.to_dense(), expected.to_dense())
        assert torch.equal(got.kv_num_blocks, expected.kv_num_blocks)
        assert torch.equal(got.full_kv_num_blocks, expected.full_kv_num_blocks)


def test_the_old_cache_position_signature() -> None:
    kwargs = dict(batch_size=1, kv_length=6, mask_function=mu.causal_mask_function, allow_is_causal_skip=False)
    old = mask_builders.sdpa_mask(cache_position=torch.arange(3, 6), **kwargs)
    new = mask_builders.sdpa_mask(q_length=3, q_offset=3, **kwargs)
    assert torch.equal(old, new)


def test_block_masks_pass_transformers_precomputed_mask_check() -> None:
    mask = mask_builders.attnrs_mask(batch_size=2, q_length=3, kv_length=5, mask_function=mu.causal_mask_function,
                                     config=types.SimpleNamespace(model_type="llama"))
    # _preprocess_mask_arguments returns a 4-D Tensor or BlockMask unchanged.
    assert isinstance(mask, torch.nn.attention.flex_attention.BlockMask) and len(mask.shape) == 4
    early_exit, returned, *_ = mu._preprocess_mask_arguments(
        _config("sdpa"), torch.empty(2, 3, 8), mask, None, None, 0
    )
    assert early_exit and returned is mask
