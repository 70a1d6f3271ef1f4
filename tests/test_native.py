"""Native kernels through the C ABI (attnrs-abi): the example plugin of ``examples/native_kernel`` found through
the ``attnrs.kernels`` entry point and compared with the built-in kernel, as a transformers attention
implementation, from many threads; bad capsules, panics, refusals and broken plugins become clear errors.

``scripts/test.sh`` installs the example wheel and sets ``ATTNRS_REQUIRE_EXAMPLE_KERNEL=1``; without it the tests
that need the example are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import attnrs
from attnrs import AttentionInterface, _attnrs, masks

if os.environ.get("ATTNRS_REQUIRE_EXAMPLE_KERNEL"):
    import attnrs_example_kernel as example
else:
    example = pytest.importorskip(
        "attnrs_example_kernel", reason="the example plugin is not installed (pip install ./examples/native_kernel)"
    )


@pytest.fixture(scope="module", autouse=True)
def plugins_loaded() -> None:
    attnrs.load_plugins()


def qkv(b: int, h: int, hkv: int, q: int, k: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, s, d, generator=gen) for n, s in ((h, q), (hkv, k), (hkv, k)))


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=300
    )


# ---- discovery ---------------------------------------------------------------------------------------------


def test_example_plugin_is_discovered_with_its_capabilities() -> None:
    kernels = attnrs.native_kernels()
    assert list(kernels)[:1] == ["attnrs"]
    assert kernels["attnrs"]["dtypes"] == ["torch.float32", "torch.bfloat16", "torch.float16", "torch.float64"]
    info = kernels["example"]
    assert info["origin"] == "plugin 'example' (ABI v1)"
    assert info["dtypes"] == ["torch.float32"] and info["devices"] == ["cpu"] and info["lse"]
    assert set(info["features"]) == {"softcap", "sinks", "gqa"}
    assert "example" not in attnrs.plugin_errors()
    caps = AttentionInterface().capabilities("example")
    assert caps is not None and caps["mask_kinds"] == ["none", "dense", "block_sparse", "expression"]


def test_plugins_load_lazily_on_first_lookup() -> None:
    result = run_python(
        """
        import torch, attnrs
        from attnrs import _attnrs
        assert "example" not in _attnrs.native_kernels(), "loaded at import"
        q = torch.randn(1, 2, 5, 8)
        out = attnrs.attention(q, q, q, backend="example")   # an unknown name loads the plugins
        assert "example" in _attnrs.native_kernels()
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_plugins_can_be_disabled() -> None:
    result = run_python(
        """
        import torch, attnrs
        q = torch.randn(1, 2, 5, 8)
        try:
            attnrs.attention(q, q, q, backend="example")
        except attnrs.ArgumentError as e:
            print("refused:", e)
        """,
        env={"ATTNRS_DISABLE_PLUGINS": "1"},
    )
    assert result.returncode == 0 and "refused: backend: expected one of" in result.stdout, result.stderr


def test_a_broken_plugin_does_not_break_import_or_other_plugins(tmp_path: Path) -> None:
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('this plugin is broken on purpose')\n")
    (tmp_path / "not_a_capsule.py").write_text("value = 42\n")
    dist = tmp_path / "attnrs_test_plugins-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: attnrs-test-plugins\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text(
        "[attnrs.kernels]\nbroken = broken_plugin:kernel\nnot_a_capsule = not_a_capsule:value\n"
    )
    result = run_python(
        """
        import json, logging, torch
        logging.basicConfig(level=logging.WARNING)
        import attnrs
        print(json.dumps(attnrs.load_plugins()))
        print(json.dumps(attnrs.plugin_errors()))
        q = torch.randn(1, 2, 5, 8)
        assert torch.allclose(attnrs.attention(q, q, q, backend="example"), attnrs.attention(q, q, q), atol=1e-5)
        """,
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 0, result.stderr
    loaded, errors = (json.loads(line) for line in result.stdout.splitlines()[:2])
    assert loaded["example"] is None
    assert "this plugin is broken on purpose" in loaded["broken"] == errors["broken"]
    assert "expected a PyCapsule" in errors["not_a_capsule"]
    assert "the kernel plugin 'broken'" in result.stderr and "failed to load" in result.stderr


# ---- parity with the built-in kernel -----------------------------------------------------------------------

SHAPES = [(1, 2, 2, 9, 9, 8), (2, 4, 2, 37, 70, 16), (1, 4, 1, 20, 23, 32), (2, 2, 2, 1, 40, 8)]
MASKS: dict[str, Any] = {
    "none": None,
    "is_causal": "is_causal",
    "sliding_window": masks.sliding_window(5),
    "document_causal": masks.document(torch.tensor([[0] * 30 + [1] * 40, [0] * 10 + [1] * 60])) & masks.causal(),
    "dense_bool": "dense",
    "block_mask": "block",
}


def _mask(kind: Any, b: int, h: int, q: int, k: int) -> tuple[Any, bool]:
    if kind == "is_causal":
        return None, True
    if kind == "dense":
        gen = torch.Generator().manual_seed(5)
        return torch.rand(b, 1, q, k, generator=gen) > 0.3, False
    if kind == "block":
        return attnrs.create_block_mask(masks.causal(), b, None, q, k, BLOCK_SIZE=16, q_offset=k - q), False
    if isinstance(kind, masks.Mask) and kind.kind == "and":  # the document ids above span 70 keys
        return (kind if k == 70 else masks.causal()), False
    return kind, False


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_example_matches_the_builtin_kernel(shape: tuple[int, ...], mask_name: str) -> None:
    b, h, hkv, q_len, k_len, d = shape
    q, k, v = qkv(*shape)
    mask, causal = _mask(MASKS[mask_name], b, h, q_len, k_len)
    got, got_lse = attnrs.attention(q, k, v, mask, is_causal=causal, backend="example", return_lse=True)
    want, want_lse = attnrs.attention(q, k, v, mask, is_causal=causal, backend="native", return_lse=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_lse, want_lse, atol=2e-5, rtol=2e-5)


def test_example_with_softcap_sinks_and_strided_inputs() -> None:
    q, k, v = qkv(2, 4, 2, 17, 29, 16, seed=3)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Q, H, D] memory viewed as [B, H, Q, D]
    sinks = torch.randn(4)
    kwargs: dict[str, Any] = dict(softcap=4.0, sinks=sinks, return_lse=True, scale=0.2)
    got = attnrs.attention(q, k, v, masks.sliding_window(6), backend="example", **kwargs)
    want = attnrs.attention(q, k, v, masks.sliding_window(6), backend="native", **kwargs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_builtin_kernel_through_the_table_is_the_native_backend(dtype: torch.dtype) -> None:
    q, k, v = (t.to(dtype) for t in qkv(1, 4, 2, 40, 40, 32))
    got = attnrs.attention(q, k, v, masks.sliding_window(9), backend="attnrs")
    want = attnrs.attention(q, k, v, masks.sliding_window(9), backend="native")
    assert torch.equal(got, want)


def test_capabilities_are_enforced_before_the_kernel_runs() -> None:
    q, k, v = qkv(1, 2, 2, 6, 6, 8)
    with pytest.raises(attnrs.UnsupportedError, match="kernel 'example' takes"):
        attnrs.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="example")
    with pytest.raises(attnrs.UnsupportedError, match="additive mask or bias"):
        attnrs.attention(q, k, v, torch.zeros(6, 6), backend="example")
    with pytest.raises(attnrs.UnsupportedError, match="gradients"):
        attnrs.attention(q.requires_grad_(), k, v, backend="example")
    with pytest.raises(attnrs.ArgumentError, match="registered native kernel"):
        attnrs.attention(q, k, v, backend="no-such-kernel")


def test_native_op_passes_opcheck() -> None:
    q, k, v = qkv(1, 2, 1, 5, 7, 8)
    args = ("example", q, k, v, None, None, None, None, None, None, torch.empty(0, dtype=torch.uint8), 0.3, 0.0, True)
    torch.library.opcheck(torch.ops.attnrs.native_attention, args)


# ---- transformers ------------------------------------------------------------------------------------------


def test_tiny_llama_runs_on_the_example_kernel() -> None:
    transformers = pytest.importorskip("transformers")
    from attnrs.integrations.transformers import register

    assert register("example_native", AttentionInterface()["example"]) == "example_native"
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
        intermediate_size=96,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    logits = {}
    with torch.no_grad():
        for impl in ("eager", "example_native"):
            model.set_attn_implementation(impl)
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits
        generated = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
        model.set_attn_implementation("eager")
        expected = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    valid = mask.bool()
    torch.testing.assert_close(logits["example_native"][valid], logits["eager"][valid], atol=1e-4, rtol=1e-4)
    assert torch.equal(generated, expected)


# ---- bad capsules, failures, panics ------------------------------------------------------------------------

BAD_CAPSULES = {
    "wrong_name": "expected a capsule named 'attnrs.kernel.v1'.*got a capsule named 'attnrs.kernel.v0'",
    "wrong_version": "ABI version 1, got ABI version 2",
    "small_size": "at least 64 bytes .struct_size., got struct_size 24",
    "null_forward": "with a forward function, got a null forward pointer",
    "null_name": "a kernel table with a name, got a null name",
}


@pytest.mark.parametrize("kind", list(BAD_CAPSULES))
def test_bad_capsules_are_refused_and_nothing_is_registered(kind: str) -> None:
    with pytest.raises(attnrs.ArgumentError, match=BAD_CAPSULES[kind]):
        attnrs.register_native("bad-one", _attnrs._test_capsule(kind))
    assert "bad-one" not in _attnrs.native_kernels()
    assert "bad-one" not in AttentionInterface()


def test_things_that_are_not_kernel_capsules_are_refused() -> None:
    with pytest.raises(TypeError, match="capsule: expected a PyCapsule named 'attnrs.kernel.v1'"):
        attnrs.register_native("bad-one", 42)
    q = torch.zeros(1)
    with pytest.raises(attnrs.ArgumentError, match="attnrs.kernel.v1"):
        attnrs.register_native("bad-one", q.__dlpack__())  # a capsule, but a tensor's
    with pytest.raises(attnrs.ArgumentError, match="reserved"):
        attnrs.register_native("sdpa", example.kernel_capsule())
    with pytest.raises(TypeError, match="non-empty"):
        attnrs.register_native("", example.kernel_capsule())


@pytest.mark.parametrize(
    ("capsule", "error", "message"),
    [
        (lambda: example.panicking_kernel_capsule(), attnrs.InternalError, "panic: the example kernel was asked to panic"),
        (lambda: _attnrs._test_capsule("panics"), attnrs.InternalError, r"panic: the test kernel panicked \(scale 0.5\)"),
        (lambda: _attnrs._test_capsule("refuses"), attnrs.UnsupportedError, "refuses every call"),
        (lambda: _attnrs._test_capsule("asks_outside"), attnrs.ArgumentError, "outside the grid"),
    ],
    ids=["example-panics", "test-panics", "refuses", "asks-outside"],
)
def test_kernel_failures_become_python_exceptions(capsule: Any, error: type, message: str) -> None:
    attnrs.register_native("failing", capsule())
    try:
        q, k, v = qkv(1, 2, 2, 4, 4, 8)
        for _ in range(2):  # the process and the kernel table survive
            with pytest.raises(error, match=message):
                attnrs.attention(q, k, v, masks.causal(), scale=0.5, backend="failing")
        torch.testing.assert_close(attnrs.attention(q, k, v, backend="example"), attnrs.attention(q, k, v))
    finally:
        _attnrs.remove_native("failing")
        AttentionInterface._global_mapping.pop("failing", None)


# ---- threads -----------------------------------------------------------------------------------------------


def test_concurrent_calls_from_many_threads() -> None:
    cases = []
    for i in range(16):
        shape = (1 + i % 2, 4, 2 if i % 3 else 4, 8 + 5 * i, 8 + 7 * i, 16)
        mask = [None, masks.causal(), masks.sliding_window(4 + i)][i % 3]
        q, k, v = qkv(*shape, seed=i)
        cases.append((q, k, v, mask, attnrs.attention(q, k, v, mask, backend="native")))

    def work(i: int) -> float:
        q, k, v, mask, want = cases[i % len(cases)]
        got = attnrs.attention(q, k, v, mask, backend="example")
        return float((got - want).abs().max())

    with ThreadPoolExecutor(max_workers=8) as pool:
        diffs = list(pool.map(work, range(64)))
    assert max(diffs) < 2e-5


def test_the_gil_is_released_during_a_native_call() -> None:
    q, k, v = qkv(1, 8, 8, 384, 384, 64)
    ticks = 0
    stop = threading.Event()
    started = threading.Event()

    def count() -> None:
        nonlocal ticks
        started.set()
        while not stop.is_set():
            ticks += 1

    thread = threading.Thread(target=count)
    thread.start()
    started.wait()
    try:
        before = ticks
        with torch.no_grad():
            _attnrs.native_attention_forward(
                "example", (q, k, v, None, None, None, None), (torch.empty_like(q), None),
                (torch.empty(0, dtype=torch.uint8), None, None), (0.125, 0.0, 0.0, 0, 1, 0),
            )
        during = ticks - before
    finally:
        stop.set()
        thread.join()
    # With the GIL held for the whole call the counter could only move at the edges of the call.
    assert during > 1_000, during
