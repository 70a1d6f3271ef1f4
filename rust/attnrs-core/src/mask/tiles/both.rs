//! The AND of two masks, tile by tile.

use std::ops::Range;

use super::{BlockClass, MaskTiles};

/// Visible where both masks are. Classes combine conservatively (two partial tiles stay partial even if
/// their intersection is empty), which costs work but never correctness: a partial tile is filled exactly.
#[derive(Clone, Copy)]
pub struct BothTiles<'a> {
    pub first: &'a dyn MaskTiles,
    pub second: &'a dyn MaskTiles,
}

impl std::fmt::Debug for BothTiles<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BothTiles")
    }
}

impl MaskTiles for BothTiles<'_> {
    fn classify(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>) -> BlockClass {
        match self.first.classify(b, h, rows.clone(), cols.clone()) {
            BlockClass::Empty => BlockClass::Empty,
            BlockClass::Full => self.second.classify(b, h, rows, cols),
            BlockClass::Partial => match self.second.classify(b, h, rows, cols) {
                BlockClass::Empty => BlockClass::Empty,
                _ => BlockClass::Partial,
            },
        }
    }
    fn fill(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>, out: &mut [u8]) {
        self.first.fill(b, h, rows.clone(), cols.clone(), out);
        let mut other = vec![0u8; out.len()];
        self.second.fill(b, h, rows, cols, &mut other);
        out.iter_mut().zip(&other).for_each(|(o, x)| *o &= x);
    }
    fn spans(
        &self,
        b: usize,
        h: usize,
        rows: Range<usize>,
        cols: Range<usize>,
        out: &mut [(u32, u32)],
    ) -> bool {
        // The second part is the dense tensor in a call mask, which has no spans: ask it first, into `out`,
        // so that answer costs no allocation (this runs once per partial tile).
        if !self.second.spans(b, h, rows.clone(), cols.clone(), out) {
            return false;
        }
        let mut other = vec![(0, 0); out.len()];
        if !self.first.spans(b, h, rows, cols, &mut other) {
            return false;
        }
        for ((a, e), &(a2, e2)) in out.iter_mut().zip(&other) {
            (*a, *e) = ((*a).max(a2), (*e).min(e2));
            *e = (*e).max(*a);
        }
        true
    }
}
