"""The bad inputs of the fuzz suite (issue #15), by name: each one is called in a child process by
:func:`fuzz_support.run_in_children` (so an abort or a segfault is a test failure naming the input) and must raise
an :class:`attnrs.AttnrsError` subclass (or the documented builtin) whose message names the argument.

``xfail`` gives the reason of a known, not yet fixed defect (the test is then a strict xfail, so it flips when the
fix lands); every defect issue #15 listed, and those this suite found, are fixed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import attnrs
from attnrs import masks


@dataclass
class BadCase:
    """One bad input: ``call`` must raise an error of a class in ``allowed`` whose message contains ``words``."""

    call: Callable[[], Any]
    words: Sequence[str]
    allowed: Sequence[str] = ("AttnrsError",)
    timeout: float = 20.0
    xfail: str | None = None  # the reason, "#15: ...", for a known defect
    may_return: bool = False  # returning (e.g. a meta tensor for meta inputs) is also correct
    risky: bool = False  # may crash the child: run after the others (one fresh child each)


CASES: dict[str, BadCase] = {}


def qkv(b: int = 1, h: int = 2, q_len: int = 8, kv_len: int = 8, d: int = 16) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, h, q_len, d, generator=gen),
        torch.randn(b, h, kv_len, d, generator=gen),
        torch.randn(b, h, kv_len, d, generator=gen),
    )


def attend(*args: Any, b: int = 1, h: int = 2, q_len: int = 8, kv_len: int = 8, **kwargs: Any) -> Callable[[], Any]:
    """A call of attnrs.attention on good tensors with the given extra arguments."""

    def call() -> Any:
        q, k, v = qkv(b, h, q_len, kv_len)
        return attnrs.attention(q, k, v, *args, **kwargs)

    return call


def tensors(
    q: Callable[[], Any], k: Callable[[], Any] | None = None, v: Callable[[], Any] | None = None, **kwargs: Any
) -> Callable[[], Any]:
    """A call of attnrs.attention where some of query/key/value are replaced (built inside the child)."""

    def call() -> Any:
        good = qkv()
        args = [f() if f is not None else g for f, g in zip((q, k, v), good)]
        return attnrs.attention(*args, **kwargs)

    return call


def add(
    name: str,
    call: Callable[[], Any],
    *words: str,
    allowed: tuple[str, ...] = ("AttnrsError",),
    xfail: str | None = None,
    timeout: float = 20.0,
    may_return: bool = False,
) -> None:
    assert name not in CASES, name
    CASES[name] = BadCase(call, words, allowed, timeout, xfail, may_return, risky=timeout > 20 or "THREADS" in name)


def with_env(value: str, call: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        old = os.environ.get("ATTNRS_NUM_THREADS")
        os.environ["ATTNRS_NUM_THREADS"] = value
        try:
            return call()
        finally:
            if old is None:
                del os.environ["ATTNRS_NUM_THREADS"]
            else:
                os.environ["ATTNRS_NUM_THREADS"] = old

    return run


r = torch.randn
HUGE = [2**63, 2**64, 2**70, -(2**63) - 1]

# -- ranks --------------------------------------------------------------------------------------------------------
add("query rank 2", tensors(lambda: r(8, 16)), "query")
add("query rank 0", tensors(lambda: torch.tensor(1.0)), "query")
add("key rank 1", tensors(None, lambda: r(16)), "key")
add("value rank 2", tensors(None, None, lambda: r(8, 16)), "value")
add("query is a list", tensors(lambda: [[1.0]]), "query")
add("key is None", tensors(None, lambda: None), "key")

# -- dtypes ---------------------------------------------------------------------------------------------------------
add("query int64", tensors(lambda: torch.ones(1, 2, 8, 16, dtype=torch.long)), "query", allowed=("DtypeError",))
add("query bool", tensors(lambda: torch.ones(1, 2, 8, 16, dtype=torch.bool)), "query", allowed=("DtypeError",))
add("query complex64", tensors(lambda: r(1, 2, 8, 16, dtype=torch.complex64)), "query", allowed=("DtypeError",))
add("key float16 for a float32 query", tensors(None, lambda: r(1, 2, 8, 16).half()), "key", allowed=("DtypeError",))
add("value float64 for a float32 query", tensors(None, None, lambda: r(1, 2, 8, 16).double()), "value")
add("query float8", tensors(lambda: r(1, 2, 8, 16).to(torch.float8_e4m3fn)), "query", allowed=("DtypeError",))
add("dense mask int32", attend(torch.ones(8, 8, dtype=torch.int32)), "attn_mask", allowed=("DtypeError",))
add("dense mask complex", attend(torch.ones(8, 8, dtype=torch.complex64)), "attn_mask", allowed=("DtypeError",))
add("sinks int64", attend(sinks=torch.zeros(2, dtype=torch.long)), "sinks", allowed=("DtypeError",))
add("sinks a list", attend(sinks=[0.0, 0.0]), "sinks")
add("padding of floats", lambda: masks.padding(torch.ones(2, 8)), "mask2d", allowed=("DtypeError",))
add("document of floats", lambda: masks.document(torch.zeros(8)), "seq_ids", allowed=("DtypeError",))
add("document of a string", lambda: masks.document("abc"), "seq_ids")
add("prefix_lm of floats", lambda: masks.prefix_lm([1.5]), "prefix_lengths", allowed=("DtypeError",))
add(
    "create_dense_mask dtype int32",
    lambda: attnrs.create_dense_mask(masks.causal(), 1, 1, 4, 4, dtype=torch.int32),
    "dtype",
    allowed=("DtypeError",),
)
add("attn_mask a string", attend("causal"), "attn_mask")
add("attn_mask a list", attend([[True]]), "attn_mask")
add("mask_mod returning floats", attend(lambda b, h, q, kv: (kv <= q).float()), "mask")
add("mask_mod returning a Python bool", attend(lambda b, h, q, kv: True), "mask")
add("mask_mod returning the wrong shape", attend(lambda b, h, q, kv: torch.ones(3, 5, dtype=torch.bool)), "mask")

# -- devices (meta tensors) -------------------------------------------------------------------------------------------
add("query on meta", tensors(lambda: r(1, 2, 8, 16, device="meta")), "query")
add("key on meta", tensors(None, lambda: r(1, 2, 8, 16, device="meta")), "key")
add("all on meta", tensors(*(lambda: r(1, 2, 8, 16, device="meta"),) * 3), "query", may_return=True)
add(
    "all on meta with a causal Mask",
    tensors(*(lambda: r(1, 2, 8, 16, device="meta"),) * 3, attn_mask=masks.sliding_window(3)),
    "query",
    may_return=True,
)
add("dense mask on meta", attend(torch.ones(8, 8, dtype=torch.bool, device="meta")), "attn_mask")
add("additive mask on meta", attend(torch.zeros(8, 8, device="meta")), "attn_mask")
add("sinks on meta", attend(sinks=torch.zeros(2, device="meta")), "sinks")
add("padding on meta", lambda: masks.padding(torch.ones(1, 8, dtype=torch.bool, device="meta")), "mask2d")
add("document on meta", lambda: masks.document(torch.zeros(1, 8, dtype=torch.long, device="meta")), "seq_ids")
add("prefix_lm on meta", lambda: masks.prefix_lm(torch.zeros(1, dtype=torch.long, device="meta")), "prefix_lengths")

# -- mismatched shapes ----------------------------------------------------------------------------------------------
add("key head dim differs", tensors(None, lambda: r(1, 2, 8, 15)), "key", allowed=("ShapeError",))
add("value length differs", tensors(None, None, lambda: r(1, 2, 7, 16)), "value", allowed=("ShapeError",))
add("key heads do not divide", tensors(lambda: r(1, 3, 8, 16)), "key", allowed=("ShapeError",))
add("key heads zero", tensors(None, lambda: r(1, 0, 8, 16), lambda: r(1, 0, 8, 16)), "key", allowed=("ShapeError",))
add(
    "batch dims do not broadcast",
    tensors(lambda: r(3, 2, 8, 16), lambda: r(2, 2, 8, 16), lambda: r(2, 2, 8, 16)),
    "key",
    allowed=("ShapeError",),
)
add("dense mask of the wrong shape", attend(torch.ones(8, 9, dtype=torch.bool)), "attn_mask", allowed=("ShapeError",))
add("dense mask of too many dims", attend(torch.ones(1, 1, 1, 1, 8, 8, dtype=torch.bool)), "attn_mask")
add("sinks of the wrong shape", attend(sinks=torch.zeros(3)), "sinks", allowed=("ShapeError",))
add("sinks 2-D", attend(sinks=torch.zeros(1, 2)), "sinks", allowed=("ShapeError",))
add(
    "BlockMask of other lengths",
    lambda: attend(attnrs.create_block_mask(masks.causal(), 1, 1, 16, 16))(),
    "attn_mask",
    allowed=("ShapeError",),
)
add(
    "BlockMask of another batch",
    lambda: attend(attnrs.create_block_mask(masks.causal(), 2, 1, 8, 8), b=3)(),
    "attn_mask",
    allowed=("ShapeError",),
)
add("document ids too short", attend(masks.document(torch.zeros(5, dtype=torch.long))), "seq_ids")
add("padding 3-D", lambda: masks.padding(torch.ones(1, 2, 8, dtype=torch.bool)), "mask2d", allowed=("ShapeError",))
add("document empty", lambda: masks.document(torch.zeros(0, dtype=torch.long)), "seq_ids", allowed=("ShapeError",))
add("document 3-D", lambda: masks.document(torch.zeros(1, 1, 8, dtype=torch.long)), "seq_ids")

# -- tables whose batch is neither 1 nor B (b) ----------------------------------------------------------------------
add(
    "document batch 2 for B=3",
    attend(masks.document(torch.zeros(2, 8, dtype=torch.long)), b=3),
    "seq_ids|document",
    allowed=("ShapeError",),
)
add(
    "document batch 2 for B=1",
    attend(masks.document(torch.zeros(2, 8, dtype=torch.long)), b=1),
    "seq_ids|document",
    allowed=("ShapeError",),
)
add(
    "padding batch 2 for B=3",
    attend(masks.padding(torch.ones(2, 8, dtype=torch.bool)), b=3),
    "mask2d|padding",
    allowed=("ShapeError",),
)
add(
    "prefix_lm batch 2 for B=3",
    attend(masks.prefix_lm([1, 2]), b=3),
    "prefix_lengths|prefix",
    allowed=("ShapeError",),
)
add(
    "chunked left_padding 2 for B=3",
    attend(masks.chunked(4, [0, 1]), b=3),
    "left_padding|chunk",
    allowed=("ShapeError",),
)
add(
    "document batch 2 & causal for B=3 (decode)",
    attend(masks.document(torch.zeros(2, 8, dtype=torch.long)) & masks.causal(), b=3, q_len=1, q_offset=7),
    "seq_ids|document",
    allowed=("ShapeError",),
)
add(
    "create_dense_mask document batch 2 for B=3",
    lambda: attnrs.create_dense_mask(masks.document(torch.zeros(2, 8, dtype=torch.long)), 3, 1, 8, 8),
    "seq_ids|document",
    allowed=("ShapeError",),
)
add(
    "create_block_mask padding batch 2 for B=3",
    lambda: attnrs.create_block_mask(masks.padding(torch.ones(2, 8, dtype=torch.bool)), 3, 1, 8, 8),
    "mask2d|padding",
    allowed=("ShapeError",),
)

# -- NaN / inf scalars ----------------------------------------------------------------------------------------------
for value in (float("nan"), float("inf"), float("-inf")):
    add(f"scale={value}", attend(scale=value), "scale", allowed=("ArgumentError",))
    add(f"softcap={value}", attend(softcap=value), "softcap", allowed=("ArgumentError",))
    add(f"dropout_p={value}", attend(dropout_p=value), "dropout_p", allowed=("ArgumentError",))
add("scale=1e39 (overflows float32)", attend(scale=1e39), "scale", allowed=("ArgumentError",))
add("scale=-1e39 (overflows float32)", attend(scale=-1e39), "scale", allowed=("ArgumentError",))
add("scale a string", attend(scale="0.1"), "scale", allowed=("ArgumentError",))
add("scale complex", attend(scale=1j), "scale", allowed=("ArgumentError",))
add("scale True", attend(scale=True), "scale", allowed=("ArgumentError",))
add("softcap 0", attend(softcap=0.0), "softcap", allowed=("ArgumentError",))
add("softcap negative", attend(softcap=-5.0), "softcap", allowed=("ArgumentError",))
add("dropout_p 1.5", attend(dropout_p=1.5), "dropout_p", allowed=("ArgumentError",))
add("dropout_p -0.1", attend(dropout_p=-0.1), "dropout_p", allowed=("ArgumentError",))
add("dropout_p a string", attend(dropout_p="0.1"), "dropout_p", allowed=("ArgumentError",))
add("enable_gqa a string", attend(enable_gqa="yes"), "enable_gqa", allowed=("ArgumentError",))
add("backend unknown", attend(backend="nope"), "backend", allowed=("ArgumentError",))
add("backend an int", attend(backend=5), "backend", allowed=("ArgumentError",))

# -- huge ints ------------------------------------------------------------------------------------------------------
add("sliding_window(2**70)", lambda: masks.sliding_window(2**70), "window", allowed=("ArgumentError",))
add("sliding_window(2**64)", lambda: masks.sliding_window(2**64), "window", allowed=("ArgumentError",))
add(
    "sliding_window_overlay(2**70)",
    lambda: masks.sliding_window_overlay(2**70),
    "window",
    allowed=("ArgumentError",),
)
add("chunked(2**64)", lambda: masks.chunked(2**64), "size", allowed=("ArgumentError",))
add("chunked(4, left_padding=[2**63])", lambda: masks.chunked(4, [2**63]), "left_padding")
add("prefix_lm([2**63])", lambda: masks.prefix_lm([2**63]), "prefix_lengths")
add(
    "create_block_mask 2**64 x 2**64",
    lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 2**64, 2**64),
    "Q_LEN",
    allowed=("ArgumentError", "ShapeError"),
)
add(
    "create_block_mask B=2**64",
    lambda: attnrs.create_block_mask(masks.causal(), 2**64, 1, 8, 8),
    "B",
    allowed=("ArgumentError", "ShapeError"),
)
add(
    "create_block_mask BLOCK_SIZE=2**64",
    lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 8, 8, BLOCK_SIZE=2**64),
    "BLOCK_SIZE",
    allowed=("ArgumentError",),
)
add(
    "create_dense_mask Q_LEN=2**64",
    lambda: attnrs.create_dense_mask(masks.causal(), 1, 1, 2**64, 4),
    "Q_LEN",
    allowed=("ArgumentError", "ShapeError"),
)
for off in HUGE:
    add(f"q_offset={off}", attend(masks.causal(), q_offset=off), "q_offset", allowed=("ArgumentError",))
add("kv_offset=2**70", attend(masks.causal(), kv_offset=2**70), "kv_offset", allowed=("ArgumentError",))
add(
    "create_dense_mask q_offset=2**64",
    lambda: attnrs.create_dense_mask(masks.causal(), 1, 1, 4, 4, q_offset=2**64),
    "q_offset",
    allowed=("ArgumentError",),
)

# -- floats where ints are expected ---------------------------------------------------------------------------------
add("sliding_window(3.0)", lambda: masks.sliding_window(3.0), "window", allowed=("ArgumentError",))
add("chunked(4.5)", lambda: masks.chunked(4.5), "size", allowed=("ArgumentError",))
add(
    "create_block_mask BLOCK_SIZE=16.0",
    lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 16, 16, BLOCK_SIZE=16.0),
    "BLOCK_SIZE",
    allowed=("ArgumentError",),
)
add(
    "create_block_mask BLOCK_SIZE=(16.0, 16)",
    lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 16, 16, BLOCK_SIZE=(16.0, 16)),
    "BLOCK_SIZE",
    allowed=("ArgumentError",),
)
add(
    "create_block_mask BLOCK_SIZE=(16,)",
    lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 16, 16, BLOCK_SIZE=(16,)),
    "BLOCK_SIZE",
    allowed=("ArgumentError",),
)
add(
    "create_block_mask Q_LEN=16.0",
    lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 16.0, 16),
    "Q_LEN",
    allowed=("ArgumentError",),
)
add(
    "create_dense_mask H=2.0",
    lambda: attnrs.create_dense_mask(masks.causal(), 1, 2.0, 4, 4),
    "H",
    allowed=("ArgumentError",),
)
add("q_offset=1.0", attend(masks.causal(), q_offset=1.0), "q_offset", allowed=("ArgumentError",))
add("q_offset=True", attend(masks.causal(), q_offset=True), "q_offset", allowed=("ArgumentError",))
add(
    "q_offset with a dense mask",
    attend(torch.ones(8, 8, dtype=torch.bool), q_offset=1),
    "q_offset",
    allowed=("ArgumentError",),
)
add(
    "capabilities=5",
    lambda: attnrs.AttentionInterface.register("fuzz_caps_int", lambda *a, **k: None, capabilities=5),
    "capabilities",
    allowed=("ArgumentError", "TypeError"),
)
add(
    "register an empty name",
    lambda: attnrs.AttentionInterface.register("", lambda *a, **k: None),
    "",
    allowed=("TypeError", "ValueError"),
)
add(
    "register a non-callable",
    lambda: attnrs.AttentionInterface.register("fuzz_value", 5),
    "",
    allowed=("TypeError", "ValueError"),
)
add(
    "register an int name",
    lambda: attnrs.AttentionInterface.register(5, lambda *a, **k: None),
    "",
    allowed=("TypeError", "ValueError"),
)
add("from_callable(5)", lambda: masks.from_callable(5), "mask", allowed=("TypeError",))

# -- negative sizes ---------------------------------------------------------------------------------------------------
add("create_block_mask B=-1", lambda: attnrs.create_block_mask(masks.causal(), -1, 1, 8, 8), "B")
add("create_block_mask KV_LEN=-8", lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 8, -8), "KV_LEN")
add("create_dense_mask Q_LEN=-4", lambda: attnrs.create_dense_mask(masks.causal(), 1, 1, -4, 4), "Q_LEN")
add("create_dense_mask H=-2", lambda: attnrs.create_dense_mask(masks.causal(), 1, -2, 4, 4), "H")
add("sliding_window(0)", lambda: masks.sliding_window(0), "window", allowed=("ArgumentError",))
add("sliding_window(-3)", lambda: masks.sliding_window(-3), "window", allowed=("ArgumentError",))
add("chunked(0)", lambda: masks.chunked(0), "size", allowed=("ArgumentError",))
add("prefix_lm([-1])", lambda: masks.prefix_lm([-1]), "prefix_lengths", allowed=("ArgumentError",))
add("BLOCK_SIZE=0", lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 8, 8, BLOCK_SIZE=0), "BLOCK_SIZE")
add("BLOCK_SIZE=-128", lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 8, 8, BLOCK_SIZE=-128), "BLOCK_SIZE")
add(
    "dropout_keep_pattern negative shape",
    lambda: attnrs.dropout_keep_pattern((2, -3), 0.1, 0),
    "shape",
)

# -- huge sizes (a): must be refused quickly, within the child's 4 GiB address space -------------------------------
add(
    "create_block_mask 2**40 x 2**40, BLOCK_SIZE=2**20",
    lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 2**40, 2**40, BLOCK_SIZE=2**20),
    "",
    allowed=("ArgumentError", "ShapeError"),
    timeout=30,
)
add(
    "create_block_mask 1 x 2**30, BLOCK_SIZE=1",
    lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 1, 2**30, BLOCK_SIZE=1),
    "",
    allowed=("ArgumentError", "ShapeError"),
    timeout=30,
)
add(
    "create_dense_mask 2**20 x 2**20",
    lambda: attnrs.create_dense_mask(masks.causal(), 1, 1, 2**20, 2**20),
    "",
    allowed=("ArgumentError", "ShapeError"),
    timeout=30,
)
# A mask that ignores the batch and the heads is computed once and broadcast: a huge B x H is fine.
add(
    "create_dense_mask 2**31 x 2**31 heads of causal",
    lambda: attnrs.create_dense_mask(masks.causal(), 2**31, 2**31, 8, 8),
    "",
    may_return=True,
    timeout=30,
)

# -- sparse, nested, quantized ----------------------------------------------------------------------------------------
add("query sparse COO", tensors(lambda: r(1, 2, 8, 16).to_sparse()), "query")
add("query sparse CSR", tensors(lambda: r(2, 8, 16).to_sparse_csr()), "query")
add("query nested", tensors(lambda: torch.nested.nested_tensor([r(2, 8, 16), r(2, 5, 16)])), "query")
add("query quantized", tensors(lambda: torch.quantize_per_tensor(r(1, 2, 8, 16), 0.1, 0, torch.qint8)), "query")
add("dense mask sparse", attend((torch.rand(8, 8) > 0.5).to_sparse()), "attn_mask")
add("padding sparse", lambda: masks.padding(torch.ones(1, 8, dtype=torch.bool).to_sparse()), "mask2d")
add("sinks sparse", attend(sinks=torch.zeros(2).to_sparse()), "sinks")

# -- bad ATTNRS_NUM_THREADS -----------------------------------------------------------------------------------------
for value in ("abc", str(2**70), "100000", "-1", "0", "1.5"):
    add(
        f"ATTNRS_NUM_THREADS={value} attention",
        with_env(value, attend(masks.causal())),
        "ATTNRS_NUM_THREADS",
        allowed=("ArgumentError",),
    )
    add(
        f"ATTNRS_NUM_THREADS={value} create_dense_mask",
        with_env(value, lambda: attnrs.create_dense_mask(masks.sliding_window(3), 1, 1, 64, 64)),
        "ATTNRS_NUM_THREADS",
        allowed=("ArgumentError",),
    )
