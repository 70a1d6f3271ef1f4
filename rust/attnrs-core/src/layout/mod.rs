//! Layouts of evaluated masks: dense bool grids and FlexAttention-compatible block-sparse indices, each
//! built from a [`PlacedMask`] (the mask and where the grid sits) over a [`Grid`] (its size).

mod block_sparse;
mod dense;

pub use crate::mask::tiles::Grid;
pub use block_sparse::{BlockIndex, BlockSparse};
pub use dense::fill_dense;

use crate::mask::PlacedMask;
use crate::{Error, Result};

/// Validates what every layout builder needs: a non-empty batch and head count, then the mask's own check
/// against the grid ([`PlacedMask::check`]).
fn check(mask: &PlacedMask, grid: Grid) -> Result<()> {
    if grid.batch == 0 {
        return Err(Error::value("B", "a positive integer", "0"));
    }
    if grid.heads == 0 {
        return Err(Error::value("H", "a positive integer", "0"));
    }
    mask.check(grid)
}
