"""The torch backends of ``attnrs.attention``: delegation to torch's ``sdpa`` and ``flex_attention``, to
flash-attn (``flash``), and the plain formula (``math``, also the weights for ``output_attentions``).

They take the same resolved mask as the Rust kernel, so tests can force any of them and compare, and the
CUDA path delegates to them. ``math`` is the plain formula (float32 accumulation for half types, float64
for float64) and supports everything; ``sdpa`` and ``flex`` support what their torch functions support.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from ..errors import UnsupportedError
from ..masks.block_mask import create_block_mask
from ..masks.dense import create_dense_mask
from ..masks.mask import from_callable
from .dispatch import flash_reason
from .resolve import ResolvedMask

__all__ = ["attention_with_weights", "math_attention", "torch_attention", "visibility"]


def visibility(
    resolved: ResolvedMask, shape: tuple[int, int, int, int], device: torch.device, start: int = 0
) -> torch.Tensor | None:
    """The resolved mask's bool visibility of query rows ``[start, start + Q)`` (``shape`` is ``[B, H, Q, K]``),
    broadcastable to ``shape`` (None: everything visible)."""
    batch, heads, q_len, kv_len = shape
    visible = None
    if resolved.structural is not None:
        visible = create_dense_mask(
            resolved.structural,
            batch,
            heads,
            q_len,
            kv_len,
            q_offset=resolved.q_offset + start,
            kv_offset=resolved.kv_offset,
        ).to(device)
    if resolved.dense_bool is not None:
        rows = resolved.dense_bool[:, :, start : start + q_len]
        visible = rows if visible is None else visible & rows
    return visible


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def math_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    score_mod: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """The formula, written plainly (and differentiably): returns (out [B, H, Q, Dv], lse float32 [B, H, Q]),
    plus the attention weights [B, H, Q, K] when ``return_weights``. ``score_mod`` maps the scaled scores
    ``[B, H, Q, K]`` (in the working precision) to the modified ones, before the softcap, bias and mask."""
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    heads = query.shape[1]
    q = query.to(compute)
    k = _repeat_kv(key, heads).to(compute)
    v = _repeat_kv(value, heads).to(compute)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if score_mod is not None:
        scores = score_mod(scores)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.to(compute)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        # [H] (one logit per head) or [B, H, Q] (one per row, as some transformers families pass them).
        per_row = sinks.to(compute) if sinks.dim() == 3 else sinks.to(compute).reshape(1, heads, 1)
        sink_column = per_row[..., None].expand(*scores.shape[:-1], 1)
        lse = torch.logsumexp(torch.cat([scores, sink_column], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(scores, dim=-1)
    # Rows that see nothing have lse = -inf: their weights are 0 (not NaN).
    weights = torch.exp(scores - lse[..., None].masked_fill(torch.isneginf(lse[..., None]), 0.0))
    weights = weights.masked_fill(torch.isneginf(scores), 0.0)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    out = torch.matmul(weights, v)
    if return_weights:
        return out.to(query.dtype), lse.to(torch.float32), weights.to(query.dtype)
    return out.to(query.dtype), lse.to(torch.float32)


def torch_attention(
    backend: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: ResolvedMask,
    shape: tuple[int, int, int, int],
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    return_lse: bool,
    dropout_p: float = 0.0,
    score_mod: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs ``backend`` (``math``, ``sdpa``, ``flex`` or ``flash``) on the resolved mask: (out, lse or None).
    ``score_mod`` (flex only: :func:`attnrs.attention.api.run_resolved` routes it) sees positions, as masks do."""
    if backend == "math":
        visible = visibility(resolved, shape, query.device)
        out, lse = math_attention(query, key, value, visible, resolved.bias, scale, softcap, sinks, dropout_p)
        return out, lse
    if dropout_p > 0 and backend != "sdpa":
        raise UnsupportedError(f"dropout_p > 0: backend {backend!r} has no dropout; use 'math' or 'sdpa'")
    if backend == "flash":
        return _flash(query, key, value, resolved, shape, scale, softcap, sinks, return_lse, dropout_p)
    if backend == "sdpa":
        for name, value_ in (("softcap", softcap), ("sinks", sinks)):
            if value_ is not None:
                raise UnsupportedError(
                    f"{name}: torch's scaled_dot_product_attention has no {name}; use "
                    "backend='native', 'flex' or 'math'"
                )
        if return_lse:
            raise UnsupportedError("return_lse: torch's scaled_dot_product_attention does not return it")
        visible = visibility(resolved, shape, query.device)
        attn_mask: torch.Tensor | None = visible
        if resolved.bias is not None:
            additive = resolved.bias.to(query.dtype)
            attn_mask = additive if visible is None else additive.masked_fill(~visible, float("-inf"))
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            scale=scale,
            enable_gqa=key.shape[1] != query.shape[1],
            dropout_p=dropout_p,
        )
        if visible is not None:
            out = out.masked_fill(~visible.any(-1, keepdim=True), 0.0)  # fully hidden rows are zeros
        return out, None
    if backend == "flex":
        return _flex(query, key, value, resolved, shape, scale, softcap, sinks, score_mod)
    raise AssertionError(backend)


def _flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: ResolvedMask,
    shape: tuple[int, int, int, int],
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    user_score_mod: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, q_len, kv_len = shape
    structural = resolved.structural
    if resolved.dense_bool is not None:
        dense = resolved.dense_bool

        def dense_lookup(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return dense[b, h, q, kv]

        lookup = from_callable(dense_lookup).shifted(-resolved.q_offset, -resolved.kv_offset)
        structural = lookup if structural is None else structural & lookup
    block_mask = None
    if structural is not None:
        block_mask = create_block_mask(
            structural, batch, heads, q_len, kv_len, q_offset=resolved.q_offset, kv_offset=resolved.kv_offset
        )
    bias = resolved.bias
    q_offset, kv_offset = resolved.q_offset, resolved.kv_offset

    def score_mod(score: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
        if user_score_mod is not None:
            score = user_score_mod(score, b, h, q + q_offset, kv + kv_offset)  # positions, as masks see them
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if bias is not None:
            score = score + bias[b, h, q, kv]
        return score

    with warnings.catch_warnings(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        # Eager flex_attention traces itself with dynamo; dynamic shapes turn the scale into a SymFloat that
        # its kernel rejects (torch 2.15), so every shape gets its own static trace.
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
        out, aux = flex_attention(
            query,
            key,
            value,
            score_mod=score_mod if softcap is not None or bias is not None or user_score_mod is not None else None,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=key.shape[1] != heads,
            return_aux=AuxRequest(lse=True),
        )
    lse = aux.lse.to(torch.float32)  # type: ignore[union-attr]  # asked for with AuxRequest(lse=True)
    if sinks is not None:
        # Renormalise through the LSE: out * exp(lse - logaddexp(lse, sink)), as transformers does on GPU.
        total = torch.logaddexp(lse, sinks.to(torch.float32).reshape(1, heads, 1))
        out = (out.to(torch.float32) * torch.exp(lse - total)[..., None]).to(query.dtype)
        lse = total
    return out, lse


def _flash(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: ResolvedMask,
    shape: tuple[int, int, int, int],
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    return_lse: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """flash-attn (CUDA, fp16/bf16) for the masks it expresses: none, or causal on a square grid."""
    reason = flash_reason(query, key, value, resolved, sinks)
    if reason is not None:
        raise UnsupportedError(f"backend='flash': {reason}")
    try:
        from flash_attn import flash_attn_func  # optional, CUDA only
    except ImportError as e:
        raise UnsupportedError(
            "backend='flash': the flash-attn package is not installed (pip install flash-attn, on a CUDA machine)"
        ) from e
    causal = resolved.structural is not None  # flash_reason admits only a top-left causal mask on Q == K
    result = flash_attn_func(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=causal,
        softcap=softcap or 0.0,
        return_attn_probs=return_lse,
    )
    if return_lse:
        out, lse, _ = result
        return out.transpose(1, 2), lse.to(torch.float32)
    return result.transpose(1, 2), None


def attention_with_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: ResolvedMask,
    shape: tuple[int, int, int, int],
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, weights [B, H, Q, K]) for ``output_attentions``: the weights must exist, so this is the math path."""
    visible = visibility(resolved, shape, query.device)
    out, _, weights = math_attention(
        query, key, value, visible, resolved.bias, scale, softcap, sinks, dropout_p, return_weights=True
    )
    return out, weights
