//! Decode (a single query block per kv head): on AVX-512 each item reads K and V rows in place
//! ([`super::decode_avx512`]); elsewhere it streams its kv tiles through the packed path, packing each as it
//! goes. When there are too few items to fill the threads, the kv length is split and the partial
//! (m, l, O) are merged by log-sum-exp.

use std::ops::Range;

use rayon::prelude::*;

use super::item::{Entry, KvSrc, Scratch};
use super::tile::{Job, write_rows};
use crate::kernel::args::Dims;
use crate::kernel::gemm::Kern;
use crate::kernel::softmax::{Acc, merge_into};
use crate::tensor::Float;

/// The state `(m, l, O)` of an item's rows over part of the key range.
type Partial<A> = (Vec<A>, Vec<A>, Vec<A>);

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
impl State<f32> for super::decode_avx512::Scratch {
    fn state(&self) -> (&[f32], &[f32], &[f32]) {
        (&self.m, &self.l, &self.o)
    }
}

pub(super) fn decode<K: Entry, T: Float>(job: &Job<T>, threads: usize) {
    #[cfg(target_arch = "x86_64")]
    if K::AVX512 && super::decode_avx512::applies(job) {
        // bf16 pairs: the AVX-512 BF16 kernel, whose CPU has `vdpbf16ps`.
        let dot = K::PAIR == 2;
        let scratch = || super::decode_avx512::Scratch::new(job, dot);
        // SAFETY: `K::AVX512` says `Backend::resolve` found AVX-512F/BW/VL (and BF16 when `dot`) on this CPU;
        // `applies` holds; the scratch was made with the same `dot`.
        let run = |sc: &mut _, b, kvh, tiles| unsafe {
            super::decode_avx512::item::<T>(job, b, kvh, tiles, sc, dot)
        };
        return split_kv::<f32, T, _>(job, threads, scratch, run);
    }
    // SAFETY: `K` was chosen by `Backend::resolve` for this CPU.
    let run = |sc: &mut Scratch<K>, b, kvh, tiles| unsafe {
        K::item::<T>(job, b, kvh, 0, job.q_len(b), tiles, KvSrc::Stream, sc)
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
    let Dims { b: nb, hkv, g, .. } = job.dims;
    let ntiles = job.ntiles();
    let heads = nb * hkv;
    let dvp = job.dvp;
    // Enough pieces to keep every thread busy, none shorter than two tiles.
    let splits = (4 * threads).div_ceil(heads).clamp(1, (ntiles / 2).max(1));
    // Rows of a batch item's GQA group; a ragged sequence without rows is skipped.
    let rows_of = |b: usize| g * job.q_len(b);
    if splits == 1 {
        (0..heads)
            .into_par_iter()
            .for_each_init(&scratch, |sc, idx| {
                let (b, kvh) = (idx / hkv, idx % hkv);
                let (q, rows) = (job.q_len(b), rows_of(b));
                if q == 0 {
                    return;
                }
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
            let rows = rows_of(b);
            let tiles = (s * per).min(ntiles)..((s + 1) * per).min(ntiles);
            if rows == 0 {
                return (Vec::new(), Vec::new(), Vec::new());
            }
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
        let (q, rows) = (job.q_len(b), rows_of(b));
        if q == 0 {
            return;
        }
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
