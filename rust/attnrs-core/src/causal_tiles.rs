//! Temporary: `CausalTiles`, kept only for the kernel tests and timing examples that still name it; removed
//! when the kernel branch merges (they use a [`PlacedMask`](crate::mask::PlacedMask) over
//! [`MaskExpr::causal_with_offset`](crate::mask::MaskExpr::causal_with_offset) instead, which is the same mask).

use std::ops::Range;

use crate::mask::tiles::{BlockClass, MaskTiles};

/// SDPA's `is_causal=True`: key `j` is visible from row `i` when `j <= i + diagonal`
/// (`diagonal = 0` is the top-left alignment SDPA uses; `K - Q` aligns bottom-right).
#[doc(hidden)]
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
    use crate::mask::{MaskExpr, PlacedMask};

    #[test]
    fn causal_tiles_equal_a_placed_causal_expression() {
        for diagonal in [-3i64, 0, 2, 7] {
            let tiles = CausalTiles { diagonal };
            let placed = PlacedMask::new(MaskExpr::causal_with_offset(diagonal), 0, 0);
            for r0 in 0..6 {
                for r1 in r0 + 1..8 {
                    for c0 in 0..6 {
                        for c1 in c0 + 1..8 {
                            let mut out = vec![0u8; (r1 - r0) * (c1 - c0)];
                            tiles.fill(0, 0, r0..r1, c0..c1, &mut out);
                            let visible = out.iter().filter(|v| **v == 1).count();
                            let expected = BlockClass::of(visible > 0, visible == out.len());
                            assert_eq!(tiles.classify(0, 0, r0..r1, c0..c1), expected);
                            assert_eq!(placed.classify(0, 0, r0..r1, c0..c1), expected);
                            let mut again = vec![9u8; out.len()];
                            placed.fill(0, 0, r0..r1, c0..c1, &mut again);
                            assert_eq!(again, out);
                        }
                    }
                }
            }
        }
    }
}
