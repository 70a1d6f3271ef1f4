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

use std::ops::Range;

use rayon::prelude::*;

use super::{Grid, check};
use crate::mask::PlacedMask;
use crate::mask::tiles::BlockClass;
use crate::{Error, Result, memory, threads};

/// What the allocations of a layout are for, in out-of-memory errors.
const LISTS: &str = "a block layout's index lists";

/// Per-(batch, head, block) lists of block indices, as FlexAttention stores them, in ragged (CSR) storage.
///
/// Row `r = (b * shape[1] + h) * shape[2] + block` lists `counts[r]` blocks, ascending, in
/// `indices[offsets[r]..offsets[r + 1]]`; rows follow each other without padding. Torch's padded
/// `[batch, heads, blocks, n]` arrays are written by [`BlockIndex::write_torch_order`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIndex {
    /// `[batch, heads, blocks, max_count]`: `counts` has the first three dimensions; `max_count` is the
    /// largest count (0 when no row lists anything).
    pub shape: [usize; 4],
    /// How many indices each (batch, head, block) row lists.
    pub counts: Vec<i32>,
    /// Prefix sums of `counts`: `counts.len() + 1` entries, starting at 0 and ending at `indices.len()`.
    pub offsets: Vec<usize>,
    /// Every row's indices, ascending within a row, rows concatenated in order.
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
        for (row, dst) in indices.chunks_exact_mut(n).enumerate() {
            let listed = self.row_at(row);
            if listed.len() > n || listed.iter().any(|&j| j < 0 || j as usize >= n) {
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

    /// The listed indices of row `(b, h, block)` of the layout's arrays, ascending.
    pub fn row(&self, b: usize, h: usize, block: usize) -> &[i32] {
        let [_, heads, blocks, _] = self.shape;
        self.row_at((b * heads + h) * blocks + block)
    }

    /// The listed indices of the flat row `row` (`(b * heads + h) * blocks + block`).
    fn row_at(&self, row: usize) -> &[i32] {
        &self.indices[self.offsets[row]..self.offsets[row + 1]]
    }

    /// Assembles an index from its counts and the concatenation of `chunks`, which must hold the rows'
    /// indices in row order (how they are split between chunks does not matter). Each chunk is freed as
    /// soon as it is copied.
    fn from_chunks(
        shape3: [usize; 3],
        counts: Vec<i32>,
        chunks: Vec<Vec<i32>>,
    ) -> Result<BlockIndex> {
        debug_assert_eq!(counts.len(), shape3.iter().product::<usize>());
        let offsets = prefix_sums(&counts)?;
        let total = offsets[counts.len()];
        let mut chunks = chunks.into_iter().filter(|c| !c.is_empty()).peekable();
        let mut indices = match chunks.next() {
            // A single chunk is the whole array already.
            Some(first) if chunks.peek().is_none() => first,
            Some(first) => {
                let mut all = Vec::new();
                memory::reserve(&mut all, total, LISTS)?;
                all.extend_from_slice(&first);
                drop(first);
                for chunk in chunks {
                    all.extend_from_slice(&chunk);
                }
                all
            }
            None => Vec::new(),
        };
        indices.shrink_to_fit();
        debug_assert_eq!(indices.len(), total);
        let width = counts.iter().copied().max().unwrap_or(0) as usize;
        Ok(BlockIndex {
            shape: [shape3[0], shape3[1], shape3[2], width],
            counts,
            offsets,
            indices,
        })
    }

    /// The transposed lists: for each of `blocks` targets, the rows (ascending) that list it.
    ///
    /// Per (b, h) plane: count each target's rows, take prefix sums for the offsets, then walk the rows in
    /// order and append each one to the targets it lists. Planes run in parallel in the current rayon
    /// pool: call it inside [`threads::install`], never on the global pool.
    fn transpose(&self, blocks: usize) -> Result<BlockIndex> {
        let [batch, heads, rows, _] = self.shape;
        let planes = batch * heads;
        let mut counts = memory::zeroed::<i32>(planes * blocks, LISTS)?;
        if blocks == 0 {
            return Ok(BlockIndex {
                shape: [batch, heads, 0, 0],
                counts,
                offsets: vec![0],
                indices: Vec::new(),
            });
        }
        // A plane's rows are contiguous in CSR storage.
        let plane = |p: usize| &self.indices[self.offsets[p * rows]..self.offsets[(p + 1) * rows]];
        counts
            .par_chunks_mut(blocks)
            .enumerate()
            .for_each(|(p, dst)| {
                for &j in plane(p) {
                    dst[j as usize] += 1;
                }
            });
        let offsets = prefix_sums(&counts)?;
        let mut indices = memory::zeroed::<i32>(offsets[planes * blocks], LISTS)?;
        let mut dsts = Vec::with_capacity(planes);
        let mut rest = indices.as_mut_slice();
        for p in 0..planes {
            let (dst, tail) = rest.split_at_mut(offsets[(p + 1) * blocks] - offsets[p * blocks]);
            dsts.push(dst);
            rest = tail;
        }
        dsts.into_par_iter().enumerate().for_each(|(p, dst)| {
            let starts = &offsets[p * blocks..(p + 1) * blocks];
            let mut cursor: Vec<usize> = starts.iter().map(|&o| o - starts[0]).collect();
            for r in 0..rows {
                for &j in self.row_at(p * rows + r) {
                    let at = &mut cursor[j as usize];
                    dst[*at] = r as i32;
                    *at += 1;
                }
            }
        });
        let width = counts.iter().copied().max().unwrap_or(0) as usize;
        Ok(BlockIndex {
            shape: [batch, heads, blocks, width],
            counts,
            offsets,
            indices,
        })
    }

    /// Bytes held by the arrays (counts, offsets and indices).
    pub fn memory_bytes(&self) -> usize {
        (self.counts.len() + self.indices.len()) * std::mem::size_of::<i32>()
            + self.offsets.len() * std::mem::size_of::<usize>()
    }
}

/// `counts.len() + 1` running totals of `counts`, starting at 0.
fn prefix_sums(counts: &[i32]) -> Result<Vec<usize>> {
    let mut offsets = Vec::new();
    memory::reserve(&mut offsets, counts.len() + 1, LISTS)?;
    let mut total = 0usize;
    offsets.push(0);
    for &n in counts {
        total += n as usize;
        offsets.push(total);
    }
    Ok(offsets)
}

/// The block layout of a mask over a `[batch, heads, q, kv]` grid, equal to what torch's
/// `create_block_mask` computes for the same mask (`BLOCK_SIZE = (q_block, kv_block)`).
///
/// The arrays have batch dimension `layout_batch` and head dimension `layout_heads`: 1 when the mask does
/// not depend on the batch (resp. head), else `grid.batch` (resp. `grid.heads`); size-1 dimensions
/// broadcast.
#[derive(Debug, Clone)]
pub struct BlockSparse {
    /// The mask, placed at the offsets; the kernel evaluates it on partial blocks.
    pub mask: PlacedMask,
    pub grid: Grid,
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
    /// Builds the layout of `mask` over `grid` (queries `mask.q_offset..mask.q_offset + grid.q` against
    /// keys `mask.kv_offset..mask.kv_offset + grid.kv`) with blocks of `q_block x kv_block`, in the private
    /// pool of `num_threads` workers.
    pub fn build(
        mask: PlacedMask,
        grid: Grid,
        (q_block, kv_block): (usize, usize),
        num_threads: usize,
    ) -> Result<BlockSparse> {
        check(&mask, grid)?;
        if q_block == 0 {
            return Err(Error::value("q_block", "a positive integer", "0"));
        }
        if kv_block == 0 {
            return Err(Error::value("kv_block", "a positive integer", "0"));
        }
        let (nqb, nkb) = (grid.q.div_ceil(q_block), grid.kv.div_ceil(kv_block));
        if nqb > i32::MAX as usize || nkb > i32::MAX as usize {
            return Err(Error::value(
                "BLOCK_SIZE",
                "fewer than 2^31 blocks per side",
                format!("{nqb} x {nkb}"),
            ));
        }
        let lb = if mask.expr.depends_on_batch() {
            grid.batch
        } else {
            1
        };
        let lh = if mask.expr.depends_on_head() {
            grid.heads
        } else {
            1
        };
        let tiling = Tiling {
            mask: &mask,
            grid,
            q_block,
            kv_block,
            nkb,
        };
        // Memory: per q-block row and per kv-block row, the counts and offsets of two directions, the count
        // tensors Python copies, and (kv rows) the transpose's cursors; per listed block, its entry in both
        // directions plus the transient copy while the chunks are concatenated. The fixed part is checked
        // first; the listed blocks only when the worst case (every block listed) would not fit, by counting
        // them before anything is allocated.
        let sides = format!("{nqb} x {nkb} blocks of {q_block} x {kv_block}");
        let (rows_q, rows_kv) = (
            memory::product(&[lb, lh, nqb]),
            memory::product(&[lb, lh, nkb]),
        );
        let fixed = rows_q
            .and_then(|r| r.checked_mul(32))
            .zip(rows_kv.and_then(|r| r.checked_mul(40)))
            .and_then(|(a, b)| a.checked_add(b));
        memory::check("BLOCK_SIZE", &format!("a block layout of {sides}"), fixed)?;
        let need = |listed: Option<usize>| {
            listed
                .and_then(|n| n.checked_mul(12))
                .zip(fixed)
                .and_then(|(a, b)| a.checked_add(b))
        };
        let worst = need(memory::product(&[lb, lh, nqb, nkb]));
        if worst.is_none_or(|n| n > memory::budget()) {
            let listed = threads::install(num_threads, || tiling.count([lb, lh, nqb]))??;
            let what = format!("a block layout of {sides} that lists {listed} of them");
            memory::check("BLOCK_SIZE", &what, need(Some(listed)))?;
        }
        let [kv, full_kv, q, full_q] =
            threads::install(num_threads, || tiling.indices([lb, lh, nqb], num_threads))??;
        Ok(BlockSparse {
            mask,
            grid,
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

/// The mask and the block tiling of the grid, as the classification of one layout reads them.
struct Tiling<'a> {
    mask: &'a PlacedMask,
    grid: Grid,
    q_block: usize,
    kv_block: usize,
    /// Number of kv-blocks.
    nkb: usize,
}

impl Tiling<'_> {
    /// The four indices (kv, full_kv, q, full_q) of layout `[lb, lh, nqb]`, computed in the current rayon
    /// pool (call inside [`threads::install`]) by about `num_threads` workers.
    ///
    /// Rows are classified in chunks of consecutive rows, each appending to its own pair of vectors while
    /// the counts go straight to their final place; the chunks are then concatenated. There are no per-row
    /// vectors, and the peak stays near the size of the finished arrays.
    fn indices(&self, [lb, lh, nqb]: [usize; 3], num_threads: usize) -> Result<[BlockIndex; 4]> {
        let rows = lb * lh * nqb;
        let chunk = rows.div_ceil(num_threads.max(1) * 16).max(1);
        let mut kv_counts = memory::zeroed::<i32>(rows, LISTS)?;
        let mut full_counts = memory::zeroed::<i32>(rows, LISTS)?;
        let lists = kv_counts
            .par_chunks_mut(chunk)
            .zip(full_counts.par_chunks_mut(chunk))
            .enumerate()
            .map(|(c, (kv_n, full_n))| {
                let (mut partial, mut full) = (Vec::new(), Vec::new());
                for (k, (kv_n, full_n)) in kv_n.iter_mut().zip(full_n).enumerate() {
                    let i = c * chunk + k;
                    let (p0, f0) = (partial.len(), full.len());
                    let (b, h, qb) = ((i / nqb) / lh, (i / nqb) % lh, i % nqb);
                    let mut sink = Append {
                        partial: &mut partial,
                        full: &mut full,
                    };
                    self.q_block_lists(b, h, qb, &mut sink)?;
                    *kv_n = (partial.len() - p0) as i32;
                    *full_n = (full.len() - f0) as i32;
                }
                partial.shrink_to_fit();
                full.shrink_to_fit();
                Ok((partial, full))
            })
            .collect::<Result<Vec<_>>>()?;
        let (partials, fulls): (Vec<Vec<i32>>, Vec<Vec<i32>>) = lists.into_iter().unzip();
        let kv = BlockIndex::from_chunks([lb, lh, nqb], kv_counts, partials)?;
        let full_kv = BlockIndex::from_chunks([lb, lh, nqb], full_counts, fulls)?;
        let q = kv.transpose(self.nkb)?;
        let full_q = full_kv.transpose(self.nkb)?;
        Ok([kv, full_kv, q, full_q])
    }

    /// How many blocks (partial and full) the layout `[lb, lh, nqb]` lists, without allocating: in the
    /// current rayon pool, O(edge blocks) per row (see [`Tiling::q_block_lists`]).
    fn count(&self, [lb, lh, nqb]: [usize; 3]) -> Result<usize> {
        (0..lb * lh * nqb)
            .into_par_iter()
            .map(|i| {
                let mut count = Count::default();
                self.q_block_lists((i / nqb) / lh, (i / nqb) % lh, i % nqb, &mut count)?;
                Ok(count.0)
            })
            .try_reduce(|| 0, |a, b| Ok(a.saturating_add(b)))
    }

    /// Reports the partial and the full kv-blocks of q-block `qb` (ascending) to `lists`, visiting only the
    /// kv-blocks inside the mask's key hull. A run of blocks inside the mask's key core (seen by every row) is
    /// reported at once, so counting a layout costs O(edge blocks) per row, not O(listed blocks).
    fn q_block_lists<L: Lists>(&self, b: usize, h: usize, qb: usize, lists: &mut L) -> Result<()> {
        let (expr, q_offset, kv_offset) =
            (&self.mask.expr, self.mask.q_offset, self.mask.kv_offset);
        let (q_len, kv_len, kvb) = (self.grid.q, self.grid.kv, self.kv_block);
        let r0 = qb * self.q_block;
        let r1 = (r0 + self.q_block).min(q_len);
        let rows_cut = r0 + self.q_block > q_len;
        let q = q_offset + r0 as i64..q_offset + r1 as i64;
        if kv_len == 0 {
            return Ok(()); // no kv-blocks (and `kv_len - 1` below would not exist)
        }
        let (lo, hi) = expr.key_hull(b, q.clone());
        let lo = lo.max(kv_offset);
        let hi = hi.min(kv_offset + (kv_len as i64 - 1)); // fits: check() bounds kv_offset + kv_len
        if lo > hi {
            return Ok(());
        }
        let first = ((lo - kv_offset) as usize / kvb).min(self.nkb);
        let last = ((hi - kv_offset) as usize / kvb).min(self.nkb - 1);
        let (core_lo, core_hi) = expr.key_core(b, q.clone());
        let core = core_lo..core_hi.saturating_add(1);
        let mut kb = first;
        while kb <= last {
            let c0 = kb * kvb;
            let k = kv_offset + c0 as i64..kv_offset + (c0 + kvb).min(kv_len) as i64;
            if core.start <= k.start && k.end <= core.end {
                // Every block from `kb` whose keys end inside the core is seen by every row: full, except
                // that a block sticking out past q_len / kv_len never is (torch pads with False).
                // Keys from column 0 to the core's end (> 0: block kb ends inside the core).
                let inside = usize::try_from(i128::from(core.end) - i128::from(kv_offset))
                    .unwrap_or(usize::MAX);
                let run_last = if inside >= kv_len {
                    last
                } else {
                    last.min(inside / kvb - 1)
                };
                let whole_end = if (run_last + 1) * kvb > kv_len {
                    run_last
                } else {
                    run_last + 1
                };
                if rows_cut {
                    lists.partial_run(kb..run_last + 1)?;
                } else {
                    lists.full_run(kb..whole_end)?;
                    if whole_end == run_last {
                        lists.partial_run(run_last..run_last + 1)?;
                    }
                }
                kb = run_last + 1;
                continue;
            }
            let cols_cut = c0 + kvb > kv_len;
            match expr.classify(b, h, q.clone(), k) {
                BlockClass::Full if !rows_cut && !cols_cut => lists.full_run(kb..kb + 1)?,
                BlockClass::Empty => {}
                _ => lists.partial_run(kb..kb + 1)?,
            }
            kb += 1;
        }
        Ok(())
    }
}

/// Where [`Tiling::q_block_lists`] reports a row's blocks: runs of consecutive kv-blocks, ascending.
trait Lists {
    fn partial_run(&mut self, blocks: Range<usize>) -> Result<()>;
    fn full_run(&mut self, blocks: Range<usize>) -> Result<()>;
}

/// Counts the blocks a layout lists, before anything is allocated for them.
#[derive(Default)]
struct Count(usize);

impl Lists for Count {
    fn partial_run(&mut self, blocks: Range<usize>) -> Result<()> {
        self.0 = self.0.saturating_add(blocks.len());
        Ok(())
    }
    fn full_run(&mut self, blocks: Range<usize>) -> Result<()> {
        self.partial_run(blocks)
    }
}

/// The partial and the full lists of a chunk of rows, grown with fallible allocation.
struct Append<'a> {
    partial: &'a mut Vec<i32>,
    full: &'a mut Vec<i32>,
}

fn append(list: &mut Vec<i32>, blocks: Range<usize>) -> Result<()> {
    memory::reserve(list, blocks.len(), LISTS)?;
    list.extend(blocks.map(|kb| kb as i32));
    Ok(())
}

impl Lists for Append<'_> {
    fn partial_run(&mut self, blocks: Range<usize>) -> Result<()> {
        append(self.partial, blocks)
    }
    fn full_run(&mut self, blocks: Range<usize>) -> Result<()> {
        append(self.full, blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(shape3: [usize; 3], rows: &[&[i32]]) -> BlockIndex {
        let counts = rows.iter().map(|r| r.len() as i32).collect();
        BlockIndex::from_chunks(shape3, counts, rows.iter().map(|r| r.to_vec()).collect()).unwrap()
    }

    #[test]
    fn csr_rows_and_memory() {
        let x = index([1, 2, 2], &[&[1, 3], &[], &[0, 1, 2], &[4]]);
        assert_eq!(x.shape, [1, 2, 2, 3]);
        assert_eq!(x.offsets, vec![0, 2, 2, 5, 6]);
        assert_eq!(x.indices, vec![1, 3, 0, 1, 2, 4]);
        assert_eq!(x.row(0, 0, 0), &[1, 3]);
        assert_eq!(x.row(0, 0, 1), &[] as &[i32]);
        assert_eq!(x.row(0, 1, 0), &[0, 1, 2]);
        assert_eq!(x.row(0, 1, 1), &[4]);
        assert_eq!(x.counts_shape(), [1, 2, 2]);
        assert_eq!(
            x.memory_bytes(),
            (4 + 6) * 4 + 5 * std::mem::size_of::<usize>()
        );
        let t = threads::install(2, || x.transpose(5)).unwrap().unwrap();
        assert_eq!(t.shape, [1, 2, 5, 1]);
        assert_eq!(t.counts, vec![0, 1, 0, 1, 0, 1, 1, 1, 0, 1]);
        assert_eq!(t.row(0, 0, 1), &[0]);
        assert_eq!(t.row(0, 0, 3), &[0]);
        assert_eq!(t.row(0, 1, 0), &[0]);
        assert_eq!(t.row(0, 1, 4), &[1]);
        assert_eq!(threads::install(1, || t.transpose(2)).unwrap().unwrap(), x);
        let none = threads::install(1, || x.transpose(0)).unwrap().unwrap();
        assert_eq!((none.shape, none.offsets), ([1, 2, 0, 0], vec![0]));
    }

    #[test]
    fn write_torch_order_puts_listed_blocks_first() {
        let x = index([1, 1, 3], &[&[1, 3], &[], &[0, 1, 2, 3, 4]]);
        let (mut counts, mut indices) = (vec![9; 3], vec![9; 15]);
        x.write_torch_order(&mut counts, &mut indices, 5).unwrap();
        assert_eq!(counts, vec![2, 0, 5]);
        assert_eq!(indices, vec![1, 3, 0, 2, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
        // Wrong sizes and blocks outside 0..n are errors.
        assert!(
            x.write_torch_order(&mut counts, &mut indices[..14], 5)
                .is_err()
        );
        let mut short = vec![0; 12];
        assert!(x.write_torch_order(&mut counts, &mut short, 4).is_err());
        let (mut c0, mut i0) = (vec![0; 3], Vec::new());
        x.write_torch_order(&mut c0, &mut i0, 0).unwrap();
        assert_eq!(c0, vec![2, 0, 5]);
    }
}
