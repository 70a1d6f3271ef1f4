"""The transformers attention-function contract on top of :func:`attnrs.attention`.

:func:`attention_forward` honours everything transformers passes to an attention function (see
shared/reference/transformers-attention.md §4): ``scaling``, ``dropout`` with ``module.training``, ``is_causal``
(the keyword wins over ``module.is_causal``), ``sliding_window`` when the mask does not already encode it,
``softcap``, ``s_aux`` and ``module.sinks``, ``position_bias``, ``output_attentions``, and packed sequences
through ``cu_seq_lens_*`` or ``position_ids``; masks arrive as an attnrs/torch ``BlockMask``, dense bool (also
stride-0 broadcasts), additive float or None. It returns ``(out [B, Q, H, Dv], weights | None)``.
:func:`attention_function` binds it to one backend (e.g. a native kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask

from ... import masks
from ...attention.api import check_backend, run_resolved
from ...attention.resolve import ResolvedMask, check_inputs, check_scalars, resolve_mask
from ...attention.torch_backends import attention_with_weights
from ...errors import DtypeError, ShapeError

__all__ = ["attention_forward", "attention_function"]


def _packed_document_ids(
    batch: int, q_len: int, kv_len: int, cu_seq_lens_q: Any, cu_seq_lens_k: Any, position_ids: Any
) -> torch.Tensor | None:
    """Document ids [1, L] of a packed batch (B == 1, Q == K): from cu_seq_lens, else where position_ids restart.

    Under torch.compile the values are unknown while tracing, so nothing branches on them: cu_seq_lens of this
    call are taken as describing it, and ids are built from position_ids even when nothing restarts (one
    document, which changes no visibility)."""
    if batch != 1 or q_len != kv_len or q_len < 2:
        return None
    compiling = torch.compiler.is_compiling()
    for cu in (cu_seq_lens_k, cu_seq_lens_q):
        if isinstance(cu, torch.Tensor) and cu.numel() > 2 and (compiling or int(cu[-1]) == kv_len):
            starts = cu[1:-1].to("cpu", torch.int64)
            return torch.bucketize(torch.arange(kv_len), starts, right=True)[None]
    if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == q_len:
        pos = position_ids.reshape(-1, q_len)[0].to("cpu", torch.int64)
        restarts = torch.diff(pos) != 1
        if compiling or bool(restarts.any()):
            return torch.cat([torch.zeros(1, dtype=torch.int64), restarts.cumsum(0)])[None]
    return None


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    output_attentions: bool = False,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    backend: str = "auto",
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The transformers attention-function contract on top of :func:`attnrs.attention`.

    ``backend`` is attnrs's, not a transformers keyword: ``"auto"`` or any backend :func:`attnrs.attention`
    takes, including the name of a registered native kernel (see :func:`attention_function`)."""
    check_inputs(query, key, value)
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    shape = (batch, heads, q_len, kv_len)
    sinks = s_aux if s_aux is not None else getattr(module, "sinks", None)
    if sinks is not None and sinks.dim() != 1:
        sinks = sinks.reshape(-1)
    dropout_p = float(dropout) if getattr(module, "training", False) else 0.0
    scale = check_scalars(query, scaling, softcap, sinks, dropout_p)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is not None and not isinstance(mask, (torch.Tensor, TorchBlockMask)):
        raise DtypeError(
            f"attention_mask: expected None, a BlockMask or a 4-D bool/float tensor, got {type(mask).__name__}"
        )
    if isinstance(mask, torch.Tensor) and not isinstance(mask, TorchBlockMask):
        if mask.dim() != 4:
            raise ShapeError(f"attention_mask: expected a 4-D mask [B, 1|H, Q, K], got shape {list(mask.shape)}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise DtypeError(f"attention_mask: expected a bool or floating mask, got {mask.dtype}")
        if mask.shape[-1] != kv_len:  # e.g. a longer static-cache mask than the keys we received
            mask = mask[..., -kv_len:] if mask.shape[-1] > kv_len else mask
    resolved = resolve_mask(mask, False, shape, query.device)
    if mask is None:
        resolved = _mask_for_none(resolved, shape, bool(causal), sliding_window)
    if mask is None or isinstance(mask, TorchBlockMask):
        # A custom dense 4-D mask is the caller's whole intent; masks from builders and None are completed.
        _keep_documents_apart(resolved, shape, cu_seq_lens_q, cu_seq_lens_k, position_ids)
    if position_bias is not None:
        bias = position_bias.expand(shape) if position_bias.dim() == 4 else position_bias
        resolved.bias = bias if resolved.bias is None else resolved.bias + bias
    if output_attentions:
        out, weights = attention_with_weights(query, key, value, resolved, shape, scale, softcap, sinks, dropout_p)
        return out.transpose(1, 2).contiguous(), weights
    out, _ = run_resolved(query, key, value, resolved, scale, softcap, sinks, dropout_p, backend, False)
    return out.transpose(1, 2).contiguous(), None


def attention_function(backend: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """:func:`attention_forward` bound to ``backend`` (e.g. a native kernel's name): an attention function with
    the transformers signature, for :func:`register` or ``AttentionInterface``. Only the per-call argument
    handling runs in Python; the kernel runs in native code with the GIL released."""
    check_backend(backend)

    def forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return attention_forward(module, query, key, value, attention_mask, backend=backend, **kwargs)

    forward.__name__ = forward.__qualname__ = f"attention_forward_{backend}"
    forward.__doc__ = f"attnrs attention with backend={backend!r} (transformers attention-function signature)."
    return forward


def _mask_for_none(
    resolved: ResolvedMask, shape: tuple[int, int, int, int], causal: bool, sliding_window: int | None
) -> ResolvedMask:
    """transformers' meaning of ``attention_mask=None``: top-left causal when Q > 1 (this also hides the empty
    slots of a static cache at prefill), plus a sliding window a mask builder would have encoded if it is in
    reach."""
    _, _, q_len, kv_len = shape
    parts: list[masks.Mask] = []
    if causal and q_len > 1:
        parts.append(masks.causal())
    if sliding_window is not None and kv_len > sliding_window:
        window = int(sliding_window)
        parts.append(masks.sliding_window_overlay(window) if causal else masks.sliding_window(window, causal=False))
    if parts:
        resolved.structural = masks.and_masks(*parts)
        # The queries are the last Q keys, except at a static-cache prefill (K > Q, top-left).
        resolved.q_offset = 0 if (causal and q_len > 1) else kv_len - q_len
        resolved.kv_offset = 0
    return resolved


def _keep_documents_apart(
    resolved: ResolvedMask,
    shape: tuple[int, int, int, int],
    cu_seq_lens_q: Any,
    cu_seq_lens_k: Any,
    position_ids: Any,
) -> None:
    """Packed sequences (one row, documents told apart by cu_seq_lens or restarting position_ids) stay
    isolated even when transformers dropped its packed mask because a cache exists."""
    batch, _, q_len, kv_len = shape
    ids = _packed_document_ids(batch, q_len, kv_len, cu_seq_lens_q, cu_seq_lens_k, position_ids)
    if ids is None or (resolved.q_offset, resolved.kv_offset) != (0, 0) or _has_documents(resolved.structural):
        return
    documents = masks.document(ids)
    resolved.structural = documents if resolved.structural is None else resolved.structural & documents


def _has_documents(mask: masks.Mask | None) -> bool:
    return mask is not None and (mask.kind == "document" or any(_has_documents(c) for c in mask.children))
