//! The typed backward call ([`Job`]), its written views of any dtype ([`AnyOut`]), a GQA group's packed query
//! and dO rows ([`Packed`]) and the per-item tile buffers ([`Scratch`]).

use super::*;
use crate::kernel::args::Dims;
use crate::kernel::dropout::DropMask;
use crate::kernel::gemm::Kern;
use crate::kernel::pack::{pack_a, pack_b_rows};
use crate::kernel::score::Terms;
use crate::kernel::softmax::Acc;
use crate::kernel::strided::{BiasRef, Strided};
use crate::mask::tiles::{MaskTiles, TileVis};
use crate::tensor::{DType, Float, TensorView};
use half::{bf16, f16};

/// A written view of any float dtype (`grad_bias`, `grad_sinks`), up to four dims.
#[derive(Debug, Clone, Copy)]
pub(super) struct AnyOut {
    pub(super) ptr: *mut u8,
    pub(super) dtype: DType,
    pub(super) st: [isize; 4],
}

// SAFETY: an address plus strides of a validated output view; items write disjoint elements.
unsafe impl Send for AnyOut {}
// SAFETY: as for `Send`.
unsafe impl Sync for AnyOut {}

impl AnyOut {
    pub(super) fn of(v: &TensorView) -> Self {
        let mut st = [0isize; 4];
        for (s, &v) in st.iter_mut().zip(v.strides()) {
            *s = v;
        }
        AnyOut {
            ptr: v.as_ptr(),
            dtype: v.dtype(),
            st,
        }
    }

    /// Writes `src[j]` to element `[i0, i1, i2, i3 + j]`.
    ///
    /// # Safety
    /// Every index written must be in range of the view, and no other thread may write those elements.
    #[inline(always)]
    pub(super) unsafe fn write_row<A: Acc>(&self, idx: [usize; 4], src: &[A]) {
        #[inline(always)]
        unsafe fn go<T: Float, A: Acc>(p: &AnyOut, base: isize, src: &[A]) {
            let ptr = p.ptr as *mut T;
            for (j, &x) in src.iter().enumerate() {
                // SAFETY: in range by the caller's promise.
                unsafe {
                    ptr.offset(base + j as isize * p.st[3])
                        .write(T::from_f64(x.to_f64()))
                };
            }
        }
        let base: isize = idx
            .iter()
            .zip(&self.st)
            .map(|(&i, &s)| i as isize * s)
            .sum();
        // SAFETY: forwarded caller promise; the dtype matches the pointer's element type.
        unsafe {
            match self.dtype {
                DType::F32 => go::<f32, A>(self, base, src),
                DType::F64 => go::<f64, A>(self, base, src),
                DType::BF16 => go::<bf16, A>(self, base, src),
                _ => go::<f16, A>(self, base, src),
            }
        }
    }
}

/// One call, typed.
pub(super) struct Job<'a, T, A> {
    pub(super) dims: Dims,
    pub(super) q: Strided<T>,
    pub(super) k: Strided<T>,
    pub(super) v: Strided<T>,
    pub(super) out: Strided<T>,
    pub(super) dout: Strided<T>,
    pub(super) lse_in: Strided<f32>,
    pub(super) grad_lse: Option<Strided<f32>>,
    pub(super) dq: Strided<T>,
    pub(super) dk: Strided<T>,
    pub(super) dv: Strided<T>,
    pub(super) bias: Option<BiasRef>,
    pub(super) grad_bias: Option<AnyOut>,
    pub(super) sinks: Option<Vec<f64>>,
    pub(super) mask: &'a dyn MaskTiles,
    pub(super) scale: A,
    /// `(c, 1/c)`.
    pub(super) softcap: Option<(A, A)>,
    pub(super) drop: Option<DropMask>,
    /// The score mod's terms (head scales, distance and key terms), read once per call.
    pub(super) terms: Option<Terms<A>>,
    /// Where the kv items put the gradients of the terms, when they are wanted.
    pub(super) term_grads: Option<TermGrads<A>>,
    /// Per row `(b * H + h) * Q + i`: `P_ij = exp(x_ij - shift_i) · norm_i` (`shift = lse`, `norm = 1` from
    /// the saved lse; `(max, 1 / sum)` where it was recomputed); a non-finite shift means the row saw nothing.
    pub(super) shift: Vec<A>,
    pub(super) norm: Vec<A>,
    /// Per row: `Δ = dO · O`.
    pub(super) delta: Vec<A>,
    /// D and Dv rounded up to 16 (packed row lengths).
    pub(super) dp: usize,
    pub(super) dvp: usize,
    /// Key columns per tile (`BK_MIN` or `BK_MAX`).
    pub(super) bk: usize,
}

impl<T, A> Job<'_, T, A> {
    pub(super) fn row(&self, b: usize, h: usize, i: usize) -> usize {
        (b * self.dims.h + h) * self.dims.q + i
    }
    pub(super) fn nqb(&self) -> usize {
        self.dims.q.div_ceil(BQ)
    }
    pub(super) fn nkb(&self) -> usize {
        self.dims.k.div_ceil(self.bk)
    }
}

/// The written gradients of the score-mod terms. Key terms: each kv item owns its columns of `key`
/// (`[B, H, K]`, written directly). Distance terms: each kv item `(b, kvh, kb)` writes its partial sums into
/// its own slot of `dist` (`g` rows of `slot = Q + bk - 1`, local index `c - i + Q - 1` for tile column `c`
/// and query row `i`, i.e. global index `kb·bk + local`); the slots are then summed in a fixed order.
pub(super) struct TermGrads<A> {
    pub(super) dist: Option<Slots<A>>,
    pub(super) slot: usize,
    pub(super) key: Option<AnyOut>,
}

/// A buffer of per-item slots that items write in parallel, each its own.
pub(super) struct Slots<A>(pub(super) *mut A);

// SAFETY: the address of a buffer that outlives the call's items; each item writes only its own slot.
unsafe impl<A> Send for Slots<A> {}
// SAFETY: as for `Send`.
unsafe impl<A> Sync for Slots<A> {}

/// Query and dO rows packed as operands of `K`: all rows of the GQA group (`[G][Q'][..]`, `Q'` = Q rounded
/// up to even), packed once per kv item when they fit [`GROUP_PACK_BUDGET`]; otherwise (`per_tile`, and for a
/// dQ item or a row-statistics pass) one tile at a time at row 0. Row-major copies are the A operands of
/// `Q·Kᵀ` and `dO·Vᵀ`; the B operands of `dSᵀ·Q` and `Pᵀ·dO` take rows in pairs (`[Q'/2][..][2]`) when
/// `K::PAIR == 2` (for `PAIR == 1` the row-major copies serve). Packing is exact, so how rows are packed
/// never changes a gradient.
pub(super) struct Packed<E> {
    pub(super) q: Vec<E>,
    pub(super) dout: Vec<E>,
    pub(super) q_pairs: Vec<E>,
    pub(super) dout_pairs: Vec<E>,
    pub(super) per_tile: bool,
}

/// Bytes one work item may hold of packed query and dO rows of its whole GQA group (per thread).
pub(super) const GROUP_PACK_BUDGET: usize = 32 << 20;

impl<E: Copy + Default> Packed<E> {
    pub(super) fn new() -> Self {
        Packed {
            q: Vec::new(),
            dout: Vec::new(),
            q_pairs: Vec::new(),
            dout_pairs: Vec::new(),
            per_tile: true,
        }
    }

    /// Whether the whole group's rows fit `budget` bytes for this call (a bf16 pair layout doubles them).
    pub(super) fn group_fits<K: Kern<E = E>, T>(job: &Job<T, K::A>, budget: usize) -> bool {
        let rows = job.dims.g * job.dims.q.next_multiple_of(2);
        let bytes = rows * (job.dp + job.dvp) * std::mem::size_of::<E>() * K::PAIR;
        bytes <= budget
    }

    /// Packs rows `r0..r0 + rows` of query head `h` (and of dO when `with_dout`) at row `at` (even).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pack<K: Kern<E = E>, T: Float>(
        &mut self,
        job: &Job<T, K::A>,
        b: usize,
        h: usize,
        r0: usize,
        rows: usize,
        at: usize,
        with_dout: bool,
    ) {
        debug_assert!(at.is_multiple_of(2));
        let Dims { d, dv, .. } = job.dims;
        let (dp, dvp) = (job.dp, job.dvp);
        let end = at + rows.next_multiple_of(2);
        let grow = |v: &mut Vec<E>, len: usize| {
            if v.len() < len {
                v.resize(len, E::default());
            }
        };
        grow(&mut self.q, end * dp);
        pack_a::<K, T>(&job.q, b, h, r0, rows, d, dp, &mut self.q[at * dp..]);
        if K::PAIR == 2 {
            grow(&mut self.q_pairs, end * dp);
            pack_b_rows::<K, T>(&job.q, b, h, r0, rows, d, dp, &mut self.q_pairs[at * dp..]);
        }
        if with_dout {
            grow(&mut self.dout, end * dvp);
            pack_a::<K, T>(
                &job.dout,
                b,
                h,
                r0,
                rows,
                dv,
                dvp,
                &mut self.dout[at * dvp..],
            );
            if K::PAIR == 2 {
                grow(&mut self.dout_pairs, end * dvp);
                let dst = &mut self.dout_pairs[at * dvp..];
                pack_b_rows::<K, T>(&job.dout, b, h, r0, rows, dv, dvp, dst);
            }
        }
    }

    /// The B-operand rows of query and dO (see the type's docs).
    pub(super) fn b_rows(&self, pair: usize) -> (&[E], &[E]) {
        if pair == 2 {
            (&self.q_pairs, &self.dout_pairs)
        } else {
            (&self.q, &self.dout)
        }
    }
}

/// Per-item tile buffers: operands (`K::E`, zero-padded to the packed widths) and accumulators (`K::A`).
pub(super) struct Scratch<K: Kern> {
    /// Kᵀ and Vᵀ of the kv tile as B operands, `[D'/PAIR][BK][PAIR]`.
    pub(super) kt: Vec<K::E>,
    pub(super) vt: Vec<K::E>,
    /// K rows of the kv tile as the B operand of `dS·K`, `[BK/PAIR][dp][PAIR]`.
    pub(super) kr: Vec<K::E>,
    /// Logits, then P, `[BQ][BK]`.
    pub(super) p: Vec<K::A>,
    /// dP, then dS, `[BQ][BK]`.
    pub(super) ds: Vec<K::A>,
    /// Pᵀ and dSᵀ `[BK][BQ]`, and dS `[BQ][BK]`, as A operands; `stage` for [`transpose`].
    pub(super) pt: Vec<K::E>,
    pub(super) stage: Vec<u32>,
    pub(super) dst: Vec<K::E>,
    pub(super) ds_e: Vec<K::E>,
    /// Softcap derivative `1 - t²`, `[BQ][BK]`.
    pub(super) g: Vec<K::A>,
    /// Visibility of a partial tile (`m` rows of `n`).
    pub(super) vis: TileVis,
    /// One bias row (or one row of score terms), `[BK]`.
    pub(super) brow: Vec<K::A>,
    /// This kv item's partial gradients of the score terms: distance `[G][slot]`, key `[G][BK]` (empty
    /// when not wanted).
    pub(super) gdist: Vec<K::A>,
    pub(super) gkey: Vec<K::A>,
    /// dK `[BK][dp]` (kv items) or dQ `[BQ][dp]` (dQ items).
    pub(super) acc_k: Vec<K::A>,
    /// dV `[BK][dvp]`.
    pub(super) acc_v: Vec<K::A>,
    pub(super) zeros: Vec<K::A>,
}

impl<K: Kern> Scratch<K> {
    pub(super) fn new<T>(job: &Job<T, K::A>) -> Self {
        let Dims { d, dv, .. } = job.dims;
        let (dp, dvp) = (job.dp, job.dvp);
        let (ze, za, bk) = (K::E::default(), K::A::ZERO, job.bk);
        Scratch {
            kt: vec![ze; d.next_multiple_of(2) * bk],
            vt: vec![ze; dv.next_multiple_of(2) * bk],
            kr: vec![ze; bk * dp],
            p: vec![za; BQ * bk],
            ds: vec![za; BQ * bk],
            pt: vec![ze; bk * BQ],
            stage: vec![0; BQ * bk],
            dst: vec![ze; bk * BQ],
            ds_e: vec![ze; BQ * bk],
            g: vec![za; BQ * bk],
            vis: TileVis::new(BQ, bk),
            brow: vec![za; bk],
            gdist: match &job.term_grads {
                Some(t) if t.dist.is_some() => vec![za; job.dims.g * t.slot],
                _ => Vec::new(),
            },
            gkey: match &job.term_grads {
                Some(t) if t.key.is_some() => vec![za; job.dims.g * bk],
                _ => Vec::new(),
            },
            acc_k: vec![za; bk.max(BQ) * dp],
            acc_v: vec![za; bk * dvp],
            zeros: vec![za; bk],
        }
    }
}
