"""``bench --plot`` and ``show-mask --png``: the files are real pictures, their titles name the machine, bad
suffixes and a missing matplotlib are refused with a message; progress bars only on a terminal.

matplotlib comes with the ``test`` extra (and the ``bench`` one), so these tests run everywhere CI runs."""

from __future__ import annotations

import io
import struct
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import attnrs
from attnrs.cli import main
from attnrs.cli.progress import echo, progress

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A bench run of tiny shapes: two lengths (the scaling panels), one short decode, no compiled flex.
TINY_BENCH = [
    "bench",
    "--quick",
    "--lengths",
    "32,64",
    "--decode-lengths",
    "256",
    "--repeats",
    "1",
    "--threads",
    "1",
    "--no-flex",
    "--no-one-thread",
]


def png_chunks(data: bytes) -> dict[bytes, list[bytes]]:
    assert data[:8] == PNG_SIGNATURE
    chunks: dict[bytes, list[bytes]] = {}
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        chunks.setdefault(kind, []).append(data[at + 8 : at + 8 + length])
        at += 12 + length
    assert b"IEND" in chunks
    return chunks


def png_size(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", png_chunks(data)[b"IHDR"][0][:8])
    return width, height


def png_title(data: bytes) -> str:
    for text in png_chunks(data).get(b"tEXt", []):
        key, _, value = text.partition(b"\x00")
        if key == b"Title":
            return value.decode("latin-1")
    raise AssertionError("no Title in the PNG")


@pytest.fixture
def restore_threads():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def check_title(title: str) -> None:
    assert attnrs.simd_path() in title
    assert "float32" in title and "bfloat16" in title
    assert "1 thread" in title and "1 threads" not in title


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_bench_plot_draws_the_run(tmp_path: Path, suffix: str, capsys, restore_threads) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / f"bench{suffix}"
    assert main([*TINY_BENCH, "--plot", str(out)]) == 0
    printed = capsys.readouterr()
    assert f"wrote {out}" in printed.out
    assert "causal fp32 L32" in printed.out and "sliding 512 fp32 L64" in printed.out
    assert "\r" not in printed.err  # no progress bar when stderr is not a terminal
    data = out.read_bytes()
    if suffix == ".png":
        width, height = png_size(data)
        assert width >= 800 and height >= 500
        check_title(png_title(data))
    else:
        root = ET.fromstring(data)
        assert root.tag.endswith("svg")
        texts = " ".join(t for element in root.iter() for t in (element.text or "",))
        check_title(texts)  # text stays text: the title, the case labels, the legend
        for label in ("causal fp32 L64", "decode fp32 Q1 Lk256", "scaling: causal fp32", "scaling: sliding 512 fp32"):
            assert label in texts
        assert "transformers sdpa" in texts and "attnrs" in texts


def test_bench_plot_refuses_an_unknown_suffix_before_running(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit:
        main([*TINY_BENCH, "--plot", str(tmp_path / "bench.pdf")])
    assert exit.value.code == 2
    assert ".png or .svg" in capsys.readouterr().err
    assert not (tmp_path / "bench.pdf").exists()
    assert time.perf_counter() - start < 5  # refused before any benchmark ran


def test_missing_matplotlib_is_a_message_naming_the_extra(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(SystemExit) as exit:
        main([*TINY_BENCH, "--plot", str(tmp_path / "bench.png")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert 'pip install "attnrs[bench]"' in err and "Traceback" not in err
    assert main(["show-mask", "causal()", "--length", "16", "--png", str(tmp_path / "mask.png")]) == 2
    err = capsys.readouterr().err
    assert 'pip install "attnrs[bench]"' in err and "--png" in err
    assert not (tmp_path / "bench.png").exists() and not (tmp_path / "mask.png").exists()


def test_show_mask_png_upscales_a_small_mask_with_axes_and_legend(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    png = tmp_path / "mask.png"
    assert main(["show-mask", "sliding_window(4) & causal()", "--length", "16", "--png", str(png)]) == 0
    width, height = png_size(png.read_bytes())
    assert width >= 300 and height >= 300
    assert f"wrote {png} ({width}x{height})" in capsys.readouterr().out
    svg = tmp_path / "mask.svg"
    args = ["show-mask", "causal()", "--length", "12", "--q-offset", "100", "--kv-offset", "100", "--png", str(svg)]
    assert main(args) == 0
    texts = [element.text or "" for element in ET.fromstring(svg.read_bytes()).iter()]
    assert "key position" in texts and "query position" in texts
    assert "100" in texts and "111" in texts  # absolute positions on the axes
    assert "visible (partial block)" in texts and "block boundary (every 4)" in texts


def test_show_mask_png_of_a_long_mask_is_quick_and_the_same_size(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    png = tmp_path / "mask.png"
    start = time.perf_counter()
    assert main(["show-mask", "sliding_window(512) & causal()", "--length", "4096", "--png", str(png)]) == 0
    assert time.perf_counter() - start < 30
    out = capsys.readouterr().out
    width, height = png_size(png.read_bytes())
    assert width >= 300 and height >= 300 and f"({width}x{height})" in out
    assert "one cell per 4x4 positions" in png_title(png.read_bytes())


def test_show_mask_png_refuses_an_unknown_suffix(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["show-mask", "causal()", "--png", str(tmp_path / "mask.jpg")]) == 2
    assert ".png or .svg" in capsys.readouterr().err
    assert not (tmp_path / "mask.jpg").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_only_on_a_terminal(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    assert list(progress(range(3), "quiet")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress(["a", "b"], "steps")
    for item in bar:
        bar.note(f"running {item}")
        echo(f"done {item}")
    assert "steps" in terminal.getvalue() and "running a" in terminal.getvalue()
    assert capsys.readouterr().out == "done a\ndone b\n"


def _kernel_path(case: str) -> str:
    """attnrs.kernel_path of a case's dtype, from the case's name ("causal bf16 L16", "decode fp32 Q1 Lk64")."""
    return attnrs.kernel_path("bfloat16" if " bf16 " in f" {case} " else "float32")[0]


@pytest.fixture
def no_gc_between_runs(monkeypatch):  # type: ignore[no-untyped-def]
    """The bench collects garbage before every timed call; with transformers imported a collection takes a
    sizeable fraction of a second, most of a tiny bench's time. These tests read the tables, not the times."""
    from attnrs.cli import bench

    monkeypatch.setattr(bench.gc, "collect", lambda *args: 0)


def test_forward_cases_run_the_bf16_masks_at_the_longest_length() -> None:
    from attnrs.cli.bench import forward_cases

    names = [case.name for case in forward_cases([16, 32], [64])]
    for name in ("sliding 512 bf16", "8 documents bf16", "sliding 512 fp32", "8 documents fp32", "causal bf16"):
        assert f"{name} L32" in names
    assert "sliding 512 bf16 L16" not in names and "8 documents bf16 L16" not in names
    assert "causal fp32 L16" in names and "sliding 512 fp32 L16" in names  # the scaling families
    bf16 = {case.name: case for case in forward_cases([32], [])}
    assert bf16["sliding 512 bf16 L32"].dtype == torch.bfloat16 and bf16["sliding 512 bf16 L32"].mask is not None


def test_bench_names_the_kernel_path_and_reports_decode_against_a_streaming_read(  # type: ignore[no-untyped-def]
    capsys, restore_threads, no_gc_between_runs
) -> None:
    args = ["--lengths", "32", "--decode-lengths", "64", "--repeats", "1", "--threads", "1"]
    assert main(["bench", *args, "--no-flex", "--no-one-thread"]) == 0
    out = capsys.readouterr().out
    blocks = [block.strip().splitlines() for block in out.split("\n\n")]
    cases = {
        lines[0]: lines[1:]
        for lines in blocks
        if lines and lines[0].startswith(("causal", "sliding", "8 doc", "decode"))
    }
    longest = (
        "causal fp32",
        "causal bf16",
        "sliding 512 fp32",
        "8 documents fp32",
        "sliding 512 bf16",
        "8 documents bf16",
    )
    assert {f"{name} L32" for name in longest} | {"decode fp32 Q1 Lk64", "decode bf16 Q1 Lk64"} <= set(cases)
    for case, rows in cases.items():
        ours = [row for row in rows if row.lstrip().startswith("attnrs (")]
        assert ours and ours[0].split()[1] == f"({_kernel_path(case)})", (case, rows)
        if "documents" in case or "sliding" in case:  # the dense-mask peers run for bf16 as for fp32
            assert any(row.lstrip().startswith("sdpa dense mask") and "failed" not in row for row in rows), rows
        if case.startswith("decode"):
            fraction = [row for row in rows if "attnrs reads K/V at" in row]
            assert len(fraction) == 1 and fraction[0].lstrip().startswith("from memory (a streaming pass before each")
            assert "% of the pass; sdpa " in fraction[0] and fraction[0].endswith("%"), fraction
    probe = [line for line in out.splitlines() if line.startswith("streaming read: ")]
    assert len(probe) == 1 and out.index(probe[0]) < out.index("decode fp32 Q1 Lk64")
    assert float(probe[0].split()[2]) > 0 and "GB/s (buffer" in probe[0] and "1 thread)" in probe[0]
    assert torch.get_num_threads() == 1  # the bench's count, set by the bench (the probe restores what it found)


def test_bench_backward_rows_name_the_kernel_path(capsys, restore_threads, no_gc_between_runs) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "--backward", "--lengths", "16", "--repeats", "1", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and " L16 " in line]
    assert len(rows) == 3
    for row in rows:
        assert f"attnrs ({_kernel_path(row.strip())})" in row


def test_streaming_read_probe_of_a_small_buffer(restore_threads) -> None:  # type: ignore[no-untyped-def]
    import math

    from attnrs.cli.bandwidth import MiB, buffer_bytes, streaming_read

    torch.set_num_threads(1)
    probe = streaming_read(threads=1, buffer=4 * MiB, repeats=2)
    assert math.isfinite(probe.gb_per_s) and probe.gb_per_s > 0
    assert probe.buffer == 4 * MiB and probe.threads == 1 and probe.op.startswith("torch.")
    assert probe.line().startswith("streaming read: ") and "buffer 4 MiB" in probe.line()
    assert torch.get_num_threads() == 1
    assert 16 * MiB <= buffer_bytes(None) <= 4096 * MiB
    assert buffer_bytes(None) <= buffer_bytes(64 * MiB)


def test_llc_bytes_sums_the_instances_of_the_highest_level(tmp_path: Path) -> None:
    from attnrs.cli.bandwidth import llc_bytes

    def cache(cpu: int, index: int, level: int, kind: str, size: str, shared: str) -> None:
        where = tmp_path / f"cpu{cpu}" / "cache" / f"index{index}"
        where.mkdir(parents=True)
        for name, text in (("level", str(level)), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
            (where / name).write_text(f"{text}\n")

    for cpu in range(4):
        cache(cpu, 0, 1, "Data", "32K", str(cpu))
        cache(cpu, 1, 1, "Instruction", "32K", str(cpu))
        cache(cpu, 2, 2, "Unified", "1024K", str(cpu))
        cache(cpu, 3, 3, "Unified", "32768K", "0-1" if cpu < 2 else "2-3")  # two L3 instances, two CPUs each
    assert llc_bytes(tmp_path) == 2 * 32 * 1024 * 1024
    assert llc_bytes(tmp_path / "nowhere") is None
