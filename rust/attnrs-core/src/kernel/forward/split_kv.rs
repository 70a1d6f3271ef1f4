//! Decode (a single query block per kv head): on AVX-512 each item reads K and V rows in place
//! ([`super::decode_avx512`]); elsewhere it streams its kv tiles through the packed path, packing each as it
//! goes. When there are too few items to fill the threads, the kv length is split and the partial
//! (m, l, O) are merged by log-sum-exp.

use std::ops::Range;

use super::item::{Entry, KvSrc, Scratch};
use super::tile::{BC, Job, write_rows};
use crate::kernel::args::Dims;
use crate::kernel::gemm::Kern;
use crate::kernel::softmax::{Acc, merge_into};
use crate::tensor::Float;
use crate::threads;

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

/// K and V bytes below which a decode call runs on the calling thread alone. Waking a pool worker and waiting
/// for the part it took costs more than reading that much: on a 2-vCPU virtual machine (Zen 4) two threads
/// were slower than one up to 1-2 MiB of K/V, by about 100 µs per call at one key.
pub(crate) const SERIAL_KV_BYTES: usize = 1 << 20;

/// The K and V bytes a decode call reads: every sequence's keys, every kv head.
fn kv_bytes<T>(job: &Job<T>) -> usize {
    let keys: usize = (0..job.dims.b).map(|b| job.k_len(b)).sum();
    keys * job.dims.hkv * (job.dims.d + job.dims.dv) * std::mem::size_of::<T>()
}

#[cfg(test)]
thread_local! {
    /// The threshold tests of this thread run under: 0 (every decode parallel, so the small shapes of the
    /// tests cover the split paths) unless a test sets [`SERIAL_KV_BYTES`].
    pub(crate) static SERIAL_KV_BYTES_IN_TESTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The threads a decode call uses: one below [`SERIAL_KV_BYTES`] of K and V, else `threads`.
fn decode_threads<T>(job: &Job<T>, threads: usize) -> usize {
    #[cfg(not(test))]
    let serial_below = SERIAL_KV_BYTES;
    #[cfg(test)]
    let serial_below = SERIAL_KV_BYTES_IN_TESTS.with(|t| t.get());
    if kv_bytes(job) < serial_below {
        1
    } else {
        threads
    }
}

/// Pieces each of `units` independent units' `ntiles` kv tiles is split into: enough to keep every thread busy,
/// none shorter than two tiles; one thread takes whole units.
fn splits(threads: usize, units: usize, ntiles: usize) -> usize {
    if threads == 1 {
        1
    } else {
        (4 * threads).div_ceil(units).clamp(1, (ntiles / 2).max(1))
    }
}

pub(super) fn decode<K: Entry, T: Float>(job: &Job<T>, threads: usize) {
    let threads = decode_threads(job, threads);
    #[cfg(target_arch = "x86_64")]
    if K::AVX512 && super::decode_avx512::applies(job) {
        // bf16 inputs of a bf16-pair family: the `vdpbf16ps` kernel, whose CPU has it. f32 inputs of such a
        // family (F32Precision::Medium) keep exact f32 products here: decode is bound by reading K and V.
        let dot = K::PAIR == 2 && T::DTYPE == crate::tensor::DType::BF16;
        let scratch = || super::decode_avx512::Scratch::new(job, dot);
        // SAFETY: `K::AVX512` says `Backend::resolve` found AVX-512F/BW/VL (and BF16 when `dot`) on this CPU;
        // `applies` holds; the scratch was made with the same `dot`.
        let run = |sc: &mut _, b, kvh, tiles| unsafe {
            super::decode_avx512::item::<T>(job, b, kvh, tiles, sc, dot)
        };
        return split_kv::<f32, T, _>(job, threads, scratch, run);
    }
    if job.dims.hkv > 1 && job.k.st[1].abs() < job.k.st[2].abs() {
        return heads_together::<K, T>(job, threads);
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
    let splits = splits(threads, heads, ntiles);
    // Rows of a batch item's GQA group; a ragged sequence without rows is skipped.
    let rows_of = |b: usize| g * job.q_len(b);
    if splits == 1 {
        threads::for_each_init(heads, threads, &scratch, |sc, idx| {
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
    let parts: Vec<Partial<A>> = threads::map_init(heads * splits, threads, &scratch, |sc, idx| {
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
    });
    threads::for_each_init(
        heads,
        threads,
        || (),
        |_, head| {
            let (b, kvh) = (head / hkv, head % hkv);
            merge_and_write(job, b, kvh, &parts[head * splits..(head + 1) * splits]);
        },
    );
}

/// Merges the partial states of `(b, kvh)`'s rows by log-sum-exp and writes them.
fn merge_and_write<A: Acc, T: Float>(job: &Job<T>, b: usize, kvh: usize, mine: &[Partial<A>]) {
    let (q, dvp) = (job.q_len(b), job.dvp);
    let rows = job.dims.g * q;
    if q == 0 {
        return;
    }
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
}

/// Decode over token-major K/V (a paged pool, packed varlen rows, a `[B, L, Hkv, D]` view), where a token's rows
/// of all kv heads sit together: one work item takes every kv head of its sequence, tile by tile, so each tile's
/// tokens are read while their pages are in the TLB and their neighbouring lines in cache, instead of one head
/// over the whole sequence at a time (a stride of `Hkv·D` that defeats the prefetchers). The keys are split over
/// threads as in [`split_kv`] when there are few sequences.
fn heads_together<K: Entry, T: Float>(job: &Job<T>, threads: usize) {
    let Dims { b: nb, hkv, .. } = job.dims;
    let ntiles = job.ntiles();
    let splits = splits(threads, nb, ntiles);
    let per = ntiles.div_ceil(splits);
    let rows_of = |b: usize| job.dims.g * job.q_len(b);
    let scratch = || (0..hkv).map(|_| Scratch::<K>::new(job)).collect::<Vec<_>>();
    // One unit: a sequence's split of tiles, every kv head; its partial states, one per kv head.
    let parts: Vec<Vec<Partial<K::A>>> =
        threads::map_init(nb * splits, threads, scratch, |scs, idx| {
            let (b, s) = (idx / splits, idx % splits);
            let (q, rows) = (job.q_len(b), rows_of(b));
            if q == 0 {
                return Vec::new();
            }
            let tiles = (s * per).min(ntiles)..((s + 1) * per).min(ntiles);
            for (kvh, sc) in scs.iter_mut().enumerate() {
                sc.resume = false;
                // SAFETY: `K` was chosen by `Backend::resolve` for this CPU. An empty range only starts the state.
                unsafe {
                    K::item::<T>(
                        job,
                        b,
                        kvh,
                        0,
                        q,
                        tiles.start..tiles.start,
                        KvSrc::Stream,
                        sc,
                    )
                };
                sc.resume = true;
            }
            for t in tiles {
                prefetch_tile(job, b, t + 1);
                for (kvh, sc) in scs.iter_mut().enumerate() {
                    // SAFETY: as above; the scratch holds this (b, kvh)'s rows, resumed.
                    unsafe { K::item::<T>(job, b, kvh, 0, q, t..t + 1, KvSrc::Stream, sc) };
                }
            }
            scs.iter()
                .map(|sc| {
                    let (m, l, o) = sc.state();
                    (
                        m[..rows].to_vec(),
                        l[..rows].to_vec(),
                        o[..rows * job.dvp].to_vec(),
                    )
                })
                .collect()
        });
    threads::for_each_init(
        nb * hkv,
        threads,
        || (),
        |_, head| {
            let (b, kvh) = (head / hkv, head % hkv);
            let mine: Vec<Partial<K::A>> = (0..splits)
                .filter_map(|s| parts[b * splits + s].get(kvh).cloned())
                .collect();
            merge_and_write(job, b, kvh, &mine);
        },
    );
}

/// Asks the CPU to fetch the K and V rows of tile `t` of sequence `b`, every kv head, in address order (each
/// token's heads are one contiguous span): a hint that lets the next tile's reads, which go head by head, hit
/// cache. Never faults; a no-op off x86-64 or past the sequence's keys.
#[inline]
fn prefetch_tile<T: Float>(job: &Job<T>, b: usize, t: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        let klen = job.k_len(b);
        let Dims { hkv, d, dv, .. } = job.dims;
        let size = std::mem::size_of::<T>() as isize;
        for (view, width) in [(&job.k, d), (&job.v, dv)] {
            let span = ((hkv as isize - 1) * view.st[1] + width as isize * view.st[3]) * size;
            for j in (t * BC)..((t + 1) * BC).min(klen) {
                // SAFETY: `j` is a key of sequence `b` (below its length), so `at` addresses its row.
                let row = unsafe { view.at(b, 0, j, 0) }.cast::<i8>().cast_const();
                for off in (0..span.max(1)).step_by(64) {
                    // SAFETY: a prefetch is a hint: it never faults and never changes memory.
                    unsafe { _mm_prefetch::<_MM_HINT_T1>(row.wrapping_offset(off)) };
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (job, b, t);
}
