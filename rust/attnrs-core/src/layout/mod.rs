//! Layouts of evaluated masks: dense bool grids and FlexAttention-compatible block-sparse indices.

mod block_sparse;
mod dense;

pub use block_sparse::{BlockIndex, BlockSparse};
pub use dense::fill_dense;

use crate::mask::MaskExpr;
use crate::{Error, Result};

/// Validates the sizes shared by every layout builder.
fn check_grid(
    expr: &MaskExpr,
    batch: usize,
    heads: usize,
    q_len: usize,
    kv_len: usize,
    q_offset: i64,
    kv_offset: i64,
) -> Result<()> {
    if batch == 0 {
        return Err(Error::value("B", "a positive integer", "0"));
    }
    if heads == 0 {
        return Err(Error::value("H", "a positive integer", "0"));
    }
    expr.check_dims(batch, heads)?;
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
    end("q_offset", q_offset, q_len)?;
    end("kv_offset", kv_offset, kv_len)
}
