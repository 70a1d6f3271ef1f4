"""Scalar arguments as the Rust core takes them: ints that fit in int64, bools, and the memory a size implies.

Each conversion raises attnrs's typed errors naming the argument, so a value Rust cannot hold (an int past int64,
a float where a count belongs) is refused here, never an ``OverflowError`` or a ``TypeError`` from deep inside
the binding. :func:`check_memory` refuses a size whose allocation could not succeed on this machine before
anything is allocated, with the same budget and wording as the Rust core's checks.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from . import _attnrs
from .errors import ArgumentError, LayoutError

__all__ = [
    "FLOAT32_MAX",
    "FLOAT32_TINY",
    "INT64_MAX",
    "INT64_MIN",
    "MEMORY_BUDGET",
    "check_memory",
    "flag",
    "human_bytes",
    "integer",
    "is_real",
    "non_negative",
    "positive",
    "strided",
]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32
# Read once per process, as Rust reads it (a constant here, so torch.compile traces the checks).
MEMORY_BUDGET = _attnrs.memory_budget()


def integer(
    value: Any, name: str, *, minimum: int = INT64_MIN, maximum: int = INT64_MAX, what: str = "an integer"
) -> int:
    """``value`` as a Python int in ``[minimum, maximum]`` (int64 by default): Python and NumPy integers and
    one-element integer tensors; bools, floats and everything else are refused."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        if value.dtype != torch.bool and not value.is_complex():
            value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ArgumentError(f"{name}: expected {what}, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ArgumentError(f"{name}: expected {what}, got {value}")
    if value > maximum:
        raise ArgumentError(f"{name}: expected {what} of at most {maximum}, got {value}")
    return value


def positive(value: Any, name: str, *, maximum: int = INT64_MAX) -> int:
    """A positive int (at most ``maximum``)."""
    return integer(value, name, minimum=1, maximum=maximum, what="a positive integer")


def non_negative(value: Any, name: str, *, maximum: int = INT64_MAX) -> int:
    """A non-negative int (at most ``maximum``)."""
    return integer(value, name, minimum=0, maximum=maximum, what="a non-negative integer")


def is_real(x: Any) -> bool:
    """A real number that is not a bool: Python's int and float, and NumPy's scalars (numbers.Real)."""
    if type(x) is float or type(x) is int:  # the usual call, without the ABC check (~0.3 µs)
        return True
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def flag(value: Any, name: str) -> bool:
    """A bool (Python's or NumPy's); ints and everything else are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def human_bytes(n: int) -> str:
    """Bytes as a short size ("1.5 GiB"), as the Rust core writes them."""
    value, unit = float(n), 0
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")
    while value >= 1024.0 and unit + 1 < len(units):
        value, unit = value / 1024.0, unit + 1
    return f"{n} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def check_memory(name: str, nbytes: int, what: str) -> None:
    """Refuses ``what`` (e.g. "a dense mask of [1, 1, 2^40, 2^40]") if its ``nbytes`` exceed what one request may
    need here (physical memory, cgroup and process limits: :data:`MEMORY_BUDGET`), naming ``name``."""
    budget = MEMORY_BUDGET
    if nbytes > budget:
        raise ArgumentError(
            f"{name}: expected sizes whose memory fits here (at most {human_bytes(budget)}), got {what}, "
            f"which needs {human_bytes(nbytes)}"
        )


def strided(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` if it is a dense (strided) tensor; sparse, nested and other layouts are a LayoutError (the kernels read
    memory through strides)."""
    if t.layout != torch.strided or t.is_nested:
        kind = "a nested tensor" if t.is_nested else f"a {t.layout} tensor"
        raise LayoutError(f"{name}: expected a dense (strided) tensor, got {kind}")
    return t
