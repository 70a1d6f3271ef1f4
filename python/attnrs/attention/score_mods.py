"""The ``score_mod`` argument of :func:`attnrs.attention` and where each form runs.

FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)`` changes the scaled logit of every pair before the
mask. attnrs takes it in two forms:

* an :mod:`attnrs.scores` value (ALiBi, relative biases, per-head scales, tables, softcap, and their
  compositions): the Rust kernel evaluates its terms inside the tile loop (:meth:`ScoreMod.terms`), with no
  ``Q x K`` tensor, forward and backward (gradients reach its tables through the terms);
* any other callable: run exactly, chunk of query rows by chunk, with torch ops
  (:mod:`attnrs.attention.score_callable`), or handed to ``flex_attention`` on CUDA.

Which backend takes which form (``backend="auto"``: values on the Rust kernel on CPU, callables tile by tile on
CPU, both through ``flex_attention`` on CUDA):

=============  ==================================  ==============================================
backend        attnrs.scores value                 other callable
=============  ==================================  ==============================================
``native``     the Rust kernel                     refused (the kernel runs values only)
``math``       tile by tile in torch               tile by tile in torch
``flex``       ``flex_attention(score_mod=...)``   ``flex_attention(score_mod=...)``
``sdpa``       refused                             refused
``flash``      refused                             refused
=============  ==================================  ==============================================

Semantics (flex's): the score mod gets the scaled logit and ``q_idx = q_offset + i``, ``kv_idx = kv_offset + j``
(the same alignment as masks); a ``softcap`` keyword applies after it; then the additive ``attn_mask`` and the
mask; ``-inf`` from a score mod hides the pair; the LSE and the gradients see the modified score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ArgumentError, DtypeError, ShapeError, UnsupportedError
from ..scores import ScoreMod
from ..scores import softcap as softcap_mod
from ..scores.recognise import is_identity_score_mod, recognise_transformers_score_mod

__all__ = ["ScoreModLike", "resolve_score_mod", "term_tensors"]

ScoreModLike = ScoreMod | Callable[..., Any]


def resolve_score_mod(
    score_mod: Any, softcap: float | None, shape: tuple[int, int, int, int]
) -> tuple[ScoreModLike | None, float | None, torch.Tensor | None]:
    """``(score mod, softcap, extra bias)`` in the forms the backends take.

    A ``softcap`` keyword joins a value as its last step (it must not have one already); with a callable it stays
    separate (applied after the callable). Known callables become what they compute: torch's identity is no
    score mod, transformers' FlexAttention closure a softcap plus its captured tensors as an additive ``[B, H, Q,
    K]`` bias (indexed by rows and columns, as FlexAttention indexes them)."""
    if score_mod is None or is_identity_score_mod(score_mod):
        return None, softcap, None
    extra: torch.Tensor | None = None
    parts = recognise_transformers_score_mod(score_mod)
    if parts is not None:
        extra = _captured_bias(parts, shape)
        if parts["softcap"] is None:
            return None, softcap, extra
        score_mod = softcap_mod(parts["softcap"])
    if isinstance(score_mod, ScoreMod):
        if softcap is not None:
            if score_mod.cap is not None:
                raise ArgumentError(
                    f"softcap: score_mod {score_mod!r} already ends with a softcap; pass one or the other"
                )
            score_mod = score_mod.then(softcap_mod(softcap))
        return score_mod, None, extra
    if not callable(score_mod) or isinstance(score_mod, torch.Tensor):
        raise DtypeError(
            "score_mod: expected None, an attnrs.scores value or a callable score_mod(score, b, h, q_idx, kv_idx), "
            f"got {type(score_mod).__name__}"
        )
    return score_mod, softcap, None


def _captured_bias(parts: dict[str, Any], shape: tuple[int, int, int, int]) -> torch.Tensor | None:
    """The additive tensors a transformers closure captured, as one ``[B, H, Q, K]`` view (None: none)."""
    batch, heads, q_len, kv_len = shape
    total: torch.Tensor | None = None
    mask = parts["score_mask"]
    for name, t in (
        ("score_mask", mask if parts["score_mask_per_head"] or mask is None else mask[:, :1]),
        ("position_bias", parts["position_bias"]),
    ):
        if t is None:
            continue
        try:
            t = t[..., :q_len, :kv_len].expand(shape)
        except RuntimeError:
            raise ShapeError(
                f"score_mod: the transformers closure's {name} has shape {list(t.shape)}, which does not cover "
                f"[{batch}, {heads}, {q_len}, {kv_len}]"
            ) from None
        total = t if total is None else total + t
    return total


def term_tensors(
    score_mod: ScoreMod, query: torch.Tensor, kv_len: int, q_offset: int, kv_offset: int
) -> tuple[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None], float | None]:
    """``((head_scale, distance, key), softcap)``: the value's terms for this call, as the kernel operator takes
    them (float64 for float64 inputs, else float32)."""
    batch, heads, q_len, _ = query.shape
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    terms = score_mod.terms(
        batch=batch, heads=heads, q_len=q_len, kv_len=kv_len, q_offset=q_offset, kv_offset=kv_offset, dtype=dtype
    )
    return (terms.head_scale, terms.distance, terms.key), terms.softcap


def refuse(backend: str, score_mod: ScoreModLike) -> UnsupportedError:
    """The error for a backend that cannot run this score mod."""
    if backend == "native":
        return UnsupportedError(
            f"score_mod: the Rust kernel evaluates attnrs.scores values; {_name(score_mod)} is a Python callable, "
            "which runs with backend='auto' or 'math' (exactly, tile by tile in torch) or 'flex'"
        )
    return UnsupportedError(
        f"score_mod: backend {backend!r} has no score_mod; use backend='auto', 'native' (attnrs.scores values), "
        "'math' or 'flex'"
    )


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
