"""How many worker threads the Rust kernels use."""

from __future__ import annotations

import os

import torch

from .errors import ArgumentError

ENV_VAR = "ATTNRS_NUM_THREADS"


def num_threads() -> int:
    """``ATTNRS_NUM_THREADS`` if set, else ``torch.get_num_threads()`` (read at every call, like torch)."""
    override = os.environ.get(ENV_VAR)
    if override is None or override.strip() == "":
        return max(1, torch.get_num_threads())
    try:
        value = int(override)
    except ValueError:
        raise ArgumentError(f"{ENV_VAR}: expected a positive integer, got {override!r}") from None
    if value < 1:
        raise ArgumentError(f"{ENV_VAR}: expected a positive integer, got {value}")
    return value
