"""Recognition of transformers' FlexAttention score_mod closures (attnrs.integrations.transformers.score_mods).

The closures are the real ones: transformers' ``flex_attention_forward`` (and DOGE's) is called with small
tensors and the ``score_mod`` it hands to FlexAttention is captured (the FlexAttention call itself is stubbed),
so a change in the installed transformers shows here. Lookalikes (same names and cells, other code) are not
recognised.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import transformers.integrations.flex_attention as hf_flex

from attnrs.integrations.transformers.score_mods import (
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
