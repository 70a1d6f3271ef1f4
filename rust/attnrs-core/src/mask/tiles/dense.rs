//! A dense bool mask tensor as tiles.

use std::ops::Range;

use super::{BlockClass, MaskTiles};
use crate::tensor::{DType, TensorView};
use crate::{Error, Result};

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
        BlockClass::of(any, all)
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
