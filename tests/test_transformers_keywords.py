"""Every keyword transformers' families pass to an attention function is honoured or refused by name, and the
"attnrs" mask builder gives each family the mask form its code can use. The references are the families' own
eager functions and mask code from the installed transformers."""

from __future__ import annotations

import copy
import types
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnrs  # noqa: E402
from attnrs.integrations.transformers import attention_forward  # noqa: E402
from attnrs.integrations.transformers.mask_builders import (  # noqa: E402
    DenseStructure,
    attention_forward_mask,
    eager_mask,
    supports_flex_attention,
)


def _module(heads: int = 4, kv_heads: int = 2, **attributes: Any) -> torch.nn.Module:
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads  # type: ignore[assignment]
    module.is_causal = True  # type: ignore[assignment]
    for name, value in attributes.items():
        setattr(module, name, value)
    return module.eval()


def _qkv(b: int = 2, h: int = 4, h_kv: int = 2, q: int = 9, k: int = 9, d: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, h, q, d, generator=g), torch.randn(b, h_kv, k, d, generator=g),
            torch.randn(b, h_kv, k, d, generator=g))


def _causal_additive(b: int, q: int, k: int, padded: int = 3) -> torch.Tensor:
    visible = torch.ones(q, k, dtype=torch.bool).tril(k - q).expand(b, 1, q, k).clone()
    visible[1, ..., :padded] = False
    visible[1, 0, :padded, 0] = True  # padded query rows see one key, so eager's uniform rows do not differ
    return torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)


def test_per_row_sinks_match_inkling2s_eager() -> None:
    from transformers.models.inkling2.modeling_inkling2 import eager_attention_forward

    q, k, v = _qkv()
    mask = _causal_additive(2, 9, 9)
    sinks = torch.randn(2, 4, 9, 1, generator=torch.Generator().manual_seed(3))
    module = _module()
    want, _ = eager_attention_forward(module, q, k, v, mask, scaling=0.25, sinks=sinks)
    got, _ = attention_forward(module, q, k, v, mask, scaling=0.25, sinks=sinks)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    got_rows, _ = attention_forward(module, q, k, v, mask, scaling=0.25, sinks=sinks[..., 0])  # [B, H, Q]
    torch.testing.assert_close(got_rows, want, atol=2e-5, rtol=2e-5)
    # And the gradients flow through the per-row sinks (they are a learned projection in inkling2).
    sinks.requires_grad_(True)
    attention_forward(module, q, k, v, mask, scaling=0.25, sinks=sinks)[0].sum().backward()
    assert sinks.grad is not None and bool(sinks.grad.abs().sum() > 0)


def test_top_k_indices_match_deepseek_v32s_eager_selection() -> None:
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import eager_attention_forward

    q, k, v = _qkv(k=9)
    mask = _causal_additive(2, 9, 9)
    topk = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(s))[:4] for s in range(18)])
    topk = topk.reshape(2, 9, 4).to(torch.int32)
    # deepseek_v32's eager path: True at the keys not selected, folded into the additive mask.
    index_mask = topk.new_ones((2, 9, 9), dtype=torch.bool).scatter(-1, topk.long(), False).unsqueeze(1)
    module = _module()
    want, _ = eager_attention_forward(module, q, k, v, mask.masked_fill(index_mask, torch.finfo(torch.float32).min),
                                      scaling=0.25)
    got, _ = attention_forward(module, q, k, v, mask, scaling=0.25, indices=topk)
    rows = (~index_mask[:, 0] & (mask[:, 0] == 0)).any(-1)  # rows that keep a key (others: eager is uniform)
    torch.testing.assert_close(got[rows], want[rows], atol=2e-5, rtol=2e-5)


def test_block_indices_match_minimax_m3s_block_mask() -> None:
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLIndexer, eager_attention_forward

    q, k, v = _qkv(k=13)
    block_size, heads = 4, 4
    fake = types.SimpleNamespace(block_size=block_size, config=types.SimpleNamespace(num_attention_heads=heads))
    blocks = torch.tensor([[0, 2], [1, -1]]).repeat(5, 1)[:9].expand(2, 1, 9, 2)  # [B, H_idx=1, Q, topk]; -1: none
    positions = torch.arange(4, 13).expand(2, -1)
    additive = MiniMaxM3VLIndexer.build_block_mask(fake, blocks, None, 13, torch.float32, torch.device("cpu"),
                                                   positions)
    module = _module(indexer=fake)
    want, _ = eager_attention_forward(module, q, k, v, additive, scaling=0.25)
    causal = torch.ones(9, 13, dtype=torch.bool).tril(4)
    got, _ = attention_forward(module, q, k, v, causal.expand(2, 1, 9, 13), scaling=0.25, block_indices=blocks)
    rows = (additive == 0).any(-1)[:, 0]
    torch.testing.assert_close(got[rows], want[rows], atol=2e-5, rtol=2e-5)
    with pytest.raises(attnrs.UnsupportedError, match="block_indices"):
        attention_forward(_module(), q, k, v, None, block_indices=blocks)


def test_unknown_keywords_are_refused_by_name_and_known_ones_ignored() -> None:
    q, k, v = _qkv()
    with pytest.raises(attnrs.UnsupportedError, match="alibi_slopes"):
        attention_forward(_module(), q, k, v, None, alibi_slopes=torch.ones(4))
    out, _ = attention_forward(_module(), q, k, v, None, use_cache=True, max_length_q=9, output_router_logits=False,
                               encoder_hidden_states=torch.ones(1))
    want, _ = attention_forward(_module(), q, k, v, None)
    assert torch.equal(out, want)


def test_sinks_and_s_aux_together_are_refused() -> None:
    """Two names of one argument: attnrs would otherwise keep one and drop the other silently."""
    q, k, v = _qkv()
    a, b = torch.randn(4), torch.randn(4)
    with pytest.raises(attnrs.ArgumentError, match="sinks and s_aux"):
        attention_forward(_module(), q, k, v, None, sinks=a, s_aux=b)
    out, _ = attention_forward(_module(), q, k, v, None, sinks=a, s_aux=a)  # the same tensor under both names
    want, _ = attention_forward(_module(), q, k, v, None, s_aux=a)
    assert torch.equal(out, want)


def test_position_bias_is_checked_by_name() -> None:
    q, k, v = _qkv()
    with pytest.raises(attnrs.ShapeError, match="position_bias"):
        attention_forward(_module(), q, k, v, None, position_bias=torch.zeros(1, 4, 9, 10))
    with pytest.raises(attnrs.DtypeError, match="position_bias"):
        attention_forward(_module(), q, k, v, None, position_bias=[[0.0]])
    bias = torch.randn(4, 9, 9)  # [H, Q, K] broadcasts as well
    out, _ = attention_forward(_module(), q, k, v, None, position_bias=bias)
    want, _ = attention_forward(_module(), q, k, v, None, position_bias=bias[None].expand(2, 4, 9, 9))
    torch.testing.assert_close(out, want)


def test_a_non_positive_sliding_window_means_no_window() -> None:
    q, k, v = _qkv()
    want, _ = attention_forward(_module(), q, k, v, None)
    for window in (0, -1):
        got, _ = attention_forward(_module(), q, k, v, None, sliding_window=window)
        assert torch.equal(got, want)


def _builder_kwargs(model_type: str) -> dict[str, Any]:
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, :3] = 0
    return dict(batch_size=2, q_length=9, kv_length=9, attention_mask=padding, dtype=torch.float32,
                config=types.SimpleNamespace(model_type=model_type))


def test_the_attnrs_mask_builder_follows_the_familys_declared_flex_support() -> None:
    assert supports_flex_attention("llama") and not supports_flex_attention("git")
    assert not supports_flex_attention("doge")  # declares it, but merges only tensor masks (see DENSE_DESPITE_FLEX)
    assert isinstance(attention_forward_mask(**_builder_kwargs("llama")), attnrs.BlockMask)
    dense = attention_forward_mask(**_builder_kwargs("git"))
    assert isinstance(dense, torch.Tensor) and dense.dtype == torch.float32
    assert torch.equal(dense, eager_mask(**_builder_kwargs("git")))  # eager's additive form, exactly


def test_the_builders_dense_mask_keeps_its_structure_until_it_is_changed() -> None:
    dense = attention_forward_mask(**_builder_kwargs("git"))
    assert isinstance(dense, torch.Tensor)
    structure = DenseStructure.of(dense)
    assert structure is not None and structure.mask.is_structural
    q, k, v = _qkv()
    structural, _ = attention_forward(_module(), q, k, v, dense)
    plain, _ = attention_forward(_module(), q, k, v, dense.clone())  # a copy carries no structure: the dense path
    real = torch.tensor([[True] * 9, [False] * 3 + [True] * 6])
    torch.testing.assert_close(structural[real], plain[real], atol=2e-6, rtol=2e-6)
    dense[0, 0, 5, :] = torch.finfo(torch.float32).min  # changed in place: the structure no longer describes it
    assert DenseStructure.of(dense) is None


def test_score_mod_reaches_the_attention_function_and_a_models_layers() -> None:
    """``score_mod`` is attnrs's keyword: given to the attention function (or to a model's forward, which passes
    extra keywords down to it) it means what it means for attnrs.attention."""
    from attnrs import scores

    q, k, v = _qkv()
    out, _ = attention_forward(_module(), q, k, v, None, score_mod=scores.alibi(4))
    want = attnrs.attention(q, k, v, is_causal=True, score_mod=scores.alibi(4)).transpose(1, 2)
    torch.testing.assert_close(out, want)

    transformers = pytest.importorskip("transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    heads = 4
    slopes = scores.alibi_slopes(heads)

    def sdpa_with_dense_alibi(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kw: Any) -> Any:
        # The reference users build today: the dense ALiBi bias added to the additive causal mask.
        q_len, kv_len = query.shape[2], key.shape[2]
        rel = torch.arange(kv_len)[None, :] - torch.arange(q_len)[:, None] - (kv_len - q_len)
        bias = slopes[:, None, None] * rel
        causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
        mask = bias.masked_fill(~causal, float("-inf"))[None].to(query.dtype)
        return sdpa_attention_forward(module, query, key, value, mask, **{**kw, "is_causal": False})

    transformers.AttentionInterface.register("sdpa_dense_alibi_test", sdpa_with_dense_alibi)
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        vocab_size=97,
        intermediate_size=96,
        initializer_range=0.1,  # weights large enough that the bias shows in the logits, not so large that one key wins
    )
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (1, 12))
    got_model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="attnrs").eval()
    ref_model = transformers.LlamaForCausalLM._from_config(
        copy.deepcopy(config), attn_implementation="sdpa_dense_alibi_test"
    )  # its own config: _from_config writes the implementation into the config it is given
    ref_model.load_state_dict(got_model.state_dict())
    with torch.no_grad():
        got = got_model(ids, score_mod=scores.alibi(slopes)).logits
        plain = got_model(ids).logits
        ref = ref_model.eval()(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-2, (got - plain).abs().max()
