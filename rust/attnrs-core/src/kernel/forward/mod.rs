//! The forward pass: from validated arguments to the typed [`tile::Job`], then prefill ([`prefill`]) or
//! split-KV decode ([`split_kv`]) on the micro-kernel family `select!` picks.

#[cfg(target_arch = "x86_64")]
pub(crate) mod decode_avx512;
mod item;
mod prefill;
pub(crate) mod split_kv;
pub(crate) mod tile;

pub(crate) use tile::ROWS;

use super::AttentionArgs;
use super::args::Checked;
use super::args::Dims;
use super::dispatch::{Backend, select};
use super::dropout::DropMask;
use super::ragged::{KeyRows, Ragged};
use super::score::AnyTerms;
use super::strided::{BiasRef, Rows, Strided, read_sinks};
use crate::tensor::Float;
use crate::{Result, threads};
use item::Entry;
use tile::{Job, round_up};

/// Validated arguments in, output written.
/// `rows` is the number of query rows (all heads of a group) a work item aims for ([`ROWS`]; tests shrink it).
/// A ragged call (`ragged`, checked against the batch-1 views of `args`) runs its sequences as the batch.
pub(crate) fn run(
    args: &AttentionArgs,
    plan: &Checked,
    backend: Backend,
    rows: usize,
    ragged: Option<&Ragged>,
) -> Result<()> {
    select!(plan.dtype, backend, go(args, plan, rows, ragged))
}

/// Runs the call with kernel family `K` on inputs of type `T`. Only called with a `K` whose features the CPU
/// has (see `select!`).
fn go<K: Entry, T: Float>(
    args: &AttentionArgs,
    plan: &Checked,
    rows: usize,
    ragged: Option<&Ragged>,
) -> Result<()> {
    let dims = match ragged {
        Some(r) => Dims {
            b: r.q_len.len(),
            q: r.max_q(),
            k: r.max_k(),
            ..plan.dims
        },
        None => plan.dims,
    };
    if dims.is_empty() {
        return Ok(());
    }
    let bq = rows.div_ceil(dims.g).clamp(1, dims.q.max(1));
    let (q_rows, k_rows) = match ragged {
        Some(r) => (
            Rows::Packed(r.q_start.as_ptr()),
            match &r.keys {
                KeyRows::Packed(start) => Rows::Packed(start.as_ptr()),
                KeyRows::Paged {
                    pages,
                    per_seq,
                    page,
                } => Rows::Paged {
                    pages: pages.as_ptr(),
                    per_seq: *per_seq,
                    page: *page,
                },
            },
        ),
        None => (Rows::Batched, Rows::Batched),
    };
    // SAFETY: the tables live in `ragged`, which outlives the job; `Ragged` was checked against these views,
    // so every (sequence, row) the loops pass (rows below `q_len`, keys below `k_len`) lies inside them.
    let (q, k, v, out, lse) = unsafe {
        (
            Strided::of(args.query).with_rows(q_rows),
            Strided::of(args.key).with_rows(k_rows),
            Strided::of(args.value).with_rows(k_rows),
            Strided::of(args.out).with_rows(q_rows),
            args.lse.map(|t| {
                let mut s = Strided::of(t);
                s.st[3] = 0;
                s.with_rows(q_rows)
            }),
        )
    };
    let job = Job::<T> {
        dims,
        q,
        k,
        v,
        out,
        lse,
        bias: args.bias.zip(plan.bias_strides).map(|(t, st)| BiasRef {
            ptr: t.as_ptr(),
            dtype: t.dtype(),
            st,
        }),
        sinks: args.sinks.map(read_sinks),
        mask: match ragged {
            Some(r) => &r.window,
            None => args.mask,
        },
        scale: plan.scale,
        softcap: plan.softcap,
        terms: AnyTerms::new::<K::A>(&args.score, &dims)?,
        drop: DropMask::new(args.dropout, dims.h, dims.q),
        bq,
        dp: round_up(dims.d, 2),
        dvp: round_up(dims.dv, 16),
        ragged,
        avx512: K::AVX512,
    };
    threads::install(plan.threads, || {
        if job.nqb() == 1 {
            split_kv::decode::<K, T>(&job, plan.threads)
        } else {
            prefill::prefill::<K, T>(&job)
        }
    })
}
