"""The AMX path: its tile logic on every CPU through the emulated tiles (``ATTNRS_ISA=amx_emulated``), the real
tiles where the CPU and OS allow them, and float32 under torch's matmul precision.

The emulated backend runs the AMX kernel's blocking, remainders, packing and tile configuration over a scalar
model of ``tileloadd``/``tdpbf16ps``/``tilestored``; the forced path is set per process, so those checks run in
a subprocess. Every reference is float64 torch (SDPA's math or autograd through it), never attnrs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnrs

ROOT = Path(__file__).resolve().parents[1]
AMX_READY = attnrs.kernel_path("bfloat16")[0] == "amx"


def _run(code: str, isa: str | None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ATTNRS_ISA"}
    if isa is not None:
        env["ATTNRS_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


# bf16 forward and backward on shapes that reach every remainder of the tile blocking: query rows that are not a
# multiple of 16 or 32, D = 80 (40 pairs: a partial k step) and D = 128, Dv != D, GQA, causal and sliding masks.
BF16_CASES = r"""
import torch, attnrs
from attnrs import masks
F = torch.nn.functional
path = attnrs.kernel_path("bfloat16")[0]
assert path == EXPECTED, (path, EXPECTED)

def check(b, h, hkv, q, k, d, dv, mask):
    g = torch.Generator().manual_seed(q * 1000 + k + d)
    make = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16).requires_grad_()
    qt, kt, vt = make(b, h, q, d), make(b, hkv, k, d), make(b, hkv, k, dv)
    visible = torch.ones(q, k, dtype=torch.bool)
    if mask == "causal":
        kw = dict(is_causal=True)
        visible = torch.ones(q, k, dtype=torch.bool).tril(k - q)
    elif mask == "sliding":
        kw = dict(attn_mask=masks.sliding_window(7))
        i, j = torch.arange(q)[:, None], torch.arange(k)[None]  # absolute positions, q = k here
        visible = (j <= i) & (i - j < 7)
    else:
        kw = {}
    out = attnrs.attention(qt, kt, vt, enable_gqa=hkv != h, **kw)
    grad = torch.randn(out.shape, generator=g).to(torch.bfloat16)
    dq, dk, dv_ = torch.autograd.grad(out, (qt, kt, vt), grad)
    leaves = [t.detach().double().requires_grad_() for t in (qt, kt, vt)]
    rep = h // hkv
    ref = F.scaled_dot_product_attention(leaves[0], leaves[1].repeat_interleave(rep, 1),
                                         leaves[2].repeat_interleave(rep, 1), attn_mask=visible)
    rq, rk, rv = torch.autograd.grad(ref, leaves, grad.double())
    for name, got, want in (("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv_, rv)):
        err = (got.double() - want).abs().max().item()
        scale = max(1.0, want.abs().max().item())
        assert err <= 0.04 * scale, (name, b, h, hkv, q, k, d, dv, mask, err, scale)

for case in [(1, 2, 2, 1, 9, 32, 32, "none"), (1, 4, 2, 37, 37, 80, 80, "causal"), (2, 2, 1, 50, 71, 128, 64, "none"),
             (1, 2, 2, 33, 33, 64, 64, "sliding"), (1, 8, 2, 1, 300, 128, 128, "none")]:
    check(*case)
print("ok")
"""


def test_bf16_forward_and_backward_on_emulated_amx_tiles_match_float64() -> None:
    result = _run(BF16_CASES.replace("EXPECTED", '"amx_emulated"'), "amx_emulated")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:]


def test_bf16_forward_and_backward_on_real_amx_tiles_match_float64() -> None:
    if not AMX_READY:
        reason = attnrs.kernel_path("bfloat16")[1]
        print(f"skipped: the real AMX path does not run here ({reason})")
        pytest.skip(f"the real AMX path does not run here: {reason}")
    result = _run(BF16_CASES.replace("EXPECTED", '"amx"'), None)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:]


def test_the_fuzz_forward_cases_pass_on_emulated_amx_tiles() -> None:
    """The existing hypothesis forward cases (every dtype, layout and mask kind) with bf16 on the emulated tiles."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header"]
    cmd.append("tests/test_fuzz.py::test_forward_matches_the_float64_reference")
    env = {**os.environ, "ATTNRS_ISA": "amx_emulated"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]


# float32 under torch's matmul precision: "medium" runs the bf16 path where the products are fast (forced here: the
# emulated AMX tiles), so its error against float64 is bf16's; "high" runs bf16x3 on AMX tiles, between bf16 and
# f32; "highest" (the default) stays exact f32. Forward and the three gradients.
PRECISION = r"""
import torch, attnrs
F = torch.nn.functional
g = torch.Generator().manual_seed(3)
q, k, v = (torch.randn(1, 4, 45, 64, generator=g, requires_grad=True) for _ in range(3))
grad = torch.randn(1, 4, 45, 64, generator=g)
leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
ref = F.scaled_dot_product_attention(*leaves, is_causal=True)
ref_grads = torch.autograd.grad(ref, leaves, grad.double())

def errors():
    out = attnrs.attention(q, k, v, is_causal=True)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    return [(a.double() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads))]

def with_setting(set_it):
    torch.set_float32_matmul_precision("highest")
    set_it()
    try:
        return errors()
    finally:
        torch.set_float32_matmul_precision("highest")

highest = with_setting(lambda: None)
high = with_setting(lambda: torch.set_float32_matmul_precision("high"))
medium = with_setting(lambda: torch.set_float32_matmul_precision("medium"))
assert max(highest) < 1e-4, highest
if MEDIUM_ROUNDS:
    assert min(m / max(e, 1e-12) for m, e in zip(medium, highest)) > 10, (medium, highest)
    assert max(medium) < 0.1, medium
    # torch's per-backend spelling of the same setting
    medium2 = with_setting(lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"))
    assert medium2 == medium, (medium2, medium)
else:
    assert medium == highest, (medium, highest)
if HIGH_SPLITS:  # bf16x3: between bf16 and f32
    assert all(h * 10 < m for h, m in zip(high, medium)) and max(high) < 1e-3, (high, medium)
else:
    assert high == highest, (high, highest)
print("ok", "highest", highest, "high", high, "medium", medium)
"""


def _precision_script(medium_rounds: bool, high_splits: bool) -> str:
    return PRECISION.replace("MEDIUM_ROUNDS", str(medium_rounds)).replace("HIGH_SPLITS", str(high_splits))


def test_f32_medium_and_high_precision_on_the_emulated_amx_tiles() -> None:
    result = _run(_precision_script(True, True), "amx_emulated")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:]
    print(result.stdout)  # the measured errors (pytest -s shows them)


def test_f32_precision_on_the_default_path() -> None:
    """Without fast bf16 products (AVX2, AVX-512F, portable) "medium" and "high" are exact f32, as torch specifies;
    on AVX-512 BF16 "medium" rounds and "high" stays exact (three bf16 products cost more than one f32 FMA)."""
    bf16_path = attnrs.kernel_path("bfloat16")[0]
    result = _run(_precision_script(bf16_path in ("amx", "avx512_bf16"), bf16_path == "amx"), None)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:]


def test_f32_matmul_precision_reads_both_spellings_of_the_setting() -> None:
    from attnrs.precision import f32_matmul_precision

    try:
        for name in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(name)
            assert f32_matmul_precision() == name
        torch.set_float32_matmul_precision("highest")
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        assert f32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")
    assert f32_matmul_precision() == "highest"


def test_forcing_amx_where_it_cannot_run_names_the_reason() -> None:
    code = """
import torch, attnrs
try:
    attnrs.attention(*(torch.randn(1, 2, 4, 8, dtype=torch.bfloat16) for _ in range(3)))
    print("ran", attnrs.kernel_path("bfloat16"))
except attnrs.UnsupportedError as e:
    print("refused", e)
"""
    result = _run(code, "amx")
    if AMX_READY:
        assert result.stdout.startswith("ran ('amx'"), result.stdout + result.stderr
    else:
        assert result.stdout.startswith("refused "), result.stdout + result.stderr
        assert "ATTNRS_ISA=amx on this CPU: the AMX kernel cannot run: " in result.stdout, result.stdout
    info = _run("from attnrs.cli import main; main(['info'])", None)
    assert info.returncode == 0, info.stderr
    if not AMX_READY:
        assert "amx: " in info.stdout, info.stdout  # the bf16 line says why not AMX
