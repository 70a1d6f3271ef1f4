"""The packed mask program of a structural :class:`~attnrs.masks.Mask`, built with torch ops.

The attention operators take a structural mask as ONE flat ``torch.uint8`` tensor, the ``mask_program``
(``rust/attnrs-py/src/operand.rs`` defines the format, ``rust/attnrs-core/src/mask/program.rs`` the words): a
32-byte header (the magic ``attnrsM1`` and three section lengths), the program (i64 words: opcodes and
parameters, children before their parent), the ints table (document ids, chunk starts, prefix lengths) and the
bytes table (padding flags).

The program words and every section length depend only on the expression and the shapes of its tables, so they
are plain Python ints, constants of a ``torch.compile`` graph; the tables are tensors concatenated in with torch
ops, so a new padding mask (or new document ids) of the same shape flows through a compiled graph without
recompiling it. Nothing here reads a table's values: Rust decodes and validates the whole program when an
operator runs (a bad value is a typed error naming the argument then), so this is traceable end to end. The
words are the ones ``_attnrs.mask_operand`` writes for the same expression (``tests/test_compile.py`` compares
them byte for byte).

Masks with a callable part are evaluated by Rust on the grid (a bitmap) and packed there; they are not built
here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

__all__ = ["MAGIC", "encode_program"]

MAGIC = int.from_bytes(b"attnrsM1", "little")  # the header's first word, as operand.rs's MAGIC

# Opcodes of rust/attnrs-core/src/mask/program.rs, by Mask kind.
_OPCODES = {
    "full": 0,
    "empty": 1,
    "causal": 2,
    "sliding_window": 3,
    "sliding_overlay": 4,
    "chunked": 5,
    "padding": 6,
    "document": 7,
    "prefix_lm": 8,
    "and": 10,
    "or": 11,
    "not": 12,
    "shift": 13,
}


class Node(Protocol):
    """What the encoder reads of a :class:`~attnrs.masks.Mask` (its kind, parameters and children)."""

    @property
    def kind(self) -> str: ...
    @property
    def params(self) -> Mapping[str, Any]: ...
    @property
    def children(self) -> tuple[Node, ...]: ...


class _Writer:
    """The program words (ints) and the table tensors of one expression, appended in encoding order."""

    def __init__(self) -> None:
        self.words: list[int] = []
        self.ints: list[torch.Tensor] = []  # int64, flat
        self.n_ints = 0
        self.bytes: list[torch.Tensor] = []  # uint8, flat
        self.n_bytes = 0

    def int_table(self, table: torch.Tensor) -> int:
        """Appends ``table`` to the ints section; returns where it starts."""
        at = self.n_ints
        self.ints.append(table.to(torch.int64).reshape(-1))
        self.n_ints += table.numel()
        return at

    def byte_table(self, table: torch.Tensor) -> int:
        """Appends ``table`` (bool or uint8) to the bytes section; returns where it starts."""
        at = self.n_bytes
        self.bytes.append(table.to(torch.uint8).reshape(-1))
        self.n_bytes += table.numel()
        return at

    def write(self, mask: Node, dq: int = 0, dk: int = 0) -> None:
        """Writes ``mask`` seen through the offsets ``(dq, dk)``, simplified as Rust's constructors simplify
        (nested shifts merge, a zero shift vanishes, ``and``/``or`` flatten, a double ``not`` cancels)."""
        kind, p = mask.kind, mask.params
        words = self.words
        if kind == "shift":
            self.write(mask.children[0], dq + p["q"], dk + p["kv"])
            return
        if kind in ("full", "empty"):
            words.append(_OPCODES[kind])
        elif kind == "causal":
            words += [_OPCODES[kind], p["offset"]]
        elif kind == "sliding_window":
            words += [_OPCODES[kind], p["window"], int(p["causal"])]
        elif kind == "sliding_overlay":
            words += [_OPCODES[kind], p["window"]]
        elif kind == "chunked":
            start = p["per_batch"]
            words += [_OPCODES[kind], p["size"], self.int_table(start), start.numel()]
        elif kind == "padding":
            table = p["table"]
            words += [_OPCODES[kind], table.shape[0], table.shape[1], self.byte_table(table)]
        elif kind == "document":
            table = p["table"]
            words += [_OPCODES[kind], table.shape[0], table.shape[1], self.int_table(table)]
        elif kind == "prefix_lm":
            lengths = p["per_batch"]
            words += [_OPCODES[kind], self.int_table(lengths), lengths.numel()]
        elif kind in ("and", "or"):
            parts = [g for c in mask.children for g in (c.children if c.kind == kind else (c,))]
            for part in parts:
                self.write(part)
            words += [_OPCODES[kind], len(parts)]
        elif kind == "not":
            inner = mask.children[0]
            if inner.kind == "not":
                self.write(inner.children[0])
            else:
                self.write(inner)
                words.append(_OPCODES[kind])
        else:
            raise AssertionError(f"encode_program: a {kind!r} node is not structural")
        if dq or dk:
            words += [_OPCODES["shift"], dq, dk]


def encode_program(mask: Node, q_offset: int, kv_offset: int) -> torch.Tensor:
    """The packed ``mask_program`` (1-D uint8, CPU) of the structural ``mask`` placed so that row 0 is query
    position ``q_offset`` and column 0 key position ``kv_offset`` (the expression shifted by the offsets)."""
    writer = _Writer()
    writer.write(mask, int(q_offset), int(kv_offset))
    header = [MAGIC, len(writer.words), writer.n_ints, writer.n_bytes]
    words = torch.tensor(header + writer.words, dtype=torch.int64)
    if writer.ints:
        words = torch.cat([words, *writer.ints])
    parts = [words.view(torch.uint8), *writer.bytes]
    return torch.cat(parts) if len(parts) > 1 else parts[0]
