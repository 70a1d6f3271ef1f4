"""attnrs: pluggable, fast attention for PyTorch.

* Registries with transformers' semantics: :class:`AttentionInterface`, :class:`AttentionMaskInterface`.
* Typed errors: :mod:`attnrs.errors`.

The compiled module ``attnrs._attnrs`` is private; everything public is re-exported here.
"""

from __future__ import annotations

from . import errors, functions, mask_builders, masks, plugins
from ._attnrs import __version__, cpu_features, simd_path
from .attention import attention
from .plugins import load_plugins, native_kernels, plugin_errors, register_native
from ._threads import num_threads
from .errors import (
    ArgumentError,
    AttnrsError,
    DeviceError,
    DtypeError,
    InternalError,
    LayoutError,
    ShapeError,
    UnknownNameError,
    UnsupportedError,
)
from .block_mask import BlockMask, create_block_mask
from .masks import Mask, create_dense_mask
from .registry import (
    ALL_ATTENTION_FUNCTIONS,
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionInterface,
    AttentionMaskInterface,
    GeneralInterface,
)

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
    "Mask",
    "LayoutError",
    "ShapeError",
    "UnknownNameError",
    "UnsupportedError",
    "__version__",
    "attention",
    "cpu_features",
    "create_block_mask",
    "create_dense_mask",
    "errors",
    "functions",
    "mask_builders",
    "masks",
    "load_plugins",
    "native_kernels",
    "num_threads",
    "plugin_errors",
    "plugins",
    "register_native",
    "simd_path",
]

_DENSE_MASK = {"devices": ["cpu", "cuda"], "mask_kinds": ["dense"]}
_BLOCK_MASK = {"devices": ["cpu", "cuda"], "mask_kinds": ["block_sparse", "expression"]}
AttentionMaskInterface.register("sdpa", mask_builders.sdpa_mask, capabilities=_DENSE_MASK)
AttentionMaskInterface.register("eager", mask_builders.eager_mask, capabilities=_DENSE_MASK)
AttentionMaskInterface.register("flex_attention", mask_builders.flex_attention_mask, capabilities=_BLOCK_MASK)
AttentionMaskInterface.register("attnrs", mask_builders.attnrs_mask, capabilities=_BLOCK_MASK)

from .integrations import transformers as _transformers_integration  # noqa: E402  (needs the registries)

_transformers_integration._register_in_attnrs()

AttentionInterface.register(
    "sdpa",
    functions.sdpa_attention_forward,
    capabilities={"devices": ["cpu", "cuda"], "mask_kinds": ["none", "dense"], "backward": True},
)
