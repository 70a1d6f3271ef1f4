"""attnrs: pluggable, fast attention for PyTorch.

* Registries with transformers' semantics: :class:`AttentionInterface`, :class:`AttentionMaskInterface`.
* Typed errors: :mod:`attnrs.errors`.

The compiled module ``attnrs._attnrs`` is private; everything public is re-exported here.
"""

from __future__ import annotations

from . import errors, functions
from ._attnrs import __version__, cpu_features, simd_path
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
    "DeviceError",
    "DtypeError",
    "GeneralInterface",
    "InternalError",
    "LayoutError",
    "ShapeError",
    "UnknownNameError",
    "UnsupportedError",
    "__version__",
    "cpu_features",
    "errors",
    "functions",
    "num_threads",
    "simd_path",
]

AttentionInterface.register(
    "sdpa",
    functions.sdpa_attention_forward,
    capabilities={"devices": ["cpu", "cuda"], "mask_kinds": ["none", "dense"], "backward": True},
)
