"""Reference attention functions with the transformers contract, written with plain torch.

``fn(module, query[B,H,Q,D], key[B,Hkv,K,D], value[B,Hkv,K,Dv], attention_mask, **kwargs)
-> (out[B,Q,H,Dv], weights | None)``. They follow transformers' ``sdpa_attention_forward`` and the models'
``eager_attention_forward`` (shared/reference/transformers-attention.md §4), so attnrs's own registry works
without transformers installed and tests have a second opinion to compare with.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["eager_attention_forward", "sdpa_attention_forward"]


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, K, D] -> [B, Hkv * n_rep, K, D], each kv head repeated for its query-head group."""
    if n_rep == 1:
        return x
    b, h, k, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, k, d).reshape(b, h * n_rep, k, d)


def _resolve_is_causal(module: Any, query: torch.Tensor, attention_mask: Any, is_causal: bool | None) -> bool:
    """transformers' rule: causal (top-left) only when there is no mask and more than one query row."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    return bool(query.shape[2] > 1 and attention_mask is None and is_causal)


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def sdpa_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``torch.nn.functional.scaled_dot_product_attention`` behind the transformers contract."""
    if softcap is not None:
        raise ValueError("softcap: torch sdpa does not support logit soft-capping; use 'attnrs' or eager")
    causal = _resolve_is_causal(module, query, attention_mask, is_causal)
    if causal and key.shape[2] > query.shape[2]:
        # Static-cache prefill: keys past the queries are empty cache slots (top-left causal drops them).
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    mask = attention_mask
    if position_bias is not None:
        bias = position_bias.to(query.dtype)
        mask = bias if mask is None else _as_additive(mask, query.dtype) + bias
        if causal:
            mask = mask + _as_additive(torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril(), query.dtype)
            causal = False
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal
    )
    return out.transpose(1, 2).contiguous(), None


def eager_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    position_bias: torch.Tensor | None = None,
    s_aux: torch.Tensor | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generic eager formulation: scores, softcap, bias, mask, sinks, fp32 softmax, dropout, P·V."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if position_bias is not None:
        scores = scores + position_bias.to(scores.dtype)
    if attention_mask is not None:
        scores = scores + _as_additive(attention_mask, scores.dtype)
    elif _resolve_is_causal(module, query, attention_mask, is_causal):
        q_len, k_len = scores.shape[-2:]
        visible = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril()
        scores = scores + _as_additive(visible, scores.dtype)
    sinks = s_aux if s_aux is not None else getattr(module, "sinks", None)
    if sinks is not None:
        sink_column = sinks.reshape(1, -1, 1, 1).to(scores.dtype).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink_column], dim=-1)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if sinks is not None:
        weights = weights[..., :-1]
    weights = F.dropout(weights, p=dropout, training=bool(getattr(module, "training", False)))
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights
