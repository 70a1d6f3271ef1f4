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
