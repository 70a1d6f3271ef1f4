"""The command line runs on a fresh install."""

from __future__ import annotations

import struct
import subprocess
import sys

import attnrs


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "attnrs", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_info_reports_version_isa_threads_and_registry() -> None:
    out = _run("info")
    assert f"attnrs {attnrs.__version__}" in out
    assert attnrs.simd_path() in out
    assert "threads:" in out
    assert "sdpa" in out


def test_demo_runs_the_model_with_attnrs_and_sdpa() -> None:
    out = _run("demo", "--length", "48", "--batch", "2", "--new-tokens", "4", "--repeats", "1")
    assert "generated tokens equal: True" in out
    assert "attnrs" in out and "sdpa" in out


def test_show_mask_draws_the_mask_and_its_blocks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = _run("show-mask", "sliding_window(2) & causal()", "--length", "6", "--block", "3")
    lines = out.splitlines()
    assert lines[2] == "0 ■⬚⬚⬚⬚⬚" and lines[7] == "5 ⬚⬚⬚⬚■■"
    assert "blocks 3x3: 0 full, 3 partial, 1 empty of 4" in out
    png = tmp_path / "mask.png"
    out = _run("show-mask", "causal()", "--length", "4096", "--png", str(png))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR: the picture, not one pixel per position
    assert f"({width}x{height})" in out and 300 <= min(width, height) < 4096


def test_the_gpu_check_script_imports_and_says_when_there_is_no_cuda() -> None:
    """scripts/gpu_check.py only runs fully on a GPU machine; here it must at least import what it uses (it once
    imported modules that no longer existed) and exit 2."""
    import pathlib

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine: run scripts/gpu_check.py by hand, it checks everything itself")
    script = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no CUDA device" in result.stdout, result.stderr


def test_models_checks_the_named_families_against_eager() -> None:
    out = _run("models", "llama", "bloom")
    assert "llama" in out and " pass " in out
    assert "bloom" in out and "not routed" in out
