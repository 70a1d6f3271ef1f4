//! The contract between masks and kernels: which (query, key) pairs of a tile are visible.
//!
//! Kernels own their tiling; they ask a [`MaskTiles`] to classify each tile before touching it. Empty tiles
//! are skipped, full tiles run without any mask work, and only partial tiles get their visibility bytes.

use std::ops::Range;

use crate::tensor::{DType, TensorView};
use crate::{Error, Result};

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
}

/// A dense boolean mask tensor viewed as `[B, H, Q, K]` (broadcast dims have stride 0): tiles are classified by
/// scanning them, which costs O(Q*K) reads in all, like the tensor itself.
#[derive(Debug, Clone)]
pub struct DenseTiles {
    view: TensorView,
}

impl DenseTiles {
    /// Wraps a bool (or uint8) view broadcastable to `shape = [B, H, Q, K]` (torch's rules: dims align to
    /// the right, size-1 dims repeat), so every `(b, h, i, j)` inside `shape` addresses an element of `view`.
    pub fn new(view: TensorView, shape: [usize; 4]) -> Result<DenseTiles> {
        if !matches!(view.dtype(), DType::Bool | DType::U8) {
            return Err(Error::dtype(
                "attn_mask",
                "torch.bool",
                view.dtype().torch_name(),
            ));
        }
        let expected = || format!("a mask broadcastable to {shape:?}");
        if view.ndim() > 4 {
            return Err(Error::shape(
                "attn_mask",
                expected(),
                format!("{:?}", view.shape()),
            ));
        }
        let skip = 4 - view.ndim();
        let mut strides = [0isize; 4];
        for d in 0..4 {
            if d < skip {
                continue;
            }
            let (n, s) = (view.shape()[d - skip], view.strides()[d - skip]);
            if n == shape[d] {
                strides[d] = if n == 1 { 0 } else { s };
            } else if n != 1 {
                return Err(Error::shape(
                    "attn_mask",
                    expected(),
                    format!("{:?}", view.shape()),
                ));
            }
        }
        // SAFETY: every index inside `shape` maps, through stride 0 on broadcast dims, to an index inside the
        // original view's shape, so the new view addresses only elements the original one does.
        let view = unsafe {
            TensorView::new(
                view.as_ptr(),
                view.dtype(),
                shape.to_vec(),
                strides.to_vec(),
            )
        }?;
        Ok(DenseTiles { view })
    }

    /// Shape `[B, H, Q, K]` of the mask.
    pub fn shape(&self) -> &[usize] {
        self.view.shape()
    }

    #[inline]
    fn row(
        &self,
        b: usize,
        h: usize,
        i: usize,
        cols: Range<usize>,
    ) -> impl Iterator<Item = u8> + '_ {
        let s = self.view.strides();
        let base = b as isize * s[0] + h as isize * s[1] + i as isize * s[2];
        let ptr = self.view.as_ptr();
        cols.map(move |j| {
            // SAFETY: callers pass b, h, i, j inside the view's shape (the MaskTiles contract), so the offset
            // addresses an element of the imported tensor, which outlives `self`.
            unsafe { *ptr.offset(base + j as isize * s[3]) }
        })
    }
}

impl MaskTiles for DenseTiles {
    fn classify(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>) -> BlockClass {
        let (mut any, mut all) = (false, true);
        for i in rows {
            for v in self.row(b, h, i, cols.clone()) {
                any |= v != 0;
                all &= v != 0;
            }
            if any && !all {
                return BlockClass::Partial;
            }
        }
        if all {
            BlockClass::Full
        } else if any {
            BlockClass::Partial
        } else {
            BlockClass::Empty
        }
    }
    fn fill(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>, out: &mut [u8]) {
        let width = cols.len();
        for (i, dst) in rows.zip(out.chunks_exact_mut(width)) {
            for (d, v) in dst.iter_mut().zip(self.row(b, h, i, cols.clone())) {
                *d = u8::from(v != 0);
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

    #[test]
    fn dense_tiles_and_both() {
        // A 3x4 mask broadcast to 1x2x3x4.
        let mut bits: Vec<u8> = vec![1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0];
        // SAFETY: the view addresses only the 12 bytes of `bits`.
        let view =
            unsafe { TensorView::new(bits.as_mut_ptr(), DType::Bool, vec![3, 4], vec![4, 1]) };
        let dense = DenseTiles::new(view.unwrap(), [1, 2, 3, 4]).unwrap();
        // SAFETY: as above.
        let wrong =
            unsafe { TensorView::new(bits.as_mut_ptr(), DType::Bool, vec![3, 4], vec![4, 1]) };
        assert!(DenseTiles::new(wrong.unwrap(), [1, 2, 3, 5]).is_err());
        assert_eq!(dense.classify(0, 1, 0..2, 0..2), BlockClass::Full);
        assert_eq!(dense.classify(0, 1, 0..2, 0..4), BlockClass::Partial);
        assert_eq!(dense.classify(0, 0, 2..3, 0..4), BlockClass::Empty);
        let mut out = vec![9u8; 8];
        dense.fill(0, 1, 0..2, 0..4, &mut out);
        assert_eq!(out, [1, 1, 0, 0, 1, 1, 1, 1]);
        let both = BothTiles {
            first: &dense,
            second: &CausalTiles { diagonal: 0 },
        };
        assert_eq!(both.classify(0, 0, 1..2, 0..4), BlockClass::Partial);
        both.fill(0, 0, 1..2, 0..4, &mut out[..4]);
        assert_eq!(&out[..4], [1, 1, 0, 0]);
        assert_eq!(both.classify(0, 0, 2..3, 0..1), BlockClass::Empty);
    }
}
