//! Work decomposition, packing and the per-item loop; dtype and ISA dispatch.
//!
//! Prefill (more than one query block per kv head): K and V of a group of kv heads are packed once into
//! tiles, then every (kv head, query block) item runs over them in the private pool. Decode (a single query
//! block per kv head): on AVX-512 each item reads K and V rows in place ([`super::decode`]); elsewhere it
//! streams its kv tiles, packing each as it goes. When there are too few items to fill the threads, the kv
//! length is split and the partial (m, l, O) are merged by log-sum-exp.

use std::ops::Range;

use rayon::prelude::*;

use super::args::{Checked, Dims};
use super::dispatch::{select, Backend, Body, Isa, Select};
use super::dropout::DropMask;
use super::gemm::Kern;
use super::softmax::{finish, merge_into, online_step, rescale, Acc, Logits};
use super::strided::{read_sinks, BiasRef, Strided};
use super::AttentionArgs;
use crate::block::{BlockClass, MaskTiles};
use crate::tensor::Float;
use crate::{threads, Result};

/// Key/value columns per tile.
pub(super) const BC: usize = 64;
/// Query rows (all heads of a GQA group together) per work item, aimed for.
pub(crate) const ROWS: usize = 96;
/// Bytes of packed K/V held at once by the prefill path.
const PACK_BUDGET: usize = 64 << 20;

pub(super) fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// One call, typed: raw strided views plus the scalars.
pub(crate) struct Job<'a, T> {
    pub(super) dims: Dims,
    pub(super) q: Strided<T>,
    pub(super) k: Strided<T>,
    pub(super) v: Strided<T>,
    pub(super) out: Strided<T>,
    pub(super) lse: Option<Strided<f32>>,
    pub(super) bias: Option<BiasRef>,
    pub(super) sinks: Option<Vec<f64>>,
    pub(super) mask: &'a dyn MaskTiles,
    pub(super) scale: f64,
    pub(super) softcap: Option<f64>,
    pub(super) drop: Option<DropMask>,
    /// Query rows per block (per head).
    pub(super) bq: usize,
    /// Packed row lengths: D rounded up to 2, Dv rounded up to 16.
    pub(super) dp: usize,
    pub(super) dvp: usize,
}

impl<T> Job<'_, T> {
    fn ntiles(&self) -> usize {
        self.dims.k.div_ceil(BC)
    }
    fn nqb(&self) -> usize {
        self.dims.q.div_ceil(self.bq)
    }
    fn klen(&self) -> usize {
        self.dp * BC
    }
    fn vlen(&self) -> usize {
        BC * self.dvp
    }
}

/// The state `(m, l, O)` of an item's rows over part of the key range.
type Partial<A> = (Vec<A>, Vec<A>, Vec<A>);

/// Per-item buffers.
struct Scratch<K: Kern> {
    qp: Vec<K::E>,
    s: Vec<K::A>,
    p: Vec<K::E>,
    o: Vec<K::A>,
    m: Vec<K::A>,
    l: Vec<K::A>,
    vis: Vec<u8>,
    bias: Vec<K::A>,
    kv: Vec<K::E>,
    stage: Vec<u32>,
}

impl<K: Kern> Scratch<K> {
    fn new<T>(job: &Job<T>) -> Self {
        let rows = job.dims.g * job.bq;
        Scratch {
            qp: vec![K::E::default(); rows * job.dp],
            s: vec![K::A::default(); rows * BC],
            p: vec![K::E::default(); rows * BC],
            o: vec![K::A::default(); rows * job.dvp],
            m: vec![K::A::default(); rows],
            l: vec![K::A::default(); rows],
            vis: vec![0; job.bq * BC],
            bias: vec![K::A::default(); BC],
            kv: Vec::new(),
            stage: Vec::new(),
        }
    }
}

/// Where an item finds its packed K/V tiles.
#[derive(Clone, Copy)]
enum KvSrc<'a, E> {
    /// All tiles of this kv head, packed beforehand (`klen + vlen` per tile).
    Packed(&'a [E]),
    /// Pack each tile into the scratch as it comes.
    Stream,
}

/// Packs kv tile `t` of `(b, kvh)` into `dst` (`klen` of Kᵀ then `vlen` of V). Padding (d beyond D, columns
/// beyond the tile, v columns beyond Dv) is written as zeros.
#[inline(always)]
fn pack_tile<K: Kern, T: Float>(
    job: &Job<T>,
    b: usize,
    kvh: usize,
    t: usize,
    dst: &mut [K::E],
    stage: &mut Vec<u32>,
) {
    let Dims {
        k: klen_total,
        d,
        dv,
        ..
    } = job.dims;
    let pair = K::PAIR;
    let c0 = t * BC;
    let n = (klen_total - c0).min(BC);
    let (kt, vt) = dst.split_at_mut(job.klen());
    let zero = K::E::default();
    // Contiguous rows whose bits are the operand's pack by moving 32-bit units (no conversion).
    let raw = K::RAW == Some(T::DTYPE) && std::mem::size_of::<K::E>() * pair == 4;
    let tsize = std::mem::size_of::<T>() as isize;
    // Kᵀ: [dp / pair][BC][pair].
    if raw && job.k.st[3] == 1 && d % pair == 0 && n > 0 {
        // SAFETY: rows c0..c0+n of key are in range, each with D contiguous elements (D / pair units); `kt`
        // holds dp / pair units of BC columns; the kernel's features were checked by `Backend::resolve`.
        unsafe {
            let src = job.k.at(b, kvh, c0, 0).cast::<u8>();
            let row_bytes = job.k.st[2] * tsize;
            let units = d / pair;
            // Copy the rows to a contiguous stage first: a sequential read the prefetchers follow, after which
            // the transposing gathers hit L1/L2 instead of 16 DRAM streams at once.
            stage.resize(n * units, 0);
            for c in 0..n {
                let row = src.offset(c as isize * row_bytes);
                std::ptr::copy_nonoverlapping(
                    row,
                    stage.as_mut_ptr().add(c * units).cast::<u8>(),
                    units * 4,
                );
            }
            let row_bytes = (units * 4) as isize;
            K::transpose_units(
                stage.as_ptr().cast(),
                row_bytes,
                n,
                units,
                kt.as_mut_ptr().cast(),
                BC,
            );
        }
    } else {
        for c in 0..n {
            // SAFETY: (b, kvh, c0 + c, 0) is in range of key; its row has D elements at stride st[3].
            let row = unsafe { job.k.at(b, kvh, c0 + c, 0) };
            for dd in 0..d {
                // SAFETY: dd < D.
                let x = unsafe { row.offset(dd as isize * job.k.st[3]).read() };
                kt[((dd / pair) * BC + c) * pair + dd % pair] = K::load(x);
            }
        }
    }
    for c in n..BC {
        for dd in 0..job.dp {
            kt[((dd / pair) * BC + c) * pair + dd % pair] = zero;
        }
    }
    // V: [BC / pair][dvp][pair].
    let vrow = |c: usize| -> Option<*const T> {
        // SAFETY: (b, kvh, c0 + c, 0) is in range of value when c < n.
        (c < n).then(|| unsafe { job.v.at(b, kvh, c0 + c, 0) } as *const T)
    };
    if raw && job.v.st[3] == 1 && pair == 1 {
        for c in 0..BC {
            let dst = &mut vt[c * job.dvp..c * job.dvp + dv];
            match vrow(c) {
                // SAFETY: the row holds Dv contiguous elements whose bits are `K::E` values (`raw`).
                Some(row) => dst
                    .copy_from_slice(unsafe { std::slice::from_raw_parts(row.cast::<K::E>(), dv) }),
                None => dst.fill(zero),
            }
        }
    } else if raw && job.v.st[3] == 1 {
        // bf16 pairs: unit (cp, j) = v[2cp, j] | v[2cp + 1, j] << 16.
        // SAFETY: rows hold Dv contiguous 16-bit elements.
        let half =
            |c: usize| vrow(c).map(|r| unsafe { std::slice::from_raw_parts(r.cast::<u16>(), dv) });
        for cp in 0..BC / 2 {
            let dst = vt[cp * job.dvp * 2..(cp * job.dvp + dv) * 2]
                .as_mut_ptr()
                .cast::<u32>();
            let put = |j: usize, x: u32| {
                // SAFETY: unit j < Dv of pair-row cp lies inside `vt` (sliced above); unaligned write.
                unsafe { dst.add(j).write_unaligned(x) }
            };
            match (half(2 * cp), half(2 * cp + 1)) {
                (Some(a), Some(bb)) => a
                    .iter()
                    .zip(bb)
                    .enumerate()
                    .for_each(|(j, (&x, &y))| put(j, x as u32 | (y as u32) << 16)),
                (Some(a), None) => a.iter().enumerate().for_each(|(j, &x)| put(j, x as u32)),
                _ => (0..dv).for_each(|j| put(j, 0)),
            }
        }
    } else {
        for c in 0..BC {
            let (cp, ct) = (c / pair, c % pair);
            match vrow(c) {
                Some(row) => {
                    for j in 0..dv {
                        // SAFETY: j < Dv.
                        let x = unsafe { row.offset(j as isize * job.v.st[3]).read() };
                        vt[(cp * job.dvp + j) * pair + ct] = K::load(x);
                    }
                }
                None => {
                    for j in 0..dv {
                        vt[(cp * job.dvp + j) * pair + ct] = zero;
                    }
                }
            }
        }
    }
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
    let Dims {
        g,
        d,
        k: klen_total,
        ..
    } = job.dims;
    let (bq, dp, dvp, pair) = (q1 - q0, job.dp, job.dvp, K::PAIR);
    let rows = g * bq;
    // Pack the query rows of the whole GQA group: row r = gi * bq + i.
    for gi in 0..g {
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
    sc.m[..rows].fill(K::A::NEG_INF);
    sc.l[..rows].fill(K::A::ZERO);
    sc.o[..rows * dvp].fill(K::A::ZERO);
    let lg = Logits {
        scale: K::A::from_f64(job.scale),
        softcap: job
            .softcap
            .map(|c| (K::A::from_f64(c), K::A::from_f64(1.0 / c))),
    };
    let mut classes = vec![BlockClass::Empty; g];
    for t in tiles {
        let c0 = t * BC;
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
            (&mut sc.vis, &mut sc.bias),
            K::to_e,
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

/// The softmax state of an item's rows: `m`, `l` (one per row) and `O` (`dvp` per row).
pub(super) struct Rows<'a, A> {
    pub m: &'a mut [A],
    pub l: &'a mut [A],
    pub o: &'a mut [A],
    /// Elements per row of `o`.
    pub ld: usize,
}

/// The online-softmax step of one kv tile (`cells` = query rows × key columns) for the rows of every head of
/// the group whose class is not empty: bias and mask applied, `m` and `l` updated, `O` rescaled, `P` written.
/// `s` and `p` hold the rows of the group (`r = gi * bq + i`) at stride [`BC`]; `scratch` is (visibility
/// bytes, one bias row).
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
    scratch: (&mut [u8], &mut [A]),
    to_e: impl Fn(A) -> E + Copy,
) {
    let (rows, cols) = cells;
    let (q0, bq, c0, n) = (rows.start, rows.len(), cols.start, cols.len());
    let (g, nw) = (job.dims.g, round_up(n, 16));
    let (vis, bias) = scratch;
    for (gi, &cls) in classes.iter().enumerate() {
        if cls == BlockClass::Empty {
            continue;
        }
        let h = kvh * g + gi;
        let partial = cls == BlockClass::Partial;
        if partial {
            job.mask
                .fill(b, h, rows.clone(), cols.clone(), &mut vis[..bq * n]);
        }
        for i in 0..bq {
            let r = gi * bq + i;
            if let Some(bref) = &job.bias {
                // SAFETY: (b, h, q0 + i) and columns c0..c0+n are in range of [B, H, Q, K].
                unsafe { bref.row(b, h, q0 + i, c0, &mut bias[..n], A::from_f64) };
            }
            let alpha = online_step(
                &mut s[r * BC..r * BC + nw],
                n,
                lg,
                job.bias.as_ref().map(|_| &bias[..n]),
                partial.then(|| &vis[i * n..(i + 1) * n]),
                &mut st.m[r],
                &mut st.l[r],
                &mut p[r * BC..r * BC + nw],
                to_e,
            );
            if alpha != A::ONE {
                rescale(&mut st.o[r * st.ld..(r + 1) * st.ld], alpha);
            }
            if let Some(drop) = &job.drop {
                // The denominator `l` keeps every weight; only `P·V` loses the dropped ones.
                drop.row(b, h, q0 + i)
                    .drop_into(c0, &mut p[r * BC..r * BC + n], to_e(A::ZERO));
            }
        }
    }
}

/// Writes out (and lse) for rows whose state `(m, l, O)` is final.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn write_rows<A: Acc, T: Float>(
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

/// [`item_body`] as a [`Body`], to run inside an ISA's features.
struct Item<'a, 'j, K: Kern, T> {
    job: &'a Job<'j, T>,
    b: usize,
    kvh: usize,
    q0: usize,
    q1: usize,
    tiles: Range<usize>,
    src: KvSrc<'a, K::E>,
    sc: &'a mut Scratch<K>,
}

impl<K: Kern, T: Float> Body for Item<'_, '_, K, T> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let Item {
            job,
            b,
            kvh,
            q0,
            q1,
            tiles,
            src,
            sc,
        } = self;
        item_body::<K, T>(job, b, kvh, q0, q1, tiles, src, sc)
    }
}

/// [`pack_tile`] as a [`Body`].
struct Pack<'a, 'j, K: Kern, T> {
    job: &'a Job<'j, T>,
    b: usize,
    kvh: usize,
    t: usize,
    dst: &'a mut [K::E],
    stage: &'a mut Vec<u32>,
}

impl<K: Kern, T: Float> Body for Pack<'_, '_, K, T> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        pack_tile::<K, T>(self.job, self.b, self.kvh, self.t, self.dst, self.stage)
    }
}

/// Validated arguments in, output written.
/// `rows` is the number of query rows (all heads of a group) a work item aims for ([`ROWS`]; tests shrink it).
pub(crate) fn run(
    args: &AttentionArgs,
    plan: &Checked,
    backend: Backend,
    rows: usize,
) -> Result<()> {
    struct Forward<'a, 'b> {
        args: &'a AttentionArgs<'b>,
        plan: &'a Checked,
        rows: usize,
    }
    impl Select for Forward<'_, '_> {
        type Out = Result<()>;
        fn with<K: Isa, T: Float>(self) -> Result<()> {
            go::<K, T>(self.args, self.plan, self.rows)
        }
    }
    select(plan.dtype, backend, Forward { args, plan, rows })
}

/// Runs the call with kernel family `K` on inputs of type `T`. Only called with a `K` whose features the CPU
/// has (see [`select`]).
fn go<K: Isa, T: Float>(args: &AttentionArgs, plan: &Checked, rows: usize) -> Result<()> {
    let dims = plan.dims;
    let bq = rows.div_ceil(dims.g).clamp(1, dims.q.max(1));
    let job = Job::<T> {
        dims,
        q: Strided::of(args.query),
        k: Strided::of(args.key),
        v: Strided::of(args.value),
        out: Strided::of(args.out),
        lse: args.lse.map(|t| {
            let mut s = Strided::of(t);
            s.st[3] = 0;
            s
        }),
        bias: args.bias.zip(plan.bias_strides).map(|(t, st)| BiasRef {
            ptr: t.as_ptr(),
            dtype: t.dtype(),
            st,
        }),
        sinks: args.sinks.map(read_sinks),
        mask: args.mask,
        scale: plan.scale,
        softcap: plan.softcap,
        drop: DropMask::new(args.dropout, dims.h, dims.q),
        bq,
        dp: round_up(dims.d, 2),
        dvp: round_up(dims.dv, 16),
    };
    threads::install(plan.threads, || {
        if job.nqb() == 1 {
            decode::<K, T>(&job, plan.threads)
        } else {
            prefill::<K, T>(&job)
        }
    })
}

fn prefill<K: Isa, T: Float>(job: &Job<T>) {
    let Dims { b: nb, hkv, .. } = job.dims;
    let (ntiles, nqb) = (job.ntiles(), job.nqb());
    let tile_len = job.klen() + job.vlen();
    let per_head = (ntiles * tile_len * std::mem::size_of::<K::E>()).max(1);
    let chunk = (PACK_BUDGET / per_head).clamp(1, nb * hkv);
    let heads: Vec<(usize, usize)> = (0..nb)
        .flat_map(|b| (0..hkv).map(move |h| (b, h)))
        .collect();
    let mut packed: Vec<K::E> = Vec::new();
    for group in heads.chunks(chunk) {
        packed.clear();
        packed.resize(group.len() * ntiles * tile_len, K::E::default());
        if tile_len > 0 {
            packed.par_chunks_mut(tile_len).enumerate().for_each_init(
                Vec::new,
                |stage, (idx, dst)| {
                    let (b, kvh) = group[idx / ntiles];
                    // SAFETY: `K` was chosen by `Backend::resolve` for this CPU.
                    unsafe {
                        K::enter(Pack::<K, T> {
                            job,
                            b,
                            kvh,
                            t: idx % ntiles,
                            dst,
                            stage,
                        })
                    };
                },
            );
        }
        let packed = &packed;
        // Largest blocks first (under a causal mask the last query blocks see the most keys).
        (0..group.len() * nqb).into_par_iter().for_each_init(
            || Scratch::<K>::new(job),
            |sc, idx| {
                let (hi, qb) = (idx / nqb, nqb - 1 - idx % nqb);
                let (b, kvh) = group[hi];
                let q0 = qb * job.bq;
                let q1 = (q0 + job.bq).min(job.dims.q);
                let all = &packed[hi * ntiles * tile_len..(hi + 1) * ntiles * tile_len];
                // SAFETY: as above.
                unsafe {
                    K::enter(Item::<K, T> {
                        job,
                        b,
                        kvh,
                        q0,
                        q1,
                        tiles: 0..ntiles,
                        src: KvSrc::Packed(all),
                        sc,
                    })
                };
                let rows = job.dims.g * (q1 - q0);
                write_rows(
                    job,
                    b,
                    kvh,
                    q0,
                    q1 - q0,
                    &sc.m[..rows],
                    &sc.l[..rows],
                    &sc.o[..rows * job.dvp],
                );
            },
        );
    }
}

/// An item's final or partial row state `(m, l, O)`.
trait State<A> {
    fn state(&self) -> (&[A], &[A], &[A]);
}

impl<K: Kern> State<K::A> for Scratch<K> {
    fn state(&self) -> (&[K::A], &[K::A], &[K::A]) {
        (&self.m, &self.l, &self.o)
    }
}

#[cfg(target_arch = "x86_64")]
impl State<f32> for super::decode::Scratch {
    fn state(&self) -> (&[f32], &[f32], &[f32]) {
        (&self.m, &self.l, &self.o)
    }
}

fn decode<K: Isa, T: Float>(job: &Job<T>, threads: usize) {
    #[cfg(target_arch = "x86_64")]
    if K::AVX512 && super::decode::applies(job) {
        // bf16 pairs: the AVX-512 BF16 kernel, whose CPU has `vdpbf16ps`.
        let dot = K::PAIR == 2;
        let scratch = || super::decode::Scratch::new(job, dot);
        // SAFETY: `K::AVX512` says `Backend::resolve` found AVX-512F/BW/VL (and BF16 when `dot`) on this CPU;
        // `applies` holds; the scratch was made with the same `dot`.
        let run = |sc: &mut _, b, kvh, tiles| unsafe {
            super::decode::item::<T>(job, b, kvh, tiles, sc, dot)
        };
        return split_kv::<f32, T, _>(job, threads, scratch, run);
    }
    let q = job.dims.q;
    // SAFETY: `K` was chosen by `Backend::resolve` for this CPU.
    let run = |sc: &mut Scratch<K>, b, kvh, tiles| unsafe {
        K::enter(Item::<K, T> {
            job,
            b,
            kvh,
            q0: 0,
            q1: q,
            tiles,
            src: KvSrc::Stream,
            sc,
        })
    };
    split_kv::<K::A, T, _>(job, threads, || Scratch::<K>::new(job), run);
}

/// Runs every (batch, kv head) over all its kv tiles, splitting the tiles into pieces merged by log-sum-exp
/// when there are too few heads to keep the threads busy. `run(scratch, b, kvh, tiles)` leaves the rows'
/// state in the scratch.
fn split_kv<A: Acc, T: Float, S: State<A>>(
    job: &Job<T>,
    threads: usize,
    scratch: impl Fn() -> S + Sync + Send,
    run: impl Fn(&mut S, usize, usize, Range<usize>) + Sync + Send,
) {
    let Dims {
        b: nb, hkv, q, g, ..
    } = job.dims;
    let ntiles = job.ntiles();
    let heads = nb * hkv;
    let dvp = job.dvp;
    // Enough pieces to keep every thread busy, none shorter than two tiles.
    let splits = (4 * threads).div_ceil(heads).clamp(1, (ntiles / 2).max(1));
    let rows = g * q;
    if splits == 1 {
        (0..heads)
            .into_par_iter()
            .for_each_init(&scratch, |sc, idx| {
                let (b, kvh) = (idx / hkv, idx % hkv);
                run(sc, b, kvh, 0..ntiles);
                let (m, l, o) = sc.state();
                write_rows(job, b, kvh, 0, q, &m[..rows], &l[..rows], &o[..rows * dvp]);
            });
        return;
    }
    let per = ntiles.div_ceil(splits);
    // Partial states, one per (head, split): m, l and O of every row.
    let parts: Vec<Partial<A>> = (0..heads * splits)
        .into_par_iter()
        .map_init(&scratch, |sc, idx| {
            let (head, s) = (idx / splits, idx % splits);
            let (b, kvh) = (head / hkv, head % hkv);
            let tiles = (s * per).min(ntiles)..((s + 1) * per).min(ntiles);
            run(sc, b, kvh, tiles);
            let (m, l, o) = sc.state();
            (
                m[..rows].to_vec(),
                l[..rows].to_vec(),
                o[..rows * dvp].to_vec(),
            )
        })
        .collect();
    (0..heads).into_par_iter().for_each(|head| {
        let (b, kvh) = (head / hkv, head % hkv);
        let mine = &parts[head * splits..(head + 1) * splits];
        let mut m = vec![A::NEG_INF; rows];
        let mut l = vec![A::ZERO; rows];
        let mut o = vec![A::ZERO; rows * dvp];
        for r in 0..rows {
            let it = mine
                .iter()
                .map(|(pm, pl, po)| (pm[r], pl[r], &po[r * dvp..(r + 1) * dvp]));
            (m[r], l[r]) = merge_into(it, &mut o[r * dvp..(r + 1) * dvp]);
        }
        write_rows(job, b, kvh, 0, q, &m, &l, &o);
    });
}
