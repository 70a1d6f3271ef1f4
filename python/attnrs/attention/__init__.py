"""``attnrs.attention`` and what it is made of.

* :mod:`~attnrs.attention.api`: :func:`attention` itself, and running a resolved call on a backend;
* :mod:`~attnrs.attention.resolve`: the argument checks, and a mask argument turned into a ``ResolvedMask``;
* :mod:`~attnrs.attention.dispatch`: which backend ``backend="auto"`` runs, and why;
* :mod:`~attnrs.attention.ops`: the custom operators of the Rust kernels (schemas, fakes, autograd);
* :mod:`~attnrs.attention.torch_backends`: delegation to torch SDPA / flex_attention / flash-attn, and ``math``.

``attnrs.attention`` (the attribute of the package ``attnrs``) is the function, which hides this package as an
attribute: reach its modules by importing from them, e.g. ``from attnrs.attention.dispatch import choose_backend``.
"""

from __future__ import annotations

from .api import BACKENDS, attention

__all__ = ["BACKENDS", "attention"]
