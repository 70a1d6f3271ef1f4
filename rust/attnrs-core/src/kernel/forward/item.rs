//! The per-item loop of the packed path: the query rows of a GQA group over packed K/V tiles (packed
//! beforehand by prefill, or streamed tile by tile by split-KV decode), `S = Q·Kᵀ` and `O += P·V` on the
//! micro-kernel `K`, the online softmax between them.

use std::ops::Range;

use super::tile::{BC, Job, Rows, round_up, softmax_tile};
use crate::kernel::args::Dims;
use crate::kernel::gemm::Kern;
use crate::kernel::pack::pack_tile;
use crate::kernel::softmax::{Acc, Logits};
use crate::mask::tiles::{BlockClass, TileVis};
use crate::tensor::Float;

/// Per-item buffers.
pub(super) struct Scratch<K: Kern> {
    pub(super) qp: Vec<K::E>,
    pub(super) s: Vec<K::A>,
    pub(super) p: Vec<K::E>,
    pub(super) o: Vec<K::A>,
    pub(super) m: Vec<K::A>,
    pub(super) l: Vec<K::A>,
    pub(super) vis: TileVis,
    pub(super) bias: Vec<K::A>,
    pub(super) kv: Vec<K::E>,
    pub(super) stage: Vec<u32>,
    /// Continue from the rows' state left by the previous call (same rows, later tiles) instead of starting.
    pub(super) resume: bool,
}

impl<K: Kern> Scratch<K> {
    pub(super) fn new<T>(job: &Job<T>) -> Self {
        let rows = job.dims.g * job.bq;
        Scratch {
            qp: vec![K::E::default(); rows * job.dp],
            s: vec![K::A::default(); rows * BC],
            p: vec![K::E::default(); rows * BC],
            o: vec![K::A::default(); rows * job.dvp],
            m: vec![K::A::default(); rows],
            l: vec![K::A::default(); rows],
            vis: TileVis::new(job.bq, BC),
            bias: vec![K::A::default(); 2 * BC], // a bias row, then a score-terms row
            kv: Vec::new(),
            stage: Vec::new(),
            resume: false,
        }
    }
}

/// Where an item finds its packed K/V tiles.
#[derive(Clone, Copy)]
pub(super) enum KvSrc<'a, E> {
    /// All tiles of this kv head, packed beforehand (`klen + vlen` per tile).
    Packed(&'a [E]),
    /// Pack each tile into the scratch as it comes.
    Stream,
}

/// Runs the rows of `(b, kvh, q0..q1)` over kv tiles `tiles`, leaving (m, l, O) in the scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn item_body<K: Kern, T: Float>(
    job: &Job<T>,
    b: usize,
    kvh: usize,
    q0: usize,
    q1: usize,
    tiles: Range<usize>,
    src: KvSrc<'_, K::E>,
    sc: &mut Scratch<K>,
) {
    let Dims { g, d, .. } = job.dims;
    let klen_total = job.k_len(b);
    let (bq, dp, dvp, pair) = (q1 - q0, job.dp, job.dvp, K::PAIR);
    let rows = g * bq;
    // Pack the query rows of the whole GQA group: row r = gi * bq + i (already there when resuming).
    for gi in (0..g).filter(|_| !sc.resume) {
        for i in 0..bq {
            let r = gi * bq + i;
            // SAFETY: (b, kvh * g + gi, q0 + i, 0) is in range of query; its row has D elements.
            let row = unsafe { job.q.at(b, kvh * g + gi, q0 + i, 0) };
            for dd in 0..d {
                // SAFETY: dd < D.
                sc.qp[r * dp + dd] =
                    K::load(unsafe { row.offset(dd as isize * job.q.st[3]).read() });
            }
        }
    }
    if !sc.resume {
        sc.m[..rows].fill(K::A::NEG_INF);
        sc.l[..rows].fill(K::A::ZERO);
        sc.o[..rows * dvp].fill(K::A::ZERO);
    }
    let lg = Logits {
        scale: K::A::from_f64(job.scale),
        softcap: job
            .softcap
            .map(|c| (K::A::from_f64(c), K::A::from_f64(1.0 / c))),
    };
    let mut classes = vec![BlockClass::Empty; g];
    for t in tiles {
        let c0 = t * BC;
        if c0 >= klen_total {
            break; // past this sequence's keys (a ragged call)
        }
        let n = (klen_total - c0).min(BC);
        for (gi, cls) in classes.iter_mut().enumerate() {
            *cls = job.mask.classify(b, kvh * g + gi, q0..q1, c0..c0 + n);
        }
        if classes.iter().all(|c| *c == BlockClass::Empty) {
            continue;
        }
        let tile: &[K::E] = match src {
            KvSrc::Packed(all) => {
                &all[t * (job.klen() + job.vlen())..(t + 1) * (job.klen() + job.vlen())]
            }
            KvSrc::Stream => {
                sc.kv.resize(job.klen() + job.vlen(), K::E::default());
                pack_tile::<K, T>(job, b, kvh, t, &mut sc.kv, &mut sc.stage);
                &sc.kv
            }
        };
        let (kt, vt) = tile.split_at(job.klen());
        let uniform = classes.iter().all(|c| *c == classes[0]);
        let nw = round_up(n, 16);
        // Row ranges to multiply: all rows at once when every head agrees, else head by head.
        let spans: Vec<(usize, usize)> = if uniform {
            vec![(0, rows)]
        } else {
            (0..g)
                .filter(|&gi| classes[gi] != BlockClass::Empty)
                .map(|gi| (gi * bq, bq))
                .collect()
        };
        for &(r0, m) in &spans {
            // SAFETY: rows r0..r0+m of Q (dp each), all BC columns of the Kᵀ tile (dp / pair units deep) and
            // rows r0..r0+m of S (BC each) are inside their buffers; nw <= BC and nw % 16 == 0.
            unsafe {
                K::gemm(
                    m,
                    nw,
                    dp / pair,
                    sc.qp.as_ptr().add(r0 * dp),
                    dp,
                    kt.as_ptr(),
                    BC,
                    sc.s.as_mut_ptr().add(r0 * BC),
                    BC,
                    false,
                );
            }
        }
        softmax_tile(
            job,
            b,
            kvh,
            (q0..q1, c0..c0 + n),
            &classes,
            lg,
            &mut sc.s,
            &mut sc.p,
            Rows {
                m: &mut sc.m,
                l: &mut sc.l,
                o: &mut sc.o,
                ld: dvp,
            },
            {
                let (bias, terms) = sc.bias.split_at_mut(BC);
                (&mut sc.vis, bias, terms)
            },
            // SAFETY: `item_body` only runs inside the `#[target_feature]` entry points of `K`'s features
            // (`Entry`), called on CPUs that have them.
            unsafe { K::row_passes() },
        );
        for &(r0, m) in &spans {
            // SAFETY: rows r0..r0+m of P (BC each, the first n.div_ceil(pair)·pair written), the V tile's
            // n.div_ceil(pair) pair-rows of dvp columns, and rows of O (dvp each) are inside their buffers.
            unsafe {
                K::gemm(
                    m,
                    dvp,
                    n.div_ceil(pair),
                    sc.p.as_ptr().add(r0 * BC),
                    BC,
                    vt.as_ptr(),
                    dvp,
                    sc.o.as_mut_ptr().add(r0 * dvp),
                    dvp,
                    true,
                );
            }
        }
    }
}

/// The per-ISA entry points of the forward: [`item_body`] and [`pack_tile`] compiled inside
/// `#[target_feature]` functions, one pair per row of `for_each_isa!`.
pub(crate) trait Entry: Kern {
    /// # Safety
    /// The CPU must support the kernel's target features.
    #[allow(clippy::too_many_arguments)]
    unsafe fn item<T: Float>(
        job: &Job<T>,
        b: usize,
        kvh: usize,
        q0: usize,
        q1: usize,
        tiles: Range<usize>,
        src: KvSrc<'_, Self::E>,
        sc: &mut Scratch<Self>,
    );
    /// # Safety
    /// As for [`Entry::item`].
    unsafe fn pack<T: Float>(
        job: &Job<T>,
        b: usize,
        kvh: usize,
        t: usize,
        dst: &mut [Self::E],
        stage: &mut Vec<u32>,
    );
}

macro_rules! entry {
    ($kern:ty $(, $feature:literal)?) => {
        impl Entry for $kern {
            unsafe fn item<T: Float>(
                job: &Job<T>,
                b: usize,
                kvh: usize,
                q0: usize,
                q1: usize,
                tiles: Range<usize>,
                src: KvSrc<'_, Self::E>,
                sc: &mut Scratch<Self>,
            ) {
                $(#[target_feature(enable = $feature)])?
                #[allow(clippy::too_many_arguments)]
                unsafe fn go<T: Float>(
                    job: &Job<T>,
                    b: usize,
                    kvh: usize,
                    q0: usize,
                    q1: usize,
                    tiles: Range<usize>,
                    src: KvSrc<'_, <$kern as Kern>::E>,
                    sc: &mut Scratch<$kern>,
                ) {
                    item_body::<$kern, T>(job, b, kvh, q0, q1, tiles, src, sc)
                }
                // SAFETY: the caller guarantees the CPU has the features `go` is compiled for.
                unsafe { go::<T>(job, b, kvh, q0, q1, tiles, src, sc) }
            }
            unsafe fn pack<T: Float>(
                job: &Job<T>,
                b: usize,
                kvh: usize,
                t: usize,
                dst: &mut [Self::E],
                stage: &mut Vec<u32>,
            ) {
                $(#[target_feature(enable = $feature)])?
                unsafe fn go<T: Float>(
                    job: &Job<T>,
                    b: usize,
                    kvh: usize,
                    t: usize,
                    dst: &mut [<$kern as Kern>::E],
                    stage: &mut Vec<u32>,
                ) {
                    pack_tile::<$kern, T>(job, b, kvh, t, dst, stage)
                }
                // SAFETY: as above.
                unsafe { go::<T>(job, b, kvh, t, dst, stage) }
            }
        }
    };
}

crate::kernel::dispatch::for_each_isa!(entry);
