"""The DLPack bridge reads torch tensors without copying: every dtype, stride, offset and broadcast is honoured,
and bad tensors are refused with typed errors."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

import pytest
import torch

import attnrs
from attnrs import _attnrs

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "contiguous": lambda x: x,
    "transposed": lambda x: x.transpose(0, 2),
    "permuted": lambda x: x.permute(2, 0, 1),
    "sliced_step": lambda x: x[:, ::2, 1::3],
    "offset": lambda x: x[1:, 2:, 3:],
    "narrowed_flat": lambda x: x.reshape(-1)[5:41],
    "expanded_stride0": lambda x: x[:, :1, :].expand(-1, 7, -1),
    "scalar_broadcast": lambda x: x[0, 0, 0].expand(3, 4, 5),
    "zero_dim": lambda x: x[1, 2, 3],
    "empty": lambda x: x[:, :0],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("view", VIEWS)
def test_views_are_read_exactly(dtype: torch.dtype, view: str) -> None:
    base = torch.randn(4, 6, 9, generator=torch.Generator().manual_seed(0)).to(dtype)
    src = VIEWS[view](base)
    dst = torch.empty(src.shape, dtype=dtype)
    _attnrs._strided_copy(src, dst)
    assert torch.equal(dst, src.contiguous()), "copy through DLPack differs from torch"
    expected = src.double().sum().item()
    assert _attnrs._strided_sum(src) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_outputs_are_written_in_place_through_strides() -> None:
    src = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    out = torch.zeros(4, 3, 2).transpose(0, 2)  # a non-contiguous output view
    _attnrs._strided_copy(src, out)
    assert torch.equal(out, src)


def test_tensors_that_require_grad_are_accepted() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    assert _attnrs._strided_sum(x) == pytest.approx(x.detach().double().sum().item())
    y = x * 2  # non-leaf, still requires grad
    out = torch.empty(3, 5)
    _attnrs._strided_copy(y, out)
    assert torch.equal(out, y.detach())


def test_legacy_dlpack_producers_work() -> None:
    class LegacyProducer:
        """A producer that predates DLPack 1.0: no max_version keyword, legacy capsule."""

        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

        def __dlpack__(self, stream: object = None) -> object:
            return torch.utils.dlpack.to_dlpack(self.t)

        def __dlpack_device__(self) -> tuple[int, int]:
            return (1, 0)

    x = torch.randn(4, 5).t()
    assert _attnrs._strided_sum(LegacyProducer(x)) == pytest.approx(x.double().sum().item())


def test_repeated_imports_release_their_tensors() -> None:
    """The producer's deleter runs once per import: the storage is freed when the last reference goes."""
    x = torch.randn(1000)
    storage_ref = x.untyped_storage()
    before = sys.getrefcount(x)
    for _ in range(200):
        _attnrs._strided_sum(x)
    assert sys.getrefcount(x) == before
    # A DLPack export that was never deleted would keep an extra reference to the storage's C++ object;
    # torch reports it through the storage's use count.
    assert torch._C._storage_Use_Count(storage_ref._cdata) == 2  # x and storage_ref


def test_plain_tensors_skip_the_python_dlpack_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain CPU tensor is exported by torch's C exporter directly; a subclass, a tensor under a torch
    function mode and a tensor that requires grad still go through ``Tensor.__dlpack__``."""
    calls: list[type] = []
    original = torch.Tensor.__dlpack__

    def counting_dlpack(self: torch.Tensor, **kwargs: object) -> object:
        calls.append(type(self))
        return original(self, **kwargs)

    monkeypatch.setattr(torch.Tensor, "__dlpack__", counting_dlpack)
    x = torch.randn(3, 4).t()
    assert _attnrs._strided_sum(x) == pytest.approx(x.double().sum().item())
    assert calls == []

    class Sub(torch.Tensor):
        pass

    sub = x.as_subclass(Sub)
    assert _attnrs._strided_sum(sub) == pytest.approx(x.double().sum().item())
    assert set(calls) == {Sub}  # (torch's subclass dispatch may call the method twice)
    calls.clear()

    seen: list[object] = []

    class Recording(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Recording():
        assert _attnrs._strided_sum(x) == pytest.approx(x.double().sum().item())
    assert calls and counting_dlpack in seen
    calls.clear()

    grad = torch.randn(5, requires_grad=True)
    assert _attnrs._strided_sum(grad) == pytest.approx(grad.detach().double().sum().item())
    assert calls == [torch.Tensor]  # the detached tensor


def test_neg_views_are_read_as_their_values() -> None:
    """DLPack has no negative bit: an input neg view is read through a resolved copy, an output one refused."""
    x = torch.randn(4, 5, dtype=torch.float64)
    neg = torch._neg_view(x)  # values -x, memory x
    assert neg.is_neg()
    assert _attnrs._strided_sum(neg) == pytest.approx(-x.sum().item())
    out = torch.empty(4, 5, dtype=torch.float64)
    _attnrs._strided_copy(neg, out)
    assert torch.equal(out, -x)
    with pytest.raises(attnrs.LayoutError, match="dst: expected a tensor without the negative bit"):
        _attnrs._strided_copy(x, torch._neg_view(torch.empty(4, 5, dtype=torch.float64)))

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = attnrs.attention(q, torch._neg_view(-k), torch._neg_view(-v), is_causal=True)
    torch.testing.assert_close(got, expected)


def test_device_errors_name_the_argument() -> None:
    meta = torch.empty(3, device="meta")
    with pytest.raises(attnrs.DeviceError, match=r"src: expected a CPU tensor, got a tensor on meta"):
        _attnrs._strided_sum(meta)

    class FakeCuda:
        device = torch.device("cuda", 0)

        def __dlpack__(self, **kwargs: object) -> object:
            raise AssertionError("must be refused before export")

    with pytest.raises(ValueError, match="cuda:0"):
        _attnrs._strided_sum(FakeCuda())


def test_dtype_and_type_errors() -> None:
    with pytest.raises(attnrs.DtypeError, match="src: expected a floating dtype, got torch.int64"):
        _attnrs._strided_sum(torch.arange(3))
    with pytest.raises(TypeError, match="src: expected a torch.Tensor, got list"):
        _attnrs._strided_sum([1.0, 2.0])
    with pytest.raises(attnrs.DtypeError, match="dst"):
        _attnrs._strided_copy(torch.zeros(3), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(attnrs.DtypeError):
        _attnrs._strided_sum(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(attnrs.ShapeError, match="dst"):
        _attnrs._strided_copy(torch.zeros(3), torch.zeros(4))


def test_outputs_must_not_alias_or_overlap() -> None:
    x = torch.randn(8)
    with pytest.raises(attnrs.LayoutError, match="dst: expected memory disjoint from src"):
        _attnrs._strided_copy(x[:4], x[2:6])
    with pytest.raises(attnrs.LayoutError, match="dst: expected a tensor whose elements do not overlap"):
        _attnrs._strided_copy(torch.zeros(2, 3), torch.zeros(1, 3).expand(2, 3))
    assert isinstance(attnrs.LayoutError("x"), ValueError)


def test_thread_count_follows_torch_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATTNRS_NUM_THREADS", raising=False)
    assert attnrs.num_threads() == torch.get_num_threads()
    monkeypatch.setenv("ATTNRS_NUM_THREADS", "3")
    assert attnrs.num_threads() == 3
    assert _attnrs._pool_threads(attnrs.num_threads()) == 3
    monkeypatch.setenv("ATTNRS_NUM_THREADS", "zero")
    with pytest.raises(attnrs.ArgumentError, match="ATTNRS_NUM_THREADS"):
        attnrs.num_threads()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX-only")
def test_pools_survive_fork() -> None:
    """A child forked after the parent used a pool builds its own instead of hanging on dead workers."""
    assert _attnrs._pool_threads(2) == 2
    code = (
        "import os, attnrs._attnrs as m\n"
        "assert m._pool_threads(2) == 2\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if m._pool_threads(2) == 2 else 1)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
