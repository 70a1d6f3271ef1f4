"""``attn_implementation="attnrs"`` for Hugging Face transformers: ``attnrs.integrations.transformers``.

:func:`register` puts an attention function *and* its mask builder into transformers' global registries under
the same name (a missing mask builder silently disables masking in transformers), after which
``from_pretrained(..., attn_implementation="attnrs")``, ``set_attn_implementation("attnrs")`` and
``config._attn_implementation = "attnrs"`` all work.

Modules: :mod:`~.forward` (:func:`attention_forward`: the transformers contract on :func:`attnrs.attention`),
:mod:`~.registration` (:func:`register`), :mod:`~.mask_builders` (mask builders with transformers' keyword
signature, ``attnrs.mask_builders``), :mod:`~.functions` (plain-torch ``sdpa``/``eager`` attention functions
with the transformers contract, ``attnrs.functions``).
"""

from __future__ import annotations

from .forward import attention_forward, attention_function
from .registration import register

__all__ = ["attention_forward", "attention_function", "register"]
