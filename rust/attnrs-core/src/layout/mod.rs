//! Layouts of evaluated masks: dense bool grids and FlexAttention-compatible block-sparse indices, each
//! built from a [`PlacedMask`] (the mask and where the grid sits) over a [`Grid`] (its size).

mod block_sparse;
mod dense;

pub use crate::mask::tiles::Grid;
pub use block_sparse::{BlockIndex, BlockSparse};
pub use dense::fill_dense;

use crate::mask::PlacedMask;
use crate::{Error, Result};

/// Validates what every layout builder needs: a non-empty batch and head count, tables that fit them, and
/// absolute positions (offset + length) that fit in `i64`.
fn check(mask: &PlacedMask, grid: Grid) -> Result<()> {
    if grid.batch == 0 {
        return Err(Error::value("B", "a positive integer", "0"));
    }
    if grid.heads == 0 {
        return Err(Error::value("H", "a positive integer", "0"));
    }
    mask.expr.check_dims(grid.batch, grid.heads)?;
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
    end("q_offset", mask.q_offset, grid.q)?;
    end("kv_offset", mask.kv_offset, grid.kv)
}
