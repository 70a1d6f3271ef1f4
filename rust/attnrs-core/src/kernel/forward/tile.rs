//! What every forward path shares: the typed call ([`Job`]), the tile width, the online-softmax step of one
//! kv tile for a GQA group's rows ([`softmax_tile`]) and the final write of out and lse ([`write_rows`]).
//! The packed path ([`super::item`]), split-KV decode ([`super::split_kv`]) and the AVX-512 decode kernel
//! build on these; this module depends on none of them.

use std::ops::Range;

use crate::kernel::args::Dims;
use crate::kernel::dropout::DropMask;
use crate::kernel::ragged::Ragged;
use crate::kernel::score::AnyTerms;
use crate::kernel::softmax::{Acc, Logits, RowPasses, finish, online_step, rescale};
use crate::kernel::strided::{BiasRef, Strided};
use crate::mask::tiles::{BlockClass, MaskTiles, TileVis};
use crate::tensor::Float;

/// Key/value columns per tile.
pub(crate) const BC: usize = 64;
/// Query rows (all heads of a GQA group together) per work item, aimed for.
pub(crate) const ROWS: usize = 96;

pub(crate) fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// One call, typed: raw strided views plus the scalars.
pub(crate) struct Job<'a, T> {
    pub(crate) dims: Dims,
    pub(crate) q: Strided<T>,
    pub(crate) k: Strided<T>,
    pub(crate) v: Strided<T>,
    pub(crate) out: Strided<T>,
    pub(crate) lse: Option<Strided<f32>>,
    pub(crate) bias: Option<BiasRef>,
    pub(crate) sinks: Option<Vec<f64>>,
    pub(crate) mask: &'a dyn MaskTiles,
    pub(crate) scale: f64,
    pub(crate) softcap: Option<f64>,
    /// The score mod's terms (head scales, distance and key terms), read once per call.
    pub(crate) terms: AnyTerms,
    pub(crate) drop: Option<DropMask>,
    /// Query rows per block (per head).
    pub(crate) bq: usize,
    /// Packed row lengths: D rounded up to 2, Dv rounded up to 16.
    pub(crate) dp: usize,
    pub(crate) dvp: usize,
    /// A ragged call's sequences (their lengths bound every loop), or `None` for a dense batch.
    pub(crate) ragged: Option<&'a Ragged>,
}

impl<T> Job<'_, T> {
    pub(super) fn ntiles(&self) -> usize {
        self.dims.k.div_ceil(BC)
    }
    pub(super) fn nqb(&self) -> usize {
        self.dims.q.div_ceil(self.bq)
    }
    pub(crate) fn klen(&self) -> usize {
        self.dp * BC
    }
    pub(crate) fn vlen(&self) -> usize {
        BC * self.dvp
    }
    /// Query rows of batch item (sequence) `b`.
    #[inline]
    pub(crate) fn q_len(&self, b: usize) -> usize {
        self.ragged.map_or(self.dims.q, |r| r.q_len[b])
    }
    /// Keys of batch item (sequence) `b`.
    #[inline]
    pub(crate) fn k_len(&self, b: usize) -> usize {
        self.ragged.map_or(self.dims.k, |r| r.k_len[b])
    }
}

/// The softmax state of an item's rows: `m`, `l` (one per row) and `O` (`dvp` per row).
pub(super) struct Rows<'a, A> {
    pub m: &'a mut [A],
    pub l: &'a mut [A],
    pub o: &'a mut [A],
    /// Elements per row of `o`.
    pub ld: usize,
}

/// The online-softmax step of one kv tile (`cells` = query rows × key columns) for the rows of every head of
/// the group whose class is not empty: score terms, bias and mask applied, `m` and `l` updated, `O` rescaled,
/// `P` written. `s` and `p` hold the rows of the group (`r = gi * bq + i`) at stride [`BC`]; `scratch` is
/// (a partial tile's visibility, one bias row, one terms row). `passes` are the kernel family's
/// ([`crate::kernel::gemm::Kern::row_passes`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn softmax_tile<A: Acc, E: Copy, T>(
    job: &Job<T>,
    b: usize,
    kvh: usize,
    cells: (Range<usize>, Range<usize>),
    classes: &[BlockClass],
    lg: Logits<A>,
    s: &mut [A],
    p: &mut [E],
    st: Rows<'_, A>,
    scratch: (&mut TileVis, &mut [A], &mut [A]),
    passes: RowPasses<
        impl Fn(A) -> E + Copy,
        impl Fn(&[A]) -> A + Copy,
        impl Fn(&[A], A, &mut [E]) -> A + Copy,
    >,
) {
    let (rows, cols) = cells;
    let (q0, bq, c0, n) = (rows.start, rows.len(), cols.start, cols.len());
    let (g, nw) = (job.dims.g, round_up(n, 16));
    let (vis, bias, term_row) = scratch;
    let terms = job.terms.get::<A>();
    for (gi, &cls) in classes.iter().enumerate() {
        if cls == BlockClass::Empty {
            continue;
        }
        let h = kvh * g + gi;
        let lg = match terms {
            Some(t) if t.has_scale() => Logits {
                scale: lg.scale * t.scale_of(h),
                ..lg
            },
            _ => lg,
        };
        let partial = cls == BlockClass::Partial;
        if partial {
            vis.load(job.mask, b, h, rows.clone(), cols.clone());
        }
        for i in 0..bq {
            let r = gi * bq + i;
            if let Some(bref) = &job.bias {
                // SAFETY: (b, h, q0 + i) and columns c0..c0+n are in range of [B, H, Q, K].
                unsafe { bref.row(b, h, q0 + i, c0, &mut bias[..n], A::from_f64) };
            }
            let add = terms.and_then(|t| t.row(b, h, q0 + i, c0, n, term_row));
            let alpha = online_step(
                &mut s[r * BC..r * BC + nw],
                n,
                lg,
                add,
                job.bias.as_ref().map(|_| &bias[..n]),
                partial.then(|| vis.row(i)),
                &mut st.m[r],
                &mut st.l[r],
                &mut p[r * BC..r * BC + nw],
                passes,
            );
            if alpha != A::ONE {
                rescale(&mut st.o[r * st.ld..(r + 1) * st.ld], alpha);
            }
            if let Some(drop) = &job.drop {
                // The denominator `l` keeps every weight; only `P·V` loses the dropped ones.
                drop.row(b, h, q0 + i).drop_into(
                    c0,
                    &mut p[r * BC..r * BC + n],
                    (passes.to_p)(A::ZERO),
                );
            }
        }
    }
}

/// Writes out (and lse) for rows whose state `(m, l, O)` is final.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn write_rows<A: Acc, T: Float>(
    job: &Job<T>,
    b: usize,
    kvh: usize,
    q0: usize,
    bq: usize,
    m: &[A],
    l: &[A],
    o: &[A],
) {
    let Dims { g, dv, .. } = job.dims;
    let kept_scale = A::from_f64(job.drop.map_or(1.0, |d| d.scale));
    for gi in 0..g {
        let h = kvh * g + gi;
        let sink = job.sinks.as_ref().map(|s| A::from_f64(s[h]));
        for i in 0..bq {
            let r = gi * bq + i;
            let (f, lse) = finish(m[r], l[r], sink);
            let f = f * kept_scale;
            // SAFETY: (b, h, q0 + i, ·) is in range of out; rows of different items never coincide and out has
            // no internal overlap (validated), so this thread is the only writer of these elements.
            unsafe {
                let row = job.out.at(b, h, q0 + i, 0);
                for (j, &x) in o[r * job.dvp..r * job.dvp + dv].iter().enumerate() {
                    row.offset(j as isize * job.out.st[3])
                        .write((x * f).write::<T>());
                }
                if let Some(lse_view) = &job.lse {
                    lse_view.at(b, h, q0 + i, 0).write(lse.to_f32());
                }
            }
        }
    }
}
