"""attnrs.attention as a drop-in: the same call as torch's SDPA gives SDPA's answer, and the same mask_mod as
FlexAttention's (a callable, an attnrs Mask, a torch or attnrs BlockMask) gives flex_attention's answer at Q != K.

The references are torch's own: ``F.scaled_dot_product_attention`` and ``flex_attention`` (its eager CPU path),
called with exactly the arguments attnrs gets.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
from torch.nn.attention.flex_attention import flex_attention

import attnrs
from attnrs import masks


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _visible(*shape: int, seed: int = 1) -> torch.Tensor:
    """A random bool mask in which every query row sees at least its first key (SDPA gives NaN for rows that see
    nothing, attnrs gives 0; that difference is documented and tested elsewhere)."""
    m = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.4
    m[..., 0] = True
    return m


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = 2e-2 if want.dtype in (torch.bfloat16, torch.float16) else 2e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# (name, args, kwargs): each case is called as attnrs.attention(*args, **kwargs) and SDPA(*args, **kwargs).
Q4, K4 = _randn(2, 4, 9, 16, seed=1), _randn(2, 4, 13, 16, seed=2)
V4 = _randn(2, 4, 13, 8, seed=3)
SDPA_CASES: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("plain", (Q4, K4, V4), {}),
    ("positional bool mask", (Q4, K4, V4, _visible(2, 1, 9, 13)), {}),
    ("keyword bool mask", (Q4, K4, V4), {"attn_mask": _visible(9, 13)}),
    ("float mask", (Q4, K4, V4), {"attn_mask": _randn(1, 4, 9, 13, seed=4)}),
    ("float mask with -inf", (Q4, K4, V4, torch.where(_visible(2, 4, 9, 13), 0.0, float("-inf"))), {}),
    ("positional dropout 0 and is_causal", (Q4, K4, V4, None, 0.0, True), {}),
    ("is_causal square", (Q4, Q4, Q4), {"is_causal": True}),
    ("all positional", (Q4, K4, V4, _visible(1, 1, 9, 13), 0.0, False), {"scale": 0.3, "enable_gqa": False}),
    ("scale float", (Q4, K4, V4), {"scale": 0.7}),
    ("scale numpy", (Q4, K4, V4), {"scale": np.float32(0.5)}),
    ("enable_gqa", (Q4, _randn(2, 2, 13, 16, seed=5), _randn(2, 2, 13, 8, seed=6)), {"enable_gqa": True}),
    ("enable_gqa causal", (Q4, _randn(2, 1, 9, 16, seed=5), _randn(2, 1, 9, 8, seed=6)),
     {"enable_gqa": True, "is_causal": True}),
    ("one kv head broadcast", (Q4, _randn(2, 1, 13, 16, seed=5), _randn(2, 1, 13, 8, seed=6)), {}),
    ("3-D", (_randn(4, 9, 16), _randn(4, 13, 16, seed=2), _randn(4, 13, 8, seed=3)), {}),
    ("3-D with mask", (_randn(4, 9, 16), _randn(4, 13, 16, seed=2), _randn(4, 13, 8, seed=3)),
     {"attn_mask": _visible(9, 13)}),
    ("5-D", (_randn(2, 3, 2, 9, 16), _randn(2, 3, 2, 13, 16, seed=2), _randn(2, 3, 2, 13, 8, seed=3)), {}),
    ("5-D broadcast batch and mask",
     (_randn(2, 3, 2, 9, 16), _randn(1, 3, 2, 13, 16, seed=2), _randn(1, 3, 2, 13, 8, seed=3)),
     {"attn_mask": _visible(2, 1, 1, 9, 13)}),
    ("kv batch 1", (Q4, K4[:1], V4[:1]), {"is_causal": True}),
    ("query batch 1", (Q4[:1], K4, V4), {}),
    ("causal_upper_left", (Q4, K4, V4, causal_upper_left(9, 13)), {}),
    ("causal_lower_right", (Q4, K4, V4, causal_lower_right(9, 13)), {}),
    ("bfloat16", tuple(t.bfloat16() for t in (Q4, K4, V4)), {"is_causal": True}),
    ("float16 with mask", tuple(t.half() for t in (Q4, K4, V4)), {"attn_mask": _visible(2, 4, 9, 13)}),
    ("dropout 1 gives zeros", (Q4, K4, V4), {"dropout_p": 1.0}),
]


@pytest.mark.parametrize(("args", "kwargs"), [c[1:] for c in SDPA_CASES], ids=[c[0] for c in SDPA_CASES])
def test_sdpa_call_forms_give_sdpas_answer(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    want = F.scaled_dot_product_attention(*args, **kwargs)
    _close(attnrs.attention(*args, **kwargs), want)


@pytest.mark.parametrize(("args", "kwargs"), [c[1:] for c in SDPA_CASES[:4]], ids=[c[0] for c in SDPA_CASES[:4]])
def test_sdpa_call_forms_give_sdpas_gradients(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    q, k, v = (t.detach().requires_grad_(True) for t in args[:3])
    q2, k2, v2 = (t.detach().requires_grad_(True) for t in args[:3])
    grad = _randn(*F.scaled_dot_product_attention(*args, **kwargs).shape, seed=9)
    F.scaled_dot_product_attention(q, k, v, *args[3:], **kwargs).backward(grad)
    attnrs.attention(q2, k2, v2, *args[3:], **kwargs).backward(grad)
    for got, want in zip((q2, k2, v2), (q, k, v)):
        _close(_grad_of(got), _grad_of(want))


def _grad_of(t: torch.Tensor) -> torch.Tensor:
    assert t.grad is not None
    return t.grad


def test_the_lse_keeps_the_batch_dims() -> None:
    q, k, v = _randn(2, 3, 2, 9, 16), _randn(3, 2, 13, 16, seed=2), _randn(3, 2, 13, 8, seed=3)
    out, lse = attnrs.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 3, 2, 9, 8) and lse.shape == (2, 3, 2, 9)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 16**-0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)


def test_dropout_1_gives_zero_gradients_as_sdpa_does() -> None:
    q = Q4.detach().requires_grad_(True)
    attnrs.attention(q, K4, V4, dropout_p=1.0).sum().backward()
    assert q.grad is not None and torch.equal(q.grad, torch.zeros_like(q))


# -- FlexAttention's mask meaning at Q != K -----------------------------------------------------------------------

MASK_MODS: dict[str, Callable[..., Any]] = {
    "causal lambda": lambda b, h, q, kv: kv <= q,
    "sliding lambda": lambda b, h, q, kv: (kv <= q) & (q - kv < 4),
    "head-dependent lambda": lambda b, h, q, kv: (q + kv + h) % 3 != 0,
    "attnrs causal()": masks.causal(),
    "attnrs sliding_window(4)": masks.sliding_window(4),
    "attnrs chunked(5)": masks.chunked(5),
}


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that its uncompiled path is slow
        return flex_attention(q, k, v, **kwargs)  # type: ignore[return-value]


@pytest.mark.parametrize("q_len", [7, 40])
@pytest.mark.parametrize("fn", list(MASK_MODS.values()), ids=list(MASK_MODS))
def test_every_mask_form_gives_flex_attentions_answer(fn: Callable[..., Any], q_len: int) -> None:
    b, h, kv_len = 2, 3, 29
    q, k, v = _randn(b, h, q_len, 16), _randn(b, h, kv_len, 16, seed=2), _randn(b, h, kv_len, 16, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_block_mask = torch_create_block_mask(fn, b, h, q_len, kv_len, device="cpu", BLOCK_SIZE=16)
    want = _flex(q, k, v, block_mask=torch_block_mask)
    ours = attnrs.create_block_mask(fn, b, h, q_len, kv_len, BLOCK_SIZE=16)
    forms = {
        "callable or Mask": attnrs.attention(q, k, v, fn),
        "attnrs BlockMask": attnrs.attention(q, k, v, ours),
        "torch BlockMask": attnrs.attention(q, k, v, torch_block_mask),
        "attnrs BlockMask in flex_attention": _flex(q, k, v, block_mask=ours),
    }
    if isinstance(fn, masks.Mask):
        forms["Mask in flex's create_block_mask"] = _flex(
            q, k, v, block_mask=torch_create_block_mask(fn, b, h, q_len, kv_len, device="cpu")
        )
    for name, got in forms.items():
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_q_offset_is_the_kv_cache_placement() -> None:
    """q_offset=K-Q puts the queries at the cache's end: the same as causal_lower_right and as a flex mask_mod
    that adds the offset itself."""
    q, k, v = _randn(1, 2, 5, 16), _randn(1, 2, 12, 16, seed=2), _randn(1, 2, 12, 16, seed=3)
    want = F.scaled_dot_product_attention(q, k, v, causal_lower_right(5, 12))
    _close(attnrs.attention(q, k, v, masks.causal(), q_offset=7), want)
    _close(attnrs.attention(q, k, v, lambda b, h, qi, kv: kv <= qi, q_offset=7), want)
    flex = _flex(q, k, v, block_mask=torch_create_block_mask(lambda b, h, qi, kv: kv <= qi + 7, 1, 2, 5, 12,
                                                                device="cpu"))
    _close(attnrs.attention(q, k, v, masks.causal(), q_offset=7), flex)
