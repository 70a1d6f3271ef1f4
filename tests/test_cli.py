"""The command line runs on a fresh install."""

from __future__ import annotations

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


def test_demo_runs() -> None:
    out = _run("demo", "--length", "64")
    assert "sdpa" in out
