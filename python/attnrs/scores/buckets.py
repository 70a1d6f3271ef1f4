"""Position functions of the score mods: the bucket functions of :func:`~attnrs.scores.relative_bias` (T5's
log-spaced buckets, Shaw et al.'s clamped distances) and the standard ALiBi slopes.

They live apart from the :class:`~attnrs.scores.ScoreMod` value because each reproduces a published formula
exactly, op for op (transformers' ``T5Attention._relative_position_bucket`` and BLOOM's ``build_alibi_tensor``),
and is tested against it; the value only indexes tables with what they return. A bucket function maps relative
positions ``kv_idx - q_idx`` (an int64 tensor of any shape, or a batched 0-d tensor under ``torch.vmap``) to
bucket indices in ``[0, n_buckets)`` with torch ops only, so it is traceable by ``torch.compile``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..arguments import flag, positive
from ..errors import ArgumentError

__all__ = ["BucketFn", "ClampBuckets", "T5Buckets", "alibi_slopes", "clamp_buckets", "t5_buckets"]


class BucketFn:
    """A bucket function: relative position ``kv_idx - q_idx`` -> a table column. Build one with
    :func:`t5_buckets` or :func:`clamp_buckets`."""

    __slots__ = ()

    @property
    def n_buckets(self) -> int:
        """The number of table columns the buckets span (every bucket is in ``[0, n_buckets)``)."""
        raise NotImplementedError

    def __call__(self, relative_position: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class T5Buckets(BucketFn):
    """T5's relative-position buckets (see :func:`t5_buckets`)."""

    __slots__ = ("bidirectional", "max_distance", "num_buckets")

    def __init__(self, num_buckets: int, max_distance: int, bidirectional: bool) -> None:
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional

    @property
    def n_buckets(self) -> int:
        return self.num_buckets

    def __call__(self, relative_position: torch.Tensor) -> torch.Tensor:
        # Op for op transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket (same float32
        # rounding), with relative_position = memory_position - context_position = kv_idx - q_idx.
        num_buckets = self.num_buckets
        relative_buckets = torch.zeros_like(relative_position, dtype=torch.long)
        if self.bidirectional:
            num_buckets //= 2
            relative_buckets = relative_buckets + (relative_position > 0).to(torch.long) * num_buckets
            relative_position = torch.abs(relative_position)
        else:
            relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
        max_exact = num_buckets // 2
        is_small = relative_position < max_exact
        relative_position_if_large = max_exact + (
            torch.log(relative_position.float() / max_exact)
            / math.log(self.max_distance / max_exact)
            * (num_buckets - max_exact)
        ).to(torch.long)
        relative_position_if_large = torch.min(
            relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
        )
        return relative_buckets + torch.where(is_small, relative_position.to(torch.long), relative_position_if_large)

    def __repr__(self) -> str:
        direction = "bidirectional" if self.bidirectional else "causal"
        return f"t5_buckets({self.num_buckets}, {self.max_distance}, {direction})"


class ClampBuckets(BucketFn):
    """Clamped distances (see :func:`clamp_buckets`)."""

    __slots__ = ("max_distance",)

    def __init__(self, max_distance: int) -> None:
        self.max_distance = max_distance

    @property
    def n_buckets(self) -> int:
        return 2 * self.max_distance + 1

    def __call__(self, relative_position: torch.Tensor) -> torch.Tensor:
        m = self.max_distance
        return relative_position.to(torch.long).clamp(-m, m) + m

    def __repr__(self) -> str:
        return f"clamp_buckets({self.max_distance})"


def t5_buckets(num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True) -> T5Buckets:
    """T5's buckets of ``kv_idx - q_idx``, exactly as ``transformers``' ``T5Attention._relative_position_bucket``:
    half the buckets (a quarter when bidirectional, per direction) hold exact distances, the rest are spaced
    logarithmically up to ``max_distance``, past which every distance shares the last bucket. Bidirectional
    (the encoder's): later keys use the upper half of the buckets; causal (the decoder's): later keys share bucket
    0. The table needs ``num_buckets`` columns.

    ``num_buckets`` must leave at least one exact bucket (>= 2, >= 4 bidirectional) and ``max_distance`` must
    exceed the exact buckets (else transformers' formula divides by zero)."""
    bidirectional = flag(bidirectional, "t5_buckets: bidirectional")
    num_buckets = positive(num_buckets, "t5_buckets: num_buckets", maximum=2**31 - 1)
    max_distance = positive(max_distance, "t5_buckets: max_distance", maximum=2**31 - 1)
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_exact < 1:
        raise ArgumentError(
            f"t5_buckets: num_buckets: expected at least {4 if bidirectional else 2} (one exact bucket per "
            f"direction), got {num_buckets}"
        )
    if max_distance <= max_exact:
        raise ArgumentError(
            f"t5_buckets: max_distance: expected more than the {max_exact} exact buckets, got {max_distance}"
        )
    return T5Buckets(num_buckets, max_distance, bidirectional)


def clamp_buckets(max_distance: int) -> ClampBuckets:
    """Shaw et al.'s clipped relative positions: bucket ``clamp(kv_idx - q_idx, -max_distance, max_distance) +
    max_distance``. The table needs ``2 * max_distance + 1`` columns (column ``max_distance`` is distance 0)."""
    return ClampBuckets(positive(max_distance, "clamp_buckets: max_distance", maximum=2**31 - 1))


def alibi_slopes(num_heads: Any) -> torch.Tensor:
    """The standard ALiBi slopes ``[num_heads]`` (float32), exactly as transformers' BLOOM ``build_alibi_tensor``:
    a geometric sequence ``2^(-8/n), 2^(-16/n), ...`` for the largest power of two ``n <= num_heads``, and for
    the remaining heads every other slope of the sequence for ``2n``."""
    num_heads = positive(num_heads, "alibi: num_heads", maximum=2**20)
    closest_power_of_2 = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest_power_of_2) - 3))), dtype=torch.float32)
    powers = torch.arange(1, 1 + closest_power_of_2, dtype=torch.int32)
    slopes = torch.pow(base, powers)
    if closest_power_of_2 != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest_power_of_2) - 3))), dtype=torch.float32)
        num_remaining_heads = min(closest_power_of_2, num_heads - closest_power_of_2)
        extra_powers = torch.arange(1, 1 + 2 * num_remaining_heads, 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra_base, extra_powers)], dim=0)
    return slopes
