"""``attn_implementation="attnrs"`` for Hugging Face transformers: ``attnrs.integrations.transformers``.

After ``import attnrs``, every entry of :class:`attnrs.AttentionInterface` (``"attnrs"``, each native kernel and
plugin, and user entries) is an ``attn_implementation`` of transformers, paired with a mask builder of the same
name: ``from_pretrained(..., attn_implementation="attnrs")``, ``set_attn_implementation("attnrs")`` and
``config._attn_implementation = "attnrs"`` all work, whichever of the two packages is imported first, and
attnrs never imports transformers itself (:func:`enable_auto_register`; ``ATTNRS_DISABLE_AUTO_REGISTER=1`` or
:func:`disable_auto_register` opt out). :func:`register` puts any function under any name at once, with its
mask builder (a missing mask builder silently disables masking in transformers).

Modules: :mod:`~.forward` (:func:`attention_forward`: the transformers contract on :func:`attnrs.attention`),
:mod:`~.registration` (:func:`register` and the automatic registration), :mod:`~.import_hook` (the
``sys.meta_path`` finder that runs it when transformers is imported), :mod:`~.mask_builders` (mask builders
with transformers' keyword signature, ``attnrs.mask_builders``), :mod:`~.functions` (plain-torch
``sdpa``/``eager`` attention functions with the transformers contract, ``attnrs.functions``).
"""

from __future__ import annotations

from .forward import attention_forward, attention_function
from .registration import disable_auto_register, enable_auto_register, register, sync

__all__ = [
    "attention_forward",
    "attention_function",
    "disable_auto_register",
    "enable_auto_register",
    "register",
    "sync",
]
