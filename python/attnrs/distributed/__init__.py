"""Context parallelism: attention over a sequence sharded across the ranks of a ``torch.distributed`` process
group (gloo on CPU, NCCL on CUDA), ``attnrs.distributed``.

* :func:`ring_attention`: K/V shards passed around the ring, overlapped with compute; masked pairs skipped.
* :func:`allgather_attention`: K/V gathered once; for short rings.
* :func:`shard_sequence`, :func:`unshard_sequence`, :func:`shard_positions`: the ``zigzag`` (load-balanced) and
  ``contiguous`` layouts.

Modules: :mod:`~attnrs.distributed.sharding` (layouts), :mod:`~attnrs.distributed.checks` (argument checks that
agree across ranks), :mod:`~attnrs.distributed.pairs` (one query chunk x key chunk: skip test, forward, exact
backward), :mod:`~attnrs.distributed.ring`, :mod:`~attnrs.distributed.allgather`.
"""

from __future__ import annotations

from .allgather import allgather_attention
from .ring import RingTimings, last_ring_timings, ring_attention
from .sharding import LAYOUTS, shard_positions, shard_sequence, unshard_sequence

__all__ = [
    "LAYOUTS",
    "RingTimings",
    "allgather_attention",
    "last_ring_timings",
    "ring_attention",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]
