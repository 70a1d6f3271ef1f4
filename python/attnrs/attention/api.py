"""``attnrs.attention``: scaled dot-product attention with masks as values, on a Rust CPU kernel; this module runs
a resolved call on the backend asked for (or chosen by :mod:`attnrs.attention.dispatch`).

The call is SDPA's (``torch.nn.functional.scaled_dot_product_attention``): ``query [..., H, Q, D]``,
``key [..., Hkv, K, D]``, ``value [..., Hkv, K, Dv]``, batch dims broadcast, GQA when ``H % Hkv == 0``, output
``[..., H, Q, Dv]``; attnrs's extras are keyword-only.

Masks (one alignment rule: masks and mask_mods see indices from 0 on both axes, as in FlexAttention; the
``q_offset``/``kv_offset`` keywords place them elsewhere, e.g. ``q_offset=K - Q`` for a KV cache):

* ``None``; ``is_causal=True`` is SDPA's top-left causal mask (``kv <= q`` on row/column indices), and torch's
  ``causal_upper_left``/``causal_lower_right`` are the causal masks they mean;
* an attnrs :class:`~attnrs.masks.Mask` or a plain ``mask_mod`` callable;
* an :class:`attnrs.BlockMask` carries its own offsets and lengths, which must match the inputs exactly; a
  torch ``BlockMask`` is honoured block by block with its ``mask_mod`` on partial blocks;
* a dense bool (True = attend) or additive float tensor broadcastable to ``[..., H, Q, K]``.

Rows that see no key give zeros (and a log-sum-exp of ``-inf``), never NaN.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, cast, overload

import torch

from .. import _attnrs
from ..errors import ArgumentError, DeviceError, UnsupportedError
from ..plugins import BUILTIN_KERNEL, is_native
from ..scores import ScoreMod
from .dispatch import choose_backend, needs_grad
from .ops import KernelOperands, direct_call_allowed, draw_dropout_seed, run_attention
from .resolve import ResolvedMask, batched_inputs, check_scalars, kernel_operands, resolve_mask
from .score_callable import callable_score_attention
from .score_mods import ScoreModLike, refuse, resolve_score_mod, term_tensors
from .torch_backends import torch_attention

__all__ = ["BACKENDS", "attention", "check_backend", "run_resolved"]

BACKENDS = ("auto", "native", "sdpa", "flex", "flash", "math")


@overload
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    q_offset: int = 0,
    kv_offset: int = 0,
    softcap: float | None = None,
    score_mod: Any = None,
    sinks: torch.Tensor | None = None,
    return_lse: Literal[False] = False,
    backend: str = "auto",
) -> torch.Tensor: ...


@overload
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    q_offset: int = 0,
    kv_offset: int = 0,
    softcap: float | None = None,
    score_mod: Any = None,
    sinks: torch.Tensor | None = None,
    return_lse: Literal[True],
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    q_offset: int = 0,
    kv_offset: int = 0,
    softcap: float | None = None,
    score_mod: Any = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    q_offset: int = 0,
    kv_offset: int = 0,
    softcap: float | None = None,
    score_mod: Any = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``torch.nn.functional.scaled_dot_product_attention``'s call and meaning, plus attnrs's masks and extras.

    The positional parameters are SDPA's, in SDPA's order; attnrs's extras are keyword-only. Inputs are
    ``query [..., H, Q, D]``, ``key [..., Hkv, K, D]``, ``value [..., Hkv, K, Dv]`` with any number of leading
    batch dims, broadcast as SDPA broadcasts them; GQA (``H % Hkv == 0``) is accepted with or without
    ``enable_gqa`` (transformers passes GQA shapes without it). The output is ``[..., H, Q, Dv]``.

    Args:
        attn_mask: ``None``; a bool (True = attend) or additive float tensor broadcastable to ``[..., H, Q, K]``;
            torch's ``causal_upper_left``/``causal_lower_right``; an attnrs :class:`~attnrs.masks.Mask` or a
            ``mask_mod(b, h, q_idx, kv_idx)`` callable; an attnrs or torch ``BlockMask``. **Alignment**: masks
            and mask_mods see indices from 0 on both axes, as in FlexAttention (query row ``i`` is at position
            ``q_offset + i``, key ``j`` at ``kv_offset + j``; pass ``q_offset=K - Q`` for the KV-cache,
            bottom-right convention); a BlockMask carries its own offsets.
        dropout_p: dropout on the attention weights, in ``[0, 1]`` (always applied when > 0, as SDPA does;
            1 gives zeros). On CPU the Rust kernel drops with a counter-based generator seeded by one draw from
            torch's default generator (:func:`draw_dropout_seed`), so ``torch.manual_seed`` reproduces a run and
            the backward regenerates the forward's pattern (see :func:`attnrs.dropout_keep_pattern`).
        is_causal: SDPA's top-left causal mask (``kv <= q`` on row/column indices); combined (AND) with
            ``attn_mask`` when both are given.
        scale: multiplies ``Q Kᵀ`` (default ``D ** -0.5``); a Python or NumPy number.
        enable_gqa: SDPA's flag; GQA shapes are accepted either way.
        q_offset, kv_offset: the positions of query row 0 and key 0 for a Mask or mask_mod (see ``attn_mask``).
        softcap: ``s = softcap * tanh(s / softcap)`` after scaling (and after ``score_mod``), before the mask
            (Gemma 2).
        score_mod: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)``, applied to the scaled logit before
            the mask (``q_idx``/``kv_idx`` are positions, as for masks): an :mod:`attnrs.scores` value (ALiBi,
            relative biases, per-head scales, tables, softcap; evaluated inside the Rust kernel, gradients
            into its tables) or any callable (run exactly with torch ops, chunk of rows by chunk; slower). See
            :mod:`attnrs.attention.score_mods`.
        sinks: ``[H]`` logits that join each row's softmax denominator only (GPT-OSS).
        return_lse: also return the float32 log-sum-exp ``[..., H, Q]`` of each row.
        backend: ``"auto"`` (see :mod:`attnrs.attention.dispatch`), ``"native"`` (the Rust CPU kernel), ``"sdpa"``,
            ``"flex"``, ``"flash"`` (flash-attn, CUDA), ``"math"`` (plain differentiable torch), or the name of a
            registered native kernel (:func:`attnrs.register_native`, installed plugins, ``"attnrs"``: the
            built-in kernel through the kernel table).

    Rows that see no key give zeros (and a log-sum-exp of ``-inf``), never NaN; NaN in a row's query, in a key,
    value or bias entry it sees, gives that row NaN, as torch's math path does. Errors are
    :mod:`attnrs.errors` classes, which are also ``RuntimeError``\\ s as SDPA's are.
    """
    batched = batched_inputs(query, key, value, enable_gqa)
    query, key, value = batched.query, batched.key, batched.value
    scale = check_scalars(query, scale, softcap, sinks, dropout_p)
    check_backend(backend)
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    resolved = resolve_mask(
        attn_mask,
        bool(is_causal),
        shape,
        query.device,
        batch_shape=batched.batch_shape,
        q_offset=q_offset,
        kv_offset=kv_offset,
    )
    out, lse = run_resolved(
        query, key, value, resolved, scale, softcap, sinks, dropout_p, backend, return_lse, score_mod=score_mod
    )
    if return_lse:
        return batched.restore(out), batched.restore(cast(torch.Tensor, lse))  # every backend returns it or raises
    return batched.restore(out)


def check_backend(backend: Any) -> None:
    """Raises ArgumentError unless ``backend`` is one of :data:`BACKENDS` or a registered native kernel (installed
    plugins are loaded the first time an unknown name is asked for)."""
    if isinstance(backend, str) and (backend in BACKENDS or is_native(backend)):
        return
    raise ArgumentError(
        f"backend: expected one of {BACKENDS} or a registered native kernel {_attnrs.native_kernels()}, got {backend!r}"
    )


def _run_kernel(
    name: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: ResolvedMask,
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout_p: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs the registered native kernel ``name`` (forward only)."""
    if dropout_p > 0:
        raise UnsupportedError(f"dropout_p > 0: native kernel {name!r} has no dropout; use backend='native'")
    if needs_grad(query, key, value, sinks, resolved.bias):
        raise UnsupportedError(
            f"native kernel {name!r}: gradients through plugin kernels are not supported yet; run under "
            "torch.no_grad() / torch.inference_mode(), or use backend='auto'"
        )
    if query.device.type != "cpu":
        raise DeviceError(f"query: native kernel {name!r} gets CPU tensors from attnrs, got a tensor on {query.device}")
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    operands = kernel_operands(resolved, shape, sinks, scale, softcap)
    out, lse = torch.ops.attnrs.native_attention(name, query, key, value, *operands, return_lse)
    return out.transpose(1, 2), (lse if return_lse else None)


def run_resolved(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: ResolvedMask,
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout_p: float,
    backend: str,
    return_lse: bool,
    *,
    score_mod: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs attention on an already resolved mask with the chosen backend (``auto``: see
    :mod:`attnrs.attention.dispatch`; with a ``score_mod``: :mod:`attnrs.attention.score_mods`)."""
    if dropout_p == 1:
        # Every weight dropped: zeros, as SDPA gives (with zero gradients); the LSE is the undropped one.
        out, lse = run_resolved(
            query, key, value, resolved, scale, softcap, sinks, 0.0, backend, return_lse, score_mod=score_mod
        )
        return out * 0, lse
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    mod, softcap, captured = resolve_score_mod(score_mod, softcap, shape)
    if captured is not None:  # a transformers FlexAttention closure's tensors: an additive bias
        resolved = dataclasses.replace(resolved, bias=captured if resolved.bias is None else resolved.bias + captured)
    if mod is not None:
        return _run_score_mod(
            query, key, value, resolved, shape, scale, softcap, sinks, dropout_p, backend, return_lse, mod
        )
    if backend == BUILTIN_KERNEL and (dropout_p > 0 or needs_grad(query, key, value, sinks, resolved.bias)):
        # The built-in kernel's dropout and backward are wired through autograd on the "native" operator.
        backend = "native"
    if backend not in BACKENDS:
        check_backend(backend)
        return _run_kernel(
            name=backend,
            query=query,
            key=key,
            value=value,
            resolved=resolved,
            scale=scale,
            softcap=softcap,
            sinks=sinks,
            dropout_p=dropout_p,
            return_lse=return_lse,
        )
    if backend == "auto":
        backend, _reason = choose_backend(query, key, value, resolved, softcap, sinks, dropout_p, return_lse)
    if backend == "native":
        return _native(query, key, value, kernel_operands(resolved, shape, sinks, scale, softcap), dropout_p)
    return torch_attention(backend, query, key, value, resolved, shape, scale, softcap, sinks, return_lse, dropout_p)


def _native(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, operands: KernelOperands, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Rust kernel's operator (``attnrs::attention``, with autograd) on CPU tensors."""
    if query.device.type != "cpu":
        raise DeviceError(f"query: the native backend runs on CPU, got a tensor on {query.device}")
    seed = draw_dropout_seed() if dropout_p > 0 else None
    tensors = (operands.dense_mask, operands.bias, operands.sinks, operands.head_scale)
    if direct_call_allowed(query, key, value, *tensors, operands.score_distance, operands.score_key):
        out, lse = run_attention(query, key, value, operands, float(dropout_p), seed)
    else:
        out, lse = torch.ops.attnrs.attention(query, key, value, *operands, float(dropout_p), seed)
    return out.transpose(1, 2), lse


def _run_score_mod(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: ResolvedMask,
    shape: tuple[int, int, int, int],
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout_p: float,
    backend: str,
    return_lse: bool,
    mod: ScoreModLike,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`run_resolved` with a score mod (see the table in :mod:`attnrs.attention.score_mods`)."""
    is_value = isinstance(mod, ScoreMod)
    if isinstance(mod, ScoreMod) and query.device.type != "meta":
        mod = mod.to(query.device)  # e.g. scores.alibi(8) (slopes on CPU) for CUDA inputs: flex indexes them there
    if backend == BUILTIN_KERNEL and is_value:
        backend = "native"  # the kernel table's ABI has no score terms; the built-in kernel runs them directly
    if backend == "auto":
        if query.device.type in ("cpu", "meta"):
            backend = "native" if is_value else "math"
        else:
            backend = "flex"
    if backend == "native" and isinstance(mod, ScoreMod):
        terms, cap = term_tensors(mod, query, shape[3], resolved.q_offset, resolved.kv_offset)
        return _native(query, key, value, kernel_operands(resolved, shape, sinks, scale, cap, terms), dropout_p)
    if dropout_p > 0:
        raise UnsupportedError(
            f"dropout_p > 0 with a score_mod: only the Rust kernel drops weights with a score mod, and it runs "
            f"attnrs.scores values (backend {backend!r}, score_mod {mod!r})"
        )
    if backend == "math":
        return callable_score_attention(query, key, value, resolved, mod, scale, softcap, sinks, return_lse)
    if backend == "flex":
        return torch_attention(
            "flex", query, key, value, resolved, shape, scale, softcap, sinks, return_lse, score_mod=mod
        )
    raise refuse(backend, mod)
