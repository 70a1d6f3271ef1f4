//! The contract between masks and kernels, and every mask a kernel can be handed.
//!
//! Kernels own their tiling; they ask a [`MaskTiles`] to classify each tile before touching it. Empty tiles
//! are skipped, full tiles run without any mask work, and only partial tiles get their visibility ([`TileVis`]:
//! a run of visible columns per row where the mask has one, else bytes).
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

    /// The tile's visibility as one run of visible columns per row, when the mask has that shape (causal,
    /// sliding and document masks do): writes `out[i] = (a, e)`, column offsets into `cols` with `a <= e`,
    /// and returns true. False (with `out` unspecified) means "fill instead"; that is the default. `out.len()`
    /// is `rows.len()`.
    fn spans(
        &self,
        _b: usize,
        _h: usize,
        _rows: Range<usize>,
        _cols: Range<usize>,
        _out: &mut [(u32, u32)],
    ) -> bool {
        false
    }
}

/// A partial tile's visibility as kernels read it, loaded once per tile ([`TileVis::load`]) and read row by
/// row ([`TileVis::row`]): per-row runs of visible columns where the mask gives them (so a causal diagonal
/// tile costs two `fill`s of -inf per row, not a byte per pair), else one byte per pair.
#[derive(Debug, Clone, Default)]
pub struct TileVis {
    spans: Vec<(u32, u32)>,
    bytes: Vec<u8>,
    width: usize,
    by_span: bool,
}

/// One row of a [`TileVis`].
#[derive(Debug, Clone, Copy)]
pub enum RowVis<'a> {
    /// Columns `a..e` are visible, the rest hidden.
    Span(usize, usize),
    /// One byte per column, 0 = hidden.
    Bytes(&'a [u8]),
}

impl TileVis {
    /// Room for tiles of up to `rows` x `cols`.
    pub fn new(rows: usize, cols: usize) -> TileVis {
        TileVis {
            spans: vec![(0, 0); rows],
            bytes: vec![0; rows * cols],
            width: 0,
            by_span: false,
        }
    }

    /// Evaluates the tile `rows x cols` of `mask` (within the size given to [`TileVis::new`]).
    pub fn load(
        &mut self,
        mask: &dyn MaskTiles,
        b: usize,
        h: usize,
        rows: Range<usize>,
        cols: Range<usize>,
    ) {
        let (m, n) = (rows.len(), cols.len());
        self.width = n;
        self.by_span = mask.spans(b, h, rows.clone(), cols.clone(), &mut self.spans[..m]);
        if !self.by_span {
            mask.fill(b, h, rows, cols, &mut self.bytes[..m * n]);
        }
    }

    /// Row `i` of the tile last loaded.
    #[inline]
    pub fn row(&self, i: usize) -> RowVis<'_> {
        if self.by_span {
            let (a, e) = self.spans[i];
            RowVis::Span(a as usize, e as usize)
        } else {
            RowVis::Bytes(&self.bytes[i * self.width..(i + 1) * self.width])
        }
    }
}

impl RowVis<'_> {
    /// Sets the hidden entries of `x` (the row's `n` real columns) to `hidden`.
    #[inline(always)]
    pub fn hide<A: Copy>(self, x: &mut [A], hidden: A) {
        match self {
            RowVis::Span(a, e) => {
                x[..a].fill(hidden);
                x[e..].fill(hidden);
            }
            RowVis::Bytes(seen) => {
                for (v, &s) in x.iter_mut().zip(seen) {
                    if s == 0 {
                        *v = hidden;
                    }
                }
            }
        }
    }
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
    fn spans(
        &self,
        _: usize,
        _: usize,
        _: Range<usize>,
        cols: Range<usize>,
        out: &mut [(u32, u32)],
    ) -> bool {
        let Ok(n) = u32::try_from(cols.len()) else {
            return false;
        };
        out.fill((0, n));
        true
    }
}

#[cfg(test)]
mod tests;
