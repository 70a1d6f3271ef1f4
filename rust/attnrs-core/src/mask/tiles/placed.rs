//! A mask expression placed on a grid: the [`MaskTiles`] a kernel consumes.

use std::ops::Range;

use super::{BlockClass, Grid, MaskTiles};
use crate::mask::MaskExpr;
use crate::{Error, Result};

/// `expr` seen from a `[Q, K]` grid whose row `i` is query position `q_offset + i` and column `j` is key
/// position `kv_offset + j`.
#[derive(Debug, Clone)]
pub struct PlacedMask {
    pub expr: MaskExpr,
    pub q_offset: i64,
    pub kv_offset: i64,
}

impl PlacedMask {
    pub fn new(expr: MaskExpr, q_offset: i64, kv_offset: i64) -> PlacedMask {
        PlacedMask {
            expr,
            q_offset,
            kv_offset,
        }
    }

    /// The one check of a mask against the grid it is used on, for every path (attention, dense fills,
    /// block layouts): its tables have 1 or `grid.batch` rows (and bitmaps 1 or `grid.heads` heads), and
    /// every absolute position (offset + length) fits in `i64`. Evaluation relies on both.
    pub fn check(&self, grid: Grid) -> Result<()> {
        self.expr.check_dims(grid.batch, grid.heads)?;
        let end = |arg: &str, offset: i64, len: usize| {
            i64::try_from(len)
                .ok()
                .and_then(|n| offset.checked_add(n))
                .map(|_| ())
                .ok_or_else(|| {
                    Error::value(
                        arg,
                        "an offset + length that fits in i64",
                        format!("{offset} + {len}"),
                    )
                })
        };
        end("q_offset", self.q_offset, grid.q)?;
        end("kv_offset", self.kv_offset, grid.kv)
    }

    fn place(&self, rows: Range<usize>, cols: Range<usize>) -> (Range<i64>, Range<i64>) {
        (
            self.q_offset + rows.start as i64..self.q_offset + rows.end as i64,
            self.kv_offset + cols.start as i64..self.kv_offset + cols.end as i64,
        )
    }
}

impl MaskTiles for PlacedMask {
    fn classify(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>) -> BlockClass {
        let (q, k) = self.place(rows, cols);
        self.expr.classify(b, h, q, k)
    }

    fn fill(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>, out: &mut [u8]) {
        let (q, k) = self.place(rows, cols);
        self.expr.fill(b, h, q, k, out);
    }

    fn spans(
        &self,
        b: usize,
        _h: usize,
        rows: Range<usize>,
        cols: Range<usize>,
        out: &mut [(u32, u32)],
    ) -> bool {
        let (q, k) = self.place(rows, cols);
        self.expr.spans(b, q, k, out)
    }
}
