//! Block-sparse layouts with the semantics of PyTorch FlexAttention's `BlockMask`.
//!
//! torch (`_convert_mask_to_block_mask`) pads the dense `[Q_LEN, KV_LEN]` mask with `False` up to whole
//! blocks and counts: a block is full iff all `q_block * kv_block` elements are visible, partial iff some
//! are. Hence a block that sticks out past `q_len` or `kv_len` is never full. Indices are ascending.
//!
//! Building costs O(non-empty blocks), not O(Q * K): for each q-block the mask names a hull of keys some
//! row can see and a core of keys every row sees; kv-blocks outside the hull are never visited, those
//! inside the core are full at once, and only the ones in between are classified (exactly, see
//! [`crate::mask`]).

use rayon::prelude::*;

use super::check_grid;
use crate::block::BlockClass;
use crate::mask::{MaskExpr, PlacedMask};
use crate::{threads, Error, Result};

/// Per-(batch, head, block) lists of block indices, as FlexAttention stores them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIndex {
    /// `[batch, heads, blocks, width]`: `counts` has the first three dimensions, `indices` all four.
    pub shape: [usize; 4],
    /// How many indices each (batch, head, block) lists.
    pub counts: Vec<i32>,
    /// The indices, ascending, in the first `count` slots of each row of `width`; unused slots hold 0.
    pub indices: Vec<i32>,
}

impl BlockIndex {
    /// Writes the counts and the rows `[.., blocks, n]` of indices the way torch lays out a `BlockMask`:
    /// each row lists its blocks ascending, then every other block of `0..n` ascending (torch sorts the
    /// 0/1 block flags with a stable descending argsort). `counts` holds `blocks` entries per (b, h) and
    /// `indices` `n` per row.
    pub fn write_torch_order(
        &self,
        counts: &mut [i32],
        indices: &mut [i32],
        n: usize,
    ) -> Result<()> {
        let rows = self.counts.len();
        if counts.len() != rows || indices.len() != rows * n {
            return Err(Error::shape(
                "indices",
                format!("{rows} counts and {rows} x {n} indices"),
                format!("{} counts and {} indices", counts.len(), indices.len()),
            ));
        }
        counts.copy_from_slice(&self.counts);
        if n == 0 {
            return Ok(());
        }
        let width = self.shape[3];
        for (row, dst) in indices.chunks_exact_mut(n).enumerate() {
            let listed = &self.indices[row * width..row * width + self.counts[row] as usize];
            if listed.iter().any(|&j| j < 0 || j as usize >= n) {
                return Err(Error::Internal(format!("block index out of 0..{n}")));
            }
            dst[..listed.len()].copy_from_slice(listed);
            // The complement of a sorted list, ascending: walk 0..n skipping the listed ones.
            let (mut next, mut at) = (listed.iter().peekable(), listed.len());
            for j in 0..n as i32 {
                if next.peek() == Some(&&j) {
                    next.next();
                } else {
                    dst[at] = j;
                    at += 1;
                }
            }
        }
        Ok(())
    }

    /// Counts' shape `[batch, heads, blocks]`.
    pub fn counts_shape(&self) -> [usize; 3] {
        [self.shape[0], self.shape[1], self.shape[2]]
    }

    /// The listed indices of row `(b, h, block)` of the layout's arrays.
    pub fn row(&self, b: usize, h: usize, block: usize) -> &[i32] {
        let [_, heads, blocks, width] = self.shape;
        let row = (b * heads + h) * blocks + block;
        &self.indices[row * width..row * width + self.counts[row] as usize]
    }

    fn from_lists<'a>(
        shape3: [usize; 3],
        lists: impl ExactSizeIterator<Item = &'a [i32]> + Clone,
    ) -> BlockIndex {
        let width = lists.clone().map(|l| l.len()).max().unwrap_or(0).max(1);
        let rows = lists.len();
        let mut counts = Vec::with_capacity(rows);
        let mut indices = vec![0i32; rows * width];
        for (list, dst) in lists.zip(indices.chunks_exact_mut(width)) {
            counts.push(list.len() as i32);
            dst[..list.len()].copy_from_slice(list);
        }
        BlockIndex {
            shape: [shape3[0], shape3[1], shape3[2], width],
            counts,
            indices,
        }
    }

    /// The transposed lists: for each of `blocks` targets, the rows (ascending) that list it.
    fn transpose(&self, blocks: usize, num_threads: usize) -> Result<BlockIndex> {
        let [batch, heads, rows, _] = self.shape;
        let planes = batch * heads;
        let mut counts = vec![0i32; planes * blocks];
        for (plane, dst) in counts
            .chunks_exact_mut(blocks.max(1))
            .enumerate()
            .take(planes)
        {
            for r in 0..rows {
                for &j in self.row(plane / heads, plane % heads, r) {
                    dst[j as usize] += 1;
                }
            }
        }
        let width = counts.iter().copied().max().unwrap_or(0).max(1) as usize;
        let mut indices = vec![0i32; planes * blocks * width];
        if blocks > 0 {
            threads::install(num_threads, || {
                indices
                    .par_chunks_mut(blocks * width)
                    .enumerate()
                    .for_each(|(plane, dst)| {
                        let mut cursor = vec![0usize; blocks];
                        for r in 0..rows {
                            for &j in self.row(plane / heads, plane % heads, r) {
                                let j = j as usize;
                                dst[j * width + cursor[j]] = r as i32;
                                cursor[j] += 1;
                            }
                        }
                    })
            })?;
        }
        Ok(BlockIndex {
            shape: [batch, heads, blocks, width],
            counts,
            indices,
        })
    }

    /// Bytes held by the arrays.
    pub fn memory_bytes(&self) -> usize {
        (self.counts.len() + self.indices.len()) * std::mem::size_of::<i32>()
    }
}

/// The block layout of a mask over a `[batch, heads, q_len, kv_len]` grid, equal to what torch's
/// `create_block_mask` computes for the same mask (`BLOCK_SIZE = (q_block, kv_block)`).
///
/// The arrays have batch dimension `layout_batch` and head dimension `layout_heads`: 1 when the mask does
/// not depend on the batch (resp. head), else `batch` (resp. `heads`); size-1 dimensions broadcast.
#[derive(Debug, Clone)]
pub struct BlockSparse {
    /// The mask, placed at the offsets; the kernel evaluates it on partial blocks.
    pub mask: PlacedMask,
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub q_block: usize,
    pub kv_block: usize,
    pub layout_batch: usize,
    pub layout_heads: usize,
    pub num_q_blocks: usize,
    pub num_kv_blocks: usize,
    /// Per q-block, the partial kv-blocks (`kv_num_blocks`, `kv_indices`).
    pub kv: BlockIndex,
    /// Per q-block, the full kv-blocks (`full_kv_num_blocks`, `full_kv_indices`).
    pub full_kv: BlockIndex,
    /// Per kv-block, the q-blocks where it is partial (`q_num_blocks`, `q_indices`).
    pub q: BlockIndex,
    /// Per kv-block, the q-blocks where it is full (`full_q_num_blocks`, `full_q_indices`).
    pub full_q: BlockIndex,
}

impl BlockSparse {
    /// Builds the layout of `expr` for `batch` x `heads` and queries `q_offset..q_offset + q_len` against
    /// keys `kv_offset..kv_offset + kv_len`, in the private pool of `num_threads` workers.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        expr: &MaskExpr,
        batch: usize,
        heads: usize,
        q_len: usize,
        kv_len: usize,
        q_offset: i64,
        kv_offset: i64,
        q_block: usize,
        kv_block: usize,
        num_threads: usize,
    ) -> Result<BlockSparse> {
        check_grid(expr, batch, heads, q_len, kv_len, q_offset, kv_offset)?;
        if q_block == 0 {
            return Err(Error::value("q_block", "a positive integer", "0"));
        }
        if kv_block == 0 {
            return Err(Error::value("kv_block", "a positive integer", "0"));
        }
        let (nqb, nkb) = (q_len.div_ceil(q_block), kv_len.div_ceil(kv_block));
        if nqb > i32::MAX as usize || nkb > i32::MAX as usize {
            return Err(Error::value(
                "BLOCK_SIZE",
                "fewer than 2^31 blocks per side",
                format!("{nqb} x {nkb}"),
            ));
        }
        let lb = if expr.depends_on_batch() { batch } else { 1 };
        let lh = if expr.depends_on_head() { heads } else { 1 };
        let grid = Grid {
            expr,
            q_len,
            kv_len,
            q_offset,
            kv_offset,
            q_block,
            kv_block,
            nkb,
        };
        let lists: Vec<(Vec<i32>, Vec<i32>)> = threads::install(num_threads, || {
            (0..lb * lh * nqb)
                .into_par_iter()
                .map(|i| grid.q_block_lists((i / nqb) / lh, (i / nqb) % lh, i % nqb))
                .collect()
        })?;
        let shape = [lb, lh, nqb];
        let kv = BlockIndex::from_lists(shape, lists.iter().map(|(partial, _)| partial.as_slice()));
        let full_kv = BlockIndex::from_lists(shape, lists.iter().map(|(_, full)| full.as_slice()));
        drop(lists);
        let q = kv.transpose(nkb, num_threads)?;
        let full_q = full_kv.transpose(nkb, num_threads)?;
        Ok(BlockSparse {
            mask: PlacedMask::new(expr.clone(), q_offset, kv_offset),
            batch,
            heads,
            q_len,
            kv_len,
            q_block,
            kv_block,
            layout_batch: lb,
            layout_heads: lh,
            num_q_blocks: nqb,
            num_kv_blocks: nkb,
            kv,
            full_kv,
            q,
            full_q,
        })
    }

    /// Bytes held by the index arrays.
    pub fn memory_bytes(&self) -> usize {
        [&self.kv, &self.full_kv, &self.q, &self.full_q]
            .iter()
            .map(|x| x.memory_bytes())
            .sum()
    }
}

struct Grid<'a> {
    expr: &'a MaskExpr,
    q_len: usize,
    kv_len: usize,
    q_offset: i64,
    kv_offset: i64,
    q_block: usize,
    kv_block: usize,
    nkb: usize,
}

impl Grid<'_> {
    /// (partial, full) kv-blocks of q-block `qb`, visiting only the kv-blocks inside the mask's key hull.
    fn q_block_lists(&self, b: usize, h: usize, qb: usize) -> (Vec<i32>, Vec<i32>) {
        let (mut partial, mut full) = (Vec::new(), Vec::new());
        let r0 = qb * self.q_block;
        let r1 = (r0 + self.q_block).min(self.q_len);
        let rows_cut = r0 + self.q_block > self.q_len;
        let q = self.q_offset + r0 as i64..self.q_offset + r1 as i64;
        let (lo, hi) = self.expr.key_hull(b, q.clone());
        let lo = lo.max(self.kv_offset);
        let hi = hi.min(self.kv_offset + self.kv_len as i64 - 1);
        if lo > hi {
            return (partial, full);
        }
        let first = ((lo - self.kv_offset) as usize / self.kv_block).min(self.nkb);
        let last = ((hi - self.kv_offset) as usize / self.kv_block).min(self.nkb - 1);
        // kv-blocks inside the core are seen by every row: no classification needed.
        let (core_lo, core_hi) = self.expr.key_core(b, q.clone());
        let core = core_lo..core_hi.saturating_add(1);
        for kb in first..=last {
            let c0 = kb * self.kv_block;
            let c1 = (c0 + self.kv_block).min(self.kv_len);
            let cols_cut = c0 + self.kv_block > self.kv_len;
            let k = self.kv_offset + c0 as i64..self.kv_offset + c1 as i64;
            let class = if core.start <= k.start && k.end <= core.end {
                BlockClass::Full
            } else {
                self.expr.classify(b, h, q.clone(), k)
            };
            match class {
                BlockClass::Full if !rows_cut && !cols_cut => full.push(kb as i32),
                BlockClass::Empty => {}
                _ => partial.push(kb as i32),
            }
        }
        (partial, full)
    }
}
