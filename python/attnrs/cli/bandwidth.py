"""A streaming-read bandwidth probe, the ceiling that ``bench`` reports decode against.

Decode (one query row against a long KV cache) reads every K and V byte once and does little arithmetic per byte,
so its honest yardstick is how fast this machine streams memory with the same threads. :func:`streaming_read`
times a few memory-bound torch reductions over a buffer several times the last-level cache and keeps the fastest
(a probe wants the ceiling, not an average op).

    probe = streaming_read(threads=2)
    print(probe.line())  # streaming read: 41.2 GB/s (buffer 256 MiB > LLC 32 MiB, 2 threads)

:func:`streaming_pass` gives one timed pass of the probe's op over such a buffer: run just before a decode call, it
evicts K/V from the caches (as a model's other layers would) and says what bandwidth the machine had at that moment.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Bandwidth", "MiB", "buffer_bytes", "llc_bytes", "streaming_pass", "streaming_read"]

MiB = 1 << 20
MIN_BUFFER = 256 * MiB
MAX_BUFFER = 4096 * MiB  # a larger buffer would only cost seconds to fill; 8 x LLC of most CPUs is below it
CPU_ROOT = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class Bandwidth:
    gb_per_s: float  # 1e9 bytes per second, the fastest op's median
    buffer: int  # bytes read per pass
    llc: int | None  # bytes of last-level cache (all instances), None where sysfs does not say
    threads: int
    op: str  # the op whose median won

    def line(self) -> str:
        if self.llc is None:
            cache = "LLC unknown"
        else:
            cache = f"{'>' if self.buffer > self.llc else '<='} LLC {self.llc / MiB:.0f} MiB"
        threads = f"{self.threads} thread{'s' * (self.threads != 1)}"
        return f"streaming read: {self.gb_per_s:.1f} GB/s (buffer {self.buffer / MiB:.0f} MiB {cache}, {threads})"


def _size(text: str) -> int:
    """sysfs cache sizes: ``32768K``, ``1M``, or plain bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def llc_bytes(root: Path = CPU_ROOT) -> int | None:
    """Bytes of last-level cache: the highest ``level`` among the data or unified caches in
    ``cpu*/cache/index*/``, summed over its distinct instances (``shared_cpu_list``), since the threads of a read
    may sit on different cache instances (AMD's L3 is per core complex). None where sysfs has no cache entries."""
    found: dict[tuple[int, str], int] = {}  # (level, shared cpus) -> bytes
    for index in root.glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _size((index / "size").read_text())
            shared = (index / "shared_cpu_list").read_text().strip() if (index / "shared_cpu_list").exists() else ""
        except (OSError, ValueError):
            continue
        found[(level, shared or str(index.parent.parent))] = size
    if not found:
        return None
    top = max(level for level, _ in found)
    return sum(size for (level, _), size in found.items() if level == top)


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def buffer_bytes(llc: int | None) -> int:
    """max(8 x LLC, 256 MiB), at most 4 GiB and a quarter of the available memory (and at least 16 MiB)."""
    wanted = max(8 * (llc or 0), MIN_BUFFER)
    cap = MAX_BUFFER
    available = _available_bytes()
    if available is not None:
        cap = min(cap, available // 4)
    return max(16 * MiB, min(wanted, cap))


def _read_ops(data: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The reductions a probe times over a float32 buffer, by name."""
    ints = data.view(torch.int32)  # the same bytes; integer max is the fastest reduction on some CPUs
    return {
        "torch.sum": lambda: torch.sum(data),
        "torch.amax": lambda: torch.amax(data),
        "torch.amax (int32 view)": lambda: torch.amax(ints),
    }


def streaming_read(threads: int, buffer: int | None = None, repeats: int = 5) -> Bandwidth:
    """The streaming-read bandwidth with ``threads`` torch threads: the median of ``repeats`` passes of each of
    ``torch.sum``, ``torch.amax`` and ``torch.amax`` of its int32 view over a float32 buffer of ``buffer`` bytes
    (default :func:`buffer_bytes`), the fastest op's. torch's thread count is restored afterwards."""
    llc = llc_bytes()
    size = buffer if buffer is not None else buffer_bytes(llc)
    data = torch.empty(max(1, size // 4), dtype=torch.float32)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data.fill_(1.0)  # touch every page before timing
        read = data.numel() * data.element_size()
        best, best_op = 0.0, ""
        for name, op in _read_ops(data).items():
            op()  # warm-up
            times = []
            for _ in range(max(1, repeats)):
                start = time.perf_counter()
                op()
                times.append(time.perf_counter() - start)
            rate = read / max(statistics.median(times), 1e-9) / 1e9
            if rate > best:
                best, best_op = rate, name
    finally:
        torch.set_num_threads(previous)
    return Bandwidth(best, read, llc, threads, best_op)


def streaming_pass(probe: Bandwidth) -> Callable[[], float]:
    """``read()``: one pass of ``probe``'s op over a buffer of ``probe.buffer`` bytes (allocated and touched here,
    kept while ``read`` lives), with torch's current thread count, returning its GB/s."""
    data = torch.empty(max(1, probe.buffer // 4), dtype=torch.float32)
    data.fill_(1.0)
    op = _read_ops(data)[probe.op]
    nbytes = data.numel() * data.element_size()

    def read() -> float:
        start = time.perf_counter()
        op()
        return nbytes / max(time.perf_counter() - start, 1e-9) / 1e9

    return read
