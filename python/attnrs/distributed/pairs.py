"""One (query chunk, key chunk) pair of a context-parallel attention: is it entirely masked, its forward, and its
exact backward given the *global* output and LSE of the query rows.

The backward uses the flash-attention identity: with the rows' final ``out``, ``lse`` and ``grad_out``, each
key part's gradients are the kernel's backward of that part alone (``P = exp(s - lse)`` with the global
``lse``, ``Δ = rowsum(grad_out ∘ out)``), and they add up over the parts. So no step recomputes its forward and
no per-step output is kept. On CPU this calls attnrs's backward operator directly; elsewhere (the CUDA backends
attnrs delegates to, float64 inputs, rows whose lse the kernel would not trust) it recomputes the pair under
autograd and feeds it the gradients the merge would have sent it, which is the same number.
"""

from __future__ import annotations

import torch

from ..attention.api import attention
from ..attention.resolve import kernel_operands, resolve_mask
from ..masks.grid import Grid
from ..masks.mask import Mask
from ..threads import num_threads

__all__ = [
    "kernel_pair_backward",
    "pair_backward",
    "pair_class",
    "pair_forward",
    "pair_is_empty",
    "recomputed_pair_backward",
]

# The kernel's backward forms P from the saved float32 lse only below this magnitude, and never for float64
# inputs (rust/attnrs-core/src/kernel/backward/stats.rs, LSE_RECOMPUTE): elsewhere it recomputes the row's
# statistics from the keys it is given, which for one key part is not the global lse. Those calls take the
# recomputed path instead.
_LSE_EXACT = 1024.0


def pair_class(mask: Mask | None, batch: int, heads: int, q_start: int, q_len: int, kv_start: int, kv_len: int) -> str:
    """``"empty"`` when no query of ``[q_start, q_start + q_len)`` sees a key of ``[kv_start, kv_start +
    kv_len)``, ``"full"`` when every query sees every key, else ``"partial"``, for every batch row and head (the
    mask's exact block classes, one block covering the pair)."""
    if q_len == 0 or kv_len == 0:
        return "empty"
    if mask is None:
        return "full"
    b = batch if mask.depends_on_batch else 1
    h = heads if mask.depends_on_head else 1
    expr = mask.to_rust(Grid(b, h, q_len, kv_len, q_start, kv_start))
    layout = expr.block_sparse(b, h, q_len, kv_len, q_start, kv_start, q_len, kv_len, num_threads())
    counts = {}
    for name in ("kv", "full_kv"):
        table = torch.empty(layout.layout_batch, layout.layout_heads, 1, dtype=torch.int32)
        layout.write_counts(name, table)
        counts[name] = table
    if not bool((counts["kv"] + counts["full_kv"]).any()):
        return "empty"
    return "full" if bool(counts["full_kv"].all()) else "partial"


def pair_is_empty(
    mask: Mask | None, batch: int, heads: int, q_start: int, q_len: int, kv_start: int, kv_len: int
) -> bool:
    """True when the mask hides the whole pair (see :func:`pair_class`)."""
    return pair_class(mask, batch, heads, q_start, q_len, kv_start, kv_len) == "empty"


def pair_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | None, q_start: int, kv_start: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the query rows at global ``q_start`` over the keys at ``kv_start``."""
    if mask is None:
        return attention(q, k, v, scale=scale, return_lse=True)
    return attention(q, k, v, mask, scale=scale, q_offset=q_start, kv_offset=kv_start, return_lse=True)


def pair_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    mask: Mask | None,
    q_start: int,
    kv_start: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of this pair's share of the loss, from the rows' global ``out``/``lse``/``grad_out``/
    ``grad_lse`` (see the module documentation)."""
    if (
        q.device.type == "cpu"
        and q.dtype != torch.float64
        and bool((lse.abs() < _LSE_EXACT).logical_or(lse.isinf()).all())
    ):
        return kernel_pair_backward(q, k, v, out, lse, grad_out, grad_lse, mask, q_start, kv_start, scale)
    return recomputed_pair_backward(q, k, v, out, lse, grad_out, grad_lse, mask, q_start, kv_start, scale)


def kernel_pair_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    mask: Mask | None,
    q_start: int,
    kv_start: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pair's gradients from attnrs's backward operator with the global ``out`` and ``lse`` (CPU)."""
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    # resolve_mask places only a mask (no mask: no offsets to place).
    at = (q_start, kv_start) if mask is not None else (0, 0)
    resolved = resolve_mask(mask, False, shape, q.device, q_offset=at[0], kv_offset=at[1])
    operands = kernel_operands(resolved, shape, None, scale, None)
    grads = torch.ops.attnrs.attention_backward(
        q,
        k,
        v,
        *operands,
        0.0,
        None,
        out.transpose(1, 2),
        lse.contiguous(),
        grad_out.transpose(1, 2),
        None if grad_lse is None else grad_lse.contiguous(),
        False,
        False,
        False,
        False,
    )
    return grads[0], grads[1], grads[2]


def recomputed_pair_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    mask: Mask | None,
    q_start: int,
    kv_start: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pair's gradients by autograd through a recomputed forward (any backend). With the pair's weight
    ``w = exp(lse_p - lse)`` in the merged output, the merge sends the pair ``grad_out_p = w · grad_out`` and
    ``grad_lse_p = w · (rowsum(grad_out ∘ out_p) - rowsum(grad_out ∘ out) + grad_lse)``."""
    with torch.enable_grad():
        q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
        out_p, lse_p = pair_forward(q_, k_, v_, mask, q_start, kv_start, scale)
        compute = torch.float64 if out.dtype == torch.float64 else torch.float32
        seen = torch.isfinite(lse)
        w = torch.where(seen, torch.exp(lse_p.to(compute) - torch.where(seen, lse, 0).to(compute)), 0)
        g = grad_out.to(compute)
        delta = (g * out_p.detach().to(compute)).sum(-1) - (g * out.to(compute)).sum(-1)
        if grad_lse is not None:
            delta = delta + grad_lse.to(compute)
        grads = torch.autograd.grad(
            (out_p, lse_p),
            (q_, k_, v_),
            ((w[..., None] * g).to(out_p.dtype), (w * delta).to(lse_p.dtype)),
            allow_unused=True,
        )
    return tuple(torch.zeros_like(t) if d is None else d for t, d in zip((q, k, v), grads))  # type: ignore[return-value]
