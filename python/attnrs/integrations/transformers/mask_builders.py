"""Mask builders for :class:`attnrs.AttentionMaskInterface`, with transformers' keyword signature.

transformers' ``create_causal_mask`` (and friends) call ``ALL_MASK_ATTENTION_FUNCTIONS[impl](**kwargs)`` with
``batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, allow_is_causal_skip,
dtype, config, use_vmap, device`` and sometimes ``local_size`` / ``allow_is_bidirectional_skip``; releases
before the removal of cache positions passed ``cache_position`` instead of ``q_length``/``q_offset``. Each
builder here accepts both forms and ignores keywords it does not use.

* ``"sdpa"``: a dense bool ``[B, 1, Q, K]`` mask (True = attend), or None when SDPA's ``is_causal`` suffices;
  the same output as transformers' ``sdpa_mask``.
* ``"eager"``: the additive float version (0 / ``finfo(dtype).min``), as transformers' ``eager_mask``.
* ``"flex_attention"``: an :class:`attnrs.BlockMask` (a real FlexAttention ``BlockMask``) built in O(blocks),
  which also carries the structural mask for the CPU kernel.
* ``"attnrs"``: that BlockMask for families that support FlexAttention, eager's additive mask (with its
  structure recorded) for the others (:func:`attention_forward_mask`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ...masks.block_mask import BlockMask, create_block_mask
from ...masks.dense import create_dense_mask
from ...masks.mask import Mask, and_masks, causal, from_callable, padding

__all__ = [
    "DENSE_DESPITE_FLEX",
    "DenseStructure",
    "attention_forward_mask",
    "attnrs_mask",
    "eager_mask",
    "flex_attention_mask",
    "sdpa_mask",
    "supports_flex_attention",
]


def _lengths(q_length: int | None, q_offset: Any, cache_position: torch.Tensor | None) -> tuple[int, int]:
    """(q_length, q_offset) from either calling convention; a 0-d tensor offset is read now, never stored."""
    if cache_position is not None:
        if q_length is None:
            q_length = int(cache_position.shape[0])
        if q_offset is None or (not isinstance(q_offset, torch.Tensor) and q_offset == 0):
            q_offset = cache_position[0] if cache_position.numel() else 0
    if q_length is None:
        raise TypeError("mask builder: expected q_length (or cache_position)")
    return int(q_length), int(q_offset or 0)


def _padding_window(attention_mask: torch.Tensor | None, kv_length: int, kv_offset: int) -> torch.Tensor | None:
    """transformers' ``prepare_padding_mask``: right-pad a short 2-D mask with False up to kv_offset + kv_length."""
    if attention_mask is None:
        return None
    missing = kv_length + kv_offset - attention_mask.shape[-1]
    if missing > 0:
        attention_mask = torch.nn.functional.pad(attention_mask, (0, missing))
    return attention_mask.to(torch.bool)


def _can_skip_causal(
    padding_mask: torch.Tensor | None,
    q_length: int,
    kv_length: int,
    q_offset: int,
    kv_offset: int,
    local_size: int | None,
) -> bool:
    """transformers' ``_ignore_causal_mask_sdpa`` (CPU): True when SDPA's top-left ``is_causal`` gives the same
    result as the mask. Under torch.compile a padding mask's values are unknown, so it is never skipped then."""
    if padding_mask is not None and torch.compiler.is_compiling():
        return False
    if padding_mask is not None and padding_mask.shape[-1] > kv_length:
        padding_mask = padding_mask[:, kv_offset : kv_offset + kv_length]
    if local_size is not None and kv_length >= local_size:
        return False
    if (q_length == 1 or kv_length == q_length) and (padding_mask is None or bool(padding_mask.all())):
        return True
    if q_offset == 0 and (
        padding_mask is None or (bool(padding_mask[:, :q_length].all()) and not bool(padding_mask[:, q_length:].any()))
    ):
        return True
    return False


def _can_skip_bidirectional(padding_mask: torch.Tensor | None, kv_length: int, local_size: int | None) -> bool:
    """transformers' ``_ignore_bidirectional_mask_sdpa``: no padding and no local window in reach (a padding
    mask is never skipped under torch.compile, its values being unknown)."""
    if padding_mask is not None and torch.compiler.is_compiling():
        return False
    return (padding_mask is None or bool(padding_mask.all())) and (local_size is None or kv_length < local_size)


def _structural(mask_function: Callable[..., Any], padding_mask: torch.Tensor | None, use_vmap: bool) -> Mask:
    mask = mask_function if isinstance(mask_function, Mask) else from_callable(mask_function, use_vmap=use_vmap)
    if padding_mask is not None:
        mask = and_masks(mask, padding(padding_mask))
    return mask


_STRUCTURE_ATTRIBUTE = "_attnrs_structure"


class DenseStructure(NamedTuple):
    """What a dense mask from :func:`sdpa_mask` / :func:`eager_mask` (and so the "attnrs" builder's dense form)
    means, kept on the tensor (an attribute) so that the attention function can skip empty blocks: the structural
    mask, its offsets, and the tensor's version counter when it was built (an in-place change of the tensor makes
    the record stale; any new tensor has none)."""

    mask: Mask
    q_offset: int
    kv_offset: int
    version: int

    @classmethod
    def of(cls, tensor: torch.Tensor) -> DenseStructure | None:
        """The structure recorded on ``tensor`` if it is still what the tensor holds, else None."""
        record = getattr(tensor, _STRUCTURE_ATTRIBUTE, None)
        if isinstance(record, cls) and record.version == tensor._version:
            return record
        return None

    @classmethod
    def record(cls, tensor: torch.Tensor, mask: Mask, q_offset: int, kv_offset: int) -> None:
        """Records on ``tensor`` that it is ``mask`` placed at these offsets (structural masks, outside tracing)."""
        if mask.is_structural and not torch.compiler.is_compiling():
            setattr(tensor, _STRUCTURE_ATTRIBUTE, cls(mask, q_offset, kv_offset, tensor._version))


def sdpa_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = causal(),
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    cache_position: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """A bool ``[B, 1, Q, K]`` mask (True = attend), or None when ``is_causal`` / no mask is equivalent."""
    q_length, q_offset = _lengths(q_length, q_offset, cache_position)
    if kv_length is None:
        raise TypeError("sdpa_mask: expected kv_length")
    kv_length, kv_offset = int(kv_length), int(kv_offset)
    padding_mask = _padding_window(attention_mask, kv_length, kv_offset)
    if allow_is_causal_skip and _can_skip_causal(padding_mask, q_length, kv_length, q_offset, kv_offset, local_size):
        return None
    if allow_is_bidirectional_skip and _can_skip_bidirectional(padding_mask, kv_length, local_size):
        return None
    mask = _structural(mask_function, padding_mask, use_vmap)
    dense = create_dense_mask(mask, batch_size, 1, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset)
    if torch.device(device).type != "cpu":
        return dense.to(device)
    DenseStructure.record(dense, mask, q_offset, kv_offset)
    return dense


def eager_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = causal(),
    attention_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    cache_position: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """An additive ``[B, 1, Q, K]`` mask: 0 where visible, ``finfo(dtype).min`` where masked."""
    kwargs.pop("allow_is_causal_skip", None)
    visible = sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset,
        kv_offset,
        mask_function,
        attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=allow_is_bidirectional_skip,
        use_vmap=use_vmap,
        device=device,
        cache_position=cache_position,
        **kwargs,
    )
    if visible is None:
        return None
    additive = torch.where(visible, torch.zeros((), device=visible.device, dtype=dtype), torch.finfo(dtype).min)
    structure = DenseStructure.of(visible)
    if structure is not None:  # the same mask in the additive form
        DenseStructure.record(additive, structure.mask, structure.q_offset, structure.kv_offset)
    return additive


def flex_attention_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = causal(),
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    cache_position: torch.Tensor | None = None,
    **kwargs: Any,
) -> BlockMask:
    """An :class:`attnrs.BlockMask` for ``[batch_size, 1, q_length, kv_length]`` (128 x 128 blocks)."""
    q_length, q_offset = _lengths(q_length, q_offset, cache_position)
    if kv_length is None:
        raise TypeError("flex_attention_mask: expected kv_length")
    kv_length, kv_offset = int(kv_length), int(kv_offset)
    padding_mask = None
    # Under torch.compile the mask's values are unknown while tracing: the padding is always part of the mask
    # then (an all-real one changes nothing), so the graph holds for every padding of this shape.
    if attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all())):
        padding_mask = _padding_window(attention_mask, kv_length, kv_offset)
    mask = _structural(mask_function, padding_mask, use_vmap)
    block_mask = create_block_mask(mask, batch_size, None, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset)
    if torch.device(device).type != "cpu":
        return block_mask.to(device)  # type: ignore[return-value]  # torch's .to() keeps the subclass
    return block_mask


# Families that declare FlexAttention support but whose own code merges only tensor masks into what it computes
# (so a BlockMask loses the causal/padding part, in transformers' flex path too): they get the dense form.
DENSE_DESPITE_FLEX = {
    "doge": "prepare_dynamic_mask merges the mask into its dynamic mask only when it is not a BlockMask",
}


_FLEX_SUPPORT: dict[str, bool] = {}  # supports_flex_attention's answers, by model type


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def supports_flex_attention(model_type: str) -> bool:
    """Whether the transformers family ``model_type`` declares FlexAttention support (``_supports_flex_attn`` of
    its model class, found through the auto mappings) and can use it (not in :data:`DENSE_DESPITE_FLEX`); False
    when unknown. Computed once per model type; under torch.compile the answer is a constant of the graph."""
    if model_type in DENSE_DESPITE_FLEX:
        return False
    if model_type not in _FLEX_SUPPORT:
        _FLEX_SUPPORT[model_type] = _declares_flex_support(model_type)
    return _FLEX_SUPPORT[model_type]


def _declares_flex_support(model_type: str) -> bool:
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping in ("MODEL_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"):
        name = getattr(modeling_auto, mapping, {}).get(model_type)
        name = name[0] if isinstance(name, (list, tuple)) else name
        model_class = getattr(transformers, name, None) if isinstance(name, str) else None
        if model_class is not None:
            return bool(getattr(model_class, "_supports_flex_attn", False))
    return False


def attention_forward_mask(**kwargs: Any) -> torch.Tensor | BlockMask | None:
    """The mask builder paired with :func:`~attnrs.integrations.transformers.attention_forward` (registered as
    ``"attnrs"``); the form is decided by the model family's declared support, read from ``config.model_type``:

    * families that support FlexAttention get an :class:`attnrs.BlockMask` (never None), which carries the
      structure to the kernel and which generate's static-cache path accepts (a 4-D ``BlockMask``);
    * the others (which may add to, slice or concatenate the mask in their own code) get eager's additive float
      mask, the form their code is written for; the structure is recorded on the tensor (:class:`DenseStructure`)
      so the attention function still skips empty blocks when it receives that same tensor unchanged."""
    config = kwargs.get("config")
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and supports_flex_attention(model_type):
        return flex_attention_mask(**kwargs)
    return eager_mask(**kwargs)


attnrs_mask = attention_forward_mask  # its public name, after the registry key
