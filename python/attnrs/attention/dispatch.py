"""Which backend ``backend="auto"`` runs, and why.

One table, read top to bottom; the first row whose condition holds wins:

=====================  ==========================================================================  ============
device                 condition                                                                   backend
=====================  ==========================================================================  ============
cpu                    always (dropout included)                                                   ``native``
meta                   always (shapes only: the operator's fake implementation)                    ``native``
cuda                   flash-attn importable and the inputs fit it (see :func:`flash_reason`)      ``flash``
cuda                   a structural mask (Mask / BlockMask) and no sinks, bias or dense mask       ``flex``
cuda                   softcap or sinks (SDPA has neither)                                         ``math``
cuda                   otherwise                                                                   ``sdpa``
=====================  ==========================================================================  ============

:func:`choose_backend` returns the backend with the reason; ``attnrs info`` prints this table. A backend given by
name never goes through this table: ``backend="<name>"`` of a registered native kernel (the built-in ``"attnrs"``,
:func:`attnrs.register_native`, installed plugins) runs that kernel, forward only, on CPU tensors.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .resolve import ResolvedMask

__all__ = ["choose_backend", "flash_attn_available", "flash_reason", "needs_grad"]


@functools.lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def flash_reason(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: ResolvedMask,
    sinks: torch.Tensor | None,
) -> str | None:
    """Why flash-attn cannot run these inputs, or None when it can."""
    if query.device.type != "cuda":
        return "flash-attn runs on CUDA tensors"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16/bfloat16, got {query.dtype}"
    if query.shape[-1] > 256 or value.shape[-1] != query.shape[-1]:
        return "flash-attn needs head dims <= 256 and Dv == D"
    if sinks is not None or resolved.bias is not None or resolved.dense_bool is not None:
        return "flash-attn has no sinks, additive bias or dense mask"
    mask = resolved.structural
    if mask is not None:
        causal_top_left = mask.kind == "causal" and mask.params["offset"] == resolved.kv_offset - resolved.q_offset
        if not (causal_top_left and query.shape[2] == key.shape[2]):
            return "flash-attn expresses only no mask or causal on a square grid here"
    return None


def choose_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: ResolvedMask,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout_p: float,
    return_lse: bool,
) -> tuple[str, str]:
    """(backend, reason) for ``backend="auto"``, following the table in the module documentation."""
    if query.device.type == "cpu":
        return "native", "CPU: the Rust kernel"
    if query.device.type == "meta":
        return "native", "meta tensors: the Rust kernel's operator gives the output's shape (no data)"
    if flash_attn_available() and flash_reason(query, key, value, resolved, sinks) is None:
        return "flash", "CUDA, fp16/bf16, a mask flash-attn expresses"
    plain = sinks is None and resolved.bias is None and resolved.dense_bool is None
    if resolved.structural is not None and plain and dropout_p == 0:
        return "flex", "CUDA with a structural mask: flex_attention skips the empty blocks"
    if softcap is not None or sinks is not None or (return_lse and dropout_p == 0):
        return "math", "CUDA with softcap, sinks or a requested LSE, which SDPA lacks"
    return "sdpa", "CUDA: torch SDPA with a dense mask"
