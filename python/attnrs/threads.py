"""How many worker threads the Rust kernels use."""

from __future__ import annotations

import os

import torch

from .errors import ArgumentError

ENV_VAR = "ATTNRS_NUM_THREADS"
# More workers than this cannot help any machine attnrs runs on, and each is an OS thread kept for the process.
MAX_THREADS = 1024


def num_threads() -> int:
    """``ATTNRS_NUM_THREADS`` if set, else ``torch.get_num_threads()`` (read at every call, like torch)."""
    override = os.environ.get(ENV_VAR)
    if override is None or override.strip() == "":
        return max(1, torch.get_num_threads())
    try:
        value = int(override)
    except ValueError:
        raise ArgumentError(f"{ENV_VAR}: expected a positive integer, got {override!r}") from None
    if not 1 <= value <= MAX_THREADS:
        raise ArgumentError(f"{ENV_VAR}: expected a positive integer of at most {MAX_THREADS}, got {value}")
    return value
