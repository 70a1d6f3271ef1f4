"""Merging partial attention results by their log-sum-exp: the building block of split-KV decoding, cascade
(shared-prefix) attention and ring attention (FlashInfer's ``merge_state``/``merge_states``, vLLM's
``merge_attn_states``).

Attention over keys split into disjoint parts ``K_1, ..., K_n`` is the LSE-weighted mean of attention over each part::

    lse = log(Σ_i exp(lse_i))
    out = Σ_i exp(lse_i - lse) · out_i

with each ``(out_i, lse_i)`` what :func:`attnrs.attention` returns with ``return_lse=True`` (natural log). Any layout
works as long as ``lse_i.shape == out_i.shape[:-1]``: attnrs's ``[..., H, Q, Dv]`` with ``[..., H, Q]``, or
FlashInfer's and vLLM's ``[tokens, H, Dv]`` with ``[tokens, H]``. A part that saw no key (``lse = -inf``) gets weight
0, and a row whose parts all saw nothing gives 0 with ``lse = -inf``, never NaN; a part whose ``lse`` is ``+inf``
(a ``+inf`` sink took its whole row) takes the row (its gradients are not defined). NaN in a part's ``out`` or
``lse`` gives NaN for that row, as attention itself does. Plain torch ops: differentiable (gradients reach every
part) and traceable by ``torch.compile``; computed in float32 (float64 for float64 outputs), returned in the
parts' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DtypeError, ShapeError

__all__ = ["merge_attention_states", "merge_attention_states_n"]


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of attention over the keys of two disjoint parts, from each part's ``(out, lse)`` (see the
    module documentation); ``lse`` is float32 (float64 for float64 outputs)."""
    return merge_attention_states_n([out_a, out_b], [lse_a, lse_b])


def merge_attention_states_n(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of attention over the keys of ``n >= 1`` disjoint parts, from the parts' outputs ``outs`` and
    log-sum-exps ``lses`` (see the module documentation)."""
    outs, lses = list(outs), list(lses)
    _check(outs, lses)
    compute = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    lse = torch.stack([t.to(compute) for t in lses])  # [n, ...]
    top = lse.amax(0)
    # Weights relative to the largest part: a row whose parts all saw nothing (top = -inf) gets weight 0 from
    # each, a +inf part takes the row; no exp(-inf - -inf) or exp(inf - inf) is ever formed.
    finite_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.where(
        top == torch.inf,
        (lse == torch.inf).to(compute),
        torch.exp(lse - finite_top),
    )
    total = weights.sum(0)
    # log and division by 1 where nothing was seen, so that neither the value nor the gradient is NaN there.
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    seen = torch.where(total > 0, finite_top + torch.log(safe_total), torch.full_like(top, -torch.inf))
    merged_lse = torch.where(top == torch.inf, top, seen)
    out = sum(w[..., None] * o.to(compute) for w, o in zip(weights, outs)) / safe_total[..., None]
    assert isinstance(out, torch.Tensor)
    return out.to(outs[0].dtype), merged_lse


def _check(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> None:
    if not outs or len(outs) != len(lses):
        raise ShapeError(
            f"outs/lses: expected the same number (at least 1) of outputs and log-sum-exps, got {len(outs)} and "
            f"{len(lses)}"
        )
    first = outs[0]
    for i, (o, s) in enumerate(zip(outs, lses)):
        for name, t in ((f"out[{i}]", o), (f"lse[{i}]", s)):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                raise DtypeError(f"{name}: expected a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if o.dim() < 1 or o.shape != first.shape or o.dtype != first.dtype or o.device != first.device:
            raise ShapeError(
                f"out[{i}]: expected the shape, dtype and device of out[0] ({list(first.shape)}, {first.dtype}, "
                f"{first.device}), got {list(o.shape)}, {o.dtype}, {o.device}"
            )
        if s.shape != o.shape[:-1] or s.device != o.device:
            raise ShapeError(
                f"lse[{i}]: expected shape {list(o.shape[:-1])} (the output's without its last dim) on {o.device}, "
                f"got {list(s.shape)} on {s.device}"
            )
