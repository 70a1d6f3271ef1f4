"""The custom operators of the Rust kernels: ``attnrs::attention`` (forward, with autograd), its
``attnrs::attention_backward``, and ``attnrs::native_attention`` (a registered native kernel by name, forward
only); their fake (meta) implementations, the autograd glue, and the dropout seed they take.

Each schema is written once: the operands every operator takes after ``query, key, value`` are the fields of
:class:`KernelOperands` (which :meth:`KernelOperands.binding_args` groups as the Rust entry points take them), and
the schema strings below are built from it and from the per-operator tails. The Python implementations unpack the
schema's arguments by those fields, so an operand added or removed is one edit of :class:`KernelOperands`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .. import _attnrs
from ..arguments import check_memory, non_negative
from ..errors import ArgumentError, UnsupportedError
from ..precision import f32_precision_code
from ..threads import num_threads

__all__ = [
    "KernelOperands",
    "attention_backward_op",
    "attention_op",
    "direct_call_allowed",
    "draw_dropout_seed",
    "dropout_keep_pattern",
    "native_attention_op",
    "run_attention",
    "seed_value",
]


class KernelOperands(NamedTuple):
    """The mask, the sinks, the score mod's terms and the score's scalars: what every operator takes after
    ``query, key, value``. The terms are :class:`attnrs.scores.ScoreTerms`'s tensors (``head_scale [H]``,
    ``score_distance [H or 1, Q + K - 1]``, ``score_key [B or 1, H or 1, K]``), differentiable inputs."""

    dense_mask: torch.Tensor | None
    bias: torch.Tensor | None
    sinks: torch.Tensor | None
    head_scale: torch.Tensor | None
    score_distance: torch.Tensor | None
    score_key: torch.Tensor | None
    mask_program: torch.Tensor  # the structural mask at its offsets, packed (``_attnrs.mask_operand``); or empty
    scale: float
    softcap: float

    def binding_args(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float, seed: int
    ) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...]]:
        """The groups every Rust entry point takes around its outputs: ``(query, key, value, sinks, head_scale,
        score_distance, score_key)`` before them, then ``(mask_program, dense_mask, bias)`` and
        ``(scale, softcap, dropout_p, dropout_seed, num_threads, f32_precision)`` (:mod:`attnrs.precision`)."""
        return (
            (query, key, value, self.sinks, self.head_scale, self.score_distance, self.score_key),
            (self.mask_program, self.dense_mask, self.bias),
            # The precision only concerns float32 inputs (reading torch's setting costs a few µs a call).
            (self.scale, self.softcap, dropout_p, seed, num_threads(), _precision_code(query.dtype)),
        )


def _precision_code(dtype: torch.dtype) -> int:
    return f32_precision_code() if dtype == torch.float32 else 0


class DropoutOperands(NamedTuple):
    """What the forward and backward take after :class:`KernelOperands`. ``dropout_seed`` is an int64 scalar
    tensor (a tensor, so that a new seed per call needs no recompilation)."""

    dropout_p: float
    dropout_seed: torch.Tensor | None


class GradientOperands(NamedTuple):
    """What the backward takes after :class:`DropoutOperands`: the forward's results and their gradients."""

    out: torch.Tensor
    lse: torch.Tensor
    grad_out: torch.Tensor
    grad_lse: torch.Tensor | None
    want_sinks: bool
    want_bias: bool
    want_score_distance: bool
    want_score_key: bool


# Python annotation (as written above) -> torch schema type.
_SCHEMA_TYPES = {
    "torch.Tensor": "Tensor",
    "torch.Tensor | None": "Tensor?",
    "int": "SymInt",
    "float": "float",
    "bool": "bool",
    "str": "str",
}


def _arguments(*groups: type) -> str:
    """``"Tensor? dense_mask, ..."``: the schema arguments of these NamedTuples' fields, in order."""
    return ", ".join(
        f"{_SCHEMA_TYPES[str(getattr(kind, '__forward_arg__', kind))]} {name}"  # annotations are ForwardRefs here
        for group in groups
        for name, kind in group.__annotations__.items()
    )


_QKV = "Tensor query, Tensor key, Tensor value"
_N = len(KernelOperands._fields)  # the operands after query, key, value
_G = _N + len(DropoutOperands._fields)  # where the backward's GradientOperands start
_BIAS = 3 + KernelOperands._fields.index("bias")  # input positions, for needs_input_grad
_SINKS = 3 + KernelOperands._fields.index("sinks")
_DISTANCE = 3 + KernelOperands._fields.index("score_distance")
_KEY = 3 + KernelOperands._fields.index("score_key")

ATTENTION_SCHEMA = f"({_QKV}, {_arguments(KernelOperands, DropoutOperands)}) -> (Tensor, Tensor)"
ATTENTION_BACKWARD_SCHEMA = (
    f"({_QKV}, {_arguments(KernelOperands, DropoutOperands, GradientOperands)}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
NATIVE_ATTENTION_SCHEMA = f"(str name, {_QKV}, {_arguments(KernelOperands)}, bool want_lse) -> (Tensor, Tensor)"


def draw_dropout_seed() -> torch.Tensor:
    """The int64 scalar seed one dropout call takes from torch's default CPU generator (one draw, so
    ``torch.manual_seed`` reproduces the pattern; under ``torch.compile`` the draw is traced like any random op)."""
    return torch.empty((), dtype=torch.int64).random_()


def dropout_keep_pattern(shape: tuple[int, int, int, int], dropout_p: float, seed: torch.Tensor | int) -> torch.Tensor:
    """The bool ``[B, H, Q, K]`` pattern (True = kept) the Rust kernel applies for this probability and seed:
    kept weights are scaled by ``1 / (1 - dropout_p)``. For tests and debugging; O(B·H·Q·K)."""
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 4:
        raise ArgumentError(f"shape: expected a (B, H, Q, K) tuple, got {shape!r}")
    dims = [non_negative(n, f"shape[{i}]") for i, n in enumerate(shape)]
    check_memory("shape", math.prod(dims), f"a keep pattern of {dims}")
    out = torch.empty(dims, dtype=torch.bool)
    _attnrs.dropout_keep_pattern(out, float(dropout_p), seed_value(float(dropout_p), torch.as_tensor(seed)))
    return out


def seed_value(dropout_p: float, seed: torch.Tensor | None) -> int:
    """The seed tensor as the unsigned 64-bit integer the kernel takes (0 without dropout)."""
    if dropout_p == 0:
        return 0
    if seed is None or seed.numel() != 1 or seed.dtype != torch.int64:
        raise ArgumentError(f"dropout_seed: expected an int64 scalar tensor with dropout_p > 0, got {seed!r}")
    return int(seed.item()) & 0xFFFF_FFFF_FFFF_FFFF


# -- attnrs::attention -------------------------------------------------------------------------------------------


def run_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    operands: KernelOperands,
    dropout_p: float,
    dropout_seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Rust CPU kernel's forward, as ``attnrs::attention`` runs it: ``out`` laid out ``[B, Q, H, Dv]``
    (contiguous) and the f32 LSE [B, H, Q]. Eager calls that autograd does not record run it directly
    (:func:`direct_call_allowed`)."""
    b, h, q_len, _ = query.shape
    out = torch.empty(b, q_len, h, value.shape[-1], dtype=query.dtype)
    lse = torch.empty(b, h, q_len, dtype=torch.float32)
    inputs, mask, scalars = operands.binding_args(query, key, value, dropout_p, seed_value(dropout_p, dropout_seed))
    _attnrs.attention_forward(inputs, (out.transpose(1, 2), lse), mask, scalars)
    return out, lse


def direct_call_allowed(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on these tensors may skip the custom operator and run :func:`run_attention` itself: eager
    (not compiling, tracing or profiling), no torch function or dispatch mode, plain ``torch.Tensor``\\ s, none
    that autograd would record. The operator's dispatch costs ~60 µs a call, more than a short decode step; a
    call it would not change (no graph, no mode, no subclass to see it) need not pay that."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()  # type: ignore[attr-defined, no-untyped-call]  # untyped in torch's stubs
        or torch.autograd._profiler_enabled()  # type: ignore[attr-defined]  # any profiler, kineto's included
        or torch._C._len_torch_function_stack() > 0
        or torch._C._len_torch_dispatch_stack() > 0
    ):
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) is torch.Tensor and not (grad and t.requires_grad)) for t in tensors)


@torch.library.custom_op("attnrs::attention", mutates_args=(), device_types="cpu", schema=ATTENTION_SCHEMA)
def attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Rust CPU kernel (:func:`run_attention`), with autograd and a fake implementation for compile."""
    dropout = DropoutOperands(*args[_N:])
    return run_attention(query, key, value, KernelOperands(*args[:_N]), dropout.dropout_p, dropout.dropout_seed)


@attention_op.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, q_len, _ = query.shape
    out = query.new_empty(b, q_len, h, value.shape[-1])
    lse = query.new_empty(b, h, q_len, dtype=torch.float32)
    return out, lse


# -- attnrs::attention_backward ----------------------------------------------------------------------------------


@torch.library.custom_op(
    "attnrs::attention_backward", mutates_args=(), device_types="cpu", schema=ATTENTION_BACKWARD_SCHEMA
)
def attention_backward_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any
) -> tuple[torch.Tensor, ...]:
    """The Rust backward. ``out``/``grad_out`` are laid out [B, Q, H, Dv] like the forward's output. Returns
    (dq, dk, dv, dsinks f32 [H], dbias f32 [B, H, Q, K], dscore_distance [H, Q + K - 1], dscore_key [B, H, K]),
    each of the last four empty when not wanted (the terms' gradients in float64 for float64 inputs)."""
    operands = KernelOperands(*args[:_N])
    dropout = DropoutOperands(*args[_N:_G])
    grads = GradientOperands(*args[_G:])
    grad_query = torch.empty(query.shape, dtype=query.dtype)
    grad_key = torch.empty(key.shape, dtype=key.dtype)
    grad_value = torch.empty(value.shape, dtype=value.dtype)
    grad_sinks = torch.empty(query.shape[1] if grads.want_sinks else 0, dtype=torch.float32)
    b, h, q_len, _ = query.shape
    grad_bias = torch.empty((b, h, q_len, key.shape[2]) if grads.want_bias else (0,), dtype=torch.float32)
    grad_distance, grad_score_key = _term_grads(query, key, grads, torch.empty)
    inputs, mask, scalars = operands.binding_args(
        query, key, value, dropout.dropout_p, seed_value(dropout.dropout_p, dropout.dropout_seed)
    )
    gradients = (
        grads.grad_out.transpose(1, 2),
        grads.grad_lse,
        grad_query,
        grad_key,
        grad_value,
        grad_sinks if grads.want_sinks else None,
        grad_bias if grads.want_bias else None,
        grad_distance if grads.want_score_distance else None,
        grad_score_key if grads.want_score_key else None,
    )
    _attnrs.attention_backward(inputs, (grads.out.transpose(1, 2), grads.lse), mask, scalars, gradients)
    return grad_query, grad_key, grad_value, grad_sinks, grad_bias, grad_distance, grad_score_key


def _term_grads(
    query: torch.Tensor, key: torch.Tensor, grads: GradientOperands, empty: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the score terms as the kernel writes them (``[H, Q + K - 1]``, ``[B, H, K]``; empty when
    not wanted; float64 for float64 inputs, else float32), allocated by ``empty(shape, dtype=...)``."""
    b, h, q_len, _ = query.shape
    kv_len = key.shape[2]
    span = max(q_len + kv_len - 1, 0)
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return (
        empty((h, span) if grads.want_score_distance else (0,), dtype=dtype),
        empty((b, h, kv_len) if grads.want_score_key else (0,), dtype=dtype),
    )


@attention_backward_op.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any) -> tuple[torch.Tensor, ...]:
    grads = GradientOperands(*args[_G:])
    b, h, q_len, _ = query.shape
    return (
        torch.empty_like(query),
        torch.empty_like(key),
        torch.empty_like(value),
        query.new_empty(h if grads.want_sinks else 0, dtype=torch.float32),
        query.new_empty((b, h, q_len, key.shape[2]) if grads.want_bias else (0,), dtype=torch.float32),
        *_term_grads(query, key, grads, query.new_empty),
    )


# -- autograd of attnrs::attention -------------------------------------------------------------------------------


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    # Tensors (and absent optional tensors) are saved for backward; the other inputs are kept on ctx.
    ctx.is_tensor = [x is None or isinstance(x, torch.Tensor) for x in inputs]
    ctx.save_for_backward(*(x for x, t in zip(inputs, ctx.is_tensor) if t), *output)
    ctx.others = [x for x, t in zip(inputs, ctx.is_tensor) if not t]


def _backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple[Any, ...]:
    saved, others = iter(ctx.saved_tensors), iter(ctx.others)
    inputs = [next(saved) if t else next(others) for t in ctx.is_tensor]
    out, lse = saved
    bias, sinks = inputs[_BIAS], inputs[_SINKS]
    distance, key_terms = inputs[_DISTANCE], inputs[_KEY]
    want = [bool(ctx.needs_input_grad[i]) for i in (_SINKS, _BIAS, _DISTANCE, _KEY)]
    dq, dk, dv, dsinks, dbias, ddistance, dkey = torch.ops.attnrs.attention_backward(
        *inputs, out, lse, grad_out, grad_lse, *want
    )
    grads: list[Any] = [None] * len(inputs)
    grads[:3] = dq, dk, dv
    grads[_SINKS] = dsinks.to(sinks.dtype) if want[0] else None
    grads[_BIAS] = dbias.to(bias.dtype) if want[1] else None
    # The kernel writes the terms' gradients per head (and per batch); broadcast operands take their sums.
    grads[_DISTANCE] = ddistance.sum_to_size(distance.shape).to(distance.dtype) if want[2] else None
    grads[_KEY] = dkey.sum_to_size(key_terms.shape).to(key_terms.dtype) if want[3] else None
    return tuple(grads)


attention_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
    raise UnsupportedError(
        "attnrs.attention: second-order gradients (double backward, e.g. create_graph=True then backward) are not "
        "supported by the Rust kernel; use backend='math' for them"
    )


attention_backward_op.register_autograd(_no_double_backward)


# -- attnrs::native_attention ------------------------------------------------------------------------------------


@torch.library.custom_op(
    "attnrs::native_attention", mutates_args=(), device_types="cpu", schema=NATIVE_ATTENTION_SCHEMA
)
def native_attention_op(
    name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """A registered native kernel by name. Returns ``out`` laid out ``[B, Q, H, Dv]`` and the f32 LSE [B, H, Q]
    (left unwritten when ``want_lse`` is False: kernels without an LSE are not asked for one)."""
    operands, (want_lse,) = KernelOperands(*args[:_N]), args[_N:]
    b, h, q_len, _ = query.shape
    out = torch.empty(b, q_len, h, value.shape[-1], dtype=query.dtype)
    lse = torch.empty(b, h, q_len, dtype=torch.float32)
    inputs, mask, scalars = operands.binding_args(query, key, value, 0.0, 0)
    _attnrs.native_attention_forward(name, inputs, (out.transpose(1, 2), lse if want_lse else None), mask, scalars)
    return out, lse


@native_attention_op.register_fake
def _(
    name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, q_len, _ = query.shape
    out = query.new_empty(b, q_len, h, value.shape[-1])
    lse = query.new_empty(b, h, q_len, dtype=torch.float32)
    return out, lse
