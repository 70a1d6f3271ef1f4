"""The command line runs on a fresh install."""

from __future__ import annotations

import struct
import subprocess
import sys

import torch

import attnrs
from attnrs.cli.demo import plural


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "attnrs", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_info_reports_version_isa_threads_registry_and_the_dispatch_table() -> None:
    from attnrs.attention.dispatch import AUTO_ROUTES

    out = _run("info")
    assert f"attnrs {attnrs.__version__}" in out
    assert attnrs.simd_path() in out
    assert "threads:" in out
    assert "sdpa" in out
    for dtype in ("float32", "bfloat16", "float16", "float64"):
        path, why = attnrs.kernel_path(dtype)
        assert f"{dtype:<9} {path:<12} {why}" in out
    for route in AUTO_ROUTES:  # every row of the table, in its order
        assert route.condition in out and route.backend in out
    positions = [out.index(route.condition) for route in AUTO_ROUTES]
    assert positions == sorted(positions)


def test_kernel_path_names_the_path_and_refuses_other_dtypes() -> None:
    import pytest

    assert attnrs.kernel_path("float64")[0] == "portable"
    assert attnrs.kernel_path("float32")[0] == attnrs.simd_path()
    with pytest.raises(ValueError, match="dtype must be"):
        attnrs.kernel_path("int8")


def test_demo_runs_eager_sdpa_and_attnrs_side_by_side() -> None:
    out = _run("demo", "--length", "64", "--batch", "2", "--new-tokens", "3", "--dtype", "float32")
    table = [line.split() for line in out.splitlines()]
    rows = {cells[0]: cells for cells in table if len(cells) == 7 and cells[0] in ("eager", "sdpa", "attnrs")}
    assert set(rows) == {"eager", "sdpa", "attnrs"}
    for impl in ("sdpa", "attnrs"):
        assert rows[impl][-1] == "True", out  # greedy tokens equal eager's
        assert float(rows[impl][-2]) < 1e-3, out  # logits against eager's, on the real tokens
    assert "attnrs vs sdpa: prefill" in out
    assert "sliding window 256" in out and "attnrs kernel path for float32" in out
    assert plural(torch.get_num_threads(), "thread") in out


def test_demo_says_thread_in_the_singular() -> None:
    assert plural(1, "thread") == "1 thread" and plural(2, "thread") == "2 threads"


def test_demo_peak_memory_sees_an_allocation_and_the_clock_restores_the_registry() -> None:
    import pytest
    import transformers
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from attnrs.cli.demo import AttentionClock, PeakMemory

    with PeakMemory() as memory:
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del big
    if memory.peak_bytes is None:
        pytest.skip("this kernel offers no resettable peak RSS (/proc/self/clear_refs)")
    assert memory.peak_bytes >= 60 * 2**20
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    ).eval()
    model.set_attn_implementation("sdpa")
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with AttentionClock(model, "sdpa") as clock, torch.no_grad():
        model(input_ids=torch.ones(1, 8, dtype=torch.long))
    assert clock.seconds > 0 and ALL_ATTENTION_FUNCTIONS["sdpa"] is before


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

    if torch.cuda.is_available():
        pytest.skip("a GPU machine: run scripts/gpu_check.py by hand, it checks everything itself")
    script = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no CUDA device" in result.stdout, result.stderr


def test_models_checks_the_named_families_against_eager() -> None:
    out = _run("models", "llama", "bloom")
    assert "llama" in out and " pass " in out
    assert "bloom" in out and "not routed" in out


def _with_isa(value: str, code: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "ATTNRS_ISA": value}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_attnrs_isa_forces_the_portable_path_and_it_agrees_with_float64() -> None:
    code = """
import torch, attnrs
assert attnrs.kernel_path("float32") == ("portable", "portable Rust, forced by ATTNRS_ISA"), attnrs.kernel_path("float32")
torch.manual_seed(0)
q, k, v = (torch.randn(2, 4, 37, 16, requires_grad=True) for _ in range(3))
out = attnrs.attention(q, k, v, is_causal=True)
out.sum().backward()
ref = torch.nn.functional.scaled_dot_product_attention(*(t.detach().double().requires_grad_() for t in (q, k, v)), is_causal=True)
assert (out.double() - ref).abs().max() < 1e-5
print("ok")
"""
    result = _with_isa("portable", code)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    assert "ATTNRS_ISA=portable" in _with_isa("portable", "from attnrs.cli import main; main(['info'])").stdout


def test_attnrs_isa_refuses_unknown_values_and_paths_this_cpu_lacks() -> None:
    call = """
import torch, attnrs
try:
    attnrs.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
except attnrs.AttnrsError as e:
    print(type(e).__name__, e)
"""
    cases = [("sse2", "ArgumentError", "ATTNRS_ISA: expected one of")]
    if "amx_bf16" not in attnrs.cpu_features():
        cases.append(("amx", "UnsupportedError", "ATTNRS_ISA=amx on this CPU: the AMX kernel cannot run"))
    if "avx512f" not in attnrs.cpu_features():
        cases.append(("avx512", "UnsupportedError", "ATTNRS_ISA=avx512 on this CPU: the AVX-512F kernel needs"))
    for value, kind, words in cases:
        result = _with_isa(value, call)
        assert result.stdout.startswith(kind) and words in result.stdout, (value, result.stdout, result.stderr)
        info = _with_isa(value, "from attnrs.cli import main; main(['info'])")
        assert info.returncode == 0 and "refused" in info.stdout, info.stderr
