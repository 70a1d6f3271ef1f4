"""An attention kernel written in Rust and plugged into attnrs through its C ABI.

Installing this package is enough: attnrs finds ``kernel_capsule`` through the ``attnrs.kernels`` entry point and
registers the kernel as ``"example"``, so ``attnrs.attention(q, k, v, backend="example")`` runs it.
"""

from ._native import kernel_capsule, panicking_kernel_capsule

__all__ = ["kernel_capsule", "panicking_kernel_capsule"]
