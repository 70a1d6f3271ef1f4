//! The contract between masks and kernels: which (query, key) pairs of a tile are visible.
//!
//! Kernels own their tiling; they ask a [`MaskTiles`] to classify each tile before touching it. Empty tiles
//! are skipped, full tiles run without any mask work, and only partial tiles get their visibility bytes.

use std::ops::Range;

/// How much of a rectangular tile of the (query, key) grid is visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockClass {
    /// No pair is visible: the tile can be skipped.
    Empty,
    /// Every pair is visible: no mask needs to be applied.
    Full,
    /// Some pairs are visible: the mask must be evaluated element by element.
    Partial,
}

/// A mask as a kernel sees it. Rows and columns are indices into the query and key tensors
/// (`0..Q`, `0..K`); whoever builds the `MaskTiles` maps them to absolute positions.
pub trait MaskTiles: Sync {
    /// Exact class of the tile `rows x cols` for batch `b` and query head `h`. Both ranges are non-empty
    /// and lie inside `0..Q` and `0..K`.
    fn classify(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>) -> BlockClass;

    /// Writes visibility (1 = visible, 0 = masked) of the tile, row-major, into `out`, whose length is
    /// `rows.len() * cols.len()`.
    fn fill(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>, out: &mut [u8]);
}

/// Every pair visible (no mask).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMask;

impl MaskTiles for NoMask {
    fn classify(&self, _: usize, _: usize, _: Range<usize>, _: Range<usize>) -> BlockClass {
        BlockClass::Full
    }
    fn fill(&self, _: usize, _: usize, _: Range<usize>, _: Range<usize>, out: &mut [u8]) {
        out.fill(1);
    }
}

/// SDPA's `is_causal=True`: key `j` is visible from row `i` when `j <= i + diagonal`
/// (`diagonal = 0` is the top-left alignment SDPA uses; `K - Q` aligns bottom-right).
#[derive(Debug, Clone, Copy)]
pub struct CausalTiles {
    pub diagonal: i64,
}

impl MaskTiles for CausalTiles {
    fn classify(&self, _: usize, _: usize, rows: Range<usize>, cols: Range<usize>) -> BlockClass {
        let first_row_last_visible = rows.start as i64 + self.diagonal;
        let last_row_last_visible = rows.end as i64 - 1 + self.diagonal;
        if (cols.end as i64 - 1) <= first_row_last_visible {
            BlockClass::Full
        } else if (cols.start as i64) > last_row_last_visible {
            BlockClass::Empty
        } else {
            BlockClass::Partial
        }
    }
    fn fill(&self, _: usize, _: usize, rows: Range<usize>, cols: Range<usize>, out: &mut [u8]) {
        let width = cols.len();
        for (r, row) in rows.zip(out.chunks_exact_mut(width)) {
            let last = r as i64 + self.diagonal; // last visible column
            for (c, v) in cols.clone().zip(row.iter_mut()) {
                *v = u8::from(c as i64 <= last);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_classes_agree_with_fill() {
        for diagonal in [-3i64, 0, 2, 7] {
            let tiles = CausalTiles { diagonal };
            for r0 in 0..6 {
                for r1 in r0 + 1..8 {
                    for c0 in 0..6 {
                        for c1 in c0 + 1..8 {
                            let mut out = vec![0u8; (r1 - r0) * (c1 - c0)];
                            tiles.fill(0, 0, r0..r1, c0..c1, &mut out);
                            let visible = out.iter().filter(|v| **v == 1).count();
                            let expected = match visible {
                                0 => BlockClass::Empty,
                                n if n == out.len() => BlockClass::Full,
                                _ => BlockClass::Partial,
                            };
                            assert_eq!(tiles.classify(0, 0, r0..r1, c0..c1), expected);
                        }
                    }
                }
            }
        }
    }
}
