"""Recognition of transformers' FlexAttention score_mod closures (attnrs.scores.recognise).

The closures are the real ones: transformers' ``flex_attention_forward`` (and DOGE's) is called with small
tensors and the ``score_mod`` it hands to FlexAttention is captured (the FlexAttention call itself is stubbed),
so a change in the installed transformers shows here. Lookalikes (same names and cells, other code) are not
recognised.
"""

from __future__ import annotations

import math
import types
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import transformers.integrations.flex_attention as hf_flex

from attnrs.scores.recognise import (
    is_identity_score_mod,
    recognise_transformers_score_mod,
)

B, H, Q, K, D = 2, 4, 3, 5, 8


def _captured(monkeypatch: pytest.MonkeyPatch, module: Any, forward: Any, **kwargs: Any) -> Any:
    """The score_mod ``forward`` passes to FlexAttention (stubbed in ``module``)."""
    seen: dict[str, Any] = {}

    def stub(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **options: Any) -> Any:
        seen.update(options)
        out = torch.zeros(*query.shape[:-1], value.shape[-1])
        return (out, torch.zeros(query.shape[:-1])) if options.get("return_lse") else out

    monkeypatch.setattr(module, "compile_friendly_flex_attention", stub)
    q, k, v = torch.randn(B, H, Q, D), torch.randn(B, H, K, D), torch.randn(B, H, K, D)
    forward(torch.nn.Module().eval(), q, k, v, **{"attention_mask": None, **kwargs})
    return seen["score_mod"]


def _dense(score_mod: Any, scores: torch.Tensor) -> torch.Tensor:
    """``score_mod`` at every [b, h, q, kv], through broadcast index tensors (as a vmap would see them)."""
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(H)[None, :, None, None]
    q = torch.arange(Q)[None, None, :, None]
    kv = torch.arange(K)[None, None, None, :]
    out = torch.empty_like(scores)
    for i in range(B):
        for j in range(H):
            for r in range(Q):
                for c in range(K):
                    out[i, j, r, c] = score_mod(
                        scores[i, j, r, c], b[i, 0, 0, 0], h[0, j, 0, 0], q[0, 0, r, 0], kv[0, 0, 0, c]
                    )
    return out


def _formula(parts: dict[str, Any], scores: torch.Tensor) -> torch.Tensor:
    """What the recognised parts mean, with plain broadcasting."""
    s = scores
    if parts["softcap"] is not None:
        s = parts["softcap"] * torch.tanh(s / parts["softcap"])
    mask = parts["score_mask"]
    if mask is not None:
        s = s + (mask if parts["score_mask_per_head"] else mask[:, :1])
    if parts["position_bias"] is not None:
        s = s + parts["position_bias"]
    return s


@pytest.mark.parametrize("softcap", [None, 30.0, 5])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_transformers_flex_closure(
    monkeypatch: pytest.MonkeyPatch, softcap: Any, with_mask: bool, with_bias: bool
) -> None:
    mask = torch.randn(B, 1, Q, K + 2) if with_mask else None  # longer than the keys: transformers cuts it
    bias = torch.randn(B, H, Q, K) if with_bias else None
    fn = _captured(
        monkeypatch, hf_flex, hf_flex.flex_attention_forward, attention_mask=mask, softcap=softcap, position_bias=bias
    )
    parts = recognise_transformers_score_mod(fn)
    assert parts is not None
    assert parts["source"] == "transformers.integrations.flex_attention"
    assert parts["score_mask_per_head"] is False
    assert parts["softcap"] == (None if softcap is None else float(softcap))
    assert isinstance(parts["softcap"], (float, type(None)))
    assert parts["position_bias"] is bias
    if mask is None:
        assert parts["score_mask"] is None
    else:
        assert torch.equal(parts["score_mask"], mask[..., :K])
    scores = torch.randn(B, H, Q, K) * 10
    torch.testing.assert_close(_formula(parts, scores), _dense(fn, scores))


def test_a_per_head_mask_is_read_at_head_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers indexes score_mask[b][0][q][kv]: a [B, H, Q, K] mask contributes its first head only."""
    mask = torch.randn(B, H, Q, K)
    fn = _captured(monkeypatch, hf_flex, hf_flex.flex_attention_forward, attention_mask=mask)
    parts = recognise_transformers_score_mod(fn)
    assert parts is not None and torch.equal(parts["score_mask"], mask) and not parts["score_mask_per_head"]
    scores = torch.randn(B, H, Q, K)
    torch.testing.assert_close(_dense(fn, scores), scores + mask[:, :1])


def test_a_block_mask_leaves_no_score_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, Q, K, device="cpu")
    fn = _captured(monkeypatch, hf_flex, hf_flex.flex_attention_forward, attention_mask=block_mask, softcap=2.0)
    assert recognise_transformers_score_mod(fn) == {
        "softcap": 2.0,
        "score_mask": None,
        "position_bias": None,
        "score_mask_per_head": False,
        "source": "transformers.integrations.flex_attention",
    }


def test_doge_closure(monkeypatch: pytest.MonkeyPatch) -> None:
    doge = pytest.importorskip("transformers.models.doge.modeling_doge")
    mask = torch.randn(B, H, Q, K)
    fn = _captured(monkeypatch, doge, doge.flex_attention_forward, attention_mask=mask, softcap=3.0)
    parts = recognise_transformers_score_mod(fn)
    assert parts is not None
    assert parts["source"] == "transformers.models.doge.modeling_doge"
    assert parts["score_mask_per_head"] is True and torch.equal(parts["score_mask"], mask) and parts["softcap"] == 3.0
    assert parts["position_bias"] is None
    scores = torch.randn(B, H, Q, K) * 5
    torch.testing.assert_close(_formula(parts, scores), _dense(fn, scores))


def _lookalike() -> Any:
    softcap, score_mask, position_bias = 1.0, None, None

    def flex_attention_forward() -> Any:
        def score_mod(score: Any, batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
            if softcap is not None:
                score = softcap * torch.tanh(score / softcap)
            if score_mask is not None:
                score = score + score_mask[batch_idx][0][q_idx][kv_idx]
            if position_bias is not None:
                score = score + position_bias[batch_idx, head_idx, q_idx, kv_idx]
            return score * 2  # not transformers' closure

        return score_mod

    return flex_attention_forward()


def test_lookalikes_are_not_recognised(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _lookalike()
    assert fake.__code__.co_qualname.endswith("score_mod")
    assert set(fake.__code__.co_freevars) == {"softcap", "score_mask", "position_bias"}
    assert recognise_transformers_score_mod(fake) is None
    # the same code with the fake's cells but transformers' globals: the code object is still not transformers'
    spoofed = types.FunctionType(fake.__code__, hf_flex.__dict__, "score_mod", None, fake.__closure__)
    assert recognise_transformers_score_mod(spoofed) is None
    # transformers' code under other globals (not the installed module)
    real = _captured(monkeypatch, hf_flex, hf_flex.flex_attention_forward, softcap=1.0)
    moved = types.FunctionType(
        real.__code__, {"__name__": "elsewhere", "torch": torch}, "score_mod", None, real.__closure__
    )
    assert recognise_transformers_score_mod(moved) is None
    for other in (None, 1.0, torch.tanh, lambda s, b, h, q, kv: s, hf_flex.flex_attention_forward, print):
        assert recognise_transformers_score_mod(other) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"softcap": torch.tensor(30.0)},  # a tensor softcap: not a number the kernel takes
        {"softcap": True},
        {"softcap": float("inf")},
        {"softcap": 0.0},
        {"attention_mask": torch.ones(B, 1, Q, K, dtype=torch.bool)},  # a bool mask would be added as 0/1
        {"position_bias": torch.randn(H, Q, K)},  # not 4-D
    ],
)
def test_unexpected_values_are_not_recognised(monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any]) -> None:
    fn = _captured(monkeypatch, hf_flex, hf_flex.flex_attention_forward, **{"attention_mask": None, **kwargs})
    assert recognise_transformers_score_mod(fn) is None


def test_torch_identity() -> None:
    from torch.nn.attention import flex_attention

    assert is_identity_score_mod(flex_attention._identity)
    assert not is_identity_score_mod(lambda score, b, h, q, kv: score)
    assert not is_identity_score_mod(flex_attention.noop_mask)  # a mask_mod, not a score_mod
    assert not is_identity_score_mod(None)


# ---------------------------------------------------------------------------------------------------------------
# The dense biases families compute before calling the attention function, against the structural formulas that
# docs/score_mods_in_transformers.md gives for them (written here in plain torch, independently of transformers).


def t5_buckets(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of ``relative = kv_position - q_position``."""
    n, bucket = num_buckets, torch.zeros_like(relative)
    if bidirectional:
        n //= 2
        bucket = bucket + (relative > 0).long() * n  # keys after the query: the upper half
        distance = relative.abs()
    else:
        distance = (-relative).clamp_min(0)  # keys after the query share bucket 0
    exact = n // 2
    log = torch.log(distance.double() / exact) / torch.log(torch.tensor(max_distance / exact, dtype=torch.float64))
    large = (exact + (log * (n - exact)).long()).clamp_max(n - 1)
    return bucket + torch.where(distance < exact, distance, large)


def relative_bias(table: torch.Tensor, buckets: Any, q: int, k: int, q_offset: int) -> torch.Tensor:
    """``table[h, bucket(kv - (q_offset + q))]`` as [1, H, Q, K]."""
    relative = torch.arange(k)[None, :] - (torch.arange(q)[:, None] + q_offset)
    return table[:, buckets(relative)][None]


T5_LIKE = [
    ("t5", "T5Config", "T5Attention"),
    ("mt5", "MT5Config", "MT5Attention"),
    ("longt5", "LongT5Config", "LongT5Attention"),
    ("switch_transformers", "SwitchTransformersConfig", "SwitchTransformersAttention"),
    ("pop2piano", "Pop2PianoConfig", "Pop2PianoAttention"),
    ("udop", "UdopConfig", "UdopAttention"),
    ("umt5", "UMT5Config", "UMT5Attention"),
    ("pix2struct", "Pix2StructTextConfig", "Pix2StructTextAttention"),
]


@pytest.mark.parametrize(("model", "config_name", "class_name"), T5_LIKE, ids=[m for m, _, _ in T5_LIKE])
@pytest.mark.parametrize("is_decoder", [False, True])
def test_t5_compute_bias_is_a_bucketed_relative_bias(
    model: str, config_name: str, class_name: str, is_decoder: bool
) -> None:
    import importlib

    import transformers

    module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
    config = getattr(transformers, config_name)(
        d_model=16,
        hidden_size=16,
        d_kv=4,
        num_heads=2,
        relative_attention_num_buckets=12,
        relative_attention_max_distance=40,
    )
    config.is_decoder = is_decoder
    torch.manual_seed(0)
    layer = getattr(module, class_name)(config, has_relative_attention_bias=True, layer_idx=0)
    torch.nn.init.normal_(layer.relative_attention_bias.weight)
    # pix2struct's text model is a decoder only: its compute_bias is causal whatever the config says
    bidirectional = not is_decoder and model != "pix2struct"
    table = layer.relative_attention_bias.weight.T  # [H, num_buckets]
    for q, k, past in [(7, 7, 0), (1, 90, 89), (3, 100, 60), (50, 50, 0)]:
        ours = relative_bias(table, lambda r: t5_buckets(r, bidirectional, 12, 40), q, k, past)
        torch.testing.assert_close(layer.compute_bias(q, k, past_seen_tokens=past), ours, rtol=0, atol=0)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's slopes (Press et al.): 2^(-8i/n) for the largest power of two n <= heads, then the odd ones of 2n."""
    n = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-8 * i / n) for i in range(1, n + 1)]
    slopes += [2 ** (-8 * i / (2 * n)) for i in range(1, 2 * (heads - n), 2)]
    return torch.tensor(slopes, dtype=torch.float64)


def mpt_slopes(heads: int, alibi_bias_max: int = 8) -> torch.Tensor:
    """MPT's slopes: 2^(-i * alibi_bias_max / m) for the smallest power of two m >= heads, odd ones first."""
    m = 2 ** math.ceil(math.log2(heads))
    slopes = torch.tensor([2 ** (-i * alibi_bias_max / m) for i in range(1, m + 1)], dtype=torch.float64)
    return torch.cat([slopes[1::2], slopes[::2]])[:heads] if m != heads else slopes


def _left_padded(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        mask[b, : b * 2] = 0
    return mask


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 6, 8, 12, 16, 20, 32, 40, 64, 71, 80])
def test_bloom_alibi_is_slopes_times_key_position(heads: int) -> None:
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor

    torch.testing.assert_close(_get_alibi_slopes(heads, torch.device("cpu")).double(), alibi_slopes(heads))
    mask = _left_padded(3, 9)
    alibi = build_alibi_tensor(mask, heads, torch.float32).view(3, heads, 1, 9)
    slopes = alibi_slopes(heads).float()[None, :, None, None]
    kv = torch.arange(9)[None, None, None, :]
    # the key's position counted over real tokens: kv - (padding before the row's first token), 0 on padding
    pad = (mask == 0).sum(-1)[:, None, None, None]
    real = mask.bool()[:, None, None, :]
    torch.testing.assert_close(alibi, torch.where(real, slopes * (kv - pad), 0.0))
    # so, on the keys a row sees, alibi(slopes, form="key") (slopes * kv) and form="relative" (slopes * (kv - q))
    # differ from BLOOM's bias by a constant per row: the same softmax
    scores = torch.randn(3, heads, 9, 9)
    q = torch.arange(9)[None, None, :, None]
    masked = torch.where(real, 0.0, float("-inf"))
    for form in (slopes * kv, slopes * (kv - q)):
        torch.testing.assert_close((scores + alibi + masked).softmax(-1), (scores + form + masked).softmax(-1))


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 6, 8, 12, 16, 20, 32, 40, 64, 71])
def test_falcon_alibi_is_slopes_times_key_position_in_bf16(heads: int) -> None:
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    mask = torch.ones(1, 9, dtype=torch.long)
    alibi = build_alibi_tensor(mask, heads, torch.float32).view(1, heads, 1, 9)
    # Falcon multiplies bf16 slopes by the (integer) positions in bf16: the bias itself is rounded to bf16
    slopes = alibi_slopes(heads).to(torch.bfloat16)[None, :, None, None]
    torch.testing.assert_close(alibi, (slopes * torch.arange(9)).float(), rtol=0, atol=0)
    exact = slopes.float() * torch.arange(9).float()
    assert bool(((alibi - exact).abs() <= exact.abs() * 2**-8).all())  # within half a bf16 ulp of each value


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 6, 8, 12, 16, 20, 32, 40, 64])
@pytest.mark.parametrize("alibi_bias_max", [8, 16])
def test_mpt_alibi_is_its_slopes_times_key_offset(heads: int, alibi_bias_max: int) -> None:
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    max_seq_len, keys = 32, 11
    bias = build_mpt_alibi_tensor(heads, max_seq_len, alibi_bias_max)  # [H, 1, max_seq_len]
    slopes = mpt_slopes(heads, alibi_bias_max).float()
    if heads & (heads - 1) == 0 and alibi_bias_max == 8:
        torch.testing.assert_close(slopes, alibi_slopes(heads).float())  # a power of two: the standard slopes
    # MptAttention keeps the last `keys` columns: slopes * (kv - (keys - 1)), slopes * kv up to a row constant
    used = bias[:, max(0, bias.size(1) - 1) :, max(0, bias.size(2) - keys) :]
    torch.testing.assert_close(used, slopes[:, None, None] * (torch.arange(keys) - (keys - 1)).float())
