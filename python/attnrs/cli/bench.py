"""attnrs.attention against its peers on one machine, in one run: torch SDPA (is_causal and with a dense mask),
transformers' sdpa and eager attention paths, and compiled flex_attention. Needs transformers.

    python -m attnrs bench                                 # the issue's table, B1 H32 Hkv8 D128, 2 threads
    python -m attnrs bench --quick                         # L 1024 instead of 4096, shorter decode
    python -m attnrs bench --backward                      # forward + backward, L 2048 and 4096
    python -m attnrs bench --scores                        # score_mod rows: ALiBi L4096, T5 bias L2048 (+ bwd)
    python -m attnrs bench --quick --plot bench.png        # also a figure (.png or .svg): bars per case and
                                                           # time vs length (L/8 .. L) for causal and sliding
    python -m attnrs bench --lengths 512,1024,2048 --no-flex --plot bench.svg
    python benchmarks/bench_attention.py [same flags]      # the same, from a checkout

Reported: median milliseconds, useful GFLOP/s (4 * B * H * D * visible pairs per forward; x2.5 with backward),
GB/s of K/V read for decode, and each peer's time divided by attnrs's (higher = attnrs faster). Every attnrs row
names its micro-kernel path for the case's dtype (attnrs.kernel_path), e.g. "attnrs (avx2)". A 1-thread column
repeats attnrs and SDPA with one thread (at the longest length and for decode). Before the decode cases a
streaming-read probe (attnrs.cli.bandwidth) measures this machine's memory bandwidth with the bench's threads; each
decode case then times attnrs and SDPA from memory (a streaming pass, which evicts K/V, before each run) and gives
the share of that pass's bandwidth each reaches reading K/V. With --backward, attnrs and its
peer run in alternation (--repeats times each) and their medians are compared.

Every case (causal, sliding 512 and 8 documents, each in fp32 and bf16) runs at the longest of --lengths; causal
fp32 and sliding 512 fp32 also run at the other lengths, for the scaling panels of --plot. With --plot and a single
length L, those two also run at L/8, L/4 and L/2. --plot needs matplotlib (pip install "attnrs[bench]"); the
figure's title names the CPU, the ISA path (attnrs.simd_path()), the dtypes and the thread count.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import attnrs
from attnrs import masks

from ..errors import AttnrsError
from .bandwidth import streaming_pass, streaming_read
from .progress import echo, progress

B, H, H_KV, D = 1, 32, 8, 128


def kernel_path(dtype: torch.dtype) -> tuple[str, str]:
    """``attnrs.kernel_path`` for a torch dtype: ``(path, reason)``; ``("refused", message)`` where every call
    would refuse (an ``ATTNRS_ISA`` this CPU lacks, or an unknown one)."""
    try:
        return attnrs.kernel_path(str(dtype).removeprefix("torch."))
    except AttnrsError as e:
        return "refused", str(e)


def attnrs_label(dtype: torch.dtype) -> str:
    """The name of attnrs's row: ``attnrs (avx2)``, its micro-kernel path for ``dtype``."""
    return f"attnrs ({kernel_path(dtype)[0]})"


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def paired_median_ms(ours: Callable[[], Any], peer: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Medians of ``ours`` and ``peer`` timed in alternation (one warm-up each), so that the machine's slow
    spells fall on both sides of the ratio."""
    ours()
    peer()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ours, times[0]), (peer, times[1])):
            gc.collect()
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


@dataclass
class Case:
    name: str
    q_len: int
    kv_len: int
    dtype: torch.dtype
    mask: masks.Mask | None  # None: causal through is_causal (or full for decode)
    decode: bool = False
    rows: dict[str, float] = field(default_factory=dict)  # implementation -> median ms, filled by run_forward
    family: str = ""  # the case without its length ("causal fp32"): the curves of the scaling plot

    def visible_pairs(self) -> int:
        if self.decode:
            return self.q_len * self.kv_len
        if self.mask is None:
            return self.q_len * (self.q_len + 1) // 2
        dense = attnrs.create_dense_mask(self.mask, 1, 1, self.q_len, self.kv_len)
        return int(dense.sum())


def tensors(case: Case, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, case.q_len, D, generator=gen).to(case.dtype)
    k = torch.randn(B, H_KV, case.kv_len, D, generator=gen).to(case.dtype)
    v = torch.randn(B, H_KV, case.kv_len, D, generator=gen).to(case.dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def peers(
    case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flex: bool = True
) -> dict[str, Callable[[], Any]]:
    """name -> a zero-argument callable computing the same attention (compiled flex only with ``flex``)."""
    from transformers import masking_utils as mu
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    module = torch.nn.Module()
    module.is_causal = True  # type: ignore[assignment]
    module.num_key_value_groups = H // H_KV  # type: ignore[assignment]
    module.training = False
    out: dict[str, Callable[[], Any]] = {}
    if case.decode:
        out["attnrs"] = lambda: attnrs.attention(q, k, v)
        out["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        # transformers' decode formulation: the GQA group folded into the query length.
        folded = q.view(B, H_KV, H // H_KV, D)
        out["sdpa (GQA folded)"] = lambda: F.scaled_dot_product_attention(folded, k, v)
        return out
    mask = case.mask if case.mask is not None else masks.causal()
    dense = attnrs.create_dense_mask(mask, 1, 1, case.q_len, case.kv_len)
    out["attnrs"] = (
        (lambda: attnrs.attention(q, k, v, is_causal=True))
        if case.mask is None
        else (lambda: attnrs.attention(q, k, v, case.mask))
    )
    if case.mask is None:
        out["sdpa is_causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out["sdpa dense mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    hf_mask = mu.sdpa_mask(
        batch_size=B,
        q_length=case.q_len,
        kv_length=case.kv_len,
        mask_function=mask,
        allow_is_causal_skip=case.mask is None,
    )
    out["transformers sdpa"] = lambda: sdpa_attention_forward(module, q, k, v, hf_mask, scaling=D**-0.5)
    additive = torch.where(dense, 0.0, torch.finfo(q.dtype).min).to(q.dtype)
    out["transformers eager"] = lambda: eager_attention_forward(module, q, k, v, additive, scaling=D**-0.5)
    if not flex:
        return out
    block_mask = attnrs.create_block_mask(mask, 1, None, case.q_len, case.kv_len)
    compiled = torch.compile(torch.nn.attention.flex_attention.flex_attention)
    out["flex (compiled)"] = lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)
    return out


def run_forward(cases: list[Case], threads: int, repeats: int, one_thread: bool, flex: bool = True) -> list[Case]:
    """Times every implementation on every case, prints the table and returns the cases, their ``rows`` filled."""
    echo(f"\nforward, B{B} H{H} Hkv{H_KV} D{D}, {threads} threads; median ms, GFLOP/s (useful), peer/attnrs")
    echo("attnrs kernel path per dtype (attnrs.kernel_path; ATTNRS_ISA forces one):")
    for dtype in dict.fromkeys(c.dtype for c in cases):
        path, why = kernel_path(dtype)
        echo(f"  {str(dtype).removeprefix('torch.'):<9} {path:<12} {why}")
    longest = max((c.q_len for c in cases if not c.decode), default=0)
    read_pass: Callable[[], float] | None = None  # a timed streaming pass, once the probe has run
    probed = False
    bar = progress(cases, "bench", unit="case")
    for case in bar:
        torch.set_num_threads(threads)
        if case.decode and not probed:  # once, before the first decode case
            probed = True
            bar.note("streaming-read probe")
            try:
                probe = streaming_read(threads)
                echo(f"\n{probe.line()}")
                read_pass = streaming_pass(probe)
            except (RuntimeError, MemoryError) as e:
                echo(f"\nstreaming read: not measured ({type(e).__name__}: {str(e)[:80]})")
        q, k, v = tensors(case)
        flops = 4 * B * H * D * case.visible_pairs()
        kv_bytes = B * H_KV * case.kv_len * (D + D) * q.element_size()  # K and V (Dv = D); Q and out are tiny
        label = attnrs_label(case.dtype)
        echo(f"\n{case.name}")
        results = case.rows
        fns = peers(case, q, k, v, flex)
        for name, fn in fns.items():
            bar.note(f"{case.name}: {name}")
            slow = name.startswith("transformers eager") or name.startswith("sdpa dense")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    if name.startswith("flex"):
                        start = time.perf_counter()
                        fn()
                        echo(f"  {'(flex compile + first call)':<24} {time.perf_counter() - start:>9.1f} s")
                    results[name] = median_ms(fn, 1 if slow else repeats, 0 if slow else 1)
                except Exception as e:
                    echo(f"  {label if name == 'attnrs' else name:<24} failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
            ms = results[name]
            extra = f"{kv_bytes / ms / 1e6:>8.1f} GB/s" if case.decode else f"{flops / ms / 1e6:>8.1f} GFLOP/s"
            ratio = f"{ms / results['attnrs']:>7.2f}x" if name != "attnrs" and "attnrs" in results else ""
            echo(f"  {label if name == 'attnrs' else name:<24} {ms:>10.2f} ms {extra} {ratio}", flush=True)
        if case.decode and read_pass is not None and "attnrs" in results:
            timed: dict[str, Callable[[], Any]] = {n: fns[n] for n in ("attnrs", "sdpa") if n in results}
            echo(f"  {from_memory(timed, kv_bytes, read_pass, repeats)}", flush=True)
        if one_thread and (case.decode or case.q_len == longest):  # not for the shorter lengths of the sweep
            torch.set_num_threads(1)
            ours = median_ms(lambda: peers_one(case, q, k, v, "attnrs"), max(1, repeats // 2))
            theirs = median_ms(lambda: peers_one(case, q, k, v, "sdpa"), max(1, repeats // 2))
            echo(f"  1 thread: attnrs {ours:.1f} ms, sdpa {theirs:.1f} ms, ratio {theirs / ours:.2f}x", flush=True)
        torch.set_num_threads(threads)
    return cases


def from_memory(fns: dict[str, Callable[[], Any]], kv_bytes: int, read_pass: Callable[[], float], repeats: int) -> str:
    """``from memory (...): attnrs reads K/V at 12.3 GB/s = 61% of the pass; sdpa 10.1 GB/s = 50%``: each of ``fns``
    (attnrs first) timed in alternation, every run right after one ``read_pass`` (a streaming read that evicts K/V
    from the caches, as a model's other layers would, and returns that moment's GB/s). Per implementation: the K/V
    bytes a call reads over its median time, and the median over runs of its rate divided by the pass's before it
    (so a slow spell of the shared machine lowers both sides of a run's ratio)."""
    runs = max(3, repeats)
    times: dict[str, list[float]] = {name: [] for name in fns}
    shares: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            rate = read_pass()
            start = time.perf_counter()
            fn()
            seconds = max(time.perf_counter() - start, 1e-9)
            times[name].append(seconds)
            shares[name].append(kv_bytes / seconds / 1e9 / rate)

    def share(name: str) -> str:
        gb_per_s = kv_bytes / statistics.median(times[name]) / 1e9
        return f"{gb_per_s:.1f} GB/s = {100 * statistics.median(shares[name]):.0f}%"

    first, *others = fns
    text = f"from memory (a streaming pass before each of {runs} runs): {first} reads K/V at {share(first)} of the pass"
    return text + "".join(f"; {name} {share(name)}" for name in others)


def peers_one(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, which: str) -> Any:
    if which == "attnrs":
        return attnrs.attention(q, k, v, case.mask, is_causal=case.mask is None and not case.decode)
    if case.decode:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if case.mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    dense = attnrs.create_dense_mask(case.mask, 1, 1, case.q_len, case.kv_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)


def backward_step(
    grad: torch.Tensor, *leaves: torch.Tensor
) -> Callable[[Callable[[], torch.Tensor]], Callable[[], None]]:
    """``step(fn)``: a callable running ``fn()`` forward and backward with ``grad``, the leaves' gradients cleared
    first (so each timed run does the same work)."""

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for leaf in leaves:
                leaf.grad = None
            fn().backward(grad)  # type: ignore[no-untyped-call]

        return run

    return step


def run_backward(lengths: list[int], threads: int, repeats: int) -> None:
    torch.set_num_threads(threads)
    echo(f"\nforward + backward, B{B} H{H} Hkv{H_KV} D{D}, {threads} threads; median ms, peer/attnrs")
    kinds = (
        ("causal fp32", torch.float32, None),
        ("causal bf16", torch.bfloat16, None),
        ("sliding 512 fp32", torch.float32, masks.sliding_window(512)),
    )
    for length, (name, dtype, mask) in progress([(n, kind) for n in lengths for kind in kinds], "bench", unit="case"):
        case = Case(f"{name} L{length}", length, length, dtype, mask)
        q, k, v = tensors(case, requires_grad=True)
        grad = torch.randn(B, H, length, D).to(dtype)

        step = backward_step(grad, q, k, v)
        ours = step(lambda: attnrs.attention(q, k, v, mask, is_causal=mask is None))
        if mask is None:
            peer, label = (
                step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
                "sdpa is_causal",
            )
        else:
            dense = attnrs.create_dense_mask(mask, 1, 1, length, length)
            peer, label = (
                step(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)),
                "sdpa dense mask",
            )
        ours_ms, peer_ms = paired_median_ms(ours, peer, repeats)
        echo(
            f"  {case.name:<22} {attnrs_label(dtype):<20} {ours_ms:>9.1f} ms | {label} {peer_ms:>9.1f} ms "
            f"{peer_ms / ours_ms:>6.2f}x",
            flush=True,
        )


def _dense_alibi(slopes: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense additive mask users build today for causal ALiBi: ``slope_h * (kv - q)``, -inf above the
    diagonal, ``[1, H, L, L]``."""
    rel = (torch.arange(length)[None, :] - torch.arange(length)[:, None]).to(torch.float32)
    bias = slopes.to(torch.float32)[:, None, None] * rel
    return bias.masked_fill(rel > 0, float("-inf"))[None].to(dtype)


def run_scores(length: int, t5_length: int, threads: int, repeats: int) -> None:
    """The score_mod rows: causal + ALiBi (fp32, bf16) against causal alone, SDPA with the dense ALiBi bias and
    compiled flex with the same score_mod; a Python callable's cost; T5's relative bias (bidirectional, 32
    buckets) forward + backward with a learned table against SDPA with the dense bias. Each pair is timed in
    alternation (:func:`paired_median_ms`)."""
    from attnrs import scores

    torch.set_num_threads(threads)
    echo(f"\nscore_mod, B{B} H{H} Hkv{H_KV} D{D}, {threads} threads; median ms, peer/attnrs (alternated)")
    alibi = scores.alibi(H)
    slopes = scores.alibi_slopes(H)
    flex = torch.compile(torch.nn.attention.flex_attention.flex_attention)

    def row(label: str, dtype: torch.dtype, ours_ms: float, peer: str, peer_ms: float) -> None:
        echo(
            f"  {label:<30} {attnrs_label(dtype):<20} {ours_ms:>9.1f} ms | {peer:<26} {peer_ms:>9.1f} ms "
            f"{peer_ms / ours_ms:>6.2f}x"
        )

    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        case = Case(f"causal+ALiBi {name} L{length}", length, length, dtype, None)
        q, k, v = tensors(case)
        echo(f"\n{case.name}")

        def ours() -> Any:
            return attnrs.attention(q, k, v, is_causal=True, score_mod=alibi)

        ours_ms, plain_ms = paired_median_ms(ours, lambda: attnrs.attention(q, k, v, is_causal=True), repeats)
        echo(
            f"  {'causal + ALiBi':<30} {attnrs_label(dtype):<20} {ours_ms:>9.1f} ms | attnrs causal alone "
            f"{plain_ms:>9.1f} ms: ALiBi costs {100 * (ours_ms / plain_ms - 1):+.1f}%"
        )
        dense = _dense_alibi(slopes, length, dtype)
        ours_ms, peer_ms = paired_median_ms(
            ours, lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True), repeats
        )
        row("causal + ALiBi", dtype, ours_ms, "sdpa + dense ALiBi bias", peer_ms)
        block_mask = attnrs.create_block_mask(masks.causal(), 1, None, length, length)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            try:
                flex(q, k, v, score_mod=alibi, block_mask=block_mask, enable_gqa=True)
            except Exception as e:
                echo(f"  flex (compiled) failed: {type(e).__name__}: {str(e)[:100]}")
            else:
                echo(f"  {'(flex compile + first call)':<51} {time.perf_counter() - start:>9.1f} s")
                ours_ms, peer_ms = paired_median_ms(
                    ours, lambda: flex(q, k, v, score_mod=alibi, block_mask=block_mask, enable_gqa=True), repeats
                )
                row("causal + ALiBi", dtype, ours_ms, "flex (compiled) + score_mod", peer_ms)
        short = min(length, 1024)
        qs, ks, vs = (t[:, :, :short] for t in (q, k, v))

        def alibi_callable(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return score + slopes.to(score.dtype)[h] * (kv_idx - q_idx)

        ours_ms, peer_ms = paired_median_ms(
            lambda: attnrs.attention(qs, ks, vs, is_causal=True, score_mod=alibi),
            lambda: attnrs.attention(qs, ks, vs, is_causal=True, score_mod=alibi_callable),
            max(1, repeats // 2),
        )
        row(f"ALiBi value L{short}", dtype, ours_ms, "the same as a Python callable", peer_ms)

    case = Case(f"T5 bias fp32 L{t5_length} fwd+bwd", t5_length, t5_length, torch.float32, None)
    q, k, v = tensors(case, requires_grad=True)
    table = (torch.randn(H, 32, generator=torch.Generator().manual_seed(1)) * 0.5).requires_grad_()
    buckets = scores.t5_buckets(32, 128, bidirectional=True)
    grad = torch.randn(B, H, t5_length, D)
    echo(f"\n{case.name} (learned [H, 32] table)")

    step = backward_step(grad, q, k, v, table)
    rel = torch.arange(t5_length)[None, :] - torch.arange(t5_length)[:, None]
    index = buckets(rel)  # [L, L] bucket of each pair

    def sdpa_dense() -> torch.Tensor:
        bias = table[:, index][None]  # [1, H, L, L], differentiable into the table
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)

    ours_ms, peer_ms = paired_median_ms(
        step(lambda: attnrs.attention(q, k, v, score_mod=scores.relative_bias(table, buckets))),
        step(sdpa_dense),
        repeats,
    )
    row("T5 bias, bidirectional", torch.float32, ours_ms, "sdpa + dense bias (table)", peer_ms)


def _lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of lengths") from None
    if not lengths or lengths[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: lengths must be positive")
    return lengths


def forward_cases(lengths: list[int], decode_lengths: list[int]) -> list[Case]:
    """Every case (causal, sliding 512 and 8 documents, fp32 and bf16) at the longest length; causal fp32 and
    sliding 512 fp32 at each (shortest first); decode fp32 and bf16 at each of ``decode_lengths``."""
    cases = []
    for length in lengths:
        ids = torch.arange(length) // max(1, length // 8)
        cases += [
            Case(f"causal fp32 L{length}", length, length, torch.float32, None, family="causal fp32"),
            Case(f"causal bf16 L{length}", length, length, torch.bfloat16, None, family="causal bf16"),
            Case(
                f"sliding 512 fp32 L{length}",
                length,
                length,
                torch.float32,
                masks.sliding_window(512),
                family="sliding 512 fp32",
            ),
            Case(
                f"8 documents fp32 L{length}",
                length,
                length,
                torch.float32,
                masks.document(ids) & masks.causal(),
                family="8 documents fp32",
            ),
            Case(
                f"sliding 512 bf16 L{length}",
                length,
                length,
                torch.bfloat16,
                masks.sliding_window(512),
                family="sliding 512 bf16",
            ),
            Case(
                f"8 documents bf16 L{length}",
                length,
                length,
                torch.bfloat16,
                masks.document(ids) & masks.causal(),
                family="8 documents bf16",
            ),
        ]
    longest = max(lengths)
    cases = [c for c in cases if c.q_len == longest or c.family in SCALED]
    for kv_len in decode_lengths:
        for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            cases.append(Case(f"decode {label} Q1 Lk{kv_len}", 1, kv_len, dtype, None, decode=True))
    return cases


SCALED = ("causal fp32", "sliding 512 fp32")  # the masks of the scaling plot


def plot_run(path: str, cases: list[Case], threads: int) -> None:
    """The figure of a forward run (:func:`attnrs.cli.plots.plot_bench`)."""
    from .plots import cpu_name, plot_bench

    longest = max((c.q_len for c in cases if not c.decode), default=0)
    bars = [(c.name, c.rows) for c in cases if c.rows and (c.decode or c.q_len == longest)]
    scaling: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for case in cases:
        if case.family in SCALED:
            for name, ms in case.rows.items():
                scaling.setdefault(case.family, {}).setdefault(name, []).append((case.q_len, ms))
    dtypes = ", ".join(dict.fromkeys(str(c.dtype).removeprefix("torch.") for c in cases))
    title = (
        f"attnrs {attnrs.__version__} bench, forward, B{B} H{H} Hkv{H_KV} D{D}\n"
        f"{cpu_name()} · ISA path {attnrs.simd_path()} · dtype {dtypes} · {threads} thread{'s' * (threads != 1)}"
    )
    height, width = plot_bench(path, bars, scaling, title)
    echo(f"\nwrote {path} ({width}x{height})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="attnrs bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="L 1024 and a short decode")
    parser.add_argument("--backward", action="store_true", help="forward + backward instead of forward")
    parser.add_argument("--scores", action="store_true", help="the score_mod rows (ALiBi, T5 relative bias)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-one-thread", action="store_true", help="skip the 1-thread column")
    parser.add_argument(
        "--lengths",
        type=_lengths,
        default=None,
        metavar="L1,L2,...",
        help="forward: every case at the longest, causal and sliding at each (default 4096, --quick 1024); "
        "--backward: each (default 2048,4096, --quick 1024)",
    )
    parser.add_argument(
        "--decode-lengths",
        type=_lengths,
        default=None,
        metavar="K1,K2,...",
        help="key lengths of the decode cases (default 8192,65536; --quick 8192)",
    )
    parser.add_argument("--no-flex", action="store_true", help="skip compiled flex (its compile takes a while)")
    parser.add_argument(
        "--plot",
        metavar="FILE",
        default=None,
        help="draw the forward run into FILE (.png or .svg): bars per case, time vs length (needs matplotlib)",
    )
    args = parser.parse_args(argv)
    if args.plot is not None:
        from .plots import PlotError, check_output, require_matplotlib

        if args.backward or args.scores:
            parser.error("--plot draws the forward run; it does not combine with --backward or --scores")
        try:
            check_output(args.plot, "--plot")
            require_matplotlib("--plot")
        except PlotError as e:
            parser.error(str(e))
    echo(f"attnrs {attnrs.__version__} ({attnrs.simd_path()}), torch {torch.__version__}")
    if args.backward:
        run_backward(args.lengths or ([1024] if args.quick else [2048, 4096]), args.threads, args.repeats)
        return
    if args.scores:
        run_scores(1024 if args.quick else 4096, 1024 if args.quick else 2048, args.threads, args.repeats)
        return
    lengths = args.lengths or [1024 if args.quick else 4096]
    if args.plot is not None and len(lengths) == 1:  # the scaling plot needs lengths: L/8, L/4, L/2, L
        lengths = sorted({max(1, lengths[0] >> shift) for shift in range(4)})
    cases = forward_cases(lengths, args.decode_lengths or ([8192] if args.quick else [8192, 65536]))
    run_forward(cases, args.threads, args.repeats, not args.no_one_thread, flex=not args.no_flex)
    if args.plot is not None:
        plot_run(args.plot, cases, args.threads)


if __name__ == "__main__":
    main()
