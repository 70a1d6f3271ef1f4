//! How a backward call is carried out: the key tile width, the dQ path (one pass with per-item or
//! per-chunk partials, or a second pass over query tiles) and the parallel loops that run the items.

use super::*;
use crate::kernel::args::Dims;
use crate::kernel::dispatch::Isa;
use crate::kernel::dropout::DropMask;
use crate::kernel::gemm::Kern;
use crate::kernel::score::Terms;
use crate::kernel::softmax::Acc;
use crate::kernel::strided::{BiasRef, Strided};
use crate::mask::tiles::{BlockClass, MaskTiles};
use crate::tensor::Float;
use rayon::prelude::*;

/// The key tile width for this call: [`BK_MAX`] unless the mask's partial tiles would make the kernel
/// compute over 5% more pairs than at [`BK_MIN`] (sliding windows and short documents keep 64). Judged on
/// batch 0, head 0 and at most 256 query tiles spread over the rows; it depends on the inputs alone, never
/// on the thread count.
pub(crate) fn kv_tile_width(mask: &dyn MaskTiles, dims: &Dims) -> usize {
    let Dims { b, h, q, k, .. } = *dims;
    if b == 0 || h == 0 || q == 0 || k == 0 {
        return BK_MIN;
    }
    let nqb = q.div_ceil(BQ);
    let area = |bk: usize| -> usize {
        let mut total = 0;
        for qb in (0..nqb).step_by(nqb.div_ceil(256)) {
            let rows = qb * BQ..(qb * BQ + BQ).min(q);
            for t in 0..k.div_ceil(bk) {
                let cols = t * bk..(t * bk + bk).min(k);
                if mask.classify(0, 0, rows.clone(), cols.clone()) != BlockClass::Empty {
                    total += cols.len();
                }
            }
        }
        total
    };
    if area(BK_MAX) * 20 <= area(BK_MIN) * 21 {
        BK_MAX
    } else {
        BK_MIN
    }
}

/// How dQ is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))] // the forced paths are for tests
pub(crate) enum DqPath {
    /// [`DqPath::Split`] when the partial dQs fit [`SPLIT_BUDGET`], else [`DqPath::TwoPass`]; decided by
    /// the shapes alone, so the result never depends on the thread count.
    Auto,
    /// A second pass over query tiles recomputes `P` and `dS` (no extra memory, two more products).
    TwoPass,
    /// The kv pass also forms dQ, into this many partial buffers summed in a fixed order.
    Split(usize),
}

/// Bytes the partial dQs of [`DqPath::Split`] may take.
pub(super) const SPLIT_BUDGET: usize = 256 << 20;
/// Most partial dQs (more would use more memory).
pub(super) const SPLIT_MAX: usize = 4;
/// Work items the split path aims for: below this many `(b, kv head)` pairs, the kv tiles are split into
/// up to [`SPLIT_MAX`] chunks. A constant, not the thread count, so that gradients never depend on it; each
/// extra chunk costs a partial dQ and another packing of the group's rows, so no more are made than needed.
pub(super) const SPLIT_ITEMS: usize = 8;

/// The number of partial dQs [`DqPath::Auto`] uses, or `None` for the two-pass path.
pub(super) fn split_chunks(dims: &Dims, dp: usize, elem: usize, nkb: usize) -> Option<usize> {
    let bytes = dims.b * dims.h * dims.q * dp * elem;
    if bytes == 0 || nkb == 0 {
        return None;
    }
    let wanted = SPLIT_ITEMS.div_ceil(dims.b * dims.hkv).min(SPLIT_MAX);
    let chunks = (SPLIT_BUDGET / bytes).min(wanted).min(nkb);
    (chunks >= 1).then_some(chunks)
}

/// Runs the call on inputs of type `T` with micro-kernel `K` (whose features the CPU has: see
/// [`backward_with`]).
pub(super) fn run<T: Float, K: Isa>(
    args: &AttentionGradArgs,
    chk: &Checked,
    tuning: Resolved,
) -> Result<()> {
    let (strategy, bk) = (tuning.dq, tuning.bk);
    type A<K> = <K as Kern>::A;
    let dims = chk.dims;
    let terms = (!args.score.is_empty())
        .then(|| Terms::<A<K>>::new(&args.score, &dims))
        .transpose()?;
    let slot = dims.q + bk - 1;
    let nkb_all = dims.k.div_ceil(bk);
    let mut dist_parts: Vec<A<K>> = match args.grad_score_distance {
        None => Vec::new(),
        Some(_) => {
            let len = crate::memory::product(&[dims.b, dims.h, nkb_all, slot]);
            let what = "the partial gradients of the score's distance terms";
            let bytes = len.and_then(|n| n.checked_mul(std::mem::size_of::<A<K>>()));
            crate::memory::check("score_distance", what, bytes)?;
            crate::memory::zeroed(len.unwrap_or(0), what)?
        }
    };
    let term_grads =
        (args.grad_score_distance.is_some() || args.grad_score_key.is_some()).then(|| {
            TermGrads {
                dist: args
                    .grad_score_distance
                    .map(|_| Slots(dist_parts.as_mut_ptr())),
                slot,
                // Viewed as [B, H, 1, K], so that a row of columns is the fourth index.
                key: args.grad_score_key.map(|t| {
                    let mut out = AnyOut::of(t);
                    out.st = [out.st[0], out.st[1], 0, out.st[2]];
                    out
                }),
            }
        });
    let mut job = Job::<T, A<K>> {
        dims,
        q: Strided::of(args.query),
        k: Strided::of(args.key),
        v: Strided::of(args.value),
        out: Strided::of(args.out),
        dout: Strided::of(args.grad_out),
        lse_in: Strided::of(args.lse),
        grad_lse: args.grad_lse.map(Strided::of),
        dq: Strided::of(args.grad_query),
        dk: Strided::of(args.grad_key),
        dv: Strided::of(args.grad_value),
        bias: args.bias.zip(chk.bias_strides).map(|(t, st)| BiasRef {
            ptr: t.as_ptr(),
            dtype: t.dtype(),
            st,
        }),
        grad_bias: args.grad_bias.map(AnyOut::of),
        sinks: args.sinks.map(read_sinks),
        mask: args.mask,
        scale: A::<K>::from_f64(args.scale),
        softcap: args
            .softcap
            .map(|c| (A::<K>::from_f64(c), A::<K>::from_f64(1.0 / c))),
        drop: DropMask::new(args.dropout, dims.h, dims.q),
        terms,
        term_grads,
        shift: Vec::new(),
        norm: Vec::new(),
        delta: Vec::new(),
        dp: dims.d.div_ceil(16) * 16,
        dvp: dims.dv.div_ceil(16) * 16,
        bk,
    };
    threads::install(chk.threads, || {
        kv_and_q_passes::<T, K>(args, &mut job, strategy, tuning)
    })?;
    if let Some(out) = args.grad_score_distance {
        // Viewed as [H, 1, 1, span], so that a row is the fourth index.
        let mut out = AnyOut::of(out);
        out.st = [out.st[0], 0, 0, out.st[1]];
        reduce_distance_grads(&job, &dist_parts, out);
    }
    Ok(())
}

/// Sums the kv items' distance-gradient slots into `out` (`[H, Q + K - 1]`), in a fixed order (batch, then
/// kv tile), so the result never depends on the thread count.
fn reduce_distance_grads<T, A: Acc>(job: &Job<T, A>, parts: &[A], out: AnyOut) {
    let Dims {
        b: nb,
        h,
        hkv,
        g,
        q,
        k,
        ..
    } = job.dims;
    let (span, slot, nkb) = (crate::kernel::score::span(q, k), q + job.bk - 1, job.nkb());
    let mut acc = vec![A::ZERO; span];
    for hh in 0..h {
        let (kvh, gi) = (hh / g, hh % g);
        acc.fill(A::ZERO);
        for b in 0..nb {
            for kb in 0..nkb {
                let c0 = kb * job.bk;
                let base = (((b * hkv + kvh) * nkb + kb) * g + gi) * slot;
                let len = slot.min(span - c0);
                for (x, &y) in acc[c0..c0 + len].iter_mut().zip(&parts[base..base + len]) {
                    *x = *x + y;
                }
            }
        }
        // SAFETY: row hh of the [H, span] output; this thread is its only writer.
        unsafe { out.write_row([hh, 0, 0, 0], &acc) };
    }
}

/// The passes after validation: row statistics, then the kv items (dK, dV and the terms' gradients) and dQ
/// by the chosen path.
fn kv_and_q_passes<T: Float, K: Isa>(
    args: &AttentionGradArgs,
    job: &mut Job<T, <K as Kern>::A>,
    strategy: DqPath,
    tuning: Resolved,
) {
    type A<K> = <K as Kern>::A;
    let dims = job.dims;
    let Dims {
        b: nb, h, hkv, q, ..
    } = dims;
    let zero = A::<K>::ZERO;
    let init = |job: &Job<T, A<K>>| (Scratch::<K>::new(job), Packed::<K::E>::new());
    {
        let rows = nb * h * q;
        let mut shift = vec![zero; rows];
        let mut norm = vec![zero; rows];
        let mut delta = vec![zero; rows];
        if q > 0 {
            shift
                .par_chunks_mut(q)
                .zip(norm.par_chunks_mut(q))
                .zip(delta.par_chunks_mut(q))
                .enumerate()
                .for_each_init(
                    || init(job),
                    |(sc, pk), (bh, ((s, nm), dl))| {
                        // SAFETY: `K` is only chosen when the CPU has its features (`backward_with`).
                        unsafe {
                            K::enter(StatsItem::<T, K> {
                                job,
                                sc,
                                rows: pk,
                                b: bh / h,
                                h: bh % h,
                                shift: s,
                                norm: nm,
                                delta: dl,
                            })
                        }
                    },
                );
        }
        (job.shift, job.norm, job.delta) = (shift, norm, delta);
        let job = &*job;
        if let (Some(gs), Some(sinks)) = (args.grad_sinks.map(AnyOut::of), &job.sinks) {
            for (hh, &sink) in sinks.iter().enumerate() {
                let mut acc = 0.0f64;
                for b in 0..nb {
                    for i in 0..q {
                        let row = job.row(b, hh, i);
                        let shift = job.shift[row].to_f64();
                        if shift.is_finite() {
                            acc += (sink - shift).exp()
                                * job.norm[row].to_f64()
                                * job.delta[row].to_f64();
                        }
                    }
                }
                let grad = if acc == 0.0 { 0.0 } else { -acc };
                // SAFETY: hh < H, the only dim of grad_sinks; this thread is its only writer.
                unsafe { gs.write_row([hh, 0, 0, 0], &[grad]) };
            }
        }
        let nkb = job.nkb();
        let chunks = match strategy {
            DqPath::Auto => split_chunks(&dims, job.dp, std::mem::size_of::<A<K>>(), nkb),
            DqPath::TwoPass => None,
            DqPath::Split(p) => Some(p.clamp(1, nkb.max(1))),
        };
        let (g, qpad) = (dims.g, q.next_multiple_of(2));
        // The query and dO rows of one GQA group, packed once per item (when they fit the budget).
        let whole_group = Packed::<K::E>::group_fits::<K, T>(job, tuning.pack_budget);
        let pack_group = |pk: &mut Packed<K::E>, b: usize, kvh: usize| {
            pk.per_tile = !whole_group;
            if whole_group {
                for gi in 0..g {
                    pk.pack::<K, T>(job, b, kvh * g + gi, 0, q, gi * qpad, true);
                }
            }
        };
        let per = g * qpad * job.dp; // one group's rows of one partial dQ
        if chunks == Some(1) && per > 0 && nkb > 0 {
            // One pass, one item per (b, kvh): the item owns its group's dQ rows outright, so it accumulates
            // them in a buffer of its own (reused across items) and writes them when done.
            (0..nb * hkv).into_par_iter().for_each_init(
                || (init(job), vec![zero; per]),
                |((sc, pk), dq), bh| {
                    let (b, kvh) = (bh / hkv, bh % hkv);
                    pack_group(pk, b, kvh);
                    dq.fill(zero);
                    for kb in 0..nkb {
                        // SAFETY: as above.
                        unsafe {
                            K::enter(KvItem::<T, K> {
                                job,
                                sc,
                                rows: pk,
                                b,
                                kvh,
                                kb,
                                dq: Some(&mut dq[..]),
                            })
                        };
                    }
                    for gi in 0..g {
                        let rows = &dq[gi * qpad * job.dp..];
                        // SAFETY: rows 0..Q of (b, kvh * g + gi) are in range and belong to this item alone.
                        unsafe {
                            write_rows(
                                &job.dq,
                                b,
                                kvh * g + gi,
                                0,
                                q,
                                dims.d,
                                rows,
                                job.dp,
                                job.scale,
                            )
                        };
                    }
                },
            );
            return;
        }
        if let Some(chunks) = chunks.filter(|_| per > 0 && nkb > 0) {
            // One pass: item (chunk, b, kvh) owns kv tiles kb ≡ chunk (mod chunks) (interleaved, so causal
            // work is balanced) and its own partial dQ; the partials are summed in chunk order.
            let mut part = vec![zero; chunks * nb * hkv * per];
            part.par_chunks_mut(per).enumerate().for_each_init(
                || init(job),
                |(sc, pk), (idx, dq)| {
                    let (chunk, bh) = (idx / (nb * hkv), idx % (nb * hkv));
                    pack_group(pk, bh / hkv, bh % hkv);
                    for kb in (chunk..nkb).step_by(chunks) {
                        // SAFETY: as above.
                        unsafe {
                            K::enter(KvItem::<T, K> {
                                job,
                                sc,
                                rows: pk,
                                b: bh / hkv,
                                kvh: bh % hkv,
                                kb,
                                dq: Some(&mut *dq),
                            })
                        };
                    }
                },
            );
            let part = &part;
            (0..nb * h).into_par_iter().for_each(|bh| {
                let (b, hh) = (bh / h, bh % h);
                let (kvh, gi) = (hh / g, hh % g);
                let mut acc = vec![zero; q * job.dp];
                for chunk in 0..chunks {
                    let base = ((chunk * nb + b) * hkv + kvh) * per + gi * qpad * job.dp;
                    for (x, &y) in acc.iter_mut().zip(&part[base..base + q * job.dp]) {
                        *x = *x + y;
                    }
                }
                // SAFETY: rows 0..Q of (b, hh) are in range and belong to this item alone.
                unsafe { write_rows(&job.dq, b, hh, 0, q, dims.d, &acc, job.dp, job.scale) };
            });
            return;
        }
        (0..nb * hkv * nkb).into_par_iter().for_each_init(
            || (init(job), usize::MAX),
            |((sc, pk), packed_for), idx| {
                let (bh, kb) = (idx / nkb, idx % nkb);
                if *packed_for != bh {
                    pack_group(pk, bh / hkv, bh % hkv);
                    *packed_for = bh;
                }
                // SAFETY: as above.
                unsafe {
                    K::enter(KvItem::<T, K> {
                        job,
                        sc,
                        rows: pk,
                        b: bh / hkv,
                        kvh: bh % hkv,
                        kb,
                        dq: None,
                    })
                };
            },
        );
        let nqb = job.nqb();
        // Largest first: under a causal mask the last query tiles see the most keys.
        (0..nb * h * nqb).into_par_iter().for_each_init(
            || init(job),
            |(sc, pk), idx| {
                let (bh, qb) = (idx / nqb, nqb - 1 - idx % nqb);
                // SAFETY: as above.
                unsafe {
                    K::enter(QItem::<T, K> {
                        job,
                        sc,
                        rows: pk,
                        b: bh / h,
                        h: bh % h,
                        qb,
                    })
                };
            },
        );
    }
}
