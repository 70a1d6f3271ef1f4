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
from ...errors import ArgumentError, DtypeError, ShapeError, UnsupportedError
from ...masks.block_mask import index_table
from .mask_builders import DenseStructure

__all__ = ["IGNORED_KEYWORDS", "attention_forward", "attention_function"]


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


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


# Keywords transformers passes that change nothing here: lengths attnrs reads from the tensors, flags of other
# outputs, determinism (attnrs's kernels are always deterministic), and model-forward arguments some families let
# through to every layer (eager ignores them too: e.g. BERT's encoder_hidden_states reach its self-attention).
# A keyword neither in the signature nor here is refused, never silently dropped.
IGNORED_KEYWORDS = frozenset(
    {
        "max_length_q",
        "max_length_k",
        "max_seqlen_q",
        "max_seqlen_k",
        "deterministic",
        "num_items_in_batch",
        "output_hidden_states",
        "output_router_logits",
        "use_cache",
        "cache",
        "cache_position",
        "past_key_values",
        "logits_to_keep",
        "decoder_input_ids",
        "encoder_hidden_states",
        "seq_idx",
    }
)


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
    sinks: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    output_attentions: bool = False,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    score_mod: Any = None,
    backend: str = "auto",
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The transformers attention-function contract on top of :func:`attnrs.attention`.

    ``sinks``/``s_aux`` (or ``module.sinks``): ``[H]`` logits per head, or ``[B, H, Q]``/``[B, H, Q, 1]`` per query
    row; they join each row's softmax denominator only. ``indices`` ``[B, Q, topk]``: the keys each query may
    see (DeepSeek-V3.2-style sparse top-k selection; negative entries select nothing), applied on top of the mask;
    ``block_indices`` ``[B, H_idx, Q, topk]``: the same at the granularity of ``module.indexer.block_size`` keys,
    one selection per group of ``H / H_idx`` query heads (MiniMax-M3).
    ``score_mod`` is attnrs's too (transformers passes a model call's extra keywords down to the attention
    function): an :mod:`attnrs.scores` value or a FlexAttention ``score_mod`` callable, as for
    :func:`attnrs.attention`; ``position_bias`` (T5) stays what it is, an additive dense bias.
    ``backend`` is attnrs's, not a transformers keyword: ``"auto"`` or any backend :func:`attnrs.attention`
    takes, including the name of a registered native kernel (see :func:`attention_function`). Other keywords
    are refused unless listed in :data:`IGNORED_KEYWORDS`."""
    unknown = sorted(k for k, v in kwargs.items() if k not in IGNORED_KEYWORDS and v is not None)
    if unknown:
        raise UnsupportedError(
            f"{unknown[0]}: attnrs's attention function does not know this keyword, so it cannot honour it "
            f"(got {sorted(kwargs)}); use attn_implementation='eager' for this model, or report it"
        )
    check_inputs(query, key, value)
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    shape = (batch, heads, q_len, kv_len)
    if sinks is not None and s_aux is not None and sinks is not s_aux:
        raise ArgumentError("sinks and s_aux: got both (two names of one argument, the sink logits); pass one")
    head_sinks, row_sinks = _sinks(sinks if sinks is not None else s_aux, module, shape)
    dropout_p = float(dropout) if getattr(module, "training", False) else 0.0
    scale = check_scalars(query, scaling, softcap, head_sinks, dropout_p)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if isinstance(sliding_window, int) and not isinstance(sliding_window, bool) and sliding_window <= 0:
        sliding_window = None  # transformers' "no window" (released configs ship sliding_window=0)
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
    structure = DenseStructure.of(mask) if isinstance(mask, torch.Tensor) and not _compiling() else None
    if structure is not None and isinstance(mask, torch.Tensor) and tuple(mask.shape[-2:]) == (q_len, kv_len):
        # The builder's own dense mask, unchanged: its structure lets the kernel skip empty blocks.
        resolved = ResolvedMask(structure.mask, structure.q_offset, structure.kv_offset)
    else:
        resolved = resolve_mask(mask, False, shape, query.device, arg="attention_mask")
    if mask is None:
        resolved = _mask_for_none(resolved, shape, bool(causal), sliding_window)
    if mask is None or isinstance(mask, TorchBlockMask):
        # A custom dense 4-D mask is the caller's whole intent; masks from builders and None are completed.
        _keep_documents_apart(resolved, shape, cu_seq_lens_q, cu_seq_lens_k, position_ids)
    for selected in (
        None if indices is None else _selected_keys(indices, shape, query.device),
        None if block_indices is None else _selected_blocks(block_indices, module, shape, query.device),
    ):
        if selected is not None:
            resolved.dense_bool = selected if resolved.dense_bool is None else resolved.dense_bool & selected
    if position_bias is not None:
        bias = _position_bias(position_bias, shape)
        resolved.bias = bias if resolved.bias is None else resolved.bias + bias
    if output_attentions:
        if score_mod is not None:
            raise UnsupportedError(
                "output_attentions: the attention weights are not formed with a score_mod; drop one of them"
            )
        out, weights = attention_with_weights(
            query,
            key,
            value,
            resolved,
            shape,
            scale,
            softcap,
            head_sinks if row_sinks is None else row_sinks,
            dropout_p,
        )
        return out.transpose(1, 2).contiguous(), weights
    out, lse = run_resolved(
        query,
        key,
        value,
        resolved,
        scale,
        softcap,
        head_sinks,
        dropout_p,
        backend,
        row_sinks is not None,
        score_mod=score_mod,
    )
    if row_sinks is not None:
        # A sink logit per row joins the denominator: out * e^lse / (e^lse + e^sink) = out * sigmoid(lse - sink).
        assert lse is not None  # asked for above
        out = out * torch.sigmoid(lse - row_sinks.to(torch.float32))[..., None].to(out.dtype)
    return out.transpose(1, 2).contiguous(), None


def _sinks(
    sinks: Any, module: torch.nn.Module, shape: tuple[int, int, int, int]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(per-head sinks [H] for the kernel, per-row sinks [B, H, Q]) from the keyword or ``module.sinks``."""
    if sinks is None:
        attribute = getattr(module, "sinks", None)  # GPT-OSS keeps its [H] sinks as a parameter of the module
        sinks = attribute if isinstance(attribute, torch.Tensor) else None
    if sinks is None:
        return None, None
    if not isinstance(sinks, torch.Tensor) or not sinks.dtype.is_floating_point:
        raise DtypeError(f"sinks: expected a floating tensor, got {getattr(sinks, 'dtype', type(sinks).__name__)}")
    batch, heads, q_len, _ = shape
    if sinks.numel() == heads and sinks.dim() <= 2:
        return sinks.reshape(heads), None
    rows = sinks[..., 0] if sinks.dim() == 4 and sinks.shape[-1] == 1 else sinks
    if rows.dim() != 3 or torch.broadcast_shapes(rows.shape, (batch, heads, q_len)) != (batch, heads, q_len):  # type: ignore[no-untyped-call]
        raise ShapeError(
            f"sinks: expected [H], [B, H, Q] or [B, H, Q, 1] for H={heads}, B={batch}, Q={q_len}, got shape "
            f"{list(sinks.shape)}"
        )
    return None, rows.expand(batch, heads, q_len)


def _position_bias(position_bias: Any, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """``position_bias`` (T5's ``[1, H, Q, K]``, any floating tensor broadcastable to ``[B, H, Q, K]``), a 4-D one
    expanded to the call's shape; its dtype is checked with the other additive masks."""
    if not isinstance(position_bias, torch.Tensor):
        raise DtypeError(
            f"position_bias: expected a floating tensor [B|1, H|1, Q, K], got {type(position_bias).__name__}"
        )
    try:
        broadcast = torch.broadcast_shapes(position_bias.shape, shape) == torch.Size(shape)  # type: ignore[no-untyped-call]
    except RuntimeError:
        broadcast = False
    if not broadcast:
        raise ShapeError(
            f"position_bias: expected a shape broadcastable to [B, H, Q, K] = {list(shape)}, "
            f"got {list(position_bias.shape)}"
        )
    return position_bias.expand(shape) if position_bias.dim() == 4 else position_bias


def _check_selection(table: Any, name: str, layout: str, n: int) -> torch.Tensor:
    if not isinstance(table, torch.Tensor) or table.dtype.is_floating_point or table.dtype == torch.bool:
        raise DtypeError(f"{name}: expected an integer tensor {layout}, got {getattr(table, 'dtype', table)}")
    if table.numel() and int(table.max()) >= n:
        raise ArgumentError(f"{name}: expected indices below {n}, got {int(table.max())}")
    return table


def _selected_keys(indices: Any, shape: tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
    """Bool [B, H, Q, K] view: True at the keys ``indices [B, Q, topk]`` (or ``[B, 1|H, Q, topk]``) selects."""
    batch, heads, q_len, kv_len = shape
    table = _check_selection(indices, "indices", "[B, Q, topk]", kv_len)
    table = table[:, None] if table.dim() == 3 else table
    if table.dim() != 4 or table.shape[0] != batch or table.shape[1] not in (1, heads) or table.shape[2] != q_len:
        raise ShapeError(f"indices: expected [B={batch}, Q={q_len}, topk], got shape {list(indices.shape)}")
    return index_table(table.to(device), kv_len).expand(batch, heads, q_len, kv_len)


def _selected_blocks(
    block_indices: Any, module: torch.nn.Module, shape: tuple[int, int, int, int], device: torch.device
) -> torch.Tensor:
    """Bool [B, H, Q, K]: the key blocks ``block_indices [B, H_idx, Q, topk]`` selects, each ``block_size`` keys
    (``module.indexer.block_size``), for each group of ``H / H_idx`` query heads."""
    batch, heads, q_len, kv_len = shape
    block_size = getattr(getattr(module, "indexer", None), "block_size", None)
    if not isinstance(block_size, int) or block_size <= 0:
        raise UnsupportedError(
            "block_indices: attnrs reads the block size from module.indexer.block_size, which this module lacks"
        )
    n_blocks = -(-kv_len // block_size)
    table = _check_selection(block_indices, "block_indices", "[B, H_idx, Q, topk]", n_blocks)
    if table.dim() != 4 or table.shape[0] != batch or table.shape[2] != q_len or heads % max(table.shape[1], 1):
        raise ShapeError(
            f"block_indices: expected [B={batch}, H_idx dividing {heads}, Q={q_len}, topk], got {list(table.shape)}"
        )
    blocks = index_table(table.to(device), n_blocks)
    keys = blocks.repeat_interleave(block_size, dim=-1)[..., :kv_len]
    return keys.repeat_interleave(heads // table.shape[1], dim=1)


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
