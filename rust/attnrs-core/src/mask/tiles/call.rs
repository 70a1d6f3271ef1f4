//! The mask of one attention call, in the representation chosen once from what the call brings.

use std::ops::Range;

use super::{BlockClass, BothTiles, DenseTiles, Grid, MaskTiles, NoMask, PlacedMask};
use crate::Result;
use crate::tensor::TensorView;

/// The mask of one attention call: the AND of an optional structural mask (a [`PlacedMask`]) and an
/// optional dense bool tensor, as the kernel consumes it.
///
/// [`CallMask::new`] picks the representation: [`NoMask`] without either part, the part alone when there is
/// one, else [`BothTiles`] with the structural mask first (its classes cost O(1), so a tile it rules empty
/// never scans the tensor).
#[derive(Debug, Clone)]
pub struct CallMask {
    repr: Repr,
}

#[derive(Debug, Clone)]
enum Repr {
    None,
    Structural(PlacedMask),
    Dense(DenseTiles),
    Both(PlacedMask, DenseTiles),
}

impl CallMask {
    /// The mask of a call over `grid`: `structural` (a mask expression at the call's offsets) AND `dense`
    /// (a bool or uint8 view broadcastable to `grid.shape()` by torch's rules, see [`DenseTiles::new`],
    /// whose errors it returns), after the structural part's own check ([`PlacedMask::check`]: its tables
    /// fit the batch). The memory `dense` addresses must outlive the `CallMask`.
    pub fn new(
        grid: Grid,
        structural: Option<PlacedMask>,
        dense: Option<TensorView>,
    ) -> Result<CallMask> {
        if let Some(s) = &structural {
            s.check(grid)?;
        }
        let dense = dense
            .map(|view| DenseTiles::new(view, grid.shape()))
            .transpose()?;
        let repr = match (structural, dense) {
            (None, None) => Repr::None,
            (Some(s), None) => Repr::Structural(s),
            (None, Some(d)) => Repr::Dense(d),
            (Some(s), Some(d)) => Repr::Both(s, d),
        };
        Ok(CallMask { repr })
    }

    /// Whether the mask may hide pairs: false only when the call has neither part (a plugin kernel that
    /// takes no mask may run only then).
    pub fn is_masked(&self) -> bool {
        !matches!(self.repr, Repr::None)
    }

    /// Runs `f` on the chosen representation.
    #[inline]
    fn with<R>(&self, f: impl FnOnce(&dyn MaskTiles) -> R) -> R {
        match &self.repr {
            Repr::None => f(&NoMask),
            Repr::Structural(s) => f(s),
            Repr::Dense(d) => f(d),
            Repr::Both(s, d) => f(&BothTiles {
                first: s,
                second: d,
            }),
        }
    }
}

impl MaskTiles for CallMask {
    fn classify(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>) -> BlockClass {
        self.with(|m| m.classify(b, h, rows, cols))
    }

    fn fill(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>, out: &mut [u8]) {
        self.with(|m| m.fill(b, h, rows, cols, out))
    }

    fn spans(
        &self,
        b: usize,
        h: usize,
        rows: Range<usize>,
        cols: Range<usize>,
        out: &mut [(u32, u32)],
    ) -> bool {
        self.with(|m| m.spans(b, h, rows, cols, out))
    }
}
