"""torch's FlexAttention as a reference on the CPU, uncompiled: forward, LSE and backward.

Uncompiled ``flex_attention`` traces the score_mod with dynamo (an eager backend) and runs torch's dense math
implementation; its gradients (the ``flex_attention_backward`` dense implementation) are plain torch math on any
device, but ``flex_attention`` refuses inputs that require grad on the CPU (``_validate_device``) because the
compiled CPU kernel has no backward. The reference skips that one check; everything else is torch's own code.
"""

from __future__ import annotations

import warnings
from typing import Any
from unittest import mock

import torch
import torch.nn.attention.flex_attention as fa


def _no_device_check(query: Any, key: Any, value: Any) -> None:
    return None


def flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Any = None,
    mask_mod: Any = None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``flex_attention`` (uncompiled, GQA enabled) with ``mask_mod`` as a block mask (None: every pair), and its
    LSE (natural log)."""
    b, h, q_len, _ = query.shape
    # Each call traces a new score_mod; without a reset dynamo's automatic dynamic shapes would turn the floats a
    # score_mod closes over into SymFloats after a few recompiles, which flex's operator refuses.
    torch._dynamo.reset()
    kv_len = key.shape[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncompiled flex's performance note, return_lse's deprecation
        block_mask = None
        if mask_mod is not None:
            block_mask = fa.create_block_mask(mask_mod, b, h, q_len, kv_len, device=str(query.device))
        with mock.patch.object(fa, "_validate_device", _no_device_check):
            out, lse = fa.flex_attention(
                query,
                key,
                value,
                score_mod=score_mod,
                block_mask=block_mask,
                scale=scale,
                enable_gqa=True,
                return_lse=True,
            )
    return out, lse


def causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return kv_idx <= q_idx
