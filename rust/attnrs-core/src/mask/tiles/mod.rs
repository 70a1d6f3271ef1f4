//! The contract between masks and kernels, and every mask a kernel can be handed.
//!
//! Kernels own their tiling; they ask a [`MaskTiles`] to classify each tile before touching it. Empty tiles
//! are skipped, full tiles run without any mask work, and only partial tiles get their visibility bytes.
//! This module owns that trait and its implementations: [`PlacedMask`] (a [`MaskExpr`](super::MaskExpr) at
//! offsets), [`DenseTiles`] (a bool tensor), [`BothTiles`] (their AND), [`NoMask`], and [`CallMask`], which
//! picks among them for one attention call. [`Grid`] is the `[B, H, Q, K]` a call (or a layout) covers.

use std::ops::Range;

mod both;
mod call;
mod dense;
mod placed;

pub use both::BothTiles;
pub use call::CallMask;
pub use dense::DenseTiles;
pub use placed::PlacedMask;

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

impl BlockClass {
    /// The class of a tile in which `any` pair / `all` pairs are visible (`all` wins: an empty tile is full).
    #[inline]
    pub fn of(any: bool, all: bool) -> BlockClass {
        if all {
            BlockClass::Full
        } else if any {
            BlockClass::Partial
        } else {
            BlockClass::Empty
        }
    }
}

/// The `[batch, heads, q, kv]` grid of one attention call or one layout: `batch` x `heads` planes of `q`
/// query rows against `kv` key columns. Rows and columns are indices (`0..q`, `0..kv`); where they sit in
/// absolute positions is the mask's business (see [`PlacedMask`]), not the grid's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Grid {
    pub batch: usize,
    pub heads: usize,
    pub q: usize,
    pub kv: usize,
}

impl Grid {
    pub fn new(batch: usize, heads: usize, q: usize, kv: usize) -> Grid {
        Grid {
            batch,
            heads,
            q,
            kv,
        }
    }

    /// `[batch, heads, q, kv]`.
    pub fn shape(&self) -> [usize; 4] {
        [self.batch, self.heads, self.q, self.kv]
    }

    /// `batch * heads * q * kv`, or `None` if it overflows.
    pub fn numel(&self) -> Option<usize> {
        self.shape()
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }
}

impl From<[usize; 4]> for Grid {
    fn from([batch, heads, q, kv]: [usize; 4]) -> Grid {
        Grid::new(batch, heads, q, kv)
    }
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

#[cfg(test)]
mod tests;
