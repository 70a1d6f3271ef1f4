//! Ragged batches (variable-length sequences packed without padding, torch's `varlen_attn` and flash-attn's
//! `flash_attn_varlen_func`) and paged KV caches (a pool of fixed-size pages and a block table per sequence):
//! [`RaggedArgs`] as the caller gives them, checked into [`Ragged`], which the forward reads rows through
//! (`strided::Rows`) and bounds its loops by (each sequence's own query and key lengths).
//!
//! A ragged call sees its tensors as batch-1 views: query and out `[1, H, Tq, ·]`, lse `[1, H, Tq]`, key and
//! value `[1, Hkv, Tk, ·]`: packed sequences (`cu_seq_k`), or a pool of `Tk / page_size` pages whose rows
//! follow each other along dim 2 (`block_table`). Sequence `b` owns query rows `cu_seq_q[b]..cu_seq_q[b+1]`
//! and keys `0..k_len[b]`. No sequence ever sees another's keys, and its mask is flash-attn's window aligned
//! to the bottom right ([`window`]): query `i` sees key `j` iff `i + off - left <= j <= i + off + right` with
//! `off = k_len - q_len` (`-1` = unbounded; causal is `(-1, 0)`).

use std::ops::Range;

use crate::mask::tiles::{BlockClass, MaskTiles};
use crate::tensor::{DType, TensorView};
use crate::{Error, Result};

/// The ragged description of one call (all integer tensors int32 or int64, any strides).
#[derive(Debug, Clone, Copy)]
pub struct RaggedArgs<'a> {
    /// `[N + 1]`: query rows of sequence `b` are `cu_seq_q[b]..cu_seq_q[b + 1]`; starts at 0, non-decreasing,
    /// ends at the query's total `Tq`.
    pub cu_seq_q: &'a TensorView,
    /// `[N + 1]`: the same for packed keys (ends at `Tk`). `None` exactly when `block_table` is given.
    pub cu_seq_k: Option<&'a TensorView>,
    /// `[N]`: keys sequence `b` uses (the first `seqused_k[b]` of its keys or pages). Required with pages.
    pub seqused_k: Option<&'a TensorView>,
    /// `[N, max_pages]`: the pages of each sequence, in order; only the pages its used keys need are read.
    pub block_table: Option<&'a TensorView>,
    /// Rows per page (with `block_table`), at least 1.
    pub page_size: usize,
    /// flash-attn's `(left, right)` window; `-1` is unbounded.
    pub window: (i64, i64),
}

/// Where a sequence's keys live.
#[derive(Debug, Clone)]
pub(crate) enum KeyRows {
    /// Row of key `j` of sequence `b` is `start[b] + j`.
    Packed(Vec<usize>),
    /// Row of key `j` of sequence `b` is `pages[b * per_seq + j / page] * page + j % page`.
    Paged {
        pages: Vec<u32>,
        per_seq: usize,
        page: usize,
    },
}

/// A checked ragged call: every row it names lies inside the batch-1 views it was checked against.
#[derive(Debug, Clone)]
pub(crate) struct Ragged {
    pub q_start: Vec<usize>,
    pub q_len: Vec<usize>,
    pub k_len: Vec<usize>,
    pub keys: KeyRows,
    pub window: Window,
}

impl Ragged {
    pub fn max_q(&self) -> usize {
        self.q_len.iter().copied().max().unwrap_or(0)
    }
    pub fn max_k(&self) -> usize {
        self.k_len.iter().copied().max().unwrap_or(0)
    }
}

/// Reads a 1-D or 2-D int32/int64 tensor (row-major values).
fn ints(view: &TensorView, arg: &str, shape: &str) -> Result<Vec<i64>> {
    let dtype = view.dtype();
    if !matches!(dtype, DType::I32 | DType::I64) {
        return Err(Error::dtype(arg, "int32 or int64", format!("{dtype:?}")));
    }
    let (dims, st) = (view.shape(), view.strides());
    let (rows, cols, sr, sc) = match dims.len() {
        1 => (1, dims[0], 0, st[0]),
        2 => (dims[0], dims[1], st[0], st[1]),
        _ => return Err(Error::shape(arg, shape, format!("{dims:?}"))),
    };
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let off = r as isize * sr + c as isize * sc;
            // SAFETY: (r, c) is inside the view's shape, so the offset addresses one of its elements, which a
            // validated view guarantees readable for the call.
            let x = unsafe {
                match dtype {
                    DType::I32 => i64::from(view.as_ptr().cast::<i32>().offset(off).read()),
                    _ => view.as_ptr().cast::<i64>().offset(off).read(),
                }
            };
            out.push(x);
        }
    }
    Ok(out)
}

/// A `[N + 1]` cumulative table: starts at 0, never decreases, ends at `total`.
fn cumulative(view: &TensorView, arg: &str, total: usize, n: Option<usize>) -> Result<Vec<usize>> {
    if view.ndim() != 1 || view.shape()[0] == 0 || n.is_some_and(|n| view.shape()[0] != n + 1) {
        let want = n.map_or("[N + 1] with N >= 0".to_string(), |n| {
            format!("[{}]", n + 1)
        });
        return Err(Error::shape(arg, want, format!("{:?}", view.shape())));
    }
    let cu = ints(view, arg, "[N + 1]")?;
    let ok = cu[0] == 0 && cu.windows(2).all(|w| w[0] <= w[1]) && cu[cu.len() - 1] == total as i64;
    if !ok {
        return Err(Error::value(
            arg,
            format!("offsets starting at 0, non-decreasing and ending at the total length {total}"),
            format!("{cu:?}"),
        ));
    }
    Ok(cu.into_iter().map(|x| x as usize).collect())
}

impl RaggedArgs<'_> {
    /// Checks the description against views of `tq` query rows and `tk` key rows.
    pub(crate) fn check(&self, tq: usize, tk: usize) -> Result<Ragged> {
        let cu_q = cumulative(self.cu_seq_q, "cu_seq_q", tq, None)?;
        let n = cu_q.len() - 1;
        let q_len: Vec<usize> = cu_q.windows(2).map(|w| w[1] - w[0]).collect();
        let used = self
            .seqused_k
            .map(|t| {
                if t.ndim() != 1 || t.shape()[0] != n {
                    return Err(Error::shape(
                        "seqused_k",
                        format!("[{n}]"),
                        format!("{:?}", t.shape()),
                    ));
                }
                let used = ints(t, "seqused_k", "[N]")?;
                match used.iter().find(|&&u| u < 0) {
                    Some(bad) => Err(Error::value("seqused_k", "counts >= 0", bad.to_string())),
                    None => Ok(used.into_iter().map(|u| u as usize).collect::<Vec<_>>()),
                }
            })
            .transpose()?;
        let (keys, k_len) = match (self.cu_seq_k, self.block_table) {
            (Some(cu), None) => {
                let cu_k = cumulative(cu, "cu_seq_k", tk, Some(n))?;
                let lens: Vec<usize> = cu_k.windows(2).map(|w| w[1] - w[0]).collect();
                let k_len = match used {
                    Some(used) => {
                        if let Some(b) = (0..n).find(|&b| used[b] > lens[b]) {
                            return Err(Error::value(
                                "seqused_k",
                                format!("at most the sequence's {} keys (cu_seq_k)", lens[b]),
                                format!("{} for sequence {b}", used[b]),
                            ));
                        }
                        used
                    }
                    None => lens,
                };
                (KeyRows::Packed(cu_k[..n].to_vec()), k_len)
            }
            (None, Some(table)) => {
                let page = self.page_size;
                if page == 0 || !tk.is_multiple_of(page) {
                    return Err(Error::shape(
                        "key",
                        format!("a pool of whole pages of page_size {page} rows"),
                        format!("{tk} rows"),
                    ));
                }
                let Some(used) = used else {
                    return Err(Error::value(
                        "seqused_k",
                        "the key count of each sequence when block_table is given",
                        "None",
                    ));
                };
                let dims = table.shape();
                if dims.len() != 2 || dims[0] != n {
                    let got = format!("{dims:?}");
                    return Err(Error::shape(
                        "block_table",
                        format!("[{n}, max_pages]"),
                        got,
                    ));
                }
                if table.dtype() != DType::I32 {
                    return Err(Error::dtype(
                        "block_table",
                        "int32",
                        format!("{:?}", table.dtype()),
                    ));
                }
                let per_seq = dims[1];
                let raw = ints(table, "block_table", "[N, max_pages]")?;
                let num_pages = tk / page;
                let mut pages = vec![0u32; n * per_seq];
                for b in 0..n {
                    let need = used[b].div_ceil(page);
                    if need > per_seq {
                        return Err(Error::value(
                            "seqused_k",
                            format!("at most max_pages * page_size = {} keys", per_seq * page),
                            format!("{} for sequence {b}", used[b]),
                        ));
                    }
                    for p in 0..need {
                        let id = raw[b * per_seq + p];
                        if id < 0 || id as usize >= num_pages {
                            return Err(Error::value(
                                "block_table",
                                format!("page ids in 0..{num_pages} (the pool's pages)"),
                                format!("{id} at [{b}, {p}]"),
                            ));
                        }
                        pages[b * per_seq + p] = id as u32;
                    }
                }
                (
                    KeyRows::Paged {
                        pages,
                        per_seq,
                        page,
                    },
                    used,
                )
            }
            (Some(_), Some(_)) => {
                return Err(Error::value(
                    "cu_seq_k",
                    "None when block_table is given (seqused_k gives each sequence's keys)",
                    "a tensor",
                ));
            }
            (None, None) => {
                return Err(Error::value(
                    "cu_seq_k",
                    "a tensor when block_table is None",
                    "None",
                ));
            }
        };
        let (left, right) = self.window;
        for (name, w) in [("window_size[0]", left), ("window_size[1]", right)] {
            if w < -1 {
                return Err(Error::value(
                    name,
                    "-1 (unbounded) or a size >= 0",
                    w.to_string(),
                ));
            }
        }
        let window = Window {
            offset: q_len
                .iter()
                .zip(&k_len)
                .map(|(&q, &k)| k as i64 - q as i64)
                .collect(),
            k_len: k_len.clone(),
            left: (left >= 0).then_some(left),
            right: (right >= 0).then_some(right),
        };
        Ok(Ragged {
            q_start: cu_q[..n].to_vec(),
            q_len,
            k_len,
            keys,
            window,
        })
    }
}

/// The mask of a ragged call, in each sequence's own rows and keys: row `i` of sequence `b` sees keys
/// `max(0, a - left) ..= min(k_len - 1, a + right)` with `a = i + offset[b]` (bottom-right alignment).
/// Both ends never decrease with `i`, so a tile's class follows from its corner rows.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    offset: Vec<i64>,
    k_len: Vec<usize>,
    left: Option<i64>,
    right: Option<i64>,
}

impl Window {
    /// The visible keys of row `i` of sequence `b`, as an inclusive interval (empty when `lo > hi`).
    #[inline]
    fn interval(&self, b: usize, i: usize) -> (i64, i64) {
        let a = i as i64 + self.offset[b];
        let last = self.k_len[b] as i64 - 1;
        let lo = self.left.map_or(0, |l| (a - l).max(0));
        let hi = self.right.map_or(last, |r| (a + r).min(last));
        (lo, hi)
    }
}

impl MaskTiles for Window {
    fn classify(&self, b: usize, _: usize, rows: Range<usize>, cols: Range<usize>) -> BlockClass {
        let (c0, c1) = (cols.start as i64, cols.end as i64 - 1);
        let (first_lo, first_hi) = self.interval(b, rows.start);
        let (last_lo, last_hi) = self.interval(b, rows.end - 1);
        if first_lo <= c0 && first_hi >= c1 && last_lo <= c0 && last_hi >= c1 {
            return BlockClass::Full;
        }
        // The first row whose interval reaches c0 has the smallest start of all rows that reach it.
        if last_hi < c0 {
            return BlockClass::Empty;
        }
        let first_reaching = match self.right {
            Some(r) if first_hi < c0 => (c0 - r - self.offset[b]) as usize,
            _ => rows.start,
        };
        let (lo, hi) = self.interval(b, first_reaching.clamp(rows.start, rows.end - 1));
        if lo <= c1 && hi >= c0 && lo <= hi {
            BlockClass::Partial
        } else {
            BlockClass::Empty
        }
    }

    fn fill(&self, b: usize, _: usize, rows: Range<usize>, cols: Range<usize>, out: &mut [u8]) {
        let n = cols.len();
        let c0 = cols.start as i64;
        for (r, i) in rows.enumerate() {
            let (lo, hi) = self.interval(b, i);
            let row = &mut out[r * n..(r + 1) * n];
            row.fill(0);
            let (a, z) = ((lo - c0).max(0), (hi - c0 + 1).min(n as i64));
            if a < z {
                row[a as usize..z as usize].fill(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::tests::support::Rng;

    /// Every tile's class agrees with its visibility bytes (which follow the documented rule), for random
    /// sequences, windows and tiles: a wrong `Empty` would skip visible keys, a wrong `Full` would unmask.
    #[test]
    fn window_classes_match_its_bytes() {
        let mut rng = Rng(11);
        for _ in 0..400 {
            let (q_len, k_len) = (1 + rng.below(90), 1 + rng.below(90));
            let side = |rng: &mut Rng| {
                if rng.chance(0.3) {
                    None
                } else {
                    Some(rng.below(12) as i64)
                }
            };
            let w = Window {
                offset: vec![k_len as i64 - q_len as i64],
                k_len: vec![k_len],
                left: side(&mut rng),
                right: side(&mut rng),
            };
            let r0 = rng.below(q_len);
            let rows = r0..r0 + 1 + rng.below(q_len - r0);
            let c0 = rng.below(k_len);
            let cols = c0..c0 + 1 + rng.below(k_len - c0);
            let mut bytes = vec![0u8; rows.len() * cols.len()];
            w.fill(0, 0, rows.clone(), cols.clone(), &mut bytes);
            for (r, i) in rows.clone().enumerate() {
                for (c, j) in cols.clone().enumerate() {
                    let a = i as i64 + k_len as i64 - q_len as i64;
                    let j = j as i64;
                    let rule =
                        w.left.is_none_or(|l| j >= a - l) && w.right.is_none_or(|r| j <= a + r);
                    assert_eq!(
                        bytes[r * cols.len() + c] == 1,
                        rule,
                        "{w:?} row {i} key {j}"
                    );
                }
            }
            let seen = bytes.iter().filter(|&&x| x == 1).count();
            let want = BlockClass::of(seen > 0, seen == bytes.len());
            assert_eq!(
                w.classify(0, 0, rows.clone(), cols.clone()),
                want,
                "{w:?} {rows:?} {cols:?}"
            );
        }
    }
}
