"""Type stubs of the private compiled module. Public names are re-exported by ``attnrs``."""

from collections.abc import Callable, Iterator
from typing import Any, final

__all__ = [
    "attention_backward",
    "attention_forward",
    "dropout_keep_pattern",
    "native_attention_forward",
    "native_info",
    "native_kernels",
    "register_native",
    "remove_native",
    "_test_capsule",
    "BitmapBuilder",
    "BlockLayout",
    "MaskExpr",
    "Registry",
    "cpu_features",
    "simd_path",
    "_strided_copy",
    "_strided_sum",
    "_pool_threads",
    "__version__",
]

__version__: str

@final
class Registry:
    """A thread-safe, insertion-ordered mapping of names to callables with their capabilities."""

    def __new__(cls) -> Registry: ...
    def __getitem__(self, key: object, /) -> Callable[..., Any]: ...
    def __setitem__(self, key: object, value: object, /) -> None: ...
    def __delitem__(self, key: object, /) -> None: ...
    def __contains__(self, key: object, /) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def keys(self) -> list[str]: ...
    def values(self) -> list[Callable[..., Any]]: ...
    def items(self) -> list[tuple[str, Callable[..., Any]]]: ...
    def get(self, key: object, default: Any = None) -> Any: ...
    def pop(self, key: object, *default: Any) -> Any: ...
    def clear(self) -> None: ...
    def register(self, key: object, value: object, capabilities: dict[str, Any] | None = None) -> None: ...
    def capabilities(self, key: object) -> dict[str, Any] | None: ...

@final
class MaskExpr:
    """An immutable mask expression over absolute positions, evaluated in Rust."""

    @staticmethod
    def full() -> MaskExpr: ...
    @staticmethod
    def empty() -> MaskExpr: ...
    @staticmethod
    def causal(offset: int = 0) -> MaskExpr: ...
    @staticmethod
    def sliding_window(window: int, causal: bool) -> MaskExpr: ...
    @staticmethod
    def sliding_window_overlay(window: int) -> MaskExpr: ...
    @staticmethod
    def chunked(size: int, start: list[int]) -> MaskExpr: ...
    @staticmethod
    def padding(valid: Any) -> MaskExpr: ...
    @staticmethod
    def document(ids: Any) -> MaskExpr: ...
    @staticmethod
    def prefix_lm(lengths: list[int]) -> MaskExpr: ...
    @staticmethod
    def and_(parts: list[MaskExpr]) -> MaskExpr: ...
    @staticmethod
    def or_(parts: list[MaskExpr]) -> MaskExpr: ...
    def negate(self) -> MaskExpr: ...
    def shift(self, dq: int, dk: int) -> MaskExpr: ...
    def kind(self) -> str: ...
    def depends_on_batch(self) -> bool: ...
    def depends_on_head(self) -> bool: ...
    def visible(self, b: int, h: int, q: int, k: int) -> bool: ...
    def encode(self) -> tuple[bytearray, bytearray, bytearray]: ...
    def fill_dense(self, out: Any, q_offset: int, kv_offset: int, num_threads: int) -> None: ...
    def block_sparse(
        self,
        batch: int,
        heads: int,
        q_len: int,
        kv_len: int,
        q_offset: int,
        kv_offset: int,
        q_block: int,
        kv_block: int,
        num_threads: int,
    ) -> BlockLayout: ...

@final
class BitmapBuilder:
    """Builds a bitmap mask from row chunks of an evaluated callable."""

    def __new__(cls, shape: tuple[int, int, int, int] | list[int], q0: int, k0: int) -> BitmapBuilder: ...
    def write_rows(self, q_start: int, values: Any) -> None: ...
    def finish(self) -> MaskExpr: ...

@final
class BlockLayout:
    """A FlexAttention-compatible block layout computed in Rust."""

    @property
    def layout_batch(self) -> int: ...
    @property
    def layout_heads(self) -> int: ...
    @property
    def num_q_blocks(self) -> int: ...
    @property
    def num_kv_blocks(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    def write(self, name: str, counts: Any, indices: Any) -> None: ...
    def write_counts(self, name: str, counts: Any) -> None: ...

def attention_backward(
    query: Any,
    key: Any,
    value: Any,
    out: Any,
    grad_out: Any,
    lse: Any,
    dense_mask: Any | None,
    bias: Any | None,
    sinks: Any | None,
    program: Any,
    program_ints: Any,
    program_bytes: Any,
    q_offset: int,
    kv_offset: int,
    scale: float,
    softcap: float,
    grad_query: Any,
    grad_key: Any,
    grad_value: Any,
    grad_sinks: Any | None,
    grad_bias: Any | None,
    grad_lse: Any | None,
    num_threads: int,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> None: ...
def attention_forward(
    query: Any,
    key: Any,
    value: Any,
    out: Any,
    lse: Any | None,
    dense_mask: Any | None,
    bias: Any | None,
    sinks: Any | None,
    program: Any,
    program_ints: Any,
    program_bytes: Any,
    q_offset: int,
    kv_offset: int,
    scale: float,
    softcap: float,
    num_threads: int,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> None: ...
def dropout_keep_pattern(out: Any, dropout_p: float, dropout_seed: int) -> None: ...
def native_attention_forward(
    name: str,
    query: Any,
    key: Any,
    value: Any,
    out: Any,
    lse: Any | None,
    dense_mask: Any | None,
    bias: Any | None,
    sinks: Any | None,
    program: Any,
    program_ints: Any,
    program_bytes: Any,
    q_offset: int,
    kv_offset: int,
    scale: float,
    softcap: float,
    num_threads: int,
) -> None: ...
def register_native(name: str, capsule: Any) -> None: ...
def native_kernels() -> list[str]: ...
def native_info(name: str) -> dict[str, Any]: ...
def remove_native(name: str) -> bool: ...
def _test_capsule(kind: str) -> Any: ...
def cpu_features() -> list[str]: ...
def simd_path() -> str: ...
def _strided_copy(src: Any, dst: Any) -> None: ...
def _strided_sum(src: Any) -> float: ...
def _pool_threads(num_threads: int) -> int: ...
