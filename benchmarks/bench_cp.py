"""Context parallelism on one machine: causal attention over L positions on 2 ranks x 1 thread (gloo; ring
attention with the zigzag and contiguous layouts, all-gather attention) against 1 rank x 1 thread
(attnrs.attention on the whole sequence).

    python benchmarks/bench_cp.py                      # L = 32768 (minutes: one thread per rank)
    python benchmarks/bench_cp.py --length 8192        # a smoke run

Every process is started fresh (subprocess), pinned to one thread. Reported per rank: the best time of the
forward and of the backward (of ``--reps`` runs after one warm-up: the machine is shared), the process CPU time
of the fastest forward + backward (the rank's work, whatever the contention) and its share of the one-rank
run's, the peak resident
memory (``ru_maxrss`` of the process, and its growth over the resident size just before the first call, i.e.
what the attention itself added), and for the ring the communication hidden behind compute:
``1 - wait / alone``, where ``wait`` is the (median) time the rank spent blocked on receives during the pass
(the ring's own timer, :func:`attnrs.distributed.last_ring_timings`) and ``alone`` the time the same transfers
take with nothing to overlap (the same number of K/V and dK/dV exchanges, measured right before). ``wait`` also
counts time spent waiting for a slower neighbour (load imbalance: the contiguous layout's rank 0 waits for rank
1). Both ranks share the machine's cores with each other and with whatever else runs, so treat ratios on a
busy machine as rough.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU model (with its family and model numbers) from lscpu, else /proc/cpuinfo."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        if "Model name" in fields:
            return f"{fields['Model name']} (family {fields.get('CPU family', '?')}, model {fields.get('Model', '?')})"
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _best(fn: Any, reps: int) -> tuple[float, list[Any], float]:
    """The shortest wall time of ``reps`` runs after a warm-up (the least disturbed by other work on a shared
    machine), what each run returned, and the process CPU time of that run (the work itself, whatever the
    contention: one thread per process)."""
    fn()
    times, extras, cpus = [], [], []
    for _ in range(reps):
        start, cpu = time.perf_counter(), time.process_time()
        extras.append(fn())
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    best = times.index(min(times))
    return times[best], extras, cpus[best]


def _worker(args: argparse.Namespace) -> None:
    """One process: the single-rank baseline, or one rank of the ring."""
    import torch

    torch.set_num_threads(1)
    import attnrs
    from attnrs.distributed import allgather_attention, last_ring_timings, ring_attention, shard_sequence

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    b, h, n, d = 1, args.heads, args.length, args.dim
    result: dict[str, Any] = {"rank": int(os.environ.get("RANK", "0")), "world": world, "layout": args.layout}
    result["variant"] = args.variant
    if world == 1:
        q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
        grad = torch.randn(b, h, n, d)
        inputs = [t.requires_grad_(True) for t in (q, k, v)]
        result["rss_before_mib"] = _rss_mib()

        def forward() -> Any:
            with torch.no_grad():
                attnrs.attention(q, k, v, is_causal=True)

        def both() -> Any:
            out = attnrs.attention(*inputs, is_causal=True)
            torch.autograd.grad(out, inputs, grad)

        result["forward_s"], _, _ = _best(forward, args.reps)
        total, _, result["cpu_s"] = _best(both, args.reps)
        result["backward_s"] = total - result["forward_s"]
        result["peak_mib"] = _peak_mib()
        print(json.dumps(result), flush=True)
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank = dist.get_rank()
    # Each rank makes only its own shard (random values: the timing does not depend on them), so that the peak
    # memory measures the attention, not a global tensor made and sharded here.
    del shard_sequence
    q, k, v, grad = (torch.randn(b, h, n // dist.get_world_size(), d) for _ in range(4))
    inputs = [t.requires_grad_(True) for t in (q, k, v)]
    result["rss_before_mib"] = _rss_mib()

    # The transfers alone: one K/V exchange with the neighbours, as the ring does it, and one dK/dV (float32).
    peer_next, peer_prev = (rank + 1) % world, (rank - 1) % world
    kv = torch.cat([k.detach().reshape(-1), v.detach().reshape(-1)])

    def exchange() -> Any:
        recv = torch.empty_like(kv)
        ops = [dist.P2POp(dist.isend, kv, peer_next), dist.P2POp(dist.irecv, recv, peer_prev)]
        for r in dist.batch_isend_irecv(ops):
            r.wait()

    dist.barrier()
    alone, _, _ = _best(exchange, args.reps)
    result["exchange_s"] = alone

    def forward() -> Any:
        with torch.no_grad():
            ring_attention(q, k, v, "causal", layout=args.layout)
        t = last_ring_timings()
        return t.forward_wait

    def both() -> Any:
        out = ring_attention(*inputs, "causal", layout=args.layout)
        torch.autograd.grad(out, inputs, grad)
        t = last_ring_timings()
        return t.forward_wait, t.backward_wait, t.backward_total, f"{t.pairs} ({t.calls})"

    if args.variant == "allgather":

        def gathered_forward() -> Any:
            with torch.no_grad():
                allgather_attention(q, k, v, "causal", layout=args.layout)

        def gathered_both() -> Any:
            out = allgather_attention(*inputs, "causal", layout=args.layout)
            torch.autograd.grad(out, inputs, grad)

        dist.barrier()
        result["forward_s"], _, _ = _best(gathered_forward, args.reps)
        dist.barrier()
        total, _, result["cpu_s"] = _best(gathered_both, args.reps)
        result["backward_s"] = total - result["forward_s"]
        result["peak_mib"] = _peak_mib()
        dist.barrier()
        dist.destroy_process_group()
        print(json.dumps(result), flush=True)
        return

    dist.barrier()
    result["forward_s"], waits, _ = _best(forward, args.reps)
    dist.barrier()
    total, extras, result["cpu_s"] = _best(both, args.reps)
    result["backward_s"] = min(e[2] for e in extras)
    result["forward_wait_s"] = statistics.median(waits)
    result["backward_wait_s"] = statistics.median(e[1] for e in extras)
    result["pairs"] = extras[-1][3]
    # Forward: W - 1 K/V exchanges; backward: W - 1 K/V exchanges plus W dK/dV ones (float32, the same size here).
    result["forward_alone_s"] = (world - 1) * alone
    result["backward_alone_s"] = (2 * world - 1) * alone
    result["peak_mib"] = _peak_mib()
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps(result), flush=True)


def _launch(args: argparse.Namespace, world: int, layout: str, variant: str = "ring") -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", ATTNRS_NUM_THREADS="1", WORLD_SIZE=str(world))
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "python"), env.get("PYTHONPATH")) if p)
    flags = ["--worker", "--length", str(args.length), "--heads", str(args.heads), "--dim", str(args.dim)]
    flags += ["--reps", str(args.reps), "--layout", layout, "--variant", variant]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *flags], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, text=True
        )
        for r in range(world)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _hidden(wait: float, alone: float) -> str:
    if alone <= 0:
        return "-"
    return f"{max(0.0, 1.0 - wait / alone) * 100:.0f}% ({wait * 1e3:.1f} of {alone * 1e3:.1f} ms)"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768, help="global sequence length (default 32768)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--layout", default="zigzag", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="ring", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    print(f"# context parallelism, causal, B=1 H={args.heads} L={args.length} D={args.dim} float32; {cpu_model()}")
    print(f"# {os.cpu_count()} logical CPUs; 1 thread per rank; best of {args.reps} after a warm-up; gloo")
    rows = _launch(args, 1, "whole")
    for layout in ("zigzag", "contiguous"):
        rows += _launch(args, 2, layout)
    rows += _launch(args, 2, "zigzag", "allgather")
    base = rows[0]["forward_s"] + rows[0]["backward_s"]
    names = ["setup", "rank", "fwd s", "bwd s", "vs 1 rank", "cpu s (share)", "pairs (calls)", "peak MiB (+attn)"]
    names.append("comm hidden fwd")
    names.append("comm hidden bwd")
    table = []
    for r in rows:
        total = r["forward_s"] + r["backward_s"]
        table.append(
            [
                "1 rank x 1 thread" if r["world"] == 1 else f"2 ranks x 1 thread, {r['variant']} {r['layout']}",
                str(r["rank"]),
                f"{r['forward_s']:.3f}",
                f"{r['backward_s']:.3f}",
                f"{base / total:.2f}x",
                f"{r['cpu_s']:.3f} ({r['cpu_s'] / rows[0]['cpu_s']:.2f})",
                str(r.get("pairs", "-")),
                f"{r['peak_mib']:.0f} (+{r['peak_mib'] - r['rss_before_mib']:.0f})",
                _hidden(r["forward_wait_s"], r["forward_alone_s"]) if "forward_wait_s" in r else "-",
                _hidden(r["backward_wait_s"], r["backward_alone_s"]) if "backward_wait_s" in r else "-",
            ]
        )
    widths = [max(len(x) for x in column) for column in zip(names, *table)]
    print("| " + " | ".join(n.ljust(w) for n, w in zip(names, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in table:
        print(
            "| "
            + " | ".join(x.ljust(w) if i in (0, 8, 9) else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths)))
            + " |"
        )
    print("# vs 1 rank: the 1-rank (fwd + bwd) time over this rank's")
    print("# cpu s (share): the process CPU time of that fwd + bwd run, and its share of the 1-rank run's (ideal 0.5)")
    print("# pairs (calls): (query chunk, key chunk) pairs the rank computed, and the attention calls they took")
    print("# comm hidden: 1 - wait / alone; wait also counts time spent waiting for a slower neighbour (imbalance)")
    print(
        "# peak: ru_maxrss of the process (torch and attnrs included); (+attn): its growth over VmRSS before the runs"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
