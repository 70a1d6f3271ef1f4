//! Prefill (more than one query block per kv head): K and V of a group of kv heads are packed once into
//! tiles, then every (kv head, query block) item runs over them in the private pool.

use rayon::prelude::*;

use super::item::{Entry, KvSrc, Scratch};
use super::tile::{BC, Job, write_rows};
use crate::kernel::args::Dims;
use crate::tensor::Float;

/// Bytes of packed K/V held at once by the prefill path.
const PACK_BUDGET: usize = 64 << 20;

pub(super) fn prefill<K: Entry, T: Float>(job: &Job<T>) {
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
                    if (idx % ntiles) * BC >= job.k_len(b) {
                        return; // past a ragged sequence's keys: never read, left as zeros
                    }
                    // SAFETY: `K` was chosen by `Backend::resolve` for this CPU.
                    unsafe { K::pack::<T>(job, b, kvh, idx % ntiles, dst, stage) };
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
                let q1 = (q0 + job.bq).min(job.q_len(b));
                if q0 >= q1 {
                    return; // past a ragged sequence's rows
                }
                let all = &packed[hi * ntiles * tile_len..(hi + 1) * ntiles * tile_len];
                // SAFETY: as above.
                unsafe { K::item::<T>(job, b, kvh, q0, q1, 0..ntiles, KvSrc::Packed(all), sc) };
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
