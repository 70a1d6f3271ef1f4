//! Dense bool grids, written in parallel.

use rayon::prelude::*;

use super::{Grid, check};
use crate::mask::PlacedMask;
use crate::{Error, Result, threads};

/// Bytes each parallel task writes (at least one row).
const TASK_BYTES: usize = 1 << 18;

/// Writes `mask` over `grid` into `out` (row-major `[batch, heads, q, kv]` bool bytes: 1 = may attend), row
/// `i` being query position `mask.q_offset + i` and column `j` key position `mask.kv_offset + j`.
///
/// Pass `batch = 1` / `heads = 1` to get a grid that broadcasts; every per-batch table must then have one
/// row (it is an error otherwise). Runs on the private pool of `num_threads` workers.
pub fn fill_dense(mask: &PlacedMask, grid: Grid, out: &mut [u8], num_threads: usize) -> Result<()> {
    check(mask, grid)?;
    if grid.numel() != Some(out.len()) {
        let [b, h, q, kv] = grid.shape();
        return Err(Error::shape(
            "out",
            format!("{b} x {h} x {q} x {kv} bytes"),
            format!("{} bytes", out.len()),
        ));
    }
    if out.is_empty() {
        return Ok(());
    }
    let (expr, q_offset, kv_offset) = (&mask.expr, mask.q_offset, mask.kv_offset);
    let (heads, q_len, kv_len) = (grid.heads, grid.q, grid.kv);
    let rows_per_task = (TASK_BYTES / kv_len).max(1);
    let k = kv_offset..kv_offset + kv_len as i64;
    threads::install(num_threads, || {
        out.par_chunks_mut(rows_per_task * kv_len)
            .enumerate()
            .for_each(|(task, chunk)| {
                // Split the task's rows into runs that share (b, h).
                let mut row = task * rows_per_task;
                let mut rest = chunk;
                while !rest.is_empty() {
                    let (bh, i) = (row / q_len, row % q_len);
                    let n = (q_len - i).min(rest.len() / kv_len);
                    let (head, tail) = rest.split_at_mut(n * kv_len);
                    let q = q_offset + i as i64..q_offset + (i + n) as i64;
                    expr.fill(bh / heads, bh % heads, q, k.clone(), head);
                    rest = tail;
                    row += n;
                }
            })
    })
}
