"""Which backend ``backend="auto"`` runs, and why.

One table, :data:`AUTO_ROUTES`, read top to bottom; the first row whose condition holds wins. The table below is
rendered from it when the module is imported, and ``attnrs info`` prints it:

{routes}

:func:`choose_backend` returns the backend with the row's reason. A backend given by name never goes through this
table: ``backend="<name>"`` of a registered native kernel (the built-in ``"attnrs"``,
:func:`attnrs.register_native`, installed plugins) runs that kernel, forward only, on CPU tensors. On CPU the Rust
kernel's own micro-kernel path per dtype is :func:`attnrs.kernel_path`'s answer.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .resolve import ResolvedMask

__all__ = [
    "AUTO_ROUTES",
    "Call",
    "Route",
    "choose_backend",
    "first_route",
    "flash_attn_available",
    "flash_reason",
    "needs_grad",
    "render_routes",
]


@functools.lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def flash_reason(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: ResolvedMask,
    sinks: torch.Tensor | None,
) -> str | None:
    """Why flash-attn cannot run these inputs, or None when it can."""
    if query.device.type != "cuda":
        return "flash-attn runs on CUDA tensors"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16/bfloat16, got {query.dtype}"
    if query.shape[-1] > 256 or value.shape[-1] != query.shape[-1]:
        return "flash-attn needs head dims <= 256 and Dv == D"
    if sinks is not None or resolved.bias is not None or resolved.dense_bool is not None:
        return "flash-attn has no sinks, additive bias or dense mask"
    mask = resolved.structural
    if mask is not None:
        causal_top_left = mask.kind == "causal" and mask.params["offset"] == resolved.kv_offset - resolved.q_offset
        if not (causal_top_left and query.shape[2] == key.shape[2]):
            return "flash-attn expresses only no mask or causal on a square grid here"
    return None


@dataclass(slots=True)
class Call:
    """What a route's condition looks at: one call's inputs, after the mask was resolved."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    resolved: ResolvedMask
    softcap: float | None
    sinks: torch.Tensor | None
    dropout_p: float
    return_lse: bool


@dataclass(frozen=True)
class Route:
    """One row of the table: on ``device`` (or, for :data:`ACCELERATOR`, every device but cpu and meta), when
    ``holds(call)``, run ``backend``; ``condition`` says when in words, ``reason`` why."""

    device: str
    condition: str
    backend: str
    reason: str
    holds: Callable[[Call], bool]


def _plain(call: Call) -> bool:
    r = call.resolved
    return call.sinks is None and r.bias is None and r.dense_bool is None


# The rows for every device but cpu and meta (CUDA first of all; XPU, MPS and others get torch's backends too).
ACCELERATOR = "cuda, other"


def _matches(route: Route, device: str) -> bool:
    return route.device == device or (route.device == ACCELERATOR and device not in ("cpu", "meta"))


AUTO_ROUTES: tuple[Route, ...] = (
    Route("cpu", "always (dropout included)", "native", "CPU: the Rust kernel", lambda c: True),
    Route(
        "meta",
        "always (shapes only)",
        "native",
        "meta tensors: the Rust kernel's operator gives the output's shape (no data)",
        lambda c: True,
    ),
    Route(
        ACCELERATOR,
        "flash-attn importable and the inputs fit it (flash_reason)",
        "flash",
        "CUDA, fp16/bf16, a mask flash-attn expresses",
        lambda c: flash_attn_available() and flash_reason(c.query, c.key, c.value, c.resolved, c.sinks) is None,
    ),
    Route(
        ACCELERATOR,
        "a structural mask, no sinks, bias, dense mask or dropout",
        "flex",
        "CUDA with a structural mask: flex_attention skips the empty blocks",
        lambda c: c.resolved.structural is not None and _plain(c) and c.dropout_p == 0,
    ),
    Route(
        ACCELERATOR,
        "softcap, sinks, or an LSE without dropout (SDPA returns none of them)",
        "math",
        "CUDA with softcap, sinks or a requested LSE, which SDPA lacks",
        lambda c: c.softcap is not None or c.sinks is not None or (c.return_lse and c.dropout_p == 0),
    ),
    Route(ACCELERATOR, "otherwise", "sdpa", "CUDA: torch SDPA with a dense mask", lambda c: True),
)


def render_routes(routes: tuple[Route, ...] = AUTO_ROUTES, *, rst: bool = False) -> str:
    """The table as aligned text (``rst=True``: a reStructuredText simple table, for the module's docs)."""
    rows = [("device", "condition", "backend"), *((r.device, r.condition, r.backend) for r in routes)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if not rst:
        return "\n".join(lines)
    rule = "  ".join("=" * w for w in widths)
    return "\n".join([rule, lines[0], rule, *lines[1:], rule])


def choose_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    resolved: ResolvedMask,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout_p: float,
    return_lse: bool,
) -> tuple[str, str]:
    """(backend, reason) for ``backend="auto"``: the first row of :data:`AUTO_ROUTES` that holds."""
    route = first_route(Call(query, key, value, resolved, softcap, sinks, dropout_p, return_lse), query.device.type)
    return route.backend, route.reason


def first_route(call: Call, device: str) -> Route:
    """The row of :data:`AUTO_ROUTES` that a call on ``device`` (a device type such as ``"cuda"``) takes."""
    for route in AUTO_ROUTES:
        if _matches(route, device) and route.holds(call):
            return route
    raise AssertionError("the last row holds on every device")


__doc__ = (__doc__ or "").replace("{routes}", render_routes(rst=True))
