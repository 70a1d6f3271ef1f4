"""torch's float32 matmul precision, as the Rust kernels read it for float32 inputs.

``torch.set_float32_matmul_precision("medium")`` lets float32 products run in bfloat16: attnrs then rounds
float32 inputs to bfloat16 and runs its bf16 path, where the CPU has fast bf16 products (AMX or AVX-512 BF16;
``attnrs.kernel_path("bfloat16")`` says which). ``"high"`` runs float32 as bf16x3 (each value split into a bf16
``hi`` and ``lo``; ``hi*hi + hi*lo + lo*hi``, f32 accumulation) on AMX tiles. Elsewhere, and under
``"highest"`` (the default), float32 stays exact f32: torch's own rule is that a lower precision is used only
"if a fast matrix multiplication algorithm using that datatype internally is available", and on AVX-512 BF16
three bf16 products cost more than one f32 FMA.

Read at every call, like torch. torch has two spellings of the setting: the legacy
``torch.get_float32_matmul_precision()`` and the per-backend ``torch.backends.mkldnn.matmul.fp32_precision``
(``"bf16"``, ``"tf32"``, ``"ieee"``, or ``"none"`` to inherit the generic ``torch.backends.fp32_precision``);
the CPU's own (mkldnn) setting is the one read here, so both spellings work.
"""

from __future__ import annotations

import torch

# The codes attnrs._attnrs takes (``Scalars`` in rust/attnrs-py/src/attention.rs).
CODES = {"highest": 0, "high": 1, "medium": 2}
# torch's per-backend names for the same settings.
_BACKEND_NAMES = {"ieee": "highest", "tf32": "high", "bf16": "medium"}


def f32_matmul_precision() -> str:
    """``"highest"``, ``"high"`` or ``"medium"``: the float32 matmul precision torch's CPU matmuls follow now."""
    setting = str(torch.backends.mkldnn.matmul.fp32_precision)  # type: ignore[attr-defined]  # not in torch's stubs
    if setting == "none":  # inherits the generic setting
        setting = str(torch.backends.fp32_precision)  # type: ignore[attr-defined]
    return _BACKEND_NAMES.get(setting, "highest")


def f32_precision_code() -> int:
    """:func:`f32_matmul_precision` as the binding's code."""
    return CODES[f32_matmul_precision()]
