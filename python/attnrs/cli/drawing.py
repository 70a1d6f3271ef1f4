"""Pictures of masks: text drawings of small ones and their block layouts, PNG files of large ones.

Text uses transformers' mask-visualiser glyphs (``■`` visible, ``⬚`` masked); block layouts use ``█`` for full
blocks (no mask work), ``▒`` for partial ones and ``·`` for empty (skipped) ones.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

from ..masks.block_mask import BlockMask, create_block_mask
from ..masks.dense import create_dense_mask
from ..masks.mask import MaskLike, from_callable

__all__ = ["draw_block_layout", "draw_mask", "write_png"]

VISIBLE, MASKED = "■", "⬚"
FULL, PARTIAL, EMPTY = "█", "▒", "·"


def draw_mask(
    mask: MaskLike,
    q_len: int,
    kv_len: int | None = None,
    *,
    batch: int = 0,
    head: int = 0,
    q_offset: int = 0,
    kv_offset: int = 0,
) -> str:
    """Rows of ``■``/``⬚`` for one (batch, head) of the mask, with absolute positions in the margins."""
    kv_len = q_len if kv_len is None else kv_len
    dense = create_dense_mask(
        from_callable(mask), batch + 1, head + 1, q_len, kv_len, q_offset=q_offset, kv_offset=kv_offset
    )
    grid = dense[batch, min(head, dense.shape[1] - 1)]
    width = len(str(q_offset + q_len - 1))
    header = " " * (width + 1) + "".join(str((kv_offset + j) % 10) for j in range(kv_len))
    lines = [header]
    for i in range(q_len):
        row = "".join(VISIBLE if v else MASKED for v in grid[i].tolist())
        lines.append(f"{q_offset + i:>{width}} {row}")
    return "\n".join(lines)


def _block_grid(block_mask: BlockMask, batch: int, head: int) -> list[list[str]]:
    n_q, n_kv = block_mask.kv_num_blocks.shape[-1], -(-block_mask.seq_lengths[1] // block_mask.BLOCK_SIZE[1])
    cells = [[EMPTY] * n_kv for _ in range(n_q)]
    b = min(batch, block_mask.kv_num_blocks.shape[0] - 1)
    h = min(head, block_mask.kv_num_blocks.shape[1] - 1)
    for glyph, counts, indices in (
        (PARTIAL, block_mask.kv_num_blocks, block_mask.kv_indices),
        (FULL, block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    ):
        if counts is None:
            continue
        for row in range(n_q):
            for j in indices[b, h, row, : int(counts[b, h, row])].tolist():
                cells[row][j] = glyph
    return cells


def draw_block_layout(block_mask: BlockMask, *, batch: int = 0, head: int = 0) -> str:
    """One character per block: ``█`` full, ``▒`` partial, ``·`` empty."""
    cells = _block_grid(block_mask, batch, head)
    q_block, kv_block = block_mask.BLOCK_SIZE
    full = sum(row.count(FULL) for row in cells)
    partial = sum(row.count(PARTIAL) for row in cells)
    total = sum(len(row) for row in cells)
    lines = [f"blocks {q_block}x{kv_block}: {full} full, {partial} partial, {total - full - partial} empty of {total}"]
    lines += ["".join(row) for row in cells]
    return "\n".join(lines)


def write_png(
    path: str | Path,
    mask: MaskLike,
    q_len: int,
    kv_len: int | None = None,
    *,
    max_pixels: int = 1024,
    q_offset: int = 0,
    kv_offset: int = 0,
) -> tuple[int, int]:
    """Writes a grayscale picture of the mask (black = visible) and returns its (height, width).

    Large masks are drawn from their block layout, one pixel per block (black full, grey partial, white
    empty), with blocks sized so that the picture is at most ``max_pixels`` on a side; no dense grid is built."""
    kv_len = q_len if kv_len is None else kv_len
    mask = from_callable(mask)
    if max(q_len, kv_len) <= max_pixels:
        dense = create_dense_mask(mask, 1, 1, q_len, kv_len, q_offset=q_offset, kv_offset=kv_offset)[0, 0]
        pixels = torch.where(dense, 0, 255).to(torch.uint8)
    else:
        block = -(-max(q_len, kv_len) // max_pixels)
        layout = create_block_mask(
            mask, 1, None, q_len, kv_len, BLOCK_SIZE=block, q_offset=q_offset, kv_offset=kv_offset
        )
        shade = {FULL: 0, PARTIAL: 128, EMPTY: 255}
        pixels = torch.tensor([[shade[c] for c in row] for row in _block_grid(layout, 0, 0)], dtype=torch.uint8)
    _write_gray_png(Path(path), pixels)
    return int(pixels.shape[0]), int(pixels.shape[1])


def _write_gray_png(path: Path, pixels: torch.Tensor) -> None:
    """A minimal 8-bit grayscale PNG encoder (zlib from the standard library)."""
    height, width = pixels.shape
    raw = b"".join(b"\x00" + bytes(row) for row in pixels.tolist())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    )
