"""Shared pieces of the fuzz suite (issue #15): the hypothesis budgets, a naive float64 reference of
``attnrs.attention`` written from the README's definitions, independent mask references, and a runner that
calls inputs in child processes so that a crash names its input instead of killing the test run.

Budgets: the default profile ``attnrs-fuzz`` is small and derandomized (CI is deterministic, the whole fuzz suite
runs in about a minute on two cores); ``ATTNRS_FUZZ=large`` selects ``attnrs-fuzz-large``: many more examples,
random seeds and larger shapes.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from attnrs import masks

RefFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LARGE = os.environ.get("ATTNRS_FUZZ", "").strip().lower() == "large"
TESTS_DIR = Path(__file__).resolve().parent

settings.register_profile(
    "attnrs-fuzz",
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile(
    "attnrs-fuzz-large",
    max_examples=400,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
PROFILE = "attnrs-fuzz-large" if LARGE else "attnrs-fuzz"


def fuzz_settings(default_examples: int, large_examples: int | None = None) -> settings:
    """The settings of one fuzz test: the selected profile with this test's example count (the large count is
    ``20 x`` the default one unless given)."""
    n = (large_examples or 20 * default_examples) if LARGE else default_examples
    return settings(settings.get_profile(PROFILE), max_examples=n)


def size(default: int, large: int) -> int:
    """An upper bound on a shape that grows with the large profile."""
    return large if LARGE else default


# ---------------------------------------------------------------------------------------------------------------
# The reference


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written from its definition in float64, differentiable (q, k, v, bias and sinks may require
    grad), on 4-D ``[B, H, S, D]`` inputs (GQA by repeating key/value heads).

    ``scores = q kᵀ scale``, then ``softcap * tanh(scores / softcap)``, ``+ bias``, ``-inf`` where not
    ``visible``; each row's softmax denominator also counts ``exp(sinks[h])``. As the README documents, a row
    that sees no key gives zeros and a log-sum-exp of ``-inf`` (the sink's logit when there are sinks), never NaN;
    NaN inputs in visible positions propagate as they do in torch's math path."""
    q, k, v = q.double(), k.double(), v.double()
    heads, d = q.shape[1], q.shape[-1]
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1) if k.shape[1] else k
        v = v.repeat_interleave(heads // v.shape[1], dim=1) if v.shape[1] else v
    if scale is None:
        scale = d**-0.5 if d else 1.0
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.double()
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(-1, keepdim=True) if scores.shape[-1] else scores.new_full((*scores.shape[:-1], 1), -1e300)
    if sinks is not None:
        sink = sinks.double().reshape(1, heads, 1, 1).expand(*row_max.shape)
        row_max = torch.maximum(row_max, sink)
    row_max = row_max.detach()
    # A row whose scores are all -inf (and no sink): subtract 0 instead of -inf, its weights are all 0. NaN rows
    # keep their NaN (NaN is not finite, but it must reach the output as it does in torch).
    finite = torch.isfinite(row_max) | torch.isnan(row_max)
    shift = torch.where(finite, row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - shift)
    denom = weights.sum(-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sinks.double().reshape(1, heads, 1, 1) - shift)
    empty = denom == 0
    safe = torch.where(empty, torch.ones_like(denom), denom)
    out = (weights / safe) @ v
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), torch.log(safe) + shift)
    return out, lse.squeeze(-1)


def tolerance(dtype: torch.dtype, head_dim: int = 64, logit_range: float = 0.0) -> float:
    """Absolute/relative tolerance of an output against the float64 reference (scaled by the output's size).
    Rounding errors of the logits grow with their size (``exp`` turns an absolute error into a relative one), so
    the float32 tolerance grows with ``logit_range`` (the largest finite |logit|)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return (2e-5 if head_dim <= 128 else 4e-5) * max(1.0, logit_range / 8)
    if dtype == torch.float16:
        return 4e-3
    return 3e-2  # bfloat16: 8 bits of mantissa


def assert_close_to_reference(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, head_dim: int, what: str = "out", logit_range: float = 0.0
) -> None:
    tol = tolerance(dtype, head_dim, logit_range)
    magnitude = max(1.0, float(ref.abs().nan_to_num(0.0).max()) if ref.numel() else 1.0)
    torch.testing.assert_close(
        out.double(), ref, rtol=tol, atol=tol * magnitude, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def assert_lse_close(lse: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, has_sinks: bool) -> None:
    assert lse.dtype == torch.float32, lse.dtype
    assert lse.shape == ref.shape, (lse.shape, ref.shape)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "rows with LSE -inf differ from the reference"
    assert not torch.isnan(lse).any(), "NaN in the LSE"
    finite = torch.isfinite(ref)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-3
    torch.testing.assert_close(lse.double()[finite], ref[finite], rtol=tol, atol=tol * 4)


def snapshot(*objects: Any) -> list[tuple[Any, torch.Tensor]]:
    """Clones of every tensor in ``objects`` (nested in lists/tuples/dicts too), to check nothing was mutated."""
    found: list[tuple[Any, torch.Tensor]] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            found.append((x, x.detach().clone()))
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)

    for obj in objects:
        walk(obj)
    return found


def assert_unchanged(saved: list[tuple[Any, torch.Tensor]]) -> None:
    for i, (tensor, copy) in enumerate(saved):
        assert tensor.shape == copy.shape, f"input tensor #{i} changed shape"
        assert torch.equal(tensor.detach().isnan(), copy.isnan()), f"input tensor #{i} was mutated (NaNs)"
        assert torch.equal(tensor.detach().nan_to_num(0.0), copy.nan_to_num(0.0)), f"input tensor #{i} was mutated"


# ---------------------------------------------------------------------------------------------------------------
# Masks with independent references


@dataclass
class MaskSpec:
    """An attnrs mask (a Mask or a plain mask_mod) and its reference ``ref(b, h, q_pos, kv_pos) -> bool`` on
    absolute positions (broadcasting int64 index tensors), written from the documented definitions."""

    mask: Any
    ref: RefFn
    text: str
    tables: list[torch.Tensor] = field(default_factory=list)


def _per_batch(values: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return values[b] if values.shape[0] > 1 else values[torch.zeros_like(b)]


def _row(table: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b if table.shape[0] > 1 else torch.zeros_like(b)


CALLABLES: list[tuple[str, RefFn]] = [
    ("(q + 2kv + h) % 3 != 0", lambda b, h, q, kv: ((q + 2 * kv + h) % 3) != 0),
    ("kv <= q and (b + h) even, or kv == 0", lambda b, h, q, kv: ((kv <= q) & ((b + h) % 2 == 0)) | (kv == 0)),
    ("|q - kv| < 4", lambda b, h, q, kv: (q - kv).abs() < 4),
    ("kv % 5 != 1", lambda b, h, q, kv: (kv % 5) != 1),
    ("nothing", lambda b, h, q, kv: (q < -(10**9)) & (kv < 0)),
]


@st.composite
def mask_specs(draw: st.DrawFn, batch: int, max_pos: int, depth: int = 0) -> MaskSpec:
    """A random mask whose tables cover positions ``0 .. max_pos - 1`` with batch 1 or ``batch``."""
    leaves = [
        "causal",
        "sliding",
        "sliding_overlay",
        "chunked",
        "padding",
        "document",
        "prefix",
        "bidirectional",
        "callable",
        *(["transformers"] if _TRANSFORMERS is not None else []),
    ]
    kinds = [*leaves, "and", "or", "not", "shift"] if depth < 2 else leaves
    kind = draw(st.sampled_from(kinds))
    table_batch = draw(st.sampled_from(sorted({1, max(1, batch)})))
    n = max(1, max_pos)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "causal":
        off = draw(st.integers(-5, 5))
        return MaskSpec(masks.causal(off), lambda b, h, q, kv: kv <= q + off, f"causal({off})")
    if kind == "sliding":
        w, causal = draw(st.integers(1, 20)), draw(st.booleans())
        if causal:
            return MaskSpec(
                masks.sliding_window(w), lambda b, h, q, kv: (kv > q - w) & (kv <= q), f"sliding_window({w})"
            )
        return MaskSpec(
            masks.sliding_window(w, causal=False),
            lambda b, h, q, kv: (q - kv).abs() <= w,
            f"sliding_window({w}, causal=False)",
        )
    if kind == "sliding_overlay":
        w = draw(st.integers(1, 20))
        return MaskSpec(masks.sliding_window_overlay(w), lambda b, h, q, kv: kv > q - w, f"sliding_window_overlay({w})")
    if kind == "chunked":
        chunk, causal = draw(st.integers(1, 12)), draw(st.booleans())
        lp = torch.randint(0, 6, (table_batch,), generator=gen)
        lp_arg: Any = lp if draw(st.booleans()) else lp.tolist()

        def chunk_ref(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            start = _per_batch(lp, b)
            same = torch.div(kv - start, chunk, rounding_mode="floor") == torch.div(
                q - start, chunk, rounding_mode="floor"
            )
            return same & (kv <= q) if causal else same

        return MaskSpec(
            masks.chunked(chunk, lp_arg, causal=causal), chunk_ref, f"chunked({chunk}, {lp.tolist()})", [lp]
        )
    if kind == "padding":
        width = draw(st.integers(1, n + 3))
        valid = torch.rand(table_batch, width, generator=gen) > draw(st.sampled_from([0.0, 0.3, 0.9]))

        def pad_ref(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            inside = (kv >= 0) & (kv < width)
            return valid[_row(valid, b), kv.clamp(0, width - 1)] & inside

        return MaskSpec(masks.padding(valid), pad_ref, f"padding({list(valid.shape)})", [valid])
    if kind == "document":
        width = n + draw(st.integers(0, 3))
        ids = torch.randint(0, draw(st.integers(1, 4)), (table_batch, width), generator=gen)
        if draw(st.booleans()):
            ids = ids.sort(-1).values
        ids_arg = ids[0] if table_batch == 1 and draw(st.booleans()) else ids

        def doc_ref(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            inside = (q >= 0) & (q < width) & (kv >= 0) & (kv < width)
            row = _row(ids, b)
            return (ids[row, q.clamp(0, width - 1)] == ids[row, kv.clamp(0, width - 1)]) & inside

        return MaskSpec(masks.document(ids_arg), doc_ref, f"document({ids.tolist()})", [ids])
    if kind == "prefix":
        lengths = torch.randint(0, n + 2, (table_batch,), generator=gen)
        return MaskSpec(
            masks.prefix_lm(lengths),
            lambda b, h, q, kv: (kv < _per_batch(lengths, b)) | (kv <= q),
            f"prefix_lm({lengths.tolist()})",
            [lengths],
        )
    if kind == "bidirectional":
        return MaskSpec(masks.bidirectional(), lambda b, h, q, kv: (q == q) & (kv == kv), "bidirectional()")
    if kind == "transformers":
        return draw(_transformers_masks(table_batch, n, gen))
    if kind == "callable":
        text, fn = draw(st.sampled_from(CALLABLES))
        # A plain mask_mod (not recognised), or the same wrapped in from_callable.
        wrapped = (lambda b, h, q, kv: fn(b, h, q, kv)) if draw(st.booleans()) else masks.from_callable(fn)
        return MaskSpec(wrapped, fn, f"mask_mod[{text}]")
    if kind == "not":
        inner = draw(mask_specs(batch, max_pos, depth + 1))
        return MaskSpec(
            ~masks.as_mask(inner.mask), lambda b, h, q, kv: ~inner.ref(b, h, q, kv), f"~{inner.text}", inner.tables
        )
    if kind == "shift":
        inner = draw(
            mask_specs(batch, 0, depth + 1).filter(lambda s: "document" not in s.text and "packed" not in s.text)
        )
        dq, dk = draw(st.integers(-4, 4)), draw(st.integers(-4, 4))
        return MaskSpec(
            masks.as_mask(inner.mask).shifted(dq, dk),
            lambda b, h, q, kv: inner.ref(b, h, q + dq, kv + dk),
            f"{inner.text}.shifted({dq}, {dk})",
            inner.tables,
        )
    parts = [draw(mask_specs(batch, max_pos, depth + 1)) for _ in range(draw(st.integers(2, 3)))]
    if kind == "and":
        if draw(st.booleans()):
            combined = masks.and_masks(*(p.mask for p in parts))
        else:
            combined = masks.as_mask(parts[0].mask)
            for p in parts[1:]:
                combined = combined & p.mask

        def and_ref(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            out = parts[0].ref(b, h, q, kv)
            for p in parts[1:]:
                out = out & p.ref(b, h, q, kv)
            return out

        return MaskSpec(
            combined, and_ref, "(" + " & ".join(p.text for p in parts) + ")", [t for p in parts for t in p.tables]
        )
    combined = masks.or_masks(*(p.mask for p in parts))

    def or_ref(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        out = parts[0].ref(b, h, q, kv)
        for p in parts[1:]:
            out = out | p.ref(b, h, q, kv)
        return out

    return MaskSpec(
        combined, or_ref, "(" + " | ".join(p.text for p in parts) + ")", [t for p in parts for t in p.tables]
    )


try:
    from transformers import masking_utils as _TRANSFORMERS
except ImportError:  # transformers is optional
    _TRANSFORMERS = None


@st.composite
def _transformers_masks(draw: st.DrawFn, table_batch: int, n: int, gen: torch.Generator) -> MaskSpec:
    """transformers' own mask functions (recognised by attnrs as structural masks), with the references of the
    pieces they mean."""
    mu = _TRANSFORMERS
    kind = draw(st.sampled_from(["causal", "overlay", "bidirectional_overlay", "chunked", "padding", "packed", "and"]))
    if kind == "causal":
        return MaskSpec(mu.causal_mask_function, lambda b, h, q, kv: kv <= q, "mu.causal_mask_function")
    if kind == "overlay":
        w = draw(st.integers(-3, 20))  # configs ship 0 for "no window"; transformers still builds the mask
        return MaskSpec(mu.sliding_window_overlay(w), lambda b, h, q, kv: kv > q - w, f"mu.sliding_window_overlay({w})")
    if kind == "bidirectional_overlay":
        w = draw(st.integers(-2, 20))
        return MaskSpec(
            mu.sliding_window_bidirectional_overlay(w),
            lambda b, h, q, kv: (q - kv).abs() <= w,
            f"mu.sliding_window_bidirectional_overlay({w})",
        )
    if kind == "chunked":
        chunk = draw(st.integers(1, 12))
        lp = torch.randint(0, 6, (table_batch,), generator=gen)

        def chunk_ref(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            start = _per_batch(lp, b)
            return torch.div(kv - start, chunk, rounding_mode="floor") == torch.div(
                q - start, chunk, rounding_mode="floor"
            )

        return MaskSpec(mu.chunked_overlay(chunk, lp), chunk_ref, f"mu.chunked_overlay({chunk}, {lp.tolist()})", [lp])
    if kind == "padding":
        valid = torch.rand(table_batch, n, generator=gen) > 0.3

        def pad_ref(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return valid[_row(valid, b), kv.clamp(0, n - 1)] & (kv >= 0) & (kv < n)

        return MaskSpec(
            mu.padding_mask_function(valid), pad_ref, f"mu.padding_mask_function({list(valid.shape)})", [valid]
        )
    if kind == "packed":
        ids = torch.randint(0, 3, (table_batch, n), generator=gen).sort(-1).values

        def doc_ref(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            inside = (q >= 0) & (q < n) & (kv >= 0) & (kv < n)
            row = _row(ids, b)
            return (ids[row, q.clamp(0, n - 1)] == ids[row, kv.clamp(0, n - 1)]) & inside

        return MaskSpec(
            mu.packed_sequence_mask_function(ids), doc_ref, f"mu.packed_sequence_mask_function({ids.tolist()})", [ids]
        )
    w = draw(st.integers(1, 10))
    combine = draw(st.sampled_from(["and", "or"]))
    if combine == "and":
        return MaskSpec(
            mu.and_masks(mu.causal_mask_function, mu.sliding_window_overlay(w)),
            lambda b, h, q, kv: (kv <= q) & (kv > q - w),
            f"mu.and_masks(causal, overlay({w}))",
        )
    return MaskSpec(
        mu.or_masks(mu.causal_mask_function, mu.sliding_window_bidirectional_overlay(w)),
        lambda b, h, q, kv: (kv <= q) | ((q - kv).abs() <= w),
        f"mu.or_masks(causal, bidirectional_overlay({w}))",
    )


def evaluate_ref(
    ref: RefFn, batch: int, heads: int, q_len: int, kv_len: int, q_offset: int, kv_offset: int
) -> torch.Tensor:
    b = torch.arange(batch).view(-1, 1, 1, 1)
    h = torch.arange(heads).view(1, -1, 1, 1)
    q = (torch.arange(q_len) + q_offset).view(1, 1, -1, 1)
    kv = (torch.arange(kv_len) + kv_offset).view(1, 1, 1, -1)
    return ref(b, h, q, kv).expand(batch, heads, q_len, kv_len)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs in child processes


@dataclass
class Outcome:
    """What one input did in a child process: ``returned``, ``raised`` (with the exception's classes and
    message), ``crashed`` (the child died: signal or exit status, and the tail of its stderr) or ``timeout``."""

    kind: str
    type_name: str = ""
    mro: list[str] = field(default_factory=list)
    message: str = ""
    detail: str = ""
    seconds: float = 0.0

    def describe(self) -> str:
        if self.kind == "raised":
            return f"raised {self.type_name}: {self.message[:300]}"
        if self.kind in ("crashed", "timeout"):
            head, _, tail = self.detail.partition("; ")
            return f"{self.kind} ({head}; ...{tail[-500:]})"
        return self.kind


_CHILD = r"""
import importlib, json, os, resource, select, signal, sys, time
limit = int(os.environ.pop("ATTNRS_FUZZ_RLIMIT_AS", "0"))
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.path.insert(0, os.environ.pop("ATTNRS_FUZZ_TESTS_DIR"))
timeouts = json.loads(os.environ.pop("ATTNRS_FUZZ_TIMEOUTS"))
forked = set(json.loads(os.environ.pop("ATTNRS_FUZZ_FORK")))
module = importlib.import_module(sys.argv[1])  # imports torch and attnrs once; no attnrs call runs here
import attnrs  # noqa: E402
attnrs.masks.from_callable(lambda b, h, q, kv: kv <= q)  # imports transformers' mask functions (pure Python)


def run(name):
    start = time.monotonic()
    try:
        module.CASES[name].call()
        result = {"kind": "returned"}
    except BaseException as e:
        result = {"kind": "raised", "type_name": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                  "message": str(e)[:2000]}
    result["seconds"] = time.monotonic() - start
    return result


def run_forked(name):
    # A fresh copy of this process per case: a crash or a hang takes only that copy down.
    start = time.monotonic()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            data = json.dumps(run(name)).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    chunks, deadline = [], start + timeouts.get(name, 20.0)
    while True:
        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return {"kind": "timeout", "detail": f"no answer in {timeouts.get(name, 20.0)} s",
                    "seconds": time.monotonic() - start}
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if chunks:
        return json.loads(b"".join(chunks))
    how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit status {os.WEXITSTATUS(status)}"
    return {"kind": "crashed", "detail": how + "; stderr: (see the test's captured stderr)",
            "seconds": time.monotonic() - start}


out = sys.stdout
for name in sys.argv[2:]:
    out.write("START " + name + "\n")
    out.flush()
    result = run_forked(name) if name in forked else run(name)
    out.write("END " + json.dumps(result) + "\n")
    out.flush()
"""


def _reader(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_in_children(
    module: str,
    names: Sequence[str],
    *,
    timeouts: dict[str, float] | None = None,
    default_timeout: float = 20.0,
    rlimit_as: int = 4 << 30,
    env: dict[str, str] | None = None,
    fork: Sequence[str] = (),
) -> dict[str, Outcome]:
    """Calls ``module.CASES[name].call()`` for each name in a child Python process, with the address space limited
    to ``rlimit_as`` bytes and a wall-clock limit per case. The child imports ``module`` (and so torch and
    attnrs) once; the cases named in ``fork`` (those likely to crash or to change the process) run in a forked
    copy of it, so they cost one fork, not a fresh child. A case that kills the child (or overruns) is recorded
    against it and a fresh child continues with the next one."""
    timeouts = timeouts or {}
    results: dict[str, Outcome] = {}
    pending = list(names)
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["ATTNRS_FUZZ_TESTS_DIR"] = str(TESTS_DIR)
    child_env["ATTNRS_FUZZ_RLIMIT_AS"] = str(rlimit_as)
    child_env["ATTNRS_FUZZ_TIMEOUTS"] = json.dumps({n: timeouts.get(n, default_timeout) for n in names})
    child_env["ATTNRS_FUZZ_FORK"] = json.dumps(list(fork))
    child_env.setdefault("RUST_BACKTRACE", "0")
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    while pending:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, module, *pending],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env,
            cwd=TESTS_DIR,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        errors: list[str] = []
        readers = [
            threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True),
            threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True),  # type: ignore[arg-type]
        ]
        for reader in readers:
            reader.start()
        current: str | None = None
        started = time.monotonic()
        startup_limit = 120.0  # importing torch on a busy machine
        while True:
            limit = startup_limit if current is None else timeouts.get(current, default_timeout) + 30
            try:
                line = lines.get(timeout=max(0.1, limit - (time.monotonic() - started)))
            except queue.Empty:
                proc.kill()
                proc.wait()
                if current is None:
                    raise RuntimeError(
                        f"the fuzz child did not start in {startup_limit} s: {''.join(errors)[-2000:]}"
                    ) from None
                results[current] = Outcome("timeout", detail=f"no answer in {limit} s", seconds=limit)
                pending.remove(current)
                break
            if line is None:  # the child is gone
                rc = proc.wait()
                readers[1].join(timeout=10)  # the whole of stderr
                if current is None:
                    if pending and not results.keys() >= set(pending):
                        raise RuntimeError(f"the fuzz child died before any case (rc {rc}): {''.join(errors)[-3000:]}")
                    pending = []
                    break
                how = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
                results[current] = Outcome(
                    "crashed", detail=f"{how}; stderr: {''.join(errors)[-1500:]}", seconds=time.monotonic() - started
                )
                pending.remove(current)
                break
            if line.startswith("START "):
                current = line[6:].strip()
                started = time.monotonic()
            elif line.startswith("END ") and current is not None:
                data = json.loads(line[4:])
                results[current] = Outcome(**data)
                pending.remove(current)
                current = None
                started = time.monotonic()
                startup_limit = 1e9
                if not pending:
                    proc.wait()
                    break
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for reader in readers:
            reader.join(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    return results


def typed_error_problem(
    outcome: Outcome, words: Sequence[str], allowed: Sequence[str] = ("AttnrsError",), internal_ok: bool = False
) -> str | None:
    """None when the child raised one of ``allowed`` (class names in its MRO; never ``InternalError``, a panic,
    unless ``internal_ok``) with every one of ``words`` in its message (``"a|b"``: either); otherwise what went
    wrong."""
    if outcome.kind != "raised":
        return outcome.describe() if outcome.kind != "returned" else "returned without an error"
    if "InternalError" in outcome.mro and not internal_ok:
        return f"an InternalError (a panic or broken invariant): {outcome.message[:300]}"
    if not any(a in outcome.mro for a in allowed):
        return f"an untyped error {outcome.type_name} (expected {'/'.join(allowed)}): {outcome.message[:300]}"
    message = outcome.message.lower()
    missing = [w for w in words if not any(alt.lower() in message for alt in w.split("|"))]
    if missing:
        return f"the message does not name {missing}: {outcome.type_name}: {outcome.message[:300]}"
    return None


def statm_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
