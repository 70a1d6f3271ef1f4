"""Recognition of the ``score_mod`` closures transformers builds for FlexAttention, and of torch's identity one.

transformers' flex integration (``transformers/integrations/flex_attention.py``, ``flex_attention_forward``) does
not hand FlexAttention its score modification as data: it builds a closure over three of its arguments and passes
that::

    def score_mod(score, batch_idx, head_idx, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if score_mask is not None:                     # the attention_mask when it is a tensor, not a BlockMask,
            score = score + score_mask[batch_idx][0][q_idx][kv_idx]  # cut to the key length; head 0 for every head
        if position_bias is not None:
            score = score + position_bias[batch_idx, head_idx, q_idx, kv_idx]
        return score

DOGE (``transformers/models/doge/modeling_doge.py``, its own ``flex_attention_forward``, registered as
``"doge_flex_attention"``) builds the same closure without ``position_bias`` and indexes its mask (``causal_mask``)
per head: ``causal_mask[batch_idx][head_idx][q_idx][kv_idx]``.

:func:`recognise_transformers_score_mod` returns the captured parts of such a closure, so that a caller can run
it as a softcap plus an additive bias instead of calling it per element. As in :mod:`attnrs.masks.mask`, a
closure is recognised only when its code object is the very code object the *installed* transformers function
creates: the function's module is looked up in ``sys.modules`` (by the closure's own ``__globals__``, so
nothing is imported here and attnrs never imports transformers) and the code object must be the ``score_mod``
constant of that module's ``flex_attention_forward``; its free variables must be exactly the expected names and
hold values of the expected types. A lookalike (same names, other code), a changed transformers release (other
code or other cells) or an unexpected value (a tensor softcap, a bool mask) is not recognised: None, and the
callable is evaluated as it is, which is always correct.

:func:`is_identity_score_mod` recognises torch's own "no score_mod": ``torch.nn.attention.flex_attention._identity``
(what ``flex_attention`` substitutes for ``score_mod=None``; ``PagedAttention.get_score_mod(None)`` starts from it
too).
"""

from __future__ import annotations

import math
import numbers
import sys
import types
from typing import Any

import torch

__all__ = ["KNOWN_CLOSURES", "is_identity_score_mod", "recognise_transformers_score_mod"]

# module name -> (the free variables of its flex_attention_forward's score_mod closure, the closure variable that
# holds the additive mask, whether that mask is indexed per head or at head 0 for every head)
KNOWN_CLOSURES: dict[str, tuple[frozenset[str], str, bool]] = {
    "transformers.integrations.flex_attention": (
        frozenset({"softcap", "score_mask", "position_bias"}),
        "score_mask",
        False,
    ),
    "transformers.models.doge.modeling_doge": (frozenset({"softcap", "causal_mask"}), "causal_mask", True),
}
_FACTORY = "flex_attention_forward"
_CLOSURE = "score_mod"


def _installed_code(module_name: str) -> types.CodeType | None:
    """The ``score_mod`` code object of ``module_name``'s ``flex_attention_forward`` if that module is loaded."""
    module = sys.modules.get(module_name)
    factory = getattr(module, _FACTORY, None) if module is not None else None
    code = getattr(factory, "__code__", None)
    if not isinstance(code, types.CodeType):
        return None
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and const.co_name == _CLOSURE:
            return const
    return None


def _cells(fn: types.FunctionType) -> dict[str, Any] | None:
    """The closure's variables by name, or None when one is unset (an empty cell)."""
    closure = fn.__closure__ or ()
    if len(closure) != len(fn.__code__.co_freevars):
        return None
    try:
        return dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in closure)))
    except ValueError:  # an empty cell
        return None


def _softcap(value: Any) -> tuple[bool, float | None]:
    """(recognised, the softcap as a float or None): None, or a finite positive real number (not a bool, not a
    tensor)."""
    if value is None:
        return True, None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False, None
    cap = float(value)
    return (True, cap) if math.isfinite(cap) and cap > 0 else (False, None)


def _additive(value: Any) -> bool:
    """None or a floating 4-D tensor: what the closure can add to a score as the bias it means."""
    return value is None or (isinstance(value, torch.Tensor) and value.dtype.is_floating_point and value.dim() == 4)


def recognise_transformers_score_mod(fn: Any) -> dict[str, Any] | None:
    """The captured parts of a transformers FlexAttention ``score_mod`` closure, or None for anything else.

    Returns ``{"softcap": float | None, "score_mask": Tensor | None, "position_bias": Tensor | None,
    "score_mask_per_head": bool, "source": str}``; the closure computes ::

        s = softcap * tanh(s / softcap)                   if softcap is not None
        s = s + score_mask[b, h if score_mask_per_head else 0, q, kv]   if score_mask is not None
        s = s + position_bias[b, h, q, kv]                if position_bias is not None

    with ``q``/``kv`` the indices FlexAttention passes (rows and columns of this call's scores; the mask has
    already been cut to the key length). ``source`` is the module that built it
    (``"transformers.integrations.flex_attention"`` or ``"transformers.models.doge.modeling_doge"``, whose mask
    is ``causal_mask``, indexed per head, and which has no ``position_bias``). Both tensors are returned as
    captured (not copied, not broadcast): ``[B, 1|H, Q, K]`` as transformers passes them, where a size-1 batch
    dimension means the same for every batch element (T5's ``position_bias`` is ``[1, H, Q, K]``)."""
    if not isinstance(fn, types.FunctionType):
        return None
    code = fn.__code__
    module_name = fn.__globals__.get("__name__")
    known = KNOWN_CLOSURES.get(module_name) if isinstance(module_name, str) else None
    if known is None or not isinstance(module_name, str) or code.co_name != _CLOSURE:
        return None
    names, mask_name, per_head = known
    if code is not _installed_code(module_name) or frozenset(code.co_freevars) != names:
        return None
    cells = _cells(fn)
    if cells is None:
        return None
    ok, softcap = _softcap(cells["softcap"])
    mask, bias = cells[mask_name], cells.get("position_bias")
    if not ok or not _additive(mask) or not _additive(bias):
        return None
    return {
        "softcap": softcap,
        "score_mask": mask,
        "position_bias": bias,
        "score_mask_per_head": per_head,
        "source": module_name,
    }


def is_identity_score_mod(fn: Any) -> bool:
    """True for torch's identity ``score_mod`` (``torch.nn.attention.flex_attention._identity``: what
    ``flex_attention`` uses for ``score_mod=None``), which changes no score. Checked by identity against the
    installed torch, which attnrs always has."""
    from torch.nn.attention import flex_attention

    return fn is getattr(flex_attention, "_identity", None)
