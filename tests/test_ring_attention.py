"""attnrs.distributed against single-process attnrs.attention (and torch SDPA) on the full sequence.

Each test starts ``world`` processes (gloo on 127.0.0.1) running this file as a script; every rank builds the same
global tensors from one seed, runs ring/all-gather attention on its shard, and compares output, LSE and the
gradients of q, k, v with the rank's shard of the single-process result. A rank that fails exits non-zero; the
parent then kills the others, and a run that outlives its deadline fails (a hang is a failure, never a stall).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

DEADLINE_S = 150.0  # per spawn; one world size's cases take 10-30 s on two busy cores, mostly imports


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(world: int, suite: str) -> None:
    """Runs ``suite`` on ``world`` ranks; fails with every rank's output if any rank fails or the deadline passes."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world))
    env.update(OMP_NUM_THREADS="1", ATTNRS_NUM_THREADS="1")
    # The ranks import the attnrs this process runs (installed, or the source tree with its built extension).
    import attnrs

    python_path = str(Path(attnrs.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_path, env.get("PYTHONPATH")) if p)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, suite],
            env=dict(env, RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + DEADLINE_S
    failed = timed_out = False
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            failed, timed_out = True, time.monotonic() > deadline
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.05)
    outputs = [p.communicate()[0] for p in procs]
    report = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{o}" for r, (p, o) in enumerate(zip(procs, outputs)))
    assert not timed_out, f"{suite} on {world} ranks did not finish in {DEADLINE_S} s\n{report}"
    assert not failed and all(p.returncode == 0 for p in procs), report
    assert all(f"{suite} passed" in o for o in outputs), report


@pytest.mark.parametrize("world", [2, 3, 4])
def test_context_parallel_on_one_machine(world: int) -> None:
    """Numerics (every mask, layout and variant against the single-process result), then the refused inputs
    (each raised on every rank, the group still usable afterwards), in one spawn: starting a rank (importing
    torch and attnrs) costs more than all its cases."""
    _spawn(world, "all")


def test_layout_helpers_without_a_group() -> None:
    from attnrs.distributed import shard_positions, shard_sequence
    from attnrs.errors import ArgumentError, ShapeError

    x = torch.arange(16)
    assert shard_sequence(x, 0, world_size=2, rank=0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shard_sequence(x, 0, world_size=2, rank=1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert shard_sequence(x, 0, world_size=2, rank=1, layout="contiguous").tolist() == list(range(8, 16))
    assert shard_positions(16, world_size=4, rank=3).tolist() == [6, 7, 8, 9]
    with pytest.raises(ShapeError, match="x: the zigzag layout over 3 ranks"):
        shard_sequence(x, 0, world_size=3, rank=0)
    with pytest.raises(ArgumentError, match="layout"):
        shard_sequence(x, 0, world_size=2, rank=0, layout="striped")
    with pytest.raises(ArgumentError, match="world_size/rank"):
        shard_sequence(x, 0, world_size=2, rank=2)


def test_one_rank_is_plain_attention() -> None:
    """Without a process group the calls refuse clearly; on a group of one (in this process) they are
    attnrs.attention on the whole sequence, gradients included, and no transfer is made."""
    import torch.distributed as dist

    import attnrs
    from attnrs import masks
    from attnrs.distributed import allgather_attention, last_ring_timings, ring_attention
    from attnrs.errors import ArgumentError

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))
    with pytest.raises(ArgumentError, match="not initialised"):
        ring_attention(q, k, v, "causal")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mask = masks.sliding_window(5)
        expected = attnrs.attention(q, k, v, mask)
        want = torch.autograd.grad(expected.sum(), (q, k, v))
        for fn in (ring_attention, allgather_attention):
            out = fn(q, k, v, mask)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            for got, ref in zip(torch.autograd.grad(out.sum(), (q, k, v)), want):
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        ring_attention(q, k, v, mask)
        assert (
            last_ring_timings().forward_wait == 0.0 and last_ring_timings().pairs == 3
        )  # (early queries, late keys) is skipped
    finally:
        dist.destroy_process_group()


def test_recomputed_pair_backward_matches_the_kernel() -> None:
    """The device-agnostic backward of one pair (autograd through a recomputed forward, used off CPU) against the
    kernel's backward with the global LSE, both summed over key parts against autograd on the whole."""
    import attnrs
    from attnrs import masks
    from attnrs.distributed.pairs import kernel_pair_backward, pair_is_empty, recomputed_pair_backward

    torch.manual_seed(0)
    b, h, n, d = 2, 2, 32, 16
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    mask = masks.document(torch.tensor([[0] * 10 + [1] * 22, [0] * 20 + [1] * 12])) & masks.causal()
    out, lse = attnrs.attention(q, k, v, mask, return_lse=True)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    expected = torch.autograd.grad((out, lse), (q, k, v), (go, gl))
    halves = [(0, 16), (16, 32)]
    for backward in (kernel_pair_backward, recomputed_pair_backward):
        grads = [torch.zeros_like(t) for t in (q, k, v)]
        for qs, qe in halves:
            for ks, ke in halves:
                if pair_is_empty(mask, b, h, qs, qe - qs, ks, ke - ks):
                    continue
                rows, keys = slice(qs, qe), slice(ks, ke)
                dq, dk, dv = backward(
                    q.detach()[:, :, rows],
                    k.detach()[:, :, keys],
                    v.detach()[:, :, keys],
                    out.detach()[:, :, rows],
                    lse.detach()[:, :, rows],
                    go[:, :, rows],
                    gl[:, :, rows],
                    mask,
                    qs,
                    ks,
                    d**-0.5,
                )
                grads[0][:, :, rows] += dq
                grads[1][:, :, keys] += dk
                grads[2][:, :, keys] += dv
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- the ranks' side -----------------------------------------------------------------------------------------------


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    # float64: the kernels' LSE is float32, so merged results carry its ~1e-7 relative rounding. bfloat16: each
    # partial output is rounded to bf16 before the float32 merge (a single call rounds once).
    if dtype == torch.bfloat16:
        return {"rtol": 2e-2, "atol": 2e-2}
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-6, "atol": 1e-6}


def _numerics() -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    import attnrs
    from attnrs import masks
    from attnrs.distributed import (
        allgather_attention,
        last_ring_timings,
        ring_attention,
        shard_positions,
        shard_sequence,
        unshard_sequence,
    )

    rank, world = dist.get_rank(), dist.get_world_size()
    b, h, h_kv, d, local = 2, 4, 2, 16, 16
    n = world * local
    ids = torch.stack([torch.arange(n) * 3 // n, (torch.arange(n) >= n // 4).long() + (torch.arange(n) >= n - 5)])
    cases = {
        "none": None,
        "causal": "causal",
        "sliding": masks.sliding_window(7),
        "documents_causal": masks.document(ids) & masks.causal(),
        "documents": masks.document(ids),
        "callable": lambda b_, h_, q_, kv_: (kv_ <= q_) & ((q_ - kv_) % 3 != 1),
        # Rows that see no key anywhere: zeros and an LSE of -inf, zero gradients, never NaN.
        "empty_rows": masks.causal() & masks.from_callable(lambda b_, h_, q_, kv_: q_ % 7 != 3),
    }
    for layout in ("zigzag", "contiguous"):
        positions = shard_positions(n, layout=layout)
        assert torch.equal(shard_sequence(torch.arange(n), 0, layout=layout), positions)
        assert torch.equal(unshard_sequence(positions, 0, layout=layout), torch.arange(n))
        for name, mask in cases.items():
            for fn in (ring_attention, allgather_attention):
                # The all-gather variant places one mask per query chunk against the whole K/V: its few cases
                # run on every world size for zigzag, on two ranks for contiguous (keeps the suite short).
                if fn is allgather_attention and (name in ("none", "callable") or (world > 2 and layout != "zigzag")):
                    continue
                dtypes = [torch.float32] + ([torch.float64] if name == "causal" and fn is ring_attention else [])
                for dtype in dtypes:
                    _compare(fn, mask, layout, dtype, (b, h, h_kv, n, d), name, rank, world)
                    if fn is ring_attention and name == "causal":
                        # zigzag: 2W + 1 pairs on every rank, in W + 2 calls (3 on the diagonal step, then the
                        # full pairs of a step fused into one); contiguous: rank r computes r + 1 pairs.
                        t = last_ring_timings()
                        want = (2 * world + 1, world + 2) if layout == "zigzag" else (rank + 1, rank + 1)
                        assert (t.pairs, t.calls) == want, f"{layout}: rank {rank} ran {t}, expected {want}"
    # The all-gather backward's two ways to return dK/dV to their owners agree with the sum over ranks.
    from attnrs.distributed.allgather import all_reduce_sequence, reduce_scatter_sequence

    for layout in ("zigzag", "contiguous"):
        torch.manual_seed(7)
        per_rank = [torch.randn(1, 2, n, 4) for _ in range(world)]
        want = shard_sequence(sum(per_rank), 2, layout=layout)  # type: ignore[arg-type]
        for reduce in (reduce_scatter_sequence, all_reduce_sequence):
            got = reduce(per_rank[rank].clone(), None, rank, world, layout)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m, r=reduce: f"{r.__name__}: {m}")
    # A group that is not the world and does not start at rank 0: ring peers are group ranks mapped to global ones.
    if world == 4:
        members = [1, 2, 3]
        sub = dist.new_group(members)
        if rank in members:
            for fn in (ring_attention, allgather_attention):
                _compare(fn, "causal", "zigzag", torch.float32, (1, 2, 2, 3 * 8, 16), "subgroup", rank, 3, group=sub)
        dist.barrier()
    # Half precision: the ring merges in float32, so it is as close to the reference as bf16 rounding allows.
    _compare(ring_attention, "causal", "zigzag", torch.bfloat16, (1, 2, 2, n, d), "bf16", rank, world)
    # An independent reference: torch SDPA (math) on the full sequence, causal.
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, d) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mine = ring_attention(*(shard_sequence(t, 2) for t in (q, k, v)), "causal")
    torch.testing.assert_close(mine, shard_sequence(full, 2), rtol=1e-5, atol=1e-5)
    del attnrs


def _compare(
    fn: object,
    mask: object,
    layout: str,
    dtype: torch.dtype,
    dims: tuple[int, ...],
    name: str,
    rank: int,
    world: int,
    group: object = None,
) -> None:
    import attnrs
    from attnrs.distributed import shard_sequence

    b, h, h_kv, n, d = dims
    torch.manual_seed(1234)  # the same global tensors on every rank
    q = torch.randn(b, h, n, d, dtype=dtype)
    k, v = (torch.randn(b, h_kv, n, d, dtype=dtype) for _ in range(2))
    go = torch.randn(b, h, n, d, dtype=dtype)
    gl = torch.randn(b, h, n)
    ref_inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_mask = attnrs.masks.causal() if mask == "causal" else mask
    ref_out, ref_lse = attnrs.attention(*ref_inputs, ref_mask, return_lse=True)
    ref_grads = torch.autograd.grad((ref_out, ref_lse), ref_inputs, (go, gl))

    def shard(t: torch.Tensor) -> torch.Tensor:
        return shard_sequence(t, 2, group=group, layout=layout)

    inputs = [shard(t).requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*inputs, mask, group=group, layout=layout, return_lse=True)  # type: ignore[operator]
    grads = torch.autograd.grad((out, lse), inputs, (shard(go), shard(gl)))
    label = f"{fn.__name__} {name} {layout} {dtype} rank {rank}/{world}"  # type: ignore[attr-defined]
    tol = _tolerance(dtype)
    for what, got, want in [
        ("out", out, shard(ref_out)),
        ("lse", lse, shard(ref_lse)),
        *((f"d{x}", g, shard(r)) for x, g, r in zip("qkv", grads, ref_grads)),
    ]:
        assert got.dtype == want.dtype, f"{label}: {what} dtype {got.dtype}, expected {want.dtype}"
        torch.testing.assert_close(got, want, **tol, msg=lambda m, w=what: f"{label}: {w}: {m}")


def _errors() -> None:
    import torch.distributed as dist

    from attnrs import masks
    from attnrs.distributed import allgather_attention, ring_attention, shard_sequence
    from attnrs.errors import ArgumentError, DtypeError, ShapeError

    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randn(1, 2, 8, 16)
    other = rank == 1

    def expect(kind: type[Exception], match: str, *args: object, fn: object = ring_attention, **kwargs: object) -> None:
        try:
            fn(*args, **kwargs)  # type: ignore[operator]
        except kind as e:
            assert match in str(e), f"rank {rank}: {kind.__name__} without {match!r}: {e}"
            return
        raise AssertionError(f"rank {rank}: expected {kind.__name__} ({match})")

    # Only rank 1 is wrong: every rank must raise, none may wait for it.
    expect(DtypeError, "rank 1", x.double() if other else x, x, x)
    short = x[:, :, :4] if other else x
    expect(ShapeError, "same shard shape", short, short, short)
    expect(ArgumentError, "layout", x, x, x, layout="striped" if other else "zigzag")
    expect(ArgumentError, "layout", x, x, x, fn=allgather_attention, layout="striped" if other else "zigzag")
    # Every rank is wrong in the same way.
    expect(ShapeError, "L_local", x[:, :, :7], x[:, :, :7], x[:, :, :7])
    expect(ArgumentError, "mask", x, x, x, torch.ones(8, 8, dtype=torch.bool))
    expect(ArgumentError, "mask", x, x, x, "bidirectional")
    expect(ShapeError, "global sequence", x, x, x, masks.document(torch.zeros(8 * (world - 1), dtype=torch.long)))
    expect(DtypeError, "q: expected a torch.Tensor", None, x, x)
    expect(ShapeError, "4-D", x[0], x[0], x[0], fn=allgather_attention)
    expect(DtypeError, "k/v", x, x.half(), x.half())
    expect(ShapeError, "GQA", x, x[:, :1].expand(1, 3, 8, 16), x[:, :1].expand(1, 3, 8, 16))
    expect(ArgumentError, "scale", x, x, x, scale=float("nan"))
    try:
        shard_sequence(torch.zeros(2 * world + 1), 0)
    except ShapeError:
        pass
    else:
        raise AssertionError("shard_sequence accepted an indivisible length")
    # The group is still usable: nothing is left in flight by the refused calls.
    out = ring_attention(x, x, x, "causal")
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def _main(suite: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        for part in ("numerics", "errors") if suite == "all" else (suite,):
            {"numerics": _numerics, "errors": _errors}[part]()
        dist.barrier()
        print(f"{suite} passed on rank {rank}", flush=True)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # without destroy_process_group: the other ranks may be blocked and are killed by the parent
    dist.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv[1])
