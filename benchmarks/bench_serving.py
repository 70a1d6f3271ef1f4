"""Serving shapes on the CPU: varlen prefill and paged decode, attnrs against its peers in the same run.

    python benchmarks/bench_serving.py                 # 16 sequences of 64..2048 tokens; 32 x 4096-token decode
    python benchmarks/bench_serving.py --quick         # 8 sequences of 64..512; 8 x 1024 decode

- **varlen prefill** (causal): ``attnrs.varlen_attention`` on the packed batch against the same batch padded to
  its longest sequence with torch SDPA and a padding + causal bool mask, and against ``attnrs.attention`` on the
  padded batch (the structural padding + causal mask, so it skips what it can).
- **paged decode** (one query per sequence, page size 16, pages in random order): ``attnrs.varlen_attention``
  reading the pool through the block table against the same keys contiguous (``attnrs.attention`` on a dense
  ``[B, Hkv, L, D]`` cache, and ``varlen_attention`` on packed keys).

Each case alternates its contenders ``--reps`` times and prints medians; ratios are peer time / attnrs time
(above 1: attnrs is faster). The CPU, thread count and shapes head the table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attnrs
from attnrs.cli.plots import cpu_name


def alternate(contenders: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each contender, run in turn ``reps`` times after one warm-up each."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def varlen_prefill(lengths: list[int], heads: int, kv_heads: int, dim: int, dtype: torch.dtype, reps: int) -> None:
    total, longest, n = sum(lengths), max(lengths), len(lengths)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(total, heads, dim, generator=gen).to(dtype)
    k = torch.randn(total, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(total, kv_heads, dim, generator=gen).to(dtype)
    cu = offsets(lengths)
    # The padded batch (right padding): [B, H, L, D] and the key-validity mask.
    pad_q = q.new_zeros(n, heads, longest, dim)
    pad_k = k.new_zeros(n, kv_heads, longest, dim)
    pad_v = v.new_zeros(n, kv_heads, longest, dim)
    valid = torch.zeros(n, longest, dtype=torch.bool)
    for b, (a, z) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        pad_q[b, :, : z - a] = q[a:z].transpose(0, 1)
        pad_k[b, :, : z - a] = k[a:z].transpose(0, 1)
        pad_v[b, :, : z - a] = v[a:z].transpose(0, 1)
        valid[b, : z - a] = True
    dense = torch.ones(longest, longest, dtype=torch.bool).tril() & valid[:, None, None, :]
    dense |= ~valid[:, None, :, None]  # padding rows see everything (their output is discarded): no NaN
    structural = attnrs.masks.causal() & attnrs.masks.padding(valid)
    with torch.no_grad():
        times = alternate(
            {
                "attnrs varlen": lambda: attnrs.varlen_attention(
                    q, k, v, cu, cu, longest, longest, window_size=(-1, 0), enable_gqa=True
                ),
                "sdpa padded": lambda: F.scaled_dot_product_attention(
                    pad_q, pad_k, pad_v, attn_mask=dense, enable_gqa=True
                ),
                "attnrs padded": lambda: attnrs.attention(pad_q, pad_k, pad_v, attn_mask=structural, enable_gqa=True),
            },
            reps,
        )
    useful = 4 * heads * dim * sum(length * (length + 1) / 2 for length in lengths)
    base = times["attnrs varlen"]
    row = f"| varlen prefill {n} seqs {min(lengths)}..{longest} ({total} tokens) | {str(dtype)[6:]} |"
    row += f" {base * 1e3:.1f} ms ({useful / base / 1e9:.0f} GF/s) |"
    for peer in ("sdpa padded", "attnrs padded"):
        row += f" {times[peer] * 1e3:.1f} ms | **{times[peer] / base:.2f}x** |"
    print(row, flush=True)


def paged_decode(n: int, length: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, reps: int) -> None:
    page = 16
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(n, heads, dim, generator=gen).to(dtype)
    cache_k = torch.randn(n, kv_heads, length, dim, generator=gen).to(dtype)
    cache_v = torch.randn(n, kv_heads, length, dim, generator=gen).to(dtype)
    pages_per_seq = length // page
    order = torch.randperm(n * pages_per_seq, generator=gen)
    table = order.view(n, pages_per_seq).to(torch.int32)
    pool_k = torch.empty(n * pages_per_seq, page, kv_heads, dim, dtype=dtype)
    pool_v = torch.empty_like(pool_k)
    pool_k[order] = (
        cache_k.view(n, kv_heads, pages_per_seq, page, dim).permute(0, 2, 3, 1, 4).reshape(-1, page, kv_heads, dim)
    )
    pool_v[order] = (
        cache_v.view(n, kv_heads, pages_per_seq, page, dim).permute(0, 2, 3, 1, 4).reshape(-1, page, kv_heads, dim)
    )
    packed_k = cache_k.transpose(1, 2).reshape(n * length, kv_heads, dim)
    packed_v = cache_v.transpose(1, 2).reshape(n * length, kv_heads, dim)
    cu_q = torch.arange(n + 1, dtype=torch.int32)
    cu_k = cu_q * length
    used = torch.full((n,), length, dtype=torch.int32)
    with torch.no_grad():
        times = alternate(
            {
                "paged": lambda: attnrs.varlen_attention(
                    q, pool_k, pool_v, cu_q, None, 1, length, enable_gqa=True, seqused_k=used, block_table=table
                ),
                "contiguous": lambda: attnrs.attention(q[:, :, None], cache_k, cache_v, enable_gqa=True),
                "packed varlen": lambda: attnrs.varlen_attention(
                    q, packed_k, packed_v, cu_q, cu_k, 1, length, enable_gqa=True
                ),
            },
            reps,
        )
    base = times["paged"]
    read = 2 * n * length * kv_heads * dim * q.element_size()
    row = f"| paged decode {n} x {length}, page {page} | {str(dtype)[6:]} |"
    row += f" {base * 1e3:.2f} ms ({read / base / 1e9:.1f} GB/s) |"
    for peer in ("contiguous", "packed varlen"):
        row += f" {times[peer] * 1e3:.2f} ms | **{times[peer] / base:.2f}x** |"
    print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("bf16", "fp32", "both"), default="both")
    args = parser.parse_args()
    dtypes = {"bf16": [torch.bfloat16], "fp32": [torch.float32], "both": [torch.bfloat16, torch.float32]}[args.dtype]
    gen = torch.Generator().manual_seed(42)
    n, top = (8, 512) if args.quick else (16, 2048)
    lengths = torch.randint(64, top + 1, (n,), generator=gen).tolist()
    decode_n, decode_len = (8, 1024) if args.quick else (32, 4096)
    shape = f"H{args.heads} Hkv{args.kv_heads} D{args.dim}"
    print(f"CPU: {cpu_name()} · ISA path {attnrs.simd_path()} · {torch.get_num_threads()} thread(s) · {shape}")
    print("\n| case | dtype | attnrs varlen | sdpa padded | ratio | attnrs padded | ratio |")
    print("|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        varlen_prefill(lengths, args.heads, args.kv_heads, args.dim, dtype, args.reps)
    print("\n| case | dtype | attnrs paged | contiguous (attention) | ratio | packed varlen | ratio |")
    print("|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        paged_decode(decode_n, decode_len, args.heads, args.kv_heads, args.dim, dtype, args.reps)


if __name__ == "__main__":
    main()
