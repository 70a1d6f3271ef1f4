"""Ring attention: each rank keeps its query shard and the key/value shards travel around the ring, one hop per
step, the transfer of the next step overlapped with the compute of the current one (ring-flash-attention's
``zigzag_ring_flash_attn``, torch's ``_templated_ring_attention``).

Forward, on rank ``r`` of ``W``: at step ``s`` the rank holds the K/V shard of rank ``r - s``; each of its query
chunks against each chunk of that shard is classified (:func:`~attnrs.distributed.pairs.pair_class`): pairs the
mask hides are skipped, full pairs that line up are fused into one unmasked call, the others run attnrs.attention
at the pair's global offsets; each result is merged into the rows' running ``(out, lse)`` (float32, float64 for
float64 inputs). Backward:
the K/V shards go around again with a dK/dV accumulator travelling one hop behind them; each rank adds its
pairs' gradients (computed from the global out/lse, :func:`~attnrs.distributed.pairs.pair_backward`) to the
accumulator of the shard it holds and passes it on; after ``W`` hops every accumulator is back with its owner.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..attention.merge import merge_attention_states
from ..masks.mask import Mask
from .checks import check_call
from .pairs import pair_backward, pair_class, pair_forward
from .sharding import Chunk, rank_chunks

__all__ = ["RingTimings", "last_ring_timings", "ring_attention"]


@dataclass
class RingTimings:
    """Where this process's last ring call spent its time (seconds): ``wait`` is time blocked on a receive (the
    communication compute did not hide), ``compute`` time in attention calls and merges, ``total`` the whole
    pass; ``pairs``/``skipped`` count the (query chunk, key chunk) pairs the forward computed and skipped,
    ``calls`` the attention calls they took (full pairs are fused)."""

    forward_total: float = 0.0
    forward_wait: float = 0.0
    forward_compute: float = 0.0
    backward_total: float = 0.0
    backward_wait: float = 0.0
    backward_compute: float = 0.0
    pairs: int = 0
    calls: int = 0
    skipped: int = 0


_LAST = RingTimings()


def last_ring_timings() -> RingTimings:
    """The timings of this process's most recent :func:`ring_attention` forward (and backward, once run)."""
    return _LAST


class _Ring:
    """Point-to-point exchange with the ring neighbours of ``group`` (send to rank + 1, receive from rank - 1)."""

    def __init__(self, group: Any, rank: int, world_size: int) -> None:
        self.group = group
        self.next = (
            dist.get_global_rank(group, (rank + 1) % world_size) if group is not None else (rank + 1) % world_size
        )
        self.prev = (
            dist.get_global_rank(group, (rank - 1) % world_size) if group is not None else (rank - 1) % world_size
        )
        self.waited = 0.0

    def start(self, send: torch.Tensor, tag: int) -> tuple[list[Any], torch.Tensor]:
        """Starts sending ``send`` to the next rank and receiving a tensor like it from the previous one."""
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.prev, self.group, tag),
        ]
        return dist.batch_isend_irecv(ops), recv

    def wait(self, pending: tuple[list[Any], torch.Tensor]) -> torch.Tensor:
        """The received tensor, once both transfers are done (the wait is timed)."""
        t0 = time.perf_counter()
        for request in pending[0]:
            request.wait()
        self.waited += time.perf_counter() - t0
        return pending[1]


def _pack(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unpack(buf: torch.Tensor, *likes: torch.Tensor) -> list[torch.Tensor]:
    out, at = [], 0
    for like in likes:
        out.append(buf[at : at + like.numel()].view(like.shape))
        at += like.numel()
    return out


class _Call(NamedTuple):
    """One attention call of a step: query rows ``q`` (local rows of this rank's shard) against key rows ``kv``
    (of the shard held), with the mask at their global offsets (``masked``) or without (every pair full)."""

    q: Chunk
    kv: Chunk
    masked: bool


def _span(chunks: list[Chunk]) -> Chunk | None:
    """One chunk covering ``chunks`` when their local rows are consecutive (global starts no longer matter: only
    unmasked calls are fused), else None."""
    chunks = sorted(chunks, key=lambda c: c.local)
    if any(a.local + a.size != b.local for a, b in itertools.pairwise(chunks)):
        return None
    return Chunk(chunks[0].start, chunks[0].local, sum(c.size for c in chunks))


@dataclass
class _Plan:
    """What both passes need besides the tensors."""

    mask: Mask | None
    scale: float
    group: Any
    rank: int
    world_size: int
    layout: str
    cache: dict[int, tuple[list[_Call], int]] = field(default_factory=dict)

    def chunks(self, rank: int, local_len: int) -> list[Chunk]:
        return rank_chunks(local_len, self.world_size, rank, self.layout)

    def calls(self, q: torch.Tensor, src: int) -> tuple[list[_Call], int]:
        """The attention calls of the step holding rank ``src``'s K/V, and how many (query chunk, key chunk)
        pairs they cover. Pairs the mask hides are skipped; query chunks whose visible pairs are all full and
        see the same key chunks are fused into one unmasked call (zigzag under a causal mask: one call per step
        after the first, as ring-flash-attention does); the rest run pair by pair. Found once per call of
        ring_attention: the backward reuses the forward's answer."""
        if src in self.cache:
            return self.cache[src]
        b, h, n, _ = q.shape
        q_chunks, kv_chunks = self.chunks(self.rank, n), self.chunks(src, n)
        classes = {
            (qc, kc): pair_class(self.mask, b, h, qc.start, qc.size, kc.start, kc.size)
            for qc in q_chunks
            for kc in kv_chunks
        }
        visible = {qc: [kc for kc in kv_chunks if classes[qc, kc] != "empty"] for qc in q_chunks}
        fusable: dict[tuple[Chunk, ...], list[Chunk]] = {}
        calls: list[_Call] = []
        for qc in q_chunks:
            if visible[qc] and all(classes[qc, kc] == "full" for kc in visible[qc]):
                fusable.setdefault(tuple(visible[qc]), []).append(qc)
            else:
                calls += [_Call(qc, kc, classes[qc, kc] == "partial") for kc in visible[qc]]
        for kcs, qcs in fusable.items():
            q_span, kv_span = _span(qcs), _span(list(kcs))
            if q_span is not None and kv_span is not None:
                calls.append(_Call(q_span, kv_span, False))
            else:
                calls += [_Call(qc, kc, False) for qc in qcs for kc in kcs]
        self.cache[src] = (calls, sum(len(kcs) for kcs in visible.values()))
        return self.cache[src]


def _rows(t: torch.Tensor, c: Chunk) -> torch.Tensor:
    return t.narrow(2, c.local, c.size)


def _ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    t0 = time.perf_counter()
    ring = _Ring(plan.group, plan.rank, plan.world_size)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, n, _ = q.shape
    # Rows no call reaches keep attention's own answer for rows that see nothing: zeros and an LSE of -inf.
    acc_out = q.new_zeros(b, h, n, v.shape[-1], dtype=compute)
    acc_lse = q.new_full((b, h, n), -torch.inf, dtype=compute)
    kv = _pack(k, v)
    for step in range(plan.world_size):
        src = (plan.rank - step) % plan.world_size
        pending = ring.start(kv, 0) if step < plan.world_size - 1 else None
        k_cur, v_cur = _unpack(kv, k, v)
        calls, pairs = plan.calls(q, src)
        _LAST.pairs += pairs
        _LAST.calls += len(calls)
        _LAST.skipped += len(plan.chunks(0, n)) ** 2 - pairs
        started = time.perf_counter()
        for call in calls:
            out, lse = pair_forward(
                _rows(q, call.q),
                _rows(k_cur, call.kv),
                _rows(v_cur, call.kv),
                plan.mask if call.masked else None,
                call.q.start,
                call.kv.start,
                plan.scale,
            )
            merged_out, merged_lse = merge_attention_states(
                _rows(acc_out, call.q), _rows(acc_lse, call.q), out.to(compute), lse.to(compute)
            )
            _rows(acc_out, call.q).copy_(merged_out)
            _rows(acc_lse, call.q).copy_(merged_lse)
        _LAST.forward_compute += time.perf_counter() - started
        if pending is not None:
            kv = ring.wait(pending)
    _LAST.forward_wait, _LAST.forward_total = ring.waited, time.perf_counter() - t0
    return acc_out.to(q.dtype), acc_lse.to(torch.float32)


def _ring_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    plan: _Plan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t0 = time.perf_counter()
    ring = _Ring(plan.group, plan.rank, plan.world_size)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    kv = _pack(k, v)
    pending_grads: tuple[list[Any], torch.Tensor] | None = None
    last = plan.world_size - 1
    for step in range(plan.world_size):
        src = (plan.rank - step) % plan.world_size
        pending_kv = ring.start(kv, 0) if step < last else None
        k_cur, v_cur = _unpack(kv, k, v)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
        started = time.perf_counter()
        for call in plan.calls(q, src)[0]:
            dq_p, dk_p, dv_p = pair_backward(
                _rows(q, call.q),
                _rows(k_cur, call.kv),
                _rows(v_cur, call.kv),
                _rows(out, call.q),
                _rows(lse, call.q),
                _rows(grad_out, call.q),
                None if grad_lse is None else _rows(grad_lse, call.q),
                plan.mask if call.masked else None,
                call.q.start,
                call.kv.start,
                plan.scale,
            )
            _rows(dq, call.q).add_(dq_p)
            _rows(dk, call.kv).add_(dk_p)
            _rows(dv, call.kv).add_(dv_p)
        _LAST.backward_compute += time.perf_counter() - started
        if pending_grads is not None:  # the accumulator of shard src, from the ranks before this one
            dk_in, dv_in = _unpack(ring.wait(pending_grads), dk, dv)
            dk.add_(dk_in)
            dv.add_(dv_in)
        if plan.world_size > 1:
            pending_grads = ring.start(_pack(dk, dv), 1)
        if pending_kv is not None:
            kv = ring.wait(pending_kv)
    if pending_grads is not None:  # every rank's share of this rank's own K/V, back from its last holder
        dk, dv = _unpack(ring.wait(pending_grads), dk, dv)
    _LAST.backward_wait, _LAST.backward_total = ring.waited, time.perf_counter() - t0
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    """The ring forward and its ring backward as one autograd node (so no per-step graph is kept)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan) -> Any:
        out, lse = _ring_forward(q, k, v, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None) -> Any:
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = _ring_backward(q, k, v, out, lse, grad_out, grad_lse, ctx.plan)
        return dq, dk, dv, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Any = None,
    *,
    group: Any = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    layout: str = "zigzag",
    return_lse: bool = False,
) -> Any:
    """Attention over a sequence sharded across the ranks of ``group`` (a collective: every rank calls it).

    ``q``, ``k``, ``v`` are this rank's shards ``[B, H, L_local, D]`` (``k``/``v`` may have fewer heads: GQA) of a
    global sequence of ``world_size * L_local`` positions, sharded by ``layout`` (see
    :mod:`attnrs.distributed.sharding`: ``"zigzag"``, balanced under causal masks, or ``"contiguous"``).
    ``mask`` is None, ``"causal"``, or an attnrs Mask / mask_mod over *global* positions (causal, sliding windows,
    documents with global ids, their combinations). Returns this rank's output shard ``[B, H, L_local, Dv]``
    (and the float32 LSE ``[B, H, L_local]`` with ``return_lse``), both differentiable. ``enable_gqa`` is
    accepted for SDPA's signature; GQA shapes work either way.

    Bad arguments on any rank (dtypes, shapes that differ across ranks, an odd ``L_local`` for zigzag, mask
    tables that do not cover the global sequence, a dense mask) raise the same :mod:`attnrs.errors` exception on
    every rank before any transfer (:mod:`attnrs.distributed.checks`). :func:`last_ring_timings` says where the
    call spent its time."""
    plan_args = check_call(q, k, v, mask, scale, layout, group, "ring_attention")
    plan = _Plan(plan_args.mask, plan_args.scale, group, plan_args.rank, plan_args.world_size, layout)
    global _LAST
    _LAST = RingTimings()
    out, lse = _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan)
    return (out, lse) if return_lse else out
