"""Threads, memory and fork (issue #15): concurrent calls from several Python threads give the serial results,
memory does not grow over many calls, and a forked child (forked while a parent thread is busy in attnrs) gets
correct results."""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from fuzz_support import LARGE, statm_rss_bytes

import attnrs
from attnrs import masks


def _calls() -> list[Callable[[], Any]]:
    """Calls of every kind, with fixed inputs: each returns tensors to compare."""
    gen = torch.Generator().manual_seed(3)

    def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = t(2, 4, 70, 32), t(2, 2, 90, 32), t(2, 2, 90, 24)
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    dec_q, dec_k = t(1, 8, 1, 64), t(1, 2, 700, 64)
    ids = torch.arange(90)[None] // 25
    window = masks.sliding_window(9)
    block = attnrs.create_block_mask(masks.causal() & masks.document(ids), 2, None, 70, 90, BLOCK_SIZE=16, q_offset=20)
    dense = torch.rand(2, 1, 70, 90, generator=gen) > 0.3
    bias = t(1, 4, 70, 90)
    sinks = t(4)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return ((qi + kv + h) % 3) != 0

    def grads() -> tuple[torch.Tensor, ...]:
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = attnrs.attention(*leaves, window, softcap=20.0, sinks=sinks)
        return torch.autograd.grad(out.square().sum(), leaves)

    return [
        lambda: attnrs.attention(q, k, v, is_causal=True),
        lambda: attnrs.attention(q, k, v, window, q_offset=20, return_lse=True),
        lambda: attnrs.attention(qb, kb, vb, masks.document(ids) & masks.causal(), q_offset=20),
        lambda: attnrs.attention(q, k, v, block, softcap=30.0, sinks=sinks, return_lse=True),
        lambda: attnrs.attention(q, k, v, dense, scale=0.3),
        lambda: attnrs.attention(q, k, v, bias),
        lambda: attnrs.attention(q, k, v, mask_mod),  # Rust calls back into Python under the GIL
        lambda: attnrs.attention(dec_q, dec_k, dec_k),  # split-KV decode
        lambda: (attnrs.create_dense_mask(window | masks.chunked(7), 2, 1, 70, 90),),
        lambda: tuple(attnrs.create_block_mask(window, 2, 4, 300, 300, BLOCK_SIZE=32).as_tuple()[2:4]),
        grads,
    ]


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _equal(a: Any, b: Any) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_as_tuple(a), _as_tuple(b), strict=True))


def test_threads_give_the_serial_results() -> None:
    calls = _calls()
    expected = [call() for call in calls]
    n_threads, rounds = (8, 6) if LARGE else (4, 3)
    barrier = threading.Barrier(n_threads)
    failures: list[str] = []

    def worker(seed: int) -> None:
        order = list(range(len(calls)))
        barrier.wait()
        for r in range(rounds):
            for i in order[seed + r :] + order[: seed + r]:  # every thread in another order
                try:
                    got = calls[i]()
                except Exception as e:  # recorded, so one failure names its call
                    failures.append(f"call {i} in thread {seed}: {type(e).__name__}: {e}")
                    continue
                if not _equal(got, expected[i]):
                    failures.append(f"call {i} in thread {seed}, round {r}: differs from the serial result")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread is stuck (deadlock?)"
    assert not failures, failures[:10]


def test_memory_does_not_grow_over_many_calls() -> None:
    calls = _calls()
    bad_q = torch.randn(1, 3, 8, 16)
    good = torch.randn(1, 2, 8, 16)

    def error_paths() -> None:
        for call in (
            lambda: attnrs.attention(bad_q, good, good),  # ShapeError from Python
            lambda: attnrs.attention(good, good, good, masks.document(torch.zeros(4, dtype=torch.long))),
            lambda: attnrs.attention(good, good, good, lambda b, h, q, kv: torch.ones(3, 5, dtype=torch.bool)),
        ):
            with pytest.raises(attnrs.AttnrsError):
                call()

    def one_round() -> None:
        for call in calls:
            call()
        error_paths()

    for _ in range(5):  # warm-up: lazy imports, pools, allocator caches
        one_round()
    gc.collect()
    before = statm_rss_bytes()
    rounds = 200 if LARGE else 40
    for _ in range(rounds):
        one_round()
    gc.collect()
    grown = statm_rss_bytes() - before
    # Each round allocates a few MiB; a leak of even one output per call would add tens of MiB here.
    assert grown < 48 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over {rounds} rounds of {len(calls) + 3} calls"


def test_a_forked_child_gets_correct_results_while_a_parent_thread_is_busy() -> None:
    calls = _calls()
    expected = [call() for call in calls]
    stop = threading.Event()
    busy_q = torch.randn(1, 8, 512, 64)

    def busy() -> None:
        while not stop.is_set():
            attnrs.attention(busy_q, busy_q, busy_q, is_causal=True)

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        time.sleep(0.2)  # the busy thread is inside the Rust kernel, on the pool's workers
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork with threads
            pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 3
            try:
                # Not the gradient call: torch's autograd refuses to run in a forked child once the parent used
                # its worker threads (https://github.com/pytorch/pytorch/wiki/Autograd-and-Fork), which other tests
                # in the same process may have done. The backward shares the forward's Rust pools.
                forward = [(call, exp) for call, exp in zip(calls, expected) if call.__name__ != "grads"]
                code = 0 if all(_equal(call(), exp) for call, exp in forward) else 1
                os.environ["ATTNRS_NUM_THREADS"] = "2"  # a pool of another size in the child too
                code = code or (0 if _equal(calls[0](), expected[0]) else 2)
            except BaseException:
                traceback.print_exc()  # to the parent's captured stderr: what went wrong in the child
                sys.stderr.flush()
            finally:
                os._exit(code)
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hangs (a deadlock in a pool inherited from the parent?)")
    finally:
        stop.set()
        thread.join()
    assert status is not None
    assert os.WIFEXITED(status), f"the forked child died: signal {os.WTERMSIG(status)}"
    code = os.WEXITSTATUS(status)
    assert code == 0, {1: "wrong results in the child", 2: "wrong results with a new thread count", 3: "an error"}[code]


_FORK_AFTER_TEAM = """
import os, signal, sys, torch, attnrs
torch.set_num_threads(2)
torch.manual_seed(0)
q = torch.randn(1, 8, 1, 64, dtype=torch.bfloat16)
k = torch.randn(1, 2, 4096, 64, dtype=torch.bfloat16)  # 2 MiB of K/V: above the serial threshold
v = torch.randn(1, 2, 4096, 64, dtype=torch.bfloat16)
expected = attnrs.attention(q, k, v)  # on this thread: the OpenMP team's master
pid = os.fork()
if pid == 0:
    signal.alarm(30)  # a child stuck in the team dies of SIGALRM
    os._exit(0 if torch.equal(attnrs.attention(q, k, v), expected) else 1)
_, status = os.waitpid(pid, 0)
sys.exit(0 if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else f"child status {status}")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_a_forked_child_decodes_on_two_threads_after_the_parent_used_the_openmp_team() -> None:
    """On Linux a threaded decode runs on torch's OpenMP team (attnrs_core::threads::openmp). libgomp's team does
    not survive fork: a child whose forking thread entered a region again would wait for the parent's threads
    (torch's own parallel ops hang there). The child's decode takes attnrs's pool instead (it notes the fork, and
    its pools are the child's own), with the parent's answer. In a fresh process, so that the forking thread is
    the team's master (here earlier tests may have sized its pools otherwise)."""
    import subprocess

    run = subprocess.run([sys.executable, "-c", _FORK_AFTER_TEAM], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"the forked child's threaded decode failed or hung: {run.stderr[-2000:]}"
