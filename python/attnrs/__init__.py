"""attnrs: pluggable, fast attention for PyTorch.

* :func:`attention`: scaled dot-product attention with masks as values (:mod:`attnrs.masks`), on a Rust kernel.
* Registries with transformers' semantics: :class:`AttentionInterface`, :class:`AttentionMaskInterface`.
* Native kernels and plugins: :func:`register_native`, :func:`load_plugins`.
* Typed errors: :mod:`attnrs.errors`.
* Context parallelism over a process group: :mod:`attnrs.distributed` (ring and all-gather attention), imported
  on first use (it loads ``torch.distributed``).

The compiled module ``attnrs._attnrs`` is private; everything public is re-exported here. Importing the package
also fills the registries (:mod:`attnrs.registrations`) and makes their entries ``attn_implementation`` values
of transformers once it is imported (:mod:`attnrs.integrations.transformers.registration`).
"""

from __future__ import annotations

import importlib
from typing import Any

from . import errors, masks, plugins, registrations, scores  # noqa: F401  (registrations: fills the registries)
from ._attnrs import __version__, cpu_features, kernel_path, simd_path
from .attention.api import attention
from .attention.merge import merge_attention_states, merge_attention_states_n
from .attention.ops import dropout_keep_pattern
from .attention.varlen import varlen_attention
from .errors import (
    ArgumentError,
    AttnrsError,
    DeviceError,
    DtypeError,
    InternalError,
    LayoutError,
    OutOfMemoryError,
    ShapeError,
    UnknownNameError,
    UnsupportedError,
)
from .integrations.transformers import functions, mask_builders
from .integrations.transformers import registration as _transformers_registration
from .masks import Mask, create_dense_mask
from .masks.block_mask import BlockMask, create_block_mask
from .plugins import load_plugins, native_kernels, plugin_errors, register_native
from .registry import (
    ALL_ATTENTION_FUNCTIONS,
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionInterface,
    AttentionMaskInterface,
    GeneralInterface,
)
from .threads import num_threads

# attn_implementation="attnrs" (and every other entry of AttentionInterface) in transformers, registered when
# transformers is imported, without importing it here (ATTNRS_DISABLE_AUTO_REGISTER=1 opts out).
_transformers_registration.enable_at_import()

__all__ = [
    "ALL_ATTENTION_FUNCTIONS",
    "ALL_MASK_ATTENTION_FUNCTIONS",
    "ArgumentError",
    "AttentionInterface",
    "AttentionMaskInterface",
    "AttnrsError",
    "BlockMask",
    "DeviceError",
    "DtypeError",
    "GeneralInterface",
    "InternalError",
    "LayoutError",
    "Mask",
    "OutOfMemoryError",
    "ShapeError",
    "UnknownNameError",
    "UnsupportedError",
    "__version__",
    "attention",
    "cpu_features",
    "create_block_mask",
    "create_dense_mask",
    "distributed",
    "dropout_keep_pattern",
    "errors",
    "functions",
    "kernel_path",
    "load_plugins",
    "mask_builders",
    "masks",
    "merge_attention_states",
    "merge_attention_states_n",
    "native_kernels",
    "num_threads",
    "plugin_errors",
    "plugins",
    "register_native",
    "scores",
    "simd_path",
    "varlen_attention",
]


def __getattr__(name: str) -> Any:
    """``attnrs.distributed`` on first use: importing torch.distributed is left to those who need it."""
    if name == "distributed":
        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
