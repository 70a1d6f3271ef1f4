"""Pictures of masks: text drawings of small ones and their block layouts, PNG or SVG files of any size.

Text uses transformers' mask-visualiser glyphs (``■`` visible, ``⬚`` masked); block layouts use ``█`` for full
blocks (no mask work), ``▒`` for partial ones and ``·`` for empty (skipped) ones.
"""

from __future__ import annotations

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


def _block_classes(block_mask: BlockMask, batch: int = 0, head: int = 0) -> torch.Tensor:
    """``[q blocks, kv blocks]`` uint8: 0 empty, 1 partial, 2 full (as :func:`_block_grid`, without Python loops)."""
    n_q = block_mask.kv_num_blocks.shape[-1]
    n_kv = -(-block_mask.seq_lengths[1] // block_mask.BLOCK_SIZE[1])
    out = torch.zeros(n_q, n_kv, dtype=torch.uint8)
    b = min(batch, block_mask.kv_num_blocks.shape[0] - 1)
    h = min(head, block_mask.kv_num_blocks.shape[1] - 1)
    for value, counts, indices in (
        (1, block_mask.kv_num_blocks, block_mask.kv_indices),
        (2, block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    ):
        if counts is None or indices is None:
            continue
        index = indices[b, h].long()
        used = torch.arange(index.shape[-1])[None, :] < counts[b, h].long()[:, None]
        rows = torch.arange(n_q)[:, None].expand_as(index)
        out[rows[used], index[used]] = value
    return out


# Colours of the picture, by class: (legend label, RGB).
_FINE = (
    ("masked (empty block: skipped)", (255, 255, 255)),
    ("masked (partial block)", (250, 214, 165)),
    ("visible (partial block)", (74, 123, 208)),
    ("visible (full block: no mask work)", (22, 45, 97)),
)
_PLAIN = (("masked", (255, 255, 255)), ("", (0, 0, 0)), ("", (0, 0, 0)), ("visible", (22, 45, 97)))
_COARSE = (
    ("all masked", (255, 255, 255)),
    ("", (0, 0, 0)),
    ("partly visible", (120, 160, 225)),
    ("all visible", (22, 45, 97)),
)
MAX_BOUNDARIES = 64  # block boundaries drawn per axis at most; denser ones would hide the mask


def write_png(
    path: str | Path,
    mask: MaskLike,
    q_len: int,
    kv_len: int | None = None,
    *,
    block: int | None = None,
    max_pixels: int = 1024,
    q_offset: int = 0,
    kv_offset: int = 0,
    title: str | None = None,
) -> tuple[int, int]:
    """Draws the mask with matplotlib into ``path`` (``.png`` or ``.svg``, from the suffix) and returns the
    picture's (height, width) in pixels. Needs matplotlib (``pip install "attnrs[bench]"``).

    The axes carry absolute positions (offsets included): query positions down, key positions across. Masks of
    up to ``max_pixels`` positions a side are drawn cell by cell, upscaled without smoothing, so a 16x16 mask is
    as legible as a 1000x1000 one; with ``block``, the cells are shaded by their ``block x block`` block (full,
    partial, empty, as a BlockMask classifies them) and the block boundaries are drawn (up to 64 a side).
    Longer masks are drawn from a block layout (power-of-two cells, at most ``max_pixels`` a side: all visible,
    partly visible, all masked); no dense grid is built. The picture has the same size at every length."""
    from .plots import legend_below, new_figure, save

    kv_len = q_len if kv_len is None else kv_len
    mask = from_callable(mask)

    def cell_of(length: int) -> int:  # positions per picture cell along one axis: 1, or a power of two
        return 1 if length <= max_pixels else 1 << (-(-length // max_pixels) - 1).bit_length()

    q_cell, kv_cell = cell_of(q_len), cell_of(kv_len)
    if q_cell == kv_cell == 1:
        dense = create_dense_mask(mask, 1, 1, q_len, kv_len, q_offset=q_offset, kv_offset=kv_offset)[0, 0]
        if block is None:
            classes, palette = torch.where(dense, 3, 0), _PLAIN
        else:
            layout = create_block_mask(
                mask, 1, None, q_len, kv_len, BLOCK_SIZE=block, q_offset=q_offset, kv_offset=kv_offset
            )
            per_block = _block_classes(layout)
            per_cell = per_block.repeat_interleave(block, 0)[:q_len].repeat_interleave(block, 1)[:, :kv_len]
            classes, palette = (
                torch.where(dense, 2 + (per_cell == 2).to(torch.uint8), (per_cell == 1).to(torch.uint8)),
                _FINE,
            )
        note = f"one cell per position ({q_len}x{kv_len})"
    else:
        layout = create_block_mask(
            mask, 1, None, q_len, kv_len, BLOCK_SIZE=(q_cell, kv_cell), q_offset=q_offset, kv_offset=kv_offset
        )
        per_cell = _block_classes(layout)  # 0 all masked, 1 partly visible, 2 all visible
        note = f"one cell per {q_cell}x{kv_cell} positions (query x key)"
        if block is not None and block % q_cell == 0 and block % kv_cell == 0:  # shaded by --block blocks too
            blocks = _block_classes(
                create_block_mask(
                    mask, 1, None, q_len, kv_len, BLOCK_SIZE=block, q_offset=q_offset, kv_offset=kv_offset
                )
            )
            shape = per_cell.shape
            in_block = blocks.repeat_interleave(block // q_cell, 0)[: shape[0]]
            in_block = in_block.repeat_interleave(block // kv_cell, 1)[:, : shape[1]]
            visible = (per_cell > 0).to(torch.uint8)
            classes = torch.where(in_block == 2, 3, torch.where(in_block == 1, 1 + visible, 0))
            palette = _FINE
        else:
            classes, palette = torch.where(per_cell == 2, 3, torch.where(per_cell == 1, 2, 0)), _COARSE
    colours = torch.tensor([rgb for _, rgb in palette], dtype=torch.uint8)
    image = colours[classes.long()].numpy()

    q_end, kv_end = q_offset + q_len, kv_offset + kv_len
    ratio = q_len / max(kv_len, 1)
    fig = new_figure(9.0, 9.0 if ratio >= 1 else 2.4 + 6.6 * max(ratio, 0.25))  # wide masks: a lower figure
    ax = fig.add_subplot()
    ax.imshow(
        image,
        interpolation="nearest" if max(image.shape[:2]) <= 600 else "antialiased",
        extent=(kv_offset - 0.5, kv_end - 0.5, q_end - 0.5, q_offset - 0.5),
        aspect="equal" if 0.25 <= ratio <= 4 else "auto",
    )
    from matplotlib.ticker import MaxNLocator

    for axis, length, start in ((ax.xaxis, kv_len, kv_offset), (ax.yaxis, q_len, q_offset)):
        if length <= 32:
            axis.set_ticks(range(start, start + length))
        elif block is not None and length // block <= 4 * MAX_BOUNDARIES:  # ticks on block starts
            every = block * (1 << (-(-(length // block) // 12) - 1).bit_length())  # a power of two of blocks
            axis.set_ticks(range(start, start + length, every))
        else:
            axis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.tick_params(labelsize=8 if max(q_len, kv_len) <= 32 else 9)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    used = set(torch.unique(classes).tolist())
    handles: list[Patch | Line2D] = [
        Patch(facecolor=(rgb[0] / 255, rgb[1] / 255, rgb[2] / 255), edgecolor="0.5", label=label)
        for i, (label, rgb) in enumerate(palette)
        if label and (i in used or palette is not _FINE)
    ]
    if block is not None:
        q_lines = [q_offset + k * block - 0.5 for k in range(1, -(-q_len // block))]
        kv_lines = [kv_offset + k * block - 0.5 for k in range(1, -(-kv_len // block))]
        if len(q_lines) < MAX_BOUNDARIES and len(kv_lines) < MAX_BOUNDARIES:
            ax.hlines(q_lines, kv_offset - 0.5, kv_end - 0.5, colors="0.55", linewidths=0.8)
            ax.vlines(kv_lines, q_offset - 0.5, q_end - 0.5, colors="0.55", linewidths=0.8)
            handles.append(Line2D([], [], color="0.55", linewidth=0.8, label=f"block boundary (every {block})"))
        else:
            note += f"; {block}x{block} block boundaries not drawn (over {MAX_BOUNDARIES} a side)"
    legend_below(fig, handles, 3, 2)
    heading = title or f"{mask!r}"
    if len(heading) > 90:
        heading = heading[:87] + "..."
    offsets = f", q_offset {q_offset}, kv_offset {kv_offset}" if q_offset or kv_offset else ""
    full_title = f"{heading}\nQ={q_len} K={kv_len}{offsets}; {note}"
    fig.suptitle(full_title, fontsize=10)
    return save(fig, path, full_title)
