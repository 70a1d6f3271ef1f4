"""attnrs.attention against a float64 naive reference, torch SDPA and flex_attention, over hypothesis-generated
shapes, masks, strides and options; plus opcheck, torch.compile and the errors bad input gets."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import attnrs
from attnrs import _attnrs, masks
from attnrs.attention.ops import direct_call_allowed

HEAD_DIMS = [32, 64, 80, 96, 128, 256]


def naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, scale: float | None = None, softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention written from the definition, one query row at a time (independent of attnrs)."""
    q, k, v = q.double(), k.double(), v.double()
    b_, h_, q_len, d = q.shape
    group = h_ // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b_, h_, q_len, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b_, h_, q_len), float("-inf"), dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            kh, vh = k[b, h // group], v[b, h // group]
            for i in range(q_len):
                s = (kh @ q[b, h, i]) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                if bias is not None:
                    s = s + bias[b, h, i].double()
                keep = torch.ones_like(s, dtype=torch.bool) if visible is None else visible[b, h, i]
                s = s[keep]
                terms = s if sinks is None else torch.cat([s, sinks[h].double().reshape(1)])
                if terms.numel() == 0 or bool(torch.isneginf(terms).all()):
                    continue
                lse[b, h, i] = torch.logsumexp(terms, 0)
                out[b, h, i] = torch.exp(s - lse[b, h, i]) @ vh[keep]
    return out, lse


def dense_visibility(mask: Any, is_causal: bool, b: int, h: int, q_len: int, kv_len: int,
                     q_offset: int = 0) -> torch.Tensor | None:
    """Bool [B, H, Q, K] of what attnrs.attention documents for each mask form (Masks placed at q_offset)."""
    visible = None
    if isinstance(mask, masks.Mask):
        visible = attnrs.create_dense_mask(mask, b, h, q_len, kv_len, q_offset=q_offset).expand(b, h, -1, -1)
    elif isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        visible = mask.expand(b, h, q_len, kv_len)
    elif isinstance(mask, attnrs.BlockMask):
        visible = attnrs.create_dense_mask(mask.attnrs_mask, b, h, q_len, kv_len, q_offset=mask.q_offset,
                                           kv_offset=mask.kv_offset).expand(b, h, -1, -1)
    if is_causal:
        causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
        visible = causal.expand(b, h, -1, -1) if visible is None else visible & causal
    return visible


@st.composite
def problems(draw: st.DrawFn, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    b = draw(st.integers(1, 2))
    h_kv = draw(st.integers(1, 2))
    h = h_kv * draw(st.sampled_from([1, 2, 3]))
    q_len = draw(st.integers(1, 70))
    kv_len = draw(st.integers(1 if q_len == 1 else q_len, 70)) if draw(st.booleans()) else draw(st.integers(1, 70))
    d = draw(st.sampled_from(HEAD_DIMS))
    dv = draw(st.sampled_from([d, 16, 48]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))

    def tensor(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
        layout = draw(st.sampled_from(["contiguous", "bshd", "sliced"]))
        if layout == "bshd":  # the transformers layout: a transposed view of [B, S, H, D]
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        if layout == "sliced":  # a view into a wider buffer
            wide = torch.randn(shape[0], shape[1], shape[2], shape[3] + 8, generator=gen).to(dtype)
            wide[..., 3 : 3 + shape[3]] = x
            return wide[..., 3 : 3 + shape[3]]
        return x

    q, k, v = tensor(b, h, q_len, d), tensor(b, h_kv, kv_len, d), tensor(b, h_kv, kv_len, dv)
    if draw(st.booleans()) and b > 1:  # stride-0 batch for k and v
        k, v = k[:1].expand(b, -1, -1, -1), v[:1].expand(b, -1, -1, -1)
    kind = draw(st.sampled_from(["none", "causal", "sliding", "document", "padding", "prefix", "composed",
                                 "callable", "block", "dense_bool", "additive", "causal_and_dense"]))
    mask: Any = None
    is_causal = False
    if kind == "causal":
        is_causal = True
    elif kind == "sliding":
        mask = masks.sliding_window(draw(st.integers(1, 20)), causal=draw(st.booleans()))
    elif kind == "document":
        # ids for every position a query or key may sit at (queries at 0..Q-1, or at the cache's end)
        ids = torch.randint(0, 3, (b, max(q_len, kv_len)), generator=gen).sort(-1).values
        mask = masks.document(ids) & masks.causal()
    elif kind == "padding":
        valid = torch.rand(b, kv_len, generator=gen) > 0.3
        mask = masks.padding(valid) & masks.causal()
    elif kind == "prefix":
        mask = masks.prefix_lm(torch.randint(0, kv_len + 1, (b,), generator=gen))
    elif kind == "composed":
        mask = (masks.sliding_window(5) | masks.chunked(4)) & ~masks.sliding_window(2, causal=False)
    elif kind == "callable":
        mask = masks.from_callable(lambda bb, hh, qq, kk: ((qq + 2 * kk + hh) % 3) != 0)
    elif kind == "block":
        mask = attnrs.create_block_mask(masks.causal(), b, None, q_len, kv_len, BLOCK_SIZE=16)
    elif kind in ("dense_bool", "causal_and_dense"):
        mask = torch.rand(b, 1, q_len, kv_len, generator=gen) > 0.4
        is_causal = kind == "causal_and_dense"
    elif kind == "additive":
        bias = torch.randn(1, h, q_len, kv_len, generator=gen)
        bias[torch.rand(bias.shape, generator=gen) > 0.8] = float("-inf")
        mask = bias
    softcap = draw(st.sampled_from([None, 5.0, 30.0]))
    sinks = torch.randn(h, generator=gen) if draw(st.booleans()) else None
    scale = draw(st.sampled_from([None, 0.1]))
    # Masks are top-left (flex) by default; q_offset=K-Q is the KV-cache placement.
    q_offset = draw(st.sampled_from([0, kv_len - q_len])) if isinstance(mask, masks.Mask) else 0
    return dict(q=q, k=k, v=v, mask=mask, is_causal=is_causal, softcap=softcap, sinks=sinks, scale=scale, kind=kind,
                q_offset=q_offset)


def _reference(p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, mask = p["q"], p["k"], p["v"], p["mask"]
    b, h, q_len, _ = q.shape
    visible = dense_visibility(mask, p["is_causal"], b, h, q_len, k.shape[2], p["q_offset"])
    bias = mask.expand(b, h, -1, -1) if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool else None
    return naive(q, k, v, visible, bias, p["scale"], p["softcap"], p["sinks"])


def _run(p: dict[str, Any], **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return attnrs.attention(p["q"], p["k"], p["v"], p["mask"], is_causal=p["is_causal"], scale=p["scale"],
                            q_offset=p["q_offset"], softcap=p["softcap"], sinks=p["sinks"], return_lse=True, **kwargs)


@given(problems())
def test_float32_matches_the_float64_reference(p: dict[str, Any]) -> None:
    out, lse = _run(p)
    ref_out, ref_lse = _reference(p)
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    scale = max(1.0, ref_out.abs().max().item())
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5 * scale)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    hidden = torch.isneginf(ref_lse)
    assert bool((out[hidden] == 0).all()), "rows that see no key must be zeros"


@given(problems(dtype=torch.float64))
def test_float64_is_exact_to_rounding(p: dict[str, Any]) -> None:
    out, lse = _run(p)
    ref_out, ref_lse = _reference(p)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-6, atol=1e-6)


@given(problems(), st.sampled_from(["math", "flex"]))
def test_torch_backends_agree_with_the_kernel(p: dict[str, Any], backend: str) -> None:
    out, lse = _run(p)
    other, other_lse = _run(p, backend=backend)
    torch.testing.assert_close(other, out, rtol=1e-4, atol=1e-4)
    finite = torch.isfinite(lse)
    torch.testing.assert_close(other_lse[finite], lse[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["causal", "dense", "none_gqa"])
def test_half_precision_is_as_accurate_as_sdpa(dtype: torch.dtype, case: str) -> None:
    """Our bf16/fp16 error against float64 is no larger than torch SDPA's on the same inputs (within 25%)."""
    torch.manual_seed(0)
    b, h, h_kv, q_len, kv_len, d = 2, 8, 2 if case == "none_gqa" else 8, 200, 200, 128
    q = torch.randn(b, h, q_len, d).to(dtype)
    k = torch.randn(b, h_kv, kv_len, d).to(dtype)
    v = torch.randn(b, h_kv, kv_len, d).to(dtype)
    mask = (torch.rand(b, 1, q_len, kv_len) > 0.3) | torch.eye(q_len, dtype=torch.bool) if case == "dense" else None
    is_causal = case == "causal"
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, is_causal=is_causal,
                                         enable_gqa=h != h_kv)
    peer = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=h != h_kv)
    ours = attnrs.attention(q, k, v, mask, is_causal=is_causal)
    peer_error = (peer.double() - ref).abs().mean().item()
    our_error = (ours.double() - ref).abs().mean().item()
    assert our_error <= 1.25 * peer_error, (our_error, peer_error)
    assert (ours.double() - ref).abs().max().item() <= 1.25 * (peer.double() - ref).abs().max().item() + 1e-3


def test_matches_torch_sdpa_and_flex_on_shared_cases() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 96, 64), torch.randn(2, 2, 96, 64), torch.randn(2, 2, 96, 64)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(attnrs.attention(q, k, v, is_causal=True), expected, rtol=1e-5, atol=1e-5)
    window = masks.sliding_window(16)
    block_mask = torch.nn.attention.flex_attention.create_block_mask(window, 1, None, 96, 96, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flex_out = torch.nn.attention.flex_attention.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    torch.testing.assert_close(attnrs.attention(q, k, v, window), flex_out, rtol=1e-5, atol=1e-5)
    # A torch BlockMask (not ours) is honoured block by block.
    torch.testing.assert_close(attnrs.attention(q, k, v, block_mask), flex_out, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_zeros_not_nan() -> None:
    q, k, v = torch.randn(1, 2, 4, 32), torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 32)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 1, :] = False
    out, lse = attnrs.attention(q, k, v, mask, return_lse=True)
    assert bool((out[:, :, 1] == 0).all()) and bool(torch.isneginf(lse[:, :, 1]).all())
    assert not torch.isnan(out).any()
    # With sinks the row still has no value to average: zeros, and the LSE is the sink's.
    sinks = torch.tensor([0.5, -1.0])
    out, lse = attnrs.attention(q, k, v, mask, sinks=sinks, return_lse=True)
    assert bool((out[:, :, 1] == 0).all())
    torch.testing.assert_close(lse[0, :, 1], sinks)


def test_opcheck() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 9, 32), torch.randn(1, 2, 11, 32), torch.randn(1, 2, 11, 16)
    empty = torch.empty(0, dtype=torch.uint8)
    causal_expr = masks.causal().to_rust(None)  # type: ignore[arg-type]
    causal = torch.frombuffer(_attnrs.mask_operand(causal_expr, 2, 0), dtype=torch.uint8)
    none3 = (None, None, None)  # no score-mod terms (head_scale, score_distance, score_key)
    terms = (torch.rand(4) + 0.5, torch.randn(1, 19), torch.randn(1, 4, 11))
    samples = [
        (q, k, v, None, None, None, *none3, empty, 0.2, 0.0, 0.0, None),
        (q, k, v, torch.rand(1, 1, 9, 11) > 0.5, None, torch.randn(4), *none3, causal, 0.2, 10.0, 0.0, None),
        (q.double(), k.double(), v.double(), None, torch.randn(1, 4, 9, 11), None, *none3, empty, 0.5, 0, 0, None),
        (q, k, v, None, None, None, *none3, empty, 0.2, 0.0, 0.3, torch.tensor(12345)),
        (q, k, v, None, None, None, *terms, causal, 0.2, 5.0, 0.0, None),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.attnrs.attention.default, args)


class _OpsSeen(TorchDispatchMode):
    """Records the operators dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_calls_without_autograd_skip_the_operator_and_others_go_through_it() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    # Decided by torch's own state: eager and nothing to record runs the kernel directly ...
    assert direct_call_allowed(q, k, v, None)
    with torch.no_grad():
        assert direct_call_allowed(q.requires_grad_(), k, v)
    assert not direct_call_allowed(q, k, v)  # q now requires grad: autograd records the call
    q = q.detach()
    with torch.autograd.profiler.profile():
        assert not direct_call_allowed(q, k, v)  # a profile names the operator
    assert not direct_call_allowed(q, k, v.as_subclass(torch.nn.Parameter))
    # ... and under a dispatch mode the operator is what the mode sees, with the direct call's results.
    direct = attnrs.attention(q, k, v, is_causal=True, return_lse=True)
    with _OpsSeen() as seen:
        assert not direct_call_allowed(q, k, v)
        through_op = attnrs.attention(q, k, v, is_causal=True, return_lse=True)
    assert "attnrs.attention.default" in seen.names, seen.names
    for a, b in zip(direct, through_op):
        assert torch.equal(a, b)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(direct[0], reference, rtol=1e-5, atol=1e-5)


def test_torch_compile() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 33, 32), torch.randn(1, 4, 33, 32), torch.randn(1, 4, 33, 32)
    window = masks.sliding_window(8)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attnrs.attention(q * 2, k, v, is_causal=True) + attnrs.attention(q, k, v, window)

    compiled = torch.compile(f)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


def test_torch_compile_with_dropout_reproduces_under_manual_seed() -> None:
    q, k, v = torch.randn(1, 4, 33, 32), torch.randn(1, 4, 33, 32), torch.ones(1, 4, 33, 32)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attnrs.attention(q, k, v, masks.causal(), dropout_p=0.5)

    compiled = torch.compile(f)
    torch.manual_seed(1)
    first = compiled(q, k, v)
    torch.manual_seed(1)
    assert torch.equal(first, compiled(q, k, v))
    # V = 1: each row is (sum of kept weights) / 0.5, whose mean over 132 rows is near 1 (and 0.5 is dropped).
    assert abs(first.mean().item() - 1.0) < 0.15 and not torch.equal(first, torch.ones_like(first))


def test_decode_with_a_long_cache() -> None:
    """Q=1 against many keys (the split-KV path) for every mask form transformers uses in decode."""
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 8, 1, 64), torch.randn(2, 2, 3000, 64), torch.randn(2, 2, 3000, 64)
    valid = torch.ones(2, 3000, dtype=torch.bool)
    valid[1, :700] = False
    for mask in (None, masks.padding(valid), masks.sliding_window(512), valid[:, None, None, :]):
        offset = 2999 if isinstance(mask, masks.Mask) else 0  # the query is the cache's last position
        out, lse = attnrs.attention(q, k, v, mask, q_offset=offset, return_lse=True)
        ref, ref_lse = naive(q, k, v, dense_visibility(mask, False, 2, 8, 1, 3000, offset))
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_grad_inputs_are_accepted_in_no_grad_mode() -> None:
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    with torch.no_grad():
        out = attnrs.attention(q, q, q)
    assert out.shape == (1, 2, 5, 16)


def _qkv(**shapes: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qs = shapes.get("q", (1, 4, 8, 32))
    ks = shapes.get("k", (1, 2, 8, 32))
    vs = shapes.get("v", ks)
    return torch.randn(*qs), torch.randn(*ks), torch.randn(*vs)


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: attnrs.attention(torch.randn(8, 32), *_qkv()[1:]), attnrs.ShapeError, "query: expected a tensor"),
        (lambda: attnrs.attention(*_qkv(q=(2, 4, 8, 32), k=(3, 2, 8, 32))), attnrs.ShapeError, "batch dims"),
        (lambda: attnrs.attention(*_qkv(), enable_gqa="yes"), attnrs.ArgumentError, "enable_gqa"),
        (lambda: attnrs.attention(*_qkv(), q_offset=1.5), attnrs.ArgumentError, "q_offset"),
        (lambda: attnrs.attention(*_qkv(), torch.ones(8, 8, dtype=torch.bool), q_offset=2), attnrs.ArgumentError,
         "q_offset"),
        (lambda: attnrs.attention(*_qkv(v=(1, 2, 9, 32))), attnrs.ShapeError, "value"),
        (lambda: attnrs.attention(*_qkv(k=(1, 2, 8, 16), v=(1, 2, 8, 32))), attnrs.ShapeError, "head dim"),
        (lambda: attnrs.attention(*_qkv(k=(1, 3, 8, 32))), attnrs.ShapeError, "GQA"),
        (lambda: attnrs.attention(_qkv()[0].double(), *_qkv()[1:]), attnrs.DtypeError, "dtype"),
        (lambda: attnrs.attention(*_qkv(), torch.ones(1, 1, 8, 9, dtype=torch.bool)), attnrs.ShapeError,
         "broadcastable"),
        (lambda: attnrs.attention(*_qkv(), torch.ones(1, 1, 8, 8, dtype=torch.int32)), attnrs.DtypeError, "mask"),
        (lambda: attnrs.attention(*_qkv(), "causal"), TypeError, "mask"),
        (lambda: attnrs.attention(*_qkv(), sinks=torch.zeros(3)), attnrs.ShapeError, "sinks"),
        (lambda: attnrs.attention(*_qkv(), scale=float("nan")), attnrs.ArgumentError, "scale"),
        (lambda: attnrs.attention(*_qkv(), softcap=-1.0), ValueError, "softcap"),
        (lambda: attnrs.attention(*_qkv(), dropout_p=1.5), ValueError, "dropout_p"),
        (lambda: attnrs.attention(*_qkv(), backend="cuda-magic"), ValueError, "backend"),
        (lambda: attnrs.attention(*(t.to("meta") for t in _qkv()), backend="native"), attnrs.DeviceError, "CPU"),
        (lambda: attnrs.attention(*_qkv(), attnrs.create_block_mask(masks.causal(), 1, None, 8, 9)),
         attnrs.ShapeError, "seq_lengths"),
        (lambda: attnrs.attention(*_qkv(), softcap=1.0, backend="sdpa"), NotImplementedError, "softcap"),
    ],
)
def test_bad_input_raises_typed_errors(call: Any, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        call()


def test_scale_defaults_to_inverse_sqrt_head_dim() -> None:
    q, k, v = _qkv()
    torch.testing.assert_close(attnrs.attention(q, k, v), attnrs.attention(q, k, v, scale=1 / math.sqrt(32)))


def test_dropout_keeps_the_expected_fraction_and_reproduces_under_manual_seed() -> None:
    q, k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16), torch.ones(1, 2, 64, 16)
    torch.manual_seed(3)
    first = attnrs.attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(3)
    again = attnrs.attention(q, k, v, dropout_p=0.25)
    assert torch.equal(first, again)
    # With V = 1 every output is (sum of kept weights) / 0.75: its mean is 1 when a quarter is dropped.
    assert abs(first.mean().item() - 1.0) < 0.05
    assert not torch.equal(first, attnrs.attention(q, k, v))


def test_dropout_keep_rate_is_one_minus_p_and_seeds_differ() -> None:
    from attnrs.attention.ops import dropout_keep_pattern

    shape = (2, 4, 96, 128)
    n = 2 * 4 * 96 * 128
    for p in (0.1, 0.5, 0.9):
        kept = dropout_keep_pattern(shape, p, 2024).double().mean().item()
        assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), (p, kept)
    a, b = dropout_keep_pattern(shape, 0.5, 1), dropout_keep_pattern(shape, 0.5, 2)
    assert torch.equal(a, dropout_keep_pattern(shape, 0.5, 1)) and not torch.equal(a, b)
    # Neighbouring pairs are independent: P(both kept) = (1 - p)^2 along rows and along columns.
    for both in ((a[..., 1:] & a[..., :-1]), (a[..., 1:, :] & a[..., :-1, :])):
        assert abs(both.double().mean().item() - 0.25) < 0.01


def _dropout_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, p: float, seed: torch.Tensor,
    sinks: torch.Tensor | None = None, softcap: float | None = None,
) -> torch.Tensor:
    """Float64 differentiable attention with the kernel's keep pattern applied to the weights (torch ops only)."""
    b, h, q_len, d = q.shape
    group = h // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ kk.transpose(-1, -2)) * d**-0.5
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.reshape(1, h, 1, 1).expand(b, h, q_len, 1)], dim=-1)
    w = torch.softmax(s, dim=-1).nan_to_num(0.0)[..., : k.shape[2]]
    from attnrs.attention.ops import dropout_keep_pattern

    keep = dropout_keep_pattern((b, h, q_len, k.shape[2]), p, seed)
    return (w * keep / (1 - p)) @ vv


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dropout_forward_and_gradients_match_the_reference_with_the_same_pattern(dtype: torch.dtype) -> None:
    from attnrs.attention.ops import draw_dropout_seed

    torch.manual_seed(8)
    q = torch.randn(2, 4, 70, 32, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 75, 32, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 75, 16, dtype=dtype, requires_grad=True)
    sinks = torch.randn(4, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 4, 70, 16, dtype=dtype)
    window = masks.sliding_window(20)
    torch.manual_seed(21)
    out = attnrs.attention(q, k, v, window, 0.3, q_offset=5, sinks=sinks, softcap=5.0)
    out.backward(grad)
    torch.manual_seed(21)
    seed = draw_dropout_seed()  # the seed attention drew
    visible = attnrs.create_dense_mask(window, 2, 4, 70, 75, q_offset=5)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, sinks)]
    want = _dropout_reference(*leaves[:3], visible, 0.3, seed, sinks=leaves[3], softcap=5.0)
    want.backward(grad.double())
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    for name, got, ref in zip("qkv", (q.grad, k.grad, v.grad, sinks.grad), leaves):
        torch.testing.assert_close(got.double(), ref.grad, atol=tol * 4, rtol=tol * 4, msg=f"grad {name}")


def test_gradcheck_with_dropout_in_float64() -> None:
    torch.manual_seed(5)
    q = torch.randn(1, 4, 7, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 9, 6, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # the same pattern on every evaluation gradcheck makes
        return attnrs.attention(q, k, v, masks.causal(), sinks=s, dropout_p=0.4, backend="native")

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_dropout_gradients_reproduce_under_manual_seed() -> None:
    q, k, v = _grad_problem(torch.float32)
    results = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        torch.manual_seed(11)
        attnrs.attention(q, k, v, is_causal=True, dropout_p=0.2).sum().backward()
        results.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(12)
    attnrs.attention(q, k, v, is_causal=True, dropout_p=0.2).sum().backward()
    assert not torch.equal(q.grad, results[0][0])


def test_gradients_flow_through_auto() -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 4, 9, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 9, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 9, 16, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    window = masks.sliding_window(4)
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: attnrs.attention(q, k, v, window, sinks=s, softcap=3.0), (q, k, v, sinks)
    )


def test_dispatch_table_reasons() -> None:
    from attnrs.attention.dispatch import choose_backend
    from attnrs.attention.resolve import resolve_mask

    q, k, v = _qkv()
    resolved = resolve_mask(None, True, (1, 4, 8, 8), q.device)
    assert choose_backend(q, k, v, resolved, None, None, 0.0, False)[0] == "native"
    assert choose_backend(q, k, v, resolved, None, None, 0.1, False)[0] == "native"
    q.requires_grad_(True)  # the Rust kernel has a backward: gradients do not change the choice
    assert choose_backend(q, k, v, resolved, None, None, 0.0, False)[0] == "native"


def test_dispatch_table_rows_for_accelerators_and_its_rendering() -> None:
    """The rows a CUDA (or XPU, MPS) call would go through, evaluated on CPU tensors (flash-attn's row needs
    CUDA tensors, so it never holds here), and the table in the module's documentation is the one it runs."""
    from attnrs.attention import dispatch
    from attnrs.attention.resolve import resolve_mask

    q, k, v = _qkv()

    def first(device: str, resolved, softcap=None, dropout_p=0.0, return_lse=False) -> str:  # type: ignore[no-untyped-def]
        call = dispatch.Call(q, k, v, resolved, softcap, None, dropout_p, return_lse)
        return dispatch.first_route(call, device).backend

    causal = resolve_mask(None, True, (1, 4, 8, 8), q.device)
    dense = resolve_mask(torch.ones(8, 8, dtype=torch.bool), False, (1, 4, 8, 8), q.device)
    for device in ("cuda", "xpu", "mps"):
        assert first(device, causal) == "flex"
        assert first(device, causal, dropout_p=0.1) == "sdpa"
        assert first(device, dense) == "sdpa"
        assert first(device, dense, softcap=5.0) == "math"
        assert first(device, dense, return_lse=True) == "math"
    assert first("cpu", dense, softcap=5.0) == "native" and first("meta", dense) == "native"
    assert dispatch.render_routes(rst=True) in (dispatch.__doc__ or "")


def _grad_problem(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(4)
    q = torch.randn(2, 4, 37, 32, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 41, 32, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 41, 24, dtype=dtype, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize(
    "options",
    [
        dict(is_causal=True),
        dict(mask="sliding"),
        dict(mask="document", softcap=4.0),
        dict(mask="dense", sinks=True),
        dict(mask="bias"),
        dict(mask="padding", sinks=True, softcap=2.0),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_gradcheck_in_float64(options: dict[str, Any]) -> None:
    """torch.autograd.gradcheck of the Rust backward on small shapes, across mask kinds, softcap, sinks, GQA."""
    torch.manual_seed(5)
    q = torch.randn(1, 4, 7, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 9, 6, dtype=torch.float64, requires_grad=True)
    extra: list[torch.Tensor] = []
    kind = options.get("mask")
    mask: Any = None
    if kind == "sliding":
        mask = masks.sliding_window(3)
    elif kind == "document":
        mask = masks.document(torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])) & masks.causal()
    elif kind == "dense":
        mask = torch.rand(1, 1, 7, 9) > 0.4
        mask[..., 2, :] = False  # a row that sees nothing
    elif kind == "padding":
        valid = torch.tensor([[False, False, True, True, True, True, True, True, True]])
        mask = masks.padding(valid) & masks.causal()
    elif kind == "bias":
        bias = torch.randn(1, 4, 7, 9, dtype=torch.float64, requires_grad=True)
        extra.append(bias)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True) if options.get("sinks") else None
    if sinks is not None:
        extra.append(sinks)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        m = rest[0] if kind == "bias" else mask
        s = rest[-1] if sinks is not None else None
        return attnrs.attention(q, k, v, m, is_causal=options.get("is_causal", False), softcap=options.get("softcap"),
                                sinks=s, backend="native")

    assert torch.autograd.gradcheck(f, (q, k, v, *extra))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_sdpa(dtype: torch.dtype) -> None:
    q, k, v = _grad_problem(dtype)
    grad = torch.randn(2, 4, 37, 24, dtype=dtype)
    window = torch.ones(37, 41, dtype=torch.bool).tril(diagonal=4) & ~torch.ones(37, 41, dtype=torch.bool).tril(-9)
    attnrs.attention(q, k, v, window).backward(grad)
    ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(q, k, v, attn_mask=window, enable_gqa=True).backward(grad)
    theirs = [t.grad for t in (q, k, v)]
    # Reference in float64 to judge both: ours must be no further from it than SDPA is (plus a margin).
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    F.scaled_dot_product_attention(q64, k64, v64, attn_mask=window, enable_gqa=True).backward(grad.double())
    for mine, peer, ref in zip(ours, theirs, (q64.grad, k64.grad, v64.grad)):
        our_error = (mine.double() - ref).abs().max().item()
        peer_error = (peer.double() - ref).abs().max().item()
        assert our_error <= 1.5 * peer_error + (1e-5 if dtype == torch.float32 else 2e-2)


def test_gradients_are_deterministic() -> None:
    q, k, v = _grad_problem(torch.float32)
    results = []
    for threads in ("1", "2", "2"):
        for t in (q, k, v):
            t.grad = None
        import os

        os.environ["ATTNRS_NUM_THREADS"] = threads
        try:
            attnrs.attention(q, k, v, masks.sliding_window(9)).sum().backward()
        finally:
            del os.environ["ATTNRS_NUM_THREADS"]
        results.append([t.grad.clone() for t in (q, k, v)])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_fully_masked_rows_have_no_nan_gradients() -> None:
    q, k, v = _grad_problem(torch.float32)
    mask = torch.ones(1, 1, 37, 41, dtype=torch.bool)
    mask[..., :5, :] = False
    attnrs.attention(q, k, v, mask).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert bool((q.grad[:, :, :5] == 0).all())


def test_malformed_mask_programs_are_argument_errors() -> None:
    q = k = v = torch.randn(1, 1, 4, 8)
    packed = bytes(_attnrs.mask_operand(masks.causal().to_rust(None), 0, 0))  # type: ignore[arg-type]
    header_word = 8  # the first section length follows the 8-byte magic
    too_long = bytearray(packed)
    too_long[header_word] += 1
    bad_magic = bytearray(packed)
    bad_magic[0] ^= 0xFF
    for raw, message in [
        (packed[:10], "shorter than its 32-byte header"),
        (packed[:-3], "do not fill"),
        (bytes(too_long), "do not fill"),
        (bytes(bad_magic), "a header starting with"),
    ]:
        program = torch.tensor(list(raw), dtype=torch.uint8)
        with pytest.raises(attnrs.ArgumentError, match=f"mask_program: expected a packed mask program.*{message}"):
            torch.ops.attnrs.attention(q, k, v, None, None, None, None, None, None, program, 0.5, 0.0, 0.0, None)
    with pytest.raises(attnrs.DtypeError, match="mask_program: expected a 1-D torch.uint8 tensor"):
        torch.ops.attnrs.attention(
            q, k, v, None, None, None, None, None, None, torch.zeros(4, dtype=torch.int64), 0.5, 0.0, 0.0, None
        )


def test_opcheck_with_gradients() -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 4, 9, 16, requires_grad=True)
    k = torch.randn(1, 2, 11, 16, requires_grad=True)
    v = torch.randn(1, 2, 11, 8, requires_grad=True)
    sinks = torch.randn(4, requires_grad=True)
    empty = torch.empty(0, dtype=torch.uint8)
    distance = torch.randn(4, 19, requires_grad=True)
    key_terms = torch.randn(1, 1, 11, requires_grad=True)
    cases = [(None, None, (0.0, None)), (None, None, (0.2, torch.tensor(77))), (distance, key_terms, (0.0, None))]
    for dist, key_t, dropout in cases:
        args = (q, k, v, None, None, sinks, None, dist, key_t, empty, 0.25, 0.0, *dropout)
        with warnings.catch_warnings():
            # opcheck itself reads .grad of non-leaf tensors it creates (a torch-internal warning).
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            torch.library.opcheck(torch.ops.attnrs.attention.default, args)


def test_double_backward_raises_a_clear_error() -> None:
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    (grad_q,) = torch.autograd.grad(attnrs.attention(q, k, v, is_causal=True).sum(), q, create_graph=True)
    with pytest.raises(attnrs.UnsupportedError, match="double backward"):
        grad_q.sum().backward()
    # The math backend is plain torch and has them.
    (grad_q,) = torch.autograd.grad(attnrs.attention(q, k, v, is_causal=True, backend="math").sum(), q,
                                    create_graph=True)
    grad_q.sum().backward()


def test_gradcheck_through_the_returned_lse() -> None:
    torch.manual_seed(6)
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 4, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    window = masks.sliding_window(3)
    # The LSE is float32 even for float64 inputs, so the finite differences take a larger step.
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: attnrs.attention(q, k, v, window, sinks=s, softcap=2.0, return_lse=True), (q, k, v, sinks),
        eps=1e-3, atol=2e-3, rtol=1e-3,
    )


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize(("q_len", "kv_len"), [(3, 6), (5, 5), (70, 130)])
def test_torch_causal_bias_is_the_causal_mask_it_means(variant: str, q_len: int, kv_len: int) -> None:
    """torch's CausalBias is a tensor subclass whose storage is uninitialised: it must be read as the causal mask
    SDPA gives it, never as an additive bias."""
    from torch.nn.attention import bias as torch_bias

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, q_len, 16), torch.randn(2, 2, kv_len, 16), torch.randn(2, 2, kv_len, 16)
    causal_bias = getattr(torch_bias, f"causal_{variant}")(q_len, kv_len)
    got = attnrs.attention(q, k, v, causal_bias)
    want = F.scaled_dot_product_attention(q, k, v, causal_bias, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_causal_bias_of_other_lengths_and_other_tensor_subclasses_are_refused() -> None:
    from torch.nn.attention.bias import causal_upper_left

    q = k = v = torch.randn(1, 1, 4, 8)
    with pytest.raises(attnrs.ShapeError, match="mask: expected a CausalBias for Q=4, K=4, got one for Q=3, K=6"):
        attnrs.attention(q, k, v, causal_upper_left(3, 6))

    class Lazy(torch.Tensor):  # a subclass whose values are not its storage
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            return super().__torch_function__(func, types, args, kwargs or {})

    lazy = torch.zeros(4, 4).as_subclass(Lazy)
    with pytest.raises(attnrs.DtypeError, match="mask: expected a plain tensor.*tensor subclass Lazy"):
        attnrs.attention(q, k, v, lazy)
    # A Parameter (a learned bias) is plain data and stays accepted.
    bias = torch.nn.Parameter(torch.randn(4, 4))
    torch.testing.assert_close(
        attnrs.attention(q, k, v, bias), F.scaled_dot_product_attention(q, k, v, bias.detach()), atol=1e-5, rtol=1e-5
    )


def test_errors_are_runtime_errors_too_as_torchs_are() -> None:
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="broadcastable"):  # what code written for SDPA catches
        attnrs.attention(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="broadcastable"):  # and still the attnrs-style builtin
        attnrs.attention(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    for error in (attnrs.ShapeError, attnrs.DtypeError, attnrs.ArgumentError, attnrs.UnknownNameError):
        assert issubclass(error, RuntimeError) and issubclass(error, attnrs.AttnrsError)


def test_numpy_scalars_are_numbers() -> None:
    import numpy as np
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    want = attnrs.attention(q, k, v, is_causal=True, scale=0.5, softcap=20.0)
    got = attnrs.attention(q, k, v, is_causal=True, scale=np.float32(0.5), softcap=np.float64(20.0), dropout_p=np.float32(0))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5), atol=2e-2, rtol=0)
    with pytest.raises(attnrs.ArgumentError, match="scale: expected a finite number"):
        attnrs.attention(q, k, v, scale=np.bool_(True))


def test_flash_backend_on_cpu_says_what_it_needs() -> None:
    q = k = v = torch.randn(1, 1, 4, 8)
    with pytest.raises(attnrs.UnsupportedError, match="backend='flash': flash-attn runs on CUDA tensors"):
        attnrs.attention(q, k, v, backend="flash")


def test_dropout_keep_pattern_is_reachable_where_the_readme_says() -> None:
    # `attnrs.attention` is the function (it hides the package of the same name), so the helper is top-level.
    from attnrs.attention.ops import dropout_keep_pattern

    assert attnrs.dropout_keep_pattern is dropout_keep_pattern
    assert "attnrs.dropout_keep_pattern(" in (Path(__file__).parent.parent / "README.md").read_text()
    keep = attnrs.dropout_keep_pattern((1, 2, 3, 4), 0.5, 7)
    assert keep.dtype == torch.bool and keep.shape == (1, 2, 3, 4)
