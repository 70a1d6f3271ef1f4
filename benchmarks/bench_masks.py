"""Mask construction: attnrs against torch's create_block_mask (eager and compiled) and transformers' sdpa_mask.

    python benchmarks/bench_masks.py                 # the issue's table (takes a few minutes: torch eager at 32k)
    python benchmarks/bench_masks.py --quick         # 4k and 16k only

Every ratio compares numbers measured in the same run. Steady-state times are medians; torch.compile's
first-call time is reported apart. Peak extra memory at 128k is measured in a fresh subprocess (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

import attnrs
from attnrs import masks
from attnrs.cli.bench import median_ms
from attnrs.cli.progress import echo, progress

WINDOW = 512
DOCUMENTS = 8
LEFT_PAD = 1000


def cases(length: int) -> dict[str, tuple[int, masks.Mask, Callable[..., Any]]]:
    """name -> (batch, attnrs mask, the same mask as a plain torch mask_mod)."""
    ids = torch.arange(length) // -(-length // DOCUMENTS)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[0, :LEFT_PAD] = False

    def causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return kv <= q

    def sliding(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (kv <= q) & (q - kv < WINDOW)

    def documents(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (ids[q] == ids[kv]) & (kv <= q)

    def padded(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return valid[b, kv] & (kv <= q)

    return {
        "causal": (1, masks.causal(), causal),
        f"sliding {WINDOW}": (1, masks.sliding_window(WINDOW), sliding),
        f"{DOCUMENTS} documents": (1, masks.document(ids) & masks.causal(), documents),
        "padding+causal B=2": (2, masks.padding(valid) & masks.causal(), padded),
    }


def bench_block_masks(lengths: list[int], eager_budget_gib: float) -> list[dict[str, Any]]:
    rows = []
    compiled = torch.compile(torch_create_block_mask)
    steps = [(length, name, case) for length in lengths for name, case in cases(length).items()]
    bar = progress(steps, "create_block_mask", unit="case")
    for length, name, (batch, ours, mod) in bar:
        bar.note(f"{name} L{length}")
        row: dict[str, Any] = {"mask": name, "L": length}
        row["attnrs_ms"] = median_ms(lambda: attnrs.create_block_mask(ours, batch, None, length, length), 7)
        # torch eager materialises [B, 1, L, L] bools plus block sums: about 10 GiB per batch row at 32k.
        eager_gib = batch * 10 * (length / 32768) ** 2
        if eager_gib <= eager_budget_gib:
            repeats = 3 if length <= 16384 else 1
            row["torch_eager_ms"] = median_ms(
                lambda: torch_create_block_mask(mod, batch, None, length, length, device="cpu"), repeats,
                warmup=1 if length <= 16384 else 0,
            )
        torch._dynamo.reset()
        start = time.perf_counter()
        compiled(mod, batch, None, length, length, "cpu")
        row["torch_compile_first_s"] = time.perf_counter() - start
        row["torch_compiled_ms"] = median_ms(lambda: compiled(mod, batch, None, length, length, "cpu"), 3, 0)
        rows.append(row)
        _print_block_row(row)
    return rows


def _print_block_row(row: dict[str, Any]) -> None:
    eager = row.get("torch_eager_ms")
    eager_text = f"{eager:>12.1f}" if eager else f"{'(memory)':>12}"
    ratio_eager = f"{eager / row['attnrs_ms']:>10.0f}x" if eager else f"{'-':>11}"
    echo(
        f"{row['mask']:<20} {row['L']:>7} {row['attnrs_ms']:>10.2f} {eager_text} {row['torch_compiled_ms']:>12.1f}"
        f" {row['torch_compile_first_s']:>9.1f}s {ratio_eager} {row['torch_compiled_ms'] / row['attnrs_ms']:>10.1f}x",
        flush=True,
    )


_MEMORY_PROBE = """
import json, resource, sys, time, torch, attnrs
from attnrs import masks
length = int(sys.argv[1]); name = sys.argv[2]
ids = torch.arange(length) // -(-length // 8)
valid = torch.ones(2, length, dtype=torch.bool); valid[0, :1000] = False
table = {"causal": (1, masks.causal()), "sliding 512": (1, masks.sliding_window(512)),
         "8 documents": (1, masks.document(ids) & masks.causal()),
         "padding+causal B=2": (2, masks.padding(valid) & masks.causal())}
batch, mask = table[name]
attnrs.create_block_mask(mask, batch, None, 4096, 4096)  # warm: pools, imports
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
block_mask = attnrs.create_block_mask(mask, batch, None, length, length)
elapsed = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"ms": elapsed * 1e3, "extra_mib": (after - before) / 1024, "layout_mib": block_mask._layout.memory_bytes / 2**20}))
"""


def bench_long(length: int) -> list[dict[str, Any]]:
    rows = []
    for name in progress(("causal", "sliding 512", "8 documents", "padding+causal B=2"), f"L {length}", unit="case"):
        best: dict[str, Any] | None = None
        for _ in range(3):  # a fresh process each time: the peak RSS must be this call's
            out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(length), name], capture_output=True,
                                 text=True, check=True)
            result = json.loads(out.stdout)
            if best is None or result["ms"] < best["ms"]:
                best = result
        assert best is not None
        rows.append({"mask": name, "L": length, **best})
        echo(f"{name:<20} {length:>7} {best['ms']:>10.2f} ms {best['extra_mib']:>10.2f} MiB peak extra "
              f"({best['layout_mib']:.2f} MiB of block lists)", flush=True)
    return rows


def bench_dense(lengths: list[int]) -> list[dict[str, Any]]:
    from transformers import masking_utils as mu

    rows = []
    for length in lengths:
        valid = torch.ones(2, length, dtype=torch.bool)
        valid[0, :LEFT_PAD] = False
        kwargs = dict(batch_size=2, q_length=length, kv_length=length, attention_mask=valid,
                      mask_function=mu.causal_mask_function, allow_is_causal_skip=False)
        ours_ms = median_ms(lambda: attnrs.create_dense_mask(masks.causal() & masks.padding(valid), 2, 1, length,
                                                              length), 5)
        via_builder_ms = median_ms(lambda: attnrs.mask_builders.sdpa_mask(**kwargs), 5)
        theirs_ms = median_ms(lambda: mu.sdpa_mask(**kwargs), 5)
        rows.append({"L": length, "attnrs_ms": ours_ms, "attnrs_builder_ms": via_builder_ms,
                     "transformers_ms": theirs_ms})
        print(f"padding+causal B=2 {length:>7} {ours_ms:>10.1f} {via_builder_ms:>14.1f} {theirs_ms:>14.1f} "
              f"{theirs_ms / ours_ms:>8.1f}x {theirs_ms / via_builder_ms:>8.1f}x", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4k and 16k only, no 128k probe")
    parser.add_argument("--eager-budget-gib", type=float, default=12.0,
                        help="skip torch eager where it would need more memory than this (default 12)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    lengths = [4096, 16384] if args.quick else [4096, 16384, 32768]
    print(f"attnrs {attnrs.__version__}, torch {torch.__version__}, threads {attnrs.num_threads()}")
    print("\ncreate_block_mask (BLOCK_SIZE 128), median ms")
    print(f"{'mask':<20} {'L':>7} {'attnrs':>10} {'torch eager':>12} {'torch comp.':>12} {'compile':>10} "
          f"{'vs eager':>11} {'vs comp.':>11}")
    results: dict[str, Any] = {"block": bench_block_masks(lengths, args.eager_budget_gib)}
    if not args.quick:
        print("\ncreate_block_mask at L = 131072 (fresh process each, best of 3)")
        results["long"] = bench_long(131072)
    print("\ncreate_dense_mask vs transformers sdpa_mask (bool [2, 1, L, L]), median ms")
    print(f"{'mask':<18} {'L':>7} {'attnrs':>10} {'attnrs sdpa_mask':>14} {'transformers':>14} {'ratio':>9} "
          f"{'builder':>9}")
    results["dense"] = bench_dense([4096, 16384])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
